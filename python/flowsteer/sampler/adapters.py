"""Model adapters: what the rollout loop needs from a model, one small class per model family.

To add a model, subclass ModelAdapter and implement encode, model_inputs, initial_latents,
schedule, velocity and (optionally) decode. The loop never looks inside the model.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .schedule import dynamic_shift_mu, scheduler_sigmas, shifted_sigmas

Tensor = torch.Tensor
Cond = Dict[str, Any]


def _gather(cond: Cond, index: Tensor) -> Cond:
    """Rows of every tensor in cond (leading dim = prompts) for the samples in index."""
    return {k: (v.index_select(0, index.to(v.device)) if torch.is_tensor(v) else v) for k, v in cond.items()}


class ModelAdapter:
    """The interface of flowsteer.sample to a model.

    Conditioning is encoded once per prompt (`encode`, leading dim P), gathered once per batch
    composition into the model's inputs (`model_inputs`, with the CFG batch already concatenated),
    and reused at every step, so the step loop does no per-sample work on the host.
    """

    #: "image" or "video" (what decode returns)
    modality = "image"

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def encode(self, prompts: List[str], guidance_scale: float) -> Cond:
        raise NotImplementedError

    def model_inputs(self, cond: Cond, index: Tensor, guidance_scale: float) -> Cond:
        return _gather(cond, index)

    def prepare(self, **size) -> None:
        """Set up what depends on the output size (height, width, num_frames); called by sample
        and evaluate before anything else. Default: nothing."""

    def initial_latents(self, n: int, generator: torch.Generator, **size) -> Tensor:
        raise NotImplementedError

    def schedule(self, num_steps: int, latents: Tensor) -> Tuple[List[float], Tensor]:
        """(sigmas: num_steps + 1 floats from 1 to 0, timesteps: [num_steps] on self.device).
        sample and evaluate call it before velocity, which may rely on what it sets up."""
        raise NotImplementedError

    def velocity(self, x: Tensor, step, timesteps: Tensor, sigma, inputs: Cond, guidance_scale: float) -> Tensor:
        """The (CFG-combined) velocity of the rows x at schedule step `step`: an int, or, when
        evaluate is given one step per sample, an int64 CPU tensor [n] of one step per row (then
        sigma is a list of n floats). `step_timesteps` gives the rows' timesteps either way."""
        raise NotImplementedError

    def expert(self, step: int) -> int:
        """Which of the model's networks runs step `step` (after schedule); rows of one velocity
        call with per-row steps share it. Default: one network."""
        return 0

    def decode(self, latents: Tensor, **size) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot decode; pass decode=False")

    @property
    def can_decode(self) -> bool:
        return True

    def like(self, model) -> "ModelAdapter":
        """An adapter for another model given to evaluate (the policy after training, or a frozen
        reference pipeline) with this adapter's settings; an adapter is returned as it is."""
        return as_adapter(model)

    def lora_disabled(self):
        """A context in which velocity runs the base model, its LoRA adapters switched off: the
        reference model of LoRA training (`evaluate(..., ref_model="base")`)."""
        raise ValueError(f"{type(self).__name__} has no LoRA adapters to switch off; pass ref_model as a "
                         "pipeline or adapter")


