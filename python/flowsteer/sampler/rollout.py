"""The rollout loop: SDE sampling with per-step log-probs, and their re-evaluation for training."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from ..ops import guidance_coefficient, sde_step
from ..ops.checks import SEED_LIMIT, check_choice, check_kind_and_noise, check_seed
from ..ops.codes import KIND_CODE, LP_FORM
from .adapters import ModelAdapter, as_adapter
from .windows import SDEWindow, as_window

Tensor = torch.Tensor


@dataclass
class Rollout:
    """One batch of N = P * G samples (P prompts, G per group) and what training needs of it.

    latents, next_latents: [N, S, ...] the latents before and after each of the S trained steps;
        when the steps are consecutive (every built-in window), overlapping views of one
        [N, S + 1, ...] trajectory (next_latents[:, k] is latents[:, k + 1]): write to neither.
    log_probs: [N, S] fp32, the log-probs of those steps as sampled.
    steps: the S step indices into the schedule; sigmas: the T + 1 schedule sigmas (floats).
    final_latents: [N, ...]; images: [N, 3, H, W] in [0, 1] (videos [N, F, 3, H, W]) or None.
    prompts: N prompts; prompt_index, group_ids: int64 [N]. cond: the per-prompt conditioning;
    guidance: [N, S, ...] reward gradients, kept only when the log-prob is taken under the guided
        mean, with guidance_coef [N, S]: each row's coefficient c of mean + c * G as sampled (the
        batch norm of the whole step included), so that any subset of rows re-evaluates exactly.
    """

    latents: Tensor
    next_latents: Tensor
    log_probs: Tensor
    steps: List[int]
    sigmas: List[float]
    final_latents: Tensor
    images: Optional[Tensor]
    prompts: List[str]
    prompt_index: Tensor
    group_ids: Tensor
    cond: Dict[str, Any]
    guidance_scale: float
    kind: str
    noise_level: float
    size: Dict[str, Any]
    adapter: ModelAdapter
    sde_options: Dict[str, Any] = field(default_factory=dict)
    guidance: Optional[Tensor] = None
    guidance_coef: Optional[Tensor] = None

    @property
    def num_samples(self) -> int:
        return self.final_latents.shape[0]


_MASK64 = (1 << 64) - 1


def _mix64(*words: int) -> int:
    """SplitMix64 over the words: a seed in [0, 2**62) that depends on every word."""
    z = 0x9E3779B97F4A7C15
    for w in words:
        z = (z + (w & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 2


@dataclass(frozen=True)
class NoiseKeys:
    """Per-sample noise, the same whatever batch, chunk or process a sample is drawn in.

    Sample j of the call's prompt p is member `first_member + j` of the group whose global id is
    `prompt_ids[p]`. Its initial latents come from torch.Generator().manual_seed(s) and its step-i
    noise from Philox(s, offset=i), with s = splitmix64(seed, prompt id, member); the latents a
    group shares (same_noise, the branch prefix) come from splitmix64(seed, prompt id, 2**32).
    A trainer that splits a batch over processes or reward chunks passes the global ids, and gets
    the samples the whole batch would have had (to the model's batch-size rounding)."""

    prompt_ids: tuple
    first_member: int = 0

    def __post_init__(self):
        ids = tuple(self.prompt_ids)
        for i, v in enumerate(ids):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"noise_keys.prompt_ids[{i}] must be an int >= 0 (got {v!r})")
        if isinstance(self.first_member, bool) or not isinstance(self.first_member, int) or self.first_member < 0:
            raise ValueError(f"noise_keys.first_member must be an int >= 0 (got {self.first_member!r})")
        object.__setattr__(self, "prompt_ids", ids)

    def sample_seeds(self, seed: int, group_size: int) -> List[int]:
        return [_mix64(seed, p, self.first_member + j) for p in self.prompt_ids for j in range(group_size)]

    def group_seeds(self, seed: int) -> List[int]:
        return [_mix64(seed, p, 1 << 32) for p in self.prompt_ids]


def _keyed_latents(adapter, seeds: List[int], size) -> Tensor:
    return torch.cat([adapter.initial_latents(1, torch.Generator().manual_seed(s), **size) for s in seeds])


