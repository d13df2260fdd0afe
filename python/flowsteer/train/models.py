"""The trained model: loading a pipeline offline, LoRA or full fine-tuning, the KL reference, EMA
and LoRA export in diffusers' format."""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from ..sampler import CallableAdapter, ModelAdapter, as_adapter
from .config import Config, ConfigError, LoraConfig

Tensor = torch.Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TESTING = {"testing:sd3": "tiny_sd3_pipeline", "testing:flux": "tiny_flux_pipeline", "testing:wan": "tiny_wan_pipeline"}


def default_device(cfg: Config) -> torch.device:
    if cfg.model.device is not None:
        return torch.device(cfg.model.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(cfg: Config):
    """The pipeline model.path names: a local diffusers directory (offline, never a hub id) or one
    of the tiny random-weight test pipelines ("testing:sd3", "testing:flux", "testing:wan")."""
    path, dtype = cfg.model.path, DTYPES[cfg.model.dtype]
    if path is None:
        raise ConfigError("model.path is not set: give a local diffusers pipeline directory "
                          "(--set model.path=/weights/sd3.5-medium), or testing:sd3 for a tiny random-weight pipeline")
    if path in TESTING:
        from ..testing import pipelines

        pipe = getattr(pipelines, TESTING[path])(0, dtype)
    else:
        if not os.path.isdir(path):
            raise ConfigError(f"model.path: no such directory {path!r} (a local diffusers pipeline directory, with "
                              "model_index.json; hub ids are not downloaded)")
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ConfigError(f"model.path: {path!r} has no model_index.json; it is not a diffusers pipeline directory")
        try:
            from diffusers import DiffusionPipeline
        except ImportError:
            raise ImportError("loading model.path needs diffusers: pip install 'flowsteer[diffusers]'") from None
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(default_device(cfg))


def make_adapter(model, cfg: Config) -> ModelAdapter:
    adapter = as_adapter(model, latent_shape=getattr(model, "latent_shape", None))
    if cfg.model.max_sequence_length is not None and hasattr(adapter, "max_sequence_length"):
        adapter.max_sequence_length = cfg.model.max_sequence_length
    return adapter


def networks_of(adapter: ModelAdapter) -> List[nn.Module]:
    """The networks the trainer adapts: a pipeline adapter's denoising transformer(s), or a
    velocity function that is an nn.Module."""
    nets = getattr(adapter, "networks", None)
    if callable(nets):
        out = [n for n in nets() if n is not None]
    elif isinstance(adapter, CallableAdapter) and isinstance(adapter.fn, nn.Module):
        out = [adapter.fn]
    else:
        out = []
    if not out:
        raise TypeError(f"{type(adapter).__name__} exposes no trainable network: give a diffusers pipeline, an adapter "
                        "with networks(), or a velocity function that is a torch.nn.Module")
    return out


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def add_lora(nets: List[nn.Module], lora: LoraConfig, seed: int) -> None:
    """Freeze the networks and add LoRA adapters to the target modules (Gaussian init, as Flow-GRPO),
    drawn from a generator seeded by `seed` so that a run is reproducible."""
    try:
        from peft import LoraConfig as PeftLoraConfig
    except ImportError:
        raise ImportError("model.lora needs peft: pip install 'flowsteer[lora]'") from None
    for k, net in enumerate(nets):
        names = [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Conv3d))]
        for t in lora.target_modules:
            if not any(_matches(n, t) for n in names):
                sample = ", ".join(sorted({n.split(".")[-1] for n in names})[:12])
                raise ConfigError(f"model.lora.target_modules: {t!r} matches no Linear or Conv module of the network "
                                  f"({type(net).__name__}); module names end in, for example: {sample}")
        net.requires_grad_(False)
        peft_cfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                                  lora_dropout=lora.dropout, init_lora_weights="gaussian")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            if hasattr(net, "add_adapter"):
                net.add_adapter(peft_cfg)
            else:
                from peft import inject_adapter_in_model

                inject_adapter_in_model(peft_cfg, net)
        for n, p in net.named_parameters():
            p.requires_grad_("lora_" in n)