class CallableAdapter(ModelAdapter):
    """A bare `velocity_fn(x, sigma, cond) -> v`: sigma is an fp32 [B] tensor, cond the rows of
    the user's per-prompt conditioning (a tensor [P, ...], a dict of them, or None) for the batch."""

    def __init__(self, velocity_fn: Callable, latent_shape: Sequence[int], cond: Any = None,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32, shift: float = 1.0,
                 decode_fn: Optional[Callable] = None):
        if not callable(velocity_fn):
            raise TypeError(f"velocity_fn must be callable (got {type(velocity_fn).__name__})")
        if latent_shape is None or len(latent_shape) < 1:
            raise ValueError("a bare velocity function needs latent_shape=(C, H, W) or (C, F, H, W)")
        self.fn = velocity_fn
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.user_cond = cond
        self._device = torch.device(device) if device is not None else _infer_device(cond)
        self.dtype = dtype
        self.shift = shift
        self.decode_fn = decode_fn
        self.modality = "video" if len(self.latent_shape) == 4 else "image"

    @property
    def device(self):
        return self._device

    def encode(self, prompts, guidance_scale):
        cond = self.user_cond
        if cond is None:
            return {}
        tensors = cond if isinstance(cond, dict) else {"cond": cond}
        for k, v in tensors.items():
            if torch.is_tensor(v) and v.shape[0] != len(prompts):
                raise ValueError(f"cond{'' if k == 'cond' else '[' + repr(k) + ']'} has {v.shape[0]} rows for {len(prompts)} prompts; "
                                 "give one row per prompt")
        return dict(tensors)

    def model_inputs(self, cond, index, guidance_scale):
        rows = _gather(cond, index)
        if isinstance(self.user_cond, dict) or self.user_cond is None:
            return {"cond": rows if rows else None}
        return {"cond": rows["cond"]}

    def initial_latents(self, n, generator, **size):
        return torch.randn((n,) + self.latent_shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)

    def schedule(self, num_steps, latents):
        sigmas = shifted_sigmas(num_steps, self.shift)
        return sigmas, torch.tensor(sigmas[:-1], dtype=torch.float32, device=self.device)

    def velocity(self, x, step, timesteps, sigma, inputs, guidance_scale):
        return self.fn(x, step_timesteps(timesteps, step, x.shape[0]), inputs["cond"])

    def lora_disabled(self):
        if not isinstance(self.fn, torch.nn.Module):
            return super().lora_disabled()
        return lora_layers_off([self.fn])

    def like(self, model):
        """A velocity function given to evaluate (a frozen reference, say) runs with this adapter's
        latent shape, conditioning, schedule and decoder."""
        if isinstance(model, ModelAdapter):
            return model
        if model is self.fn:
            return self
        if not callable(model):
            raise TypeError(f"model must be a velocity function or an adapter (got {type(model).__name__})")
        return CallableAdapter(model, self.latent_shape, cond=self.user_cond, device=self._device, dtype=self.dtype,
                               shift=self.shift, decode_fn=self.decode_fn)

    @property
    def can_decode(self):
        return self.decode_fn is not None

    def decode(self, latents, **size):
        if self.decode_fn is None:
            return super().decode(latents)
        return self.decode_fn(latents)