def _keyed_sde_step(v, x, s0, s1, kind, noise_level, seeds, step, guidance, coef, sde_kwargs):
    """sde_step row by row, row n's noise from Philox(seeds[n], offset=step)."""
    outs = []
    for n, s in enumerate(seeds):
        rows = slice(n, n + 1)
        g = None if guidance is None else guidance[rows]
        c = coef[rows] if torch.is_tensor(coef) and coef.ndim >= 1 and coef.shape[0] == x.shape[0] else coef
        outs.append(sde_step(v[rows], x[rows], s0, s1, kind, noise_level, seed=s, offset=step, guidance=g,
                             guidance_scale=c if g is not None else 1.0, return_mean=False, **sde_kwargs))
    return torch.cat([o.prev_sample for o in outs]), torch.cat([o.log_prob for o in outs])


@dataclass
class _StepOut:
    prev_sample: Tensor
    log_prob: Tensor


def _check_prompts(prompts, group_size):
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings (got {type(prompts).__name__})")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if not (isinstance(group_size, int) and group_size >= 1):
        raise ValueError(f"group_size must be an int >= 1 (got {group_size!r})")


def _group_prompts(prompts, group_size):
    """The P prompts of a per-image list (each prompt repeated group_size times in a row, as research
    trainers' repeat samplers yield them)."""
    n, G = len(prompts), group_size
    if n % G:
        raise ValueError(f"prompts_per_image: {n} prompts do not split into groups of group_size={G}; "
                         f"pass P * group_size prompts, each repeated group_size times in a row")
    for start in range(0, n, G):
        block = prompts[start:start + G]
        if any(p != block[0] for p in block):
            raise ValueError(f"prompts_per_image: prompts[{start}:{start + G}] are not one prompt repeated "
                             f"group_size={G} times (got {list(block)!r})")
    return list(prompts[::G])


def _chunked_inputs(adapter, cond, rows, guidance_scale, max_batch_size):
    """[(rows of x, model inputs for them)]: one entry, or one per chunk of max_batch_size rows."""
    n = rows.numel()
    size = n if max_batch_size is None else max_batch_size
    return [(slice(s, min(s + size, n)), adapter.model_inputs(cond, rows[s:s + size], guidance_scale))
            for s in range(0, n, size)]


def _velocity(adapter, x, i, timesteps, sigma, chunks, guidance_scale):
    # Transformers often return a permuted view; the fused step reads contiguous memory.
    if len(chunks) == 1:
        return adapter.velocity(x, i, timesteps, sigma, chunks[0][1], guidance_scale).contiguous()
    return torch.cat([adapter.velocity(x[rows], i, timesteps, sigma, inputs, guidance_scale)
                      for rows, inputs in chunks]).contiguous()