def trainable_parameters(nets: List[nn.Module]) -> List[Tuple[str, nn.Parameter]]:
    out = [(f"net{k}.{n}", p) for k, net in enumerate(nets) for n, p in net.named_parameters() if p.requires_grad]
    if not out:
        raise ValueError("no trainable parameters: with model.lora null every parameter of the network must "
                         "require grad")
    return out


def reference_model(model, adapter: ModelAdapter, nets: List[nn.Module], cfg: Config):
    """The KL reference for evaluate(ref_model=...): "base" (the LoRA adapters off) or a frozen copy
    of the networks in a model that shares everything else."""
    kind = cfg.model.reference
    if kind == "auto":
        kind = "base" if cfg.model.lora is not None else "copy"
    if kind == "base":
        return "base"
    frozen = [copy.deepcopy(n).requires_grad_(False).eval() for n in nets]
    if isinstance(adapter, CallableAdapter):
        return CallableAdapter(frozen[0], adapter.latent_shape, cond=adapter.user_cond, device=adapter.device,
                               dtype=adapter.dtype, shift=adapter.shift)
    pipe = getattr(adapter, "pipe", None)
    if pipe is None or not hasattr(pipe, "components"):
        raise ConfigError("model.reference 'copy' needs a diffusers pipeline or a velocity-function model; "
                          "use LoRA with reference 'base'")
    components = dict(pipe.components)
    components["transformer"] = frozen[0]
    if len(frozen) > 1 and "transformer_2" in components:
        components["transformer_2"] = frozen[1]
    ref = type(pipe)(**components)
    if hasattr(ref, "set_progress_bar_config"):
        ref.set_progress_bar_config(disable=True)
    return adapter.like(ref)


class EMA:
    """Exponential moving average of the trained parameters (fp32 shadows)."""

    def __init__(self, params: List[Tuple[str, nn.Parameter]], decay: float):
        self.decay = decay
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """The EMA weights in the model for the context, the trained ones back afterwards."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def tensors(self) -> Dict[str, Tensor]:
        return {f"ema.{n}": s for n, s in zip(self.names, self.shadow)}

    def load(self, tensors: Dict[str, Tensor]) -> None:
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(tensors[f"ema.{n}"])


def save_lora(model, nets: List[nn.Module], out_dir: str) -> None:
    """The LoRA of the first network in diffusers' format (pipe.load_lora_weights(out_dir) loads it);
    for a model without a diffusers pipeline class, peft's state dict in lora.safetensors with its
    adapter config."""
    from peft.utils import get_peft_model_state_dict

    os.makedirs(out_dir, exist_ok=True)
    net = nets[0]
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(net).items()}
    pipe_cls = type(model) if hasattr(type(model), "save_lora_weights") else None
    peft_cfg = getattr(net, "peft_config", {}).get("default")
    if pipe_cls is not None:
        kwargs = {}
        if peft_cfg is not None and "transformer_lora_adapter_metadata" in inspect.signature(pipe_cls.save_lora_weights).parameters:
            # rank and alpha travel with the weights (without them a loader assumes alpha = rank)
            kwargs["transformer_lora_adapter_metadata"] = _jsonable(peft_cfg.to_dict())
        pipe_cls.save_lora_weights(out_dir, transformer_lora_layers=state, safe_serialization=True, **kwargs)
    else:
        from safetensors.torch import save_file

        save_file(state, os.path.join(out_dir, "lora.safetensors"))
        if peft_cfg is not None:
            with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
                json.dump(_jsonable(peft_cfg.to_dict()), f, indent=1)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in x]
        return sorted(items, key=str) if isinstance(x, (set, frozenset)) else items
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