@contextlib.contextmanager
def lora_layers_off(nets):
    """peft LoRA layers (`inject_adapter_in_model`) of the modules `nets` switched off for the
    context, each back as it was afterwards: the LoRA-off reference of a plain nn.Module."""
    layers = [m for net in nets for m in net.modules()
              if hasattr(m, "enable_adapters") and hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]
    if not layers:
        raise ValueError("ref_model='base' needs LoRA adapters (peft) on the model; none were found")
    was_off = [bool(m.disable_adapters) for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, off in zip(layers, was_off):
            m.enable_adapters(not off)


class _DiffusersAdaptersOff:
    def __init__(self, net):
        self.net = net

    def __enter__(self):
        self.net.disable_adapters()

    def __exit__(self, *exc):
        self.net.enable_adapters()
        return False


def step_timesteps(timesteps: Tensor, step, n: int) -> Tensor:
    """The timesteps [n] of n rows at `step`: one schedule index (an int) or one per row ([n])."""
    if isinstance(step, int):
        return timesteps[step].expand(n)
    return timesteps[step.to(timesteps.device)]


def _infer_device(cond) -> torch.device:
    if torch.is_tensor(cond):
        return cond.device
    if isinstance(cond, dict):
        for v in cond.values():
            if torch.is_tensor(v):
                return v.device
    return torch.device("cpu")


def cfg_velocity(transformer, x: Tensor, guidance_scale: float, scale: Optional[float] = None, **inputs) -> Tensor:
    """One forward of the CFG batch [x; x] (inputs hold [uncond; cond]), combined as
    v_uncond + s (v_cond - v_uncond) with s = scale (default guidance_scale); a plain forward when
    guidance_scale <= 1. The timestep has one row per row of x ([B] or per token [B, seq])."""
    cfg = guidance_scale > 1.0
    x_in = torch.cat([x, x]) if cfg else x
    timestep = inputs.pop("timestep")
    if cfg:
        timestep = torch.cat([timestep, timestep])
    v = transformer(hidden_states=x_in, timestep=timestep, return_dict=False, **inputs)[0]
    if cfg:
        v_uncond, v_text = v.chunk(2)
        v = v_uncond + (guidance_scale if scale is None else scale) * (v_text - v_uncond)
    return v


class _PipelineAdapter(ModelAdapter):
    #: T5 tokens the pipeline's own __call__ uses by default
    default_max_sequence_length = 256
    #: the diffusers pipeline class this adapter wraps
    pipeline_class = ""

    def __init__(self, pipe, compile: bool = False, max_sequence_length: Optional[int] = None,
                 negative_prompt: str = ""):
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string (got {type(negative_prompt).__name__})")
        self.pipe = pipe
        self.compile = compile
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.negative_prompt = negative_prompt
        self._device, self._device_key = None, None
        self._compiled: Dict[str, Tuple[Any, Any]] = {}

    def _module(self, name: str):
        """pipe.<name> as it is now (a trainer may have wrapped it in LoRA since), compiled once per
        module object when compile=True."""
        module = getattr(self.pipe, name, None)
        if not self.compile or module is None:
            return module
        cached = self._compiled.get(name)
        if cached is None or cached[0] is not module:
            cached = self._compiled[name] = (module, torch.compile(module))
        return cached[1]

    @property
    def transformer(self):
        return self._module("transformer")

    def _settings(self) -> Dict[str, Any]:
        """What, beyond the weights, decides this adapter's velocity (for `like`)."""
        return dict(max_sequence_length=self.max_sequence_length, negative_prompt=self.negative_prompt)

    def like(self, model):
        if model is self.pipe:
            return self
        if type(model).__name__ == self.pipeline_class:
            return type(self)(model, compile=self.compile, **self._settings())
        return as_adapter(model)

    def networks(self) -> List[Any]:
        """The pipeline's denoising networks (the ones LoRA training adapts)."""
        return [self.pipe.transformer]

    @contextlib.contextmanager
    def lora_disabled(self):
        """The networks' LoRA adapters off for the context: diffusers' `disable_adapters` on a
        model with adapters added (`add_adapter`, `load_lora_adapter`), or a peft `PeftModel`'s
        `disable_adapter()`. Afterwards every LoRA layer is as it was (on, or off if the user had
        switched it off) and every parameter keeps its requires_grad (peft's switch back on makes
        all active LoRA weights trainable, frozen ones included)."""
        contexts, nets = [], [net for net in self.networks() if net is not None]
        for net in nets:
            if callable(getattr(net, "disable_adapter", None)) and not getattr(net, "_hf_peft_config_loaded", False):
                contexts.append(net.disable_adapter())  # peft.PeftModel
            elif getattr(net, "_hf_peft_config_loaded", False):
                contexts.append(_DiffusersAdaptersOff(net))
        if not contexts:
            raise ValueError("ref_model='base' needs LoRA adapters on the transformer (peft, through diffusers' "
                             "add_adapter / load_lora_adapter or a peft PeftModel); none were found")
        trainable = [(p, p.requires_grad) for net in nets for p in net.parameters()]
        layers_off = [m for net in nets for m in net.modules() if getattr(m, "_disable_adapters", False)]
        try:
            with contextlib.ExitStack() as stack:
                for c in contexts:
                    stack.enter_context(c)
                yield
        finally:
            for layer in layers_off:  # off before: off again
                layer.enable_adapters(False)
            for p, flag in trainable:
                p.requires_grad_(flag)

    @property
    def device(self):
        return self._device if self._device is not None else self.pipe._execution_device

    def prepare(self, **size):
        # pipe._execution_device walks every module of every component: 1.8 ms for the tiny SD3
        # pipeline, 8.5 ms for SD3.5-Medium's transformer alone, at every sample and evaluate call.
        # It is read again only when the transformer has moved or gained offload hooks.
        t = self.pipe.transformer
        first = next(t.parameters(), None)
        key = (None if first is None else first.device, hasattr(t, "_hf_hook"), hasattr(t, "_diffusers_hook"))
        if self._device is None or key != self._device_key:
            self._device, self._device_key = self.pipe._execution_device, key

    def _encode_once(self, prompts: List[str], cfg: bool, encode: Callable[[List[str]], Tuple[Tensor, ...]]):
        """encode(texts) -> tensors with leading dim len(texts), for the prompts and, with CFG, the
        negative prompt in the same batch: one pass of each text encoder instead of two, and the
        negative (the same text for every prompt) encoded once. Returns (positive, negative): tuples
        of [P, ...] tensors, negative's rows views of its one row (None without CFG)."""
        P = len(prompts)
        out = encode(list(prompts) + ([self.negative_prompt] if cfg else []))
        positive = tuple(t[:P] for t in out)
        negative = tuple(t[P:].expand(P, *t.shape[1:]) for t in out) if cfg else None
        return positive, negative

    @property
    def dtype(self):
        return self.pipe.transformer.dtype


class SD3Adapter(_PipelineAdapter):
    """StableDiffusion3Pipeline (SD3, SD3.5): CLIP-L/G + T5 conditioning, CFG in one batch of 2B."""

    pipeline_class = "StableDiffusion3Pipeline"

    def encode(self, prompts, guidance_scale):
        cfg = guidance_scale > 1.0

        def encode(texts):
            pe, _, pp, _ = self.pipe.encode_prompt(
                prompt=texts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
            return pe, pp

        with torch.no_grad():
            (pe, pp), negative = self._encode_once(prompts, cfg, encode)
        cond = {"prompt_embeds": pe, "pooled": pp}
        if cfg:
            cond.update(negative_prompt_embeds=negative[0], negative_pooled=negative[1])
        return cond

    def model_inputs(self, cond, index, guidance_scale):
        c = _gather(cond, index)
        if guidance_scale > 1.0:
            return {"encoder_hidden_states": torch.cat([c["negative_prompt_embeds"], c["prompt_embeds"]]),
                    "pooled_projections": torch.cat([c["negative_pooled"], c["pooled"]])}
        return {"encoder_hidden_states": c["prompt_embeds"], "pooled_projections": c["pooled"]}

    def initial_latents(self, n, generator, height=None, width=None, **size):
        height = height or self.pipe.default_sample_size * self.pipe.vae_scale_factor
        width = width or self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return self.pipe.prepare_latents(n, self.pipe.transformer.config.in_channels, height, width, self.dtype,
                                         self.device, generator)

    def schedule(self, num_steps, latents):
        sched = self.pipe.scheduler
        mu = None
        if sched.config.get("use_dynamic_shifting", None):
            p = self.pipe.transformer.config.patch_size
            mu = dynamic_shift_mu(sched, (latents.shape[-2] // p) * (latents.shape[-1] // p), 1.16)
        sigmas, timesteps = scheduler_sigmas(sched, num_steps, mu=mu)
        return sigmas, timesteps.to(self.device)

    def velocity(self, x, step, timesteps, sigma, inputs, guidance_scale):
        return cfg_velocity(self.transformer, x, guidance_scale, timestep=step_timesteps(timesteps, step, x.shape[0]),
                            **inputs)

    def decode(self, latents, **size):
        vae = self.pipe.vae
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")


class FluxAdapter(_PipelineAdapter):
    """FluxPipeline: packed latents [B, seq, 4C], the guidance embedding, dynamic shift from the
    sequence length. FLUX.1-dev is guidance-distilled: guidance_scale feeds the embedding, and
    there is no CFG batch."""

    default_max_sequence_length = 512
    pipeline_class = "FluxPipeline"

    def encode(self, prompts, guidance_scale):
        with torch.no_grad():
            pe, pp, text_ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                       num_images_per_prompt=1,
                                                       max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": pe, "pooled": pp, "text_ids": text_ids}

    def model_inputs(self, cond, index, guidance_scale):
        c = _gather({"prompt_embeds": cond["prompt_embeds"], "pooled": cond["pooled"]}, index)
        inputs = {"encoder_hidden_states": c["prompt_embeds"], "pooled_projections": c["pooled"],
                  "txt_ids": cond["text_ids"], "img_ids": self._img_ids}
        if self.pipe.transformer.config.guidance_embeds:
            inputs["guidance"] = torch.full((index.numel(),), float(guidance_scale), dtype=torch.float32,
                                            device=self.device)
        else:
            inputs["guidance"] = None
        return inputs

    def prepare(self, height=None, width=None, **size):
        super().prepare()
        pipe = self.pipe
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        self._size = (height, width)
        h, w = 2 * (int(height) // (pipe.vae_scale_factor * 2)), 2 * (int(width) // (pipe.vae_scale_factor * 2))
        self._img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype)

    def initial_latents(self, n, generator, **size):
        height, width = self._size
        latents, _ = self.pipe.prepare_latents(n, self.pipe.transformer.config.in_channels // 4, height, width,
                                               self.dtype, self.device, generator)
        return latents

    def schedule(self, num_steps, latents):
        import numpy as np

        sched = self.pipe.scheduler
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(sched.config, "use_flow_sigmas", False):
            sigmas = None
        mu = dynamic_shift_mu(sched, latents.shape[1], 1.15)
        out, timesteps = scheduler_sigmas(sched, num_steps, sigmas=sigmas, mu=mu)
        return out, timesteps.to(self.device)

    def velocity(self, x, step, timesteps, sigma, inputs, guidance_scale):
        t = step_timesteps(timesteps, step, x.shape[0]).to(x.dtype)
        return self.transformer(hidden_states=x, timestep=t / 1000, guidance=inputs["guidance"],
                                pooled_projections=inputs["pooled_projections"],
                                encoder_hidden_states=inputs["encoder_hidden_states"], txt_ids=inputs["txt_ids"],
                                img_ids=inputs["img_ids"], return_dict=False)[0]

    def decode(self, latents, height=None, width=None, **size):
        height, width = height or self._size[0], width or self._size[1]
        vae = self.pipe.vae
        latents = self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")


class WanAdapter(_PipelineAdapter):
    """WanPipeline: 5-D video latents [B, C, F, H, W], UMT5 conditioning, CFG in one batch of 2B
    (the pipeline itself runs two forwards; the sum is the same up to rounding).

    Wan 2.2 as the pipeline's __call__ runs it:
    - two experts (A14B: `boundary_ratio` in the pipeline config): `transformer` for the steps
      whose timestep is >= boundary_ratio * num_train_timesteps (high noise), `transformer_2`
      below, with guidance_scale_2 there (default: the rollout's guidance_scale);
    - `expand_timesteps` (TI2V-5B): the timestep given per latent token, [B, F * H/2 * W/2].

    Wan's checkpoints ship UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s): the
    rollout then takes the Euler schedule with shift s (`schedule.euler_scheduler`), since its
    steps are Euler steps; its ODE latents match __call__ only with an Euler scheduler.
    """

    modality = "video"
    default_max_sequence_length = 512
    pipeline_class = "WanPipeline"

    def __init__(self, pipe, compile: bool = False, max_sequence_length: Optional[int] = None,
                 negative_prompt: str = "", guidance_scale_2: Optional[float] = None):
        super().__init__(pipe, compile=compile, max_sequence_length=max_sequence_length,
                         negative_prompt=negative_prompt)
        config = getattr(pipe, "config", {})
        self.boundary_ratio = config.get("boundary_ratio", None)
        self.expand_timesteps = bool(config.get("expand_timesteps", False))
        if pipe.transformer is None:
            raise ValueError("the WanPipeline has no transformer (its __call__ needs one too)")
        if self.boundary_ratio is not None and getattr(pipe, "transformer_2", None) is None:
            raise ValueError(f"the WanPipeline's config has boundary_ratio={self.boundary_ratio} but no transformer_2")
        if guidance_scale_2 is not None and self.boundary_ratio is None:
            raise ValueError("guidance_scale_2 is for Wan 2.2 pipelines with two experts (boundary_ratio set in the "
                             "pipeline config); this pipeline has one transformer")
        self.guidance_scale_2 = guidance_scale_2
        self._low_noise: List[bool] = []

    def encode(self, prompts, guidance_scale):
        cfg = guidance_scale > 1.0

        def encode(texts):
            pe, _ = self.pipe.encode_prompt(prompt=texts, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                            max_sequence_length=self.max_sequence_length, device=self.device)
            return (pe.to(self.dtype),)

        with torch.no_grad():
            (pe,), negative = self._encode_once(prompts, cfg, encode)
        cond = {"prompt_embeds": pe}
        if cfg:
            cond["negative_prompt_embeds"] = negative[0]
        return cond

    def model_inputs(self, cond, index, guidance_scale):
        c = _gather(cond, index)
        if guidance_scale > 1.0:
            return {"encoder_hidden_states": torch.cat([c["negative_prompt_embeds"], c["prompt_embeds"]])}
        return {"encoder_hidden_states": c["prompt_embeds"]}

    def initial_latents(self, n, generator, height=480, width=832, num_frames=81, **size):
        return self.pipe.prepare_latents(n, self.pipe.transformer.config.in_channels, height, width, num_frames,
                                         torch.float32, self.device, generator)

    def schedule(self, num_steps, latents):
        sigmas, timesteps = scheduler_sigmas(self.pipe.scheduler, num_steps)
        # Which expert runs each step, decided here on the host (the loop never reads timesteps back).
        if self.boundary_ratio is None:
            self._low_noise = [False] * num_steps
        else:
            boundary = self.boundary_ratio * self.pipe.scheduler.config.num_train_timesteps
            self._low_noise = (timesteps < boundary).tolist()
        return sigmas, timesteps.to(self.device)

    def networks(self):
        return [self.pipe.transformer, getattr(self.pipe, "transformer_2", None)]

    def _settings(self):
        return dict(super()._settings(), guidance_scale_2=self.guidance_scale_2)

    def prepare(self, height=None, width=None, **size):
        super().prepare()
        # The pipeline's own check: its VAE downsamples by 8 and the transformer patches by 2.
        patch = self.pipe.transformer.config.patch_size
        mult = self.pipe.vae_scale_factor_spatial * (patch[1] if isinstance(patch, (tuple, list)) else patch)
        for name, value in (("height", height), ("width", width)):
            if value is not None and value % mult:
                raise ValueError(f"{name} must be a multiple of {mult} for this WanPipeline (got {value})")

    def expert(self, step):
        if len(self._low_noise) <= step:
            raise RuntimeError("WanAdapter: call schedule() first (it decides which expert runs each step)")
        return int(self._low_noise[step])

    def velocity(self, x, step, timesteps, sigma, inputs, guidance_scale):
        experts = {self.expert(s) for s in ([step] if isinstance(step, int) else step.tolist())}
        if len(experts) != 1:
            raise ValueError("WanAdapter.velocity: the rows' steps fall on both experts; call it once per expert "
                             "(flowsteer.evaluate splits the rows so)")
        if experts.pop():
            transformer = self._module("transformer_2")
            scale = guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2
        else:
            transformer, scale = self.transformer, guidance_scale
        t = step_timesteps(timesteps, step, x.shape[0])
        if self.expand_timesteps:
            # The pipeline's (mask[0][0][:, ::2, ::2] * t).flatten(): one value per latent token.
            frames, height, width = x.shape[2:]
            t = t[:, None].expand(-1, frames * ((height + 1) // 2) * ((width + 1) // 2))
        v = cfg_velocity(transformer, x.to(self.dtype), guidance_scale, scale=scale, timestep=t, **inputs)
        return v.to(x.dtype)

    def decode(self, latents, **size):
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device,
                                                                                                     latents.dtype)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return self.pipe.video_processor.postprocess_video(video, output_type="pt")


def as_adapter(model, *, latent_shape=None, cond=None, device=None, dtype=torch.float32, shift=1.0,
               compile=False, negative_prompt: Optional[str] = None) -> ModelAdapter:
    """An adapter for a diffusers pipeline, an adapter (returned as is) or a velocity function.
    negative_prompt: the CFG negative of an SD3 or Wan pipeline (default "", as their __call__)."""
    name = type(model).__name__
    if negative_prompt is not None and name not in ("StableDiffusion3Pipeline", "WanPipeline"):
        where = ("set it on the adapter (SD3Adapter(pipe, negative_prompt=...))" if isinstance(model, ModelAdapter)
                 else "only SD3 and Wan pipelines run a CFG batch with a negative prompt")
        raise ValueError(f"negative_prompt is not used with {name}: {where}")
    pipe_kwargs = dict(compile=compile, **({} if negative_prompt is None else dict(negative_prompt=negative_prompt)))
    if isinstance(model, ModelAdapter):
        return model
    if name in ("StableDiffusion3Pipeline",):
        return SD3Adapter(model, **pipe_kwargs)
    if name in ("FluxPipeline",):
        return FluxAdapter(model, compile=compile)
    if name in ("WanPipeline",):
        return WanAdapter(model, **pipe_kwargs)
    if hasattr(model, "transformer") and hasattr(model, "scheduler"):
        raise TypeError(f"unsupported pipeline {name}: flowsteer.sample supports StableDiffusion3Pipeline, "
                        "FluxPipeline and WanPipeline; wrap others in a ModelAdapter subclass")
    if isinstance(model, torch.nn.Module) and hasattr(model, "config") and hasattr(model, "dtype"):
        raise TypeError(f"got a {name} network: pass the pipeline that holds it (its scheduler, text encoders and "
                        "VAE are needed too), or a ModelAdapter")
    if callable(model):
        fn = torch.compile(model) if compile else model
        return CallableAdapter(fn, latent_shape, cond=cond, device=device, dtype=dtype, shift=shift)
    raise TypeError(f"model must be a diffusers pipeline, a ModelAdapter or a velocity function (got {name})")