def sample(
    model,
    prompts: List[str],
    *,
    group_size: int = 1,
    num_steps: int = 10,
    guidance_scale: float = 4.5,
    kind: str = "flow",
    noise_level: float = 0.7,
    window: Union[str, SDEWindow] = "all",
    iteration: int = 0,
    seed: int = 0,
    same_noise: bool = False,
    decode: bool = True,
    height: Optional[int] = None,
    width: Optional[int] = None,
    num_frames: Optional[int] = None,
    reward_grad: Optional[Callable] = None,
    reward_guidance_scale: float = 1.0,
    reward_guidance_norm: str = "batch",
    scale_by_dt: bool = True,
    logprob_mean: str = "unguided",
    cond: Any = None,
    latent_shape=None,
    shift: float = 1.0,
    compile: bool = False,
    cps_logprob: str = "exact",
    prompts_per_image: bool = False,
    max_batch_size: Optional[int] = None,
    negative_prompt: Optional[str] = None,
    noise_keys: Optional[NoiseKeys] = None,
) -> Rollout:
    """Sample P * G rollouts with per-step log-probs.

    Args:
        model: a StableDiffusion3Pipeline, FluxPipeline or WanPipeline, a ModelAdapter, or a
            `velocity_fn(x, sigma [B], cond) -> v` (then pass latent_shape and optionally cond:
            one row per prompt, and shift for its schedule).
        prompts: P prompts, each sampled group_size times; samples of a prompt are contiguous and
            share its group id. With prompts_per_image=True, P * G prompts instead: P runs of G
            equal prompts, as research trainers' repeat samplers give them.
        num_steps: T; the schedule comes from the pipeline's scheduler config.
        guidance_scale: CFG scale (one batched forward of 2B; FLUX: its guidance embedding).
        kind, noise_level: the step (see flowsteer.ops.sde_step); steps outside the window are ODE.
        window: "all", RandomWindow(k), ProgressiveWindow(k, ...) or Branch(at, size). In branch
            mode the model runs once per prompt up to step `at`, that step included.
            iteration feeds ProgressiveWindow.
        seed: makes the rollout reproducible: the initial latents come from
            torch.Generator().manual_seed(seed) (as a pipeline's `generator=` would), the window
            draw from the same seed, and step i's noise from Philox(seed, offset=i).
        same_noise: every sample of a group starts from the same initial latents (DanceGRPO); the
            model then runs once per prompt until the first stochastic step (that step included).
        decode: decode the final latents to pixels.
        reward_grad: Euphonium guidance: `reward_grad(x, sigma, prompt_index) -> grad` (shape of x),
            fused into each stochastic step as mean + c * G_hat with c = reward_guidance_scale
            (times delta when scale_by_dt) and the norm reward_guidance_norm ("batch", "sample", "none").
        logprob_mean: "unguided" (default: distils the guidance) or "guided".
        compile: torch.compile the transformer (or the velocity function).
        max_batch_size: at most this many samples per model call (with CFG the forward's batch is
            twice this) and per decode, for groups too large for memory in one forward; None: one
            call per step.
            Each row's velocity is the same whatever the chunking (to batch-size rounding).
        negative_prompt: the CFG negative prompt of an SD3 or Wan pipeline (default "", as their
            __call__); with an adapter, set it on the adapter instead.
        noise_keys: NoiseKeys(prompt_ids, first_member): every sample's noise from its own seed
            (derived from seed and its global prompt id and group member), so that a batch split
            over processes or chunks draws what the whole batch would. Costs one fused step call
            per sample and step instead of one per step.
    """
    _check_prompts(prompts, group_size)
    if prompts_per_image:
        prompts = _group_prompts(prompts, group_size)
    if max_batch_size is not None and not (isinstance(max_batch_size, int) and max_batch_size >= 1):
        raise ValueError(f"max_batch_size must be None or an int >= 1 (got {max_batch_size!r})")
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps must be an int >= 1 (got {num_steps!r})")
    # The step's own checks, before anything runs (noise_level <= 0 or kind "ode" means no SDE step).
    check_kind_and_noise(kind, noise_level, KIND_CODE)
    check_choice("reward_guidance_norm", reward_guidance_norm, ("none", "sample", "batch"))
    check_choice("logprob_mean", logprob_mean, ("unguided", "guided"))
    check_choice("cps_logprob", cps_logprob, LP_FORM)
    # The same check as sde_step's seed (numpy integers and 0-d integer tensors too, never a bool);
    # one below sde_step's bound, since the window draw uses seed + 1.
    seed = check_seed("seed", seed, limit=SEED_LIMIT - 1)
    adapter = as_adapter(model, latent_shape=latent_shape, cond=cond, shift=shift, compile=compile,
                         negative_prompt=negative_prompt)
    if decode and not adapter.can_decode:
        raise ValueError(f"decode=True, but {type(adapter).__name__} cannot decode (a bare velocity function has no "
                         "decoder): pass decode=False, or an adapter with a decode_fn")
    win = as_window(window)
    P, G = len(prompts), group_size
    N = P * G
    size = {k: v for k, v in dict(height=height, width=width, num_frames=num_frames).items() if v is not None}
    generator = torch.Generator().manual_seed(seed)
    if noise_keys is not None:
        if not isinstance(noise_keys, NoiseKeys):
            raise TypeError(f"noise_keys must be a flowsteer.NoiseKeys (got {type(noise_keys).__name__})")
        if len(noise_keys.prompt_ids) != P:
            raise ValueError(f"noise_keys.prompt_ids has {len(noise_keys.prompt_ids)} ids for {P} prompts")
        if prompts_per_image:
            raise ValueError("noise_keys with prompts_per_image=True is not supported: pass the P prompts once")
        sample_seeds = noise_keys.sample_seeds(seed, G)

    with torch.no_grad():
        adapter.prepare(**size)
        device = adapter.device  # after prepare: the pipeline may have moved since the last call
        cond_p = adapter.encode(list(prompts), guidance_scale)
        prompt_index = torch.arange(P).repeat_interleave(G)
        prompt_index_dev = prompt_index.to(device)
        plan_gen = torch.Generator().manual_seed(seed + 1)
        plan = win.plan(num_steps, iteration, plan_gen)
        # Initial latents: as the pipeline draws them for num_images_per_prompt = G (same_noise:
        # one per prompt, which the group shares).
        if noise_keys is None:
            x = adapter.initial_latents(P if same_noise else N, generator, **size)
        elif same_noise or plan.branch_at is not None:
            x = _keyed_latents(adapter, noise_keys.group_seeds(seed), size)  # one row per prompt
            if not same_noise:
                x = x.repeat_interleave(G, 0)  # the branch prefix keeps one row per prompt below
        else:
            x = _keyed_latents(adapter, sample_seeds, size)
        sigmas, timesteps = adapter.schedule(num_steps, x)
        branch_at = plan.branch_at
        if branch_at is not None and G < 2:
            raise ValueError("branch mode needs group_size >= 2")
        # A stochastic step with std 0 (cps onto sigma = 0) has no log-prob: run it as ODE.
        stochastic = [s and not (kind == "cps" and sigmas[i + 1] == 0.0) and noise_level > 0 and kind != "ode"
                      for i, s in enumerate(plan.stochastic)]
        # The G rows of a group stay equal until a step draws noise when they start equal: in branch
        # mode (one trajectory per prompt until the branch step) and with same_noise. Until then x
        # holds one row per prompt; at step expand_at the forward still runs on those P rows, and
        # x and the velocity are expanded to the group before the step draws its noise.
        expand_at = None
        if branch_at is not None:
            if any(stochastic[:branch_at]):
                raise ValueError(f"window {type(win).__name__}: the steps before its branch step {branch_at} must be "
                                 "deterministic (one trajectory per prompt runs them)")
            expand_at = branch_at
            if not same_noise:
                x = x[::G].contiguous()
        elif same_noise and G > 1:
            expand_at = next((i for i, s in enumerate(stochastic) if s), num_steps)
        rows = prompt_index_dev if expand_at is None else torch.arange(P, device=device)  # the prompt of each row
        inputs = _chunked_inputs(adapter, cond_p, rows, guidance_scale, max_batch_size)
        sde_kwargs = dict(sigma_max=sigmas[1] if sigmas[1] < 1 else None, cps_logprob=cps_logprob,
                          logprob_mean=logprob_mean)
        store_x, store_next, store_lp, store_guidance, store_coef, steps = [], [], [], [], [], []
        # Every built-in window trains consecutive steps: then the latents before and after them
        # go into one [N, S + 1, ...] trajectory, latents and next_latents its overlapping views
        # (S + 1 slots of memory instead of 2S, and no stacking copies at the end).
        trained = [i for i, s in enumerate(stochastic) if s]
        consecutive = bool(trained) and trained == list(range(trained[0], trained[0] + len(trained)))
        traj = None
        for i in range(num_steps):
            v = _velocity(adapter, x, i, timesteps, sigmas[i], inputs, guidance_scale)
            if i == expand_at:
                x, v = x.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
                rows = prompt_index_dev
                if i + 1 < num_steps:
                    inputs = _chunked_inputs(adapter, cond_p, rows, guidance_scale, max_batch_size)
            if stochastic[i]:
                guidance = None
                if reward_grad is not None:
                    guidance = reward_grad(x, sigmas[i], rows)
                    if not torch.is_tensor(guidance) or guidance.shape != x.shape:
                        raise ValueError(f"reward_grad returned {getattr(guidance, 'shape', type(guidance).__name__)} "
                                         f"for latents of shape {tuple(x.shape)}; it must return a tensor of the same shape")
                    guidance = guidance.to(x.dtype).contiguous()
                    coef = guidance_coefficient(guidance, sigmas[i], sigmas[i + 1], reward_guidance_scale,
                                                reward_guidance_norm, scale_by_dt)
                if noise_keys is None:
                    out = sde_step(v, x, sigmas[i], sigmas[i + 1], kind, noise_level, seed=seed, offset=i,
                                   guidance=guidance, guidance_scale=coef if guidance is not None else 1.0,
                                   return_mean=False, **sde_kwargs)
                else:
                    out = _StepOut(*_keyed_sde_step(v, x, sigmas[i], sigmas[i + 1], kind, noise_level, sample_seeds,
                                                    i, guidance, coef if guidance is not None else None, sde_kwargs))
                if consecutive:
                    if traj is None:
                        traj = x.new_empty((x.shape[0], len(trained) + 1) + tuple(x.shape[1:]))
                        traj[:, 0] = x
                    traj[:, len(steps) + 1] = out.prev_sample
                else:
                    store_x.append(x)
                    store_next.append(out.prev_sample)
                store_lp.append(out.log_prob)
                steps.append(i)
                if guidance is not None and logprob_mean == "guided":
                    store_guidance.append(guidance)
                    store_coef.append(coef)
            else:
                out = sde_step(v, x, sigmas[i], sigmas[i + 1], "ode", 0.0, return_mean=False)
            x = out.prev_sample
        if expand_at == num_steps:
            x = x.repeat_interleave(G, 0)
        images = None
        if decode:  # in chunks of max_batch_size too: a VAE decode can need more memory than the forward
            chunk = N if max_batch_size is None else max_batch_size
            parts = [adapter.decode(x[s:s + chunk], **size) for s in range(0, N, chunk)]
            images = parts[0] if len(parts) == 1 else torch.cat(parts)

    def stack(ts, like):
        return torch.stack(ts, dim=1) if ts else like.new_empty((like.shape[0], 0) + tuple(like.shape[1:]))

    return Rollout(
        latents=traj[:, :-1] if traj is not None else stack(store_x, x),
        next_latents=traj[:, 1:] if traj is not None else stack(store_next, x),
        log_probs=torch.stack(store_lp, dim=1) if store_lp else x.new_empty((N, 0), dtype=torch.float32),
        steps=steps,
        sigmas=sigmas,
        final_latents=x,
        images=images,
        prompts=[prompts[int(j)] for j in prompt_index],
        prompt_index=prompt_index,
        group_ids=prompt_index.clone(),
        cond=cond_p,
        guidance_scale=guidance_scale,
        kind=kind,
        noise_level=noise_level,
        size=size,
        adapter=adapter,
        sde_options=sde_kwargs,
        guidance=stack(store_guidance, x) if store_guidance else None,
        guidance_coef=torch.stack(store_coef, dim=1) if store_coef else None,
    )


def _indices(indices, n: int) -> Tensor:
    """The rows `indices` selects, as an int64 CPU tensor: None (all), integers, or a bool mask [N]."""
    if indices is None:
        return torch.arange(n)
    t = indices if torch.is_tensor(indices) else torch.as_tensor(indices)
    if t.numel() == 0:
        raise ValueError("indices must select at least one sample")
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise ValueError(f"indices: a bool mask must be [N] = [{n}] (got shape {tuple(t.shape)})")
        t = t.cpu().nonzero().squeeze(1)
    elif t.dtype.is_floating_point or t.dtype.is_complex or t.ndim != 1:
        raise ValueError(f"indices must be a 1-D list or tensor of sample indices, or a bool mask [N] = [{n}] "
                         f"(got {t.dtype} of shape {tuple(t.shape)})")
    t = t.cpu().long()
    if t.numel() == 0:
        raise ValueError("indices: the mask selects no sample")
    if int(t.min()) < -n or int(t.max()) >= n:
        raise ValueError(f"indices must lie in [0, {n}) (got {int(t.min())}..{int(t.max())})")
    return t % n


def _check_same_schedule(sigmas: List[float], want: List[float], name: str) -> None:
    if len(sigmas) != len(want) or max(abs(a - b) for a, b in zip(sigmas, want)) > 1e-6:
        raise ValueError(f"{name}: its schedule (sigmas {[round(s, 4) for s in sigmas]}) is not the rollout's "
                         f"({[round(s, 4) for s in want]}); evaluate with a model whose scheduler (shift) matches")


def evaluate(
    rollout: Rollout,
    step,
    indices: Optional[Tensor] = None,
    *,
    model=None,
    ref_model=None,
    kl: str = "flow_grpo",
):
    """Recompute the log-prob of the rollout's trained step `step` for the samples `indices`
    (default all), with gradients, from the same conditioning.

    step: an index into rollout.steps, the same for every sample; or one per sample (a list or
        int64 CPU tensor as long as indices), as trainers that shuffle each sample's trained steps
        (DDPO, DanceGRPO) batch them: the rows then go through the model in one batch with per-row
        timesteps and sigmas (split only where the rows' steps fall on different networks, as
        Wan 2.2's experts).
    model: the policy (default: the adapter that sampled, whose weights may have moved since).
    ref_model: a frozen reference (a pipeline or adapter) for the KL term, evaluated without grad;
        or "base": the policy itself with its LoRA adapters switched off for that forward, the
        reference of LoRA training (Flow-GRPO's `disable_adapter()`).
    Returns (log_prob [n], kl [n] or None).
    """
    S = len(rollout.steps)
    adapter = rollout.adapter if model is None else rollout.adapter.like(model)
    idx = _indices(indices, rollout.num_samples)
    if isinstance(step, bool):
        raise ValueError(f"step must be an int or one int per sample (got {step!r})")
    j = step
    if not isinstance(step, int):
        try:
            j = torch.as_tensor(step).cpu()
        except (TypeError, ValueError, RuntimeError):
            j = None
        integer = j is not None and not (j.dtype.is_floating_point or j.dtype.is_complex or j.dtype == torch.bool)
        if integer and j.ndim == 0:
            j = int(j)  # one step for all: a numpy or 0-d tensor integer
        elif not (integer and j.ndim == 1 and j.numel() == idx.numel()):
            raise ValueError(f"step must be an int or one int per sample ({idx.numel()} of them, as indices); got "
                             f"{step if j is None else ('shape ' + str(tuple(j.shape)) + ' ' + str(j.dtype))}")
        else:
            j = j.long()
            if j.numel() and not (0 <= int(j.min()) and int(j.max()) < S):
                raise ValueError(f"step: every entry must index rollout.steps, in [0, {S}) "
                                 f"(got {int(j.min())}..{int(j.max())})")
    if isinstance(j, int) and not 0 <= j < S:
        raise ValueError(f"step must index rollout.steps, in [0, {S}) (got {step!r})")
    adapter.prepare(**rollout.size)
    x = rollout.latents[idx, j]
    sigmas, timesteps = adapter.schedule(len(rollout.sigmas) - 1, x)
    if model is not None:
        _check_same_schedule(sigmas, rollout.sigmas, "model")
    if isinstance(j, int):
        i = rollout.steps[j]
        sigma, sigma_next = rollout.sigmas[i], rollout.sigmas[i + 1]
    else:
        i_list = [rollout.steps[k] for k in j.tolist()]
        groups: Dict[int, List[int]] = {}
        for pos, i in enumerate(i_list):
            groups.setdefault(adapter.expert(i), []).append(pos)
        if len(groups) > 1:  # rows on different networks: one call per network, back in order
            parts = [(pos, evaluate(rollout, j[pos], idx[pos], model=adapter, ref_model=ref_model, kl=kl))
                     for pos in groups.values()]
            order = torch.tensor([p for pos, _ in parts for p in pos])
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel())
            lp = torch.cat([out[0] for _, out in parts])
            kls = [out[1] for _, out in parts]
            return (lp[inverse.to(lp.device)],
                    None if kls[0] is None else torch.cat(kls)[inverse.to(lp.device)])
        i = torch.tensor(i_list, dtype=torch.long)
        sigma = torch.tensor([rollout.sigmas[k] for k in i_list], dtype=torch.float32)
        sigma_next = torch.tensor([rollout.sigmas[k + 1] for k in i_list], dtype=torch.float32)
    prev = rollout.next_latents[idx, j]
    rows = rollout.prompt_index[idx]
    inputs = adapter.model_inputs(rollout.cond, rows.to(adapter.device), rollout.guidance_scale)
    sig_arg = sigma if isinstance(j, int) else sigma.tolist()
    v = adapter.velocity(x, i, timesteps, sig_arg, inputs, rollout.guidance_scale).contiguous()
    ref_v = None
    if ref_model is not None:
        if isinstance(ref_model, str):
            if ref_model != "base":
                raise ValueError(f"ref_model must be a pipeline, an adapter, or 'base' (the policy with its LoRA "
                                 f"adapters switched off); got {ref_model!r}")
            ref, switch = adapter, adapter.lora_disabled()
        else:
            ref, switch = rollout.adapter.like(ref_model), contextlib.nullcontext()
            ref.prepare(**rollout.size)
            # per-step state such as Wan 2.2's expert choice; the reference runs the rollout's timesteps
            _check_same_schedule(ref.schedule(len(rollout.sigmas) - 1, x)[0], rollout.sigmas, "ref_model")
        with torch.no_grad(), switch:
            ref_inputs = ref.model_inputs(rollout.cond, rows.to(ref.device), rollout.guidance_scale)
            ref_v = ref.velocity(x, i, timesteps, sig_arg, ref_inputs, rollout.guidance_scale).contiguous()
    guidance, coef = None, 1.0
    if rollout.guidance is not None:  # the guided mean, with each row's coefficient as sampled
        guidance, coef = rollout.guidance[idx, j], rollout.guidance_coef[idx, j]
    out = sde_step(v, x, sigma, sigma_next, rollout.kind, rollout.noise_level, prev_sample=prev, ref_v=ref_v, kl=kl,
                   guidance=guidance, guidance_scale=coef, return_mean=False, **rollout.sde_options)
    return out.log_prob, out.kl
