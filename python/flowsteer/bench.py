"""Rollout throughput: flowsteer.sample against a reference loop written as research code does it.

The reference loop is the same model, settings and math as flowsteer.sample, written the way the
Flow-GRPO / DanceGRPO samplers are: every image's prompt encoded on its own, CFG as two separate
forwards, a per-sample timestep lookup (one host sync per sample and step) and the eager torch
step with torch.randn noise. `flowsteer bench rollout` and benches/ run it.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Dict, List

import torch

from .ops import philox_normal, reference
from .sampler import Branch, RandomWindow, SD3Adapter, sample


def research_group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-group normalisation as research code writes it: a Python loop over unique ids."""
    adv = torch.empty_like(rewards)
    for gid in torch.unique(group_ids):
        m = group_ids == gid
        r = rewards[m]
        adv[m] = (r - r.mean()) / (r.std(unbiased=False) + 1e-4)
    return adv


def reference_rollout(pipe, prompts: List[str], group_size: int, num_steps: int, guidance_scale: float, kind: str,
                      noise_level: float, seed: int, height: int, width: int, max_sequence_length: int = 256,
                      noise: str = "torch", transformer=None):
    """SD3 rollouts as research code writes them. Returns (final latents [N, ...], log_probs [N, T]).

    noise="torch" draws each step's noise with torch.randn, as research code does; noise="philox"
    draws flowsteer.sample's noise for the same seed (Philox(seed, offset=step)), so that tests can
    check that the two loops compute the same rollout. transformer: what runs in place of
    pipe.transformer (a torch.compile'd one, say).
    """
    transformer = transformer if transformer is not None else pipe.transformer
    if noise not in ("torch", "philox"):
        raise ValueError(f"noise must be 'torch' or 'philox' (got {noise!r})")
    device = pipe._execution_device
    per_image = [p for p in prompts for _ in range(group_size)]
    n = len(per_image)
    with torch.no_grad():
        pe, ne, pp, npool = pipe.encode_prompt(prompt=per_image, prompt_2=None, prompt_3=None, device=device,
                                               do_classifier_free_guidance=True, negative_prompt=[""] * n,
                                               max_sequence_length=max_sequence_length)
        generator = torch.Generator().manual_seed(seed)
        latents = pipe.prepare_latents(n, pipe.transformer.config.in_channels, height, width, pe.dtype, device,
                                       generator)
        sched = copy.deepcopy(pipe.scheduler)
        sched.set_timesteps(num_steps, device=device)
        sigma_max = float(sched.sigmas[1])
        log_probs = []
        for step, t in enumerate(sched.timesteps):
            timestep = t.expand(n)
            v_text = transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=pe,
                                 pooled_projections=pp, return_dict=False)[0]
            v_uncond = transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=ne,
                                   pooled_projections=npool, return_dict=False)[0]
            v = v_uncond + guidance_scale * (v_text - v_uncond)
            index = [int((sched.timesteps == t_i).nonzero().item()) for t_i in timestep]
            sigma = sched.sigmas[index].to(device)
            sigma_next = sched.sigmas[[i + 1 for i in index]].to(device)
            if noise == "torch":
                eps = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            else:
                eps = philox_normal(tuple(latents.shape), seed, step, device=device)
            out = reference.sde_step(v, latents, sigma, sigma_next, kind, noise_level, noise=eps,
                                     sigma_max=sigma_max if sigma_max < 1 else None)
            latents = out["prev_sample"].to(pe.dtype)
            log_probs.append(out["log_prob"])
    return latents, torch.stack(log_probs, dim=1)


def transformer_floor(pipe, n: int, num_steps: int, height: int, width: int, max_sequence_length: int = 256,
                      transformer=None):
    """A function running only what every SD3 rollout of n images must run: `num_steps` transformer
    forwards on a CFG batch of 2n, with no scheduler, step or encoding. Its time is the loop's floor."""
    device = pipe._execution_device
    transformer = transformer if transformer is not None else pipe.transformer
    with torch.no_grad():
        pe, ne, pp, npool = pipe.encode_prompt(prompt=["floor"] * n, prompt_2=None, prompt_3=None, device=device,
                                               do_classifier_free_guidance=True, negative_prompt=[""] * n,
                                               max_sequence_length=max_sequence_length)
        hidden, pooled = torch.cat([pe, ne]), torch.cat([pp, npool])
        latents = pipe.prepare_latents(2 * n, pipe.transformer.config.in_channels, height, width, pe.dtype, device,
                                       torch.Generator().manual_seed(0))
        timestep = torch.full((2 * n,), 500.0, device=device)

    def run():
        with torch.no_grad():
            for _ in range(num_steps):
                transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=hidden,
                            pooled_projections=pooled, return_dict=False)

    return run


def _time(fns: Dict[str, Callable], device: torch.device, repeats: int) -> Dict[str, float]:
    """Best seconds per call of each function, timed in turns (round r runs every function once),
    so that a machine's drift over the run falls on all of them alike. One warm-up call each first
    (compilation included)."""

    def once(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for fn in fns.values():
        fn()
    best = {key: float("inf") for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            best[key] = min(best[key], once(fn))
    return best


def bench_rollout(pipe, *, prompts: int = 2, group_size: int = 8, num_steps: int = 10, guidance_scale: float = 4.5,
                  height: int = 32, width: int = 32, kind: str = "flow", noise_level: float = 0.7,
                  compile: bool = False, compile_reference: bool = False, branch_group_size: int = 24,
                  repeats: int = 3, max_sequence_length: int = 256,
                  log=print) -> Dict[str, float]:
    """Images per second of the reference loop, flowsteer.sample (and with compile=True), and branch
    mode at k = T/2 against full SDE rollouts with the same number of trained steps per image.

    The transformer-only floor (`transformer_floor`) is timed with them; compile_reference (with
    compile) adds the reference loop and the floor with a compiled transformer. Each group of
    functions is timed in turns, `repeats` rounds, best of each.
    """
    device = pipe._execution_device
    model = SD3Adapter(pipe, max_sequence_length=max_sequence_length)
    texts = [f"prompt number {i}" for i in range(prompts)]
    n = prompts * group_size
    common = dict(num_steps=num_steps, guidance_scale=guidance_scale, kind=kind, noise_level=noise_level,
                  height=height, width=width)
    floor_key = "transformer forwards only (floor)"
    results = {}

    def report(times, images):
        for key, seconds in times.items():
            results[key] = images / seconds
            log(f"{key:44s} {images / seconds:9.2f} images/s  ({seconds * 1e3:8.1f} ms for {images} images)")

    # Each group is timed in turns and reported at once (a run cut short keeps the groups before).
    report(_time({
        floor_key: transformer_floor(pipe, n, num_steps, height, width, max_sequence_length),
        "reference_loop": lambda: reference_rollout(pipe, texts, group_size, num_steps, guidance_scale, kind,
                                                    noise_level, 0, height, width, max_sequence_length),
        "flowsteer.sample": lambda: sample(model, texts, group_size=group_size, decode=False, **common),
    }, device, repeats), n)
    results["speedup"] = results["flowsteer.sample"] / results["reference_loop"]
    floor = results[floor_key]
    log(f"flowsteer.sample vs reference loop: {results['speedup']:.2f}x; time over the floor: flowsteer.sample "
        f"{floor / results['flowsteer.sample']:.2f}x, reference loop {floor / results['reference_loop']:.2f}x")
    if compile:
        model_compiled = SD3Adapter(pipe, max_sequence_length=max_sequence_length, compile=True)
        sample_compiled = lambda: sample(model_compiled, texts, group_size=group_size, decode=False, **common)  # noqa: E731
        key = "flowsteer.sample(compile=True)"
        group = {key: sample_compiled}
        if compile_reference:
            group["compiled transformer forwards only (floor)"] = transformer_floor(
                pipe, n, num_steps, height, width, max_sequence_length, model_compiled.transformer)
        report(_time(group, device, repeats), n)
        results["compile_speedup"] = results[key] / results["reference_loop"]
        log(f"flowsteer.sample(compile=True) vs reference loop: {results['compile_speedup']:.2f}x")
    if compile and compile_reference:
        # The reference loop with a compiled transformer too: what flowsteer itself adds once compile
        # is on. Its CFG halves are batches of n, compiled for that shape; timed in turns with the
        # compiled flowsteer.sample again, and the ratio is taken within this group.
        reference_compiled = torch.compile(pipe.transformer, dynamic=False)
        times = _time({
            "reference_loop(compiled transformer)": lambda: reference_rollout(
                pipe, texts, group_size, num_steps, guidance_scale, kind, noise_level, 0, height, width,
                max_sequence_length, transformer=reference_compiled),
            key + " again": sample_compiled,
        }, device, repeats)
        report(times, n)
        results["compile_vs_compiled_reference"] = \
            results[key + " again"] / results["reference_loop(compiled transformer)"]
        floor_c = results["compiled transformer forwards only (floor)"]
        log(f"flowsteer.sample(compile=True) vs the reference loop with the same compiled transformer: "
            f"{results['compile_vs_compiled_reference']:.2f}x; time over the compiled floor: flowsteer.sample "
            f"{floor_c / results[key]:.2f}x, reference loop "
            f"{floor_c / results['reference_loop(compiled transformer)']:.2f}x")
    if branch_group_size <= 0:
        return results
    # Branch mode: one ODE prefix per prompt to step T/2, then T/2 stochastic steps per image;
    # against rollouts with a random window of T/2 stochastic steps: equal trained steps per image.
    half = num_steps // 2
    full_key, branch_key = f"full SDE, G={branch_group_size}, window {half}", f"branch at {half}, G={branch_group_size}"
    report(_time({
        full_key: lambda: sample(model, texts, group_size=branch_group_size, decode=False, window=RandomWindow(half),
                                 **common),
        branch_key: lambda: sample(model, texts, group_size=branch_group_size, decode=False, window=Branch(half),
                                   **common),
    }, device, repeats), prompts * branch_group_size)
    results["branch_speedup"] = results[branch_key] / results[full_key]
    log(f"branch vs full SDE rollouts: {results['branch_speedup']:.2f}x")
    return results


# ------------------------------------------------------------------------------------ training


def research_train_step(pipe, rollout, advantages: torch.Tensor, clip_range, beta: float, ref_transformer=None,
                        kl: str = "flow_grpo", max_sequence_length: int = 256, *, num_train_steps=None,
                        optimizer=None, params=None, max_grad_norm=None) -> Dict[str, torch.Tensor]:
    """The training update of one rollout batch of an SD3 pipeline as Flow-GRPO's train_sd3.py writes it.

    One minibatch (the whole batch); for each trained step j in order, a separate loss and its
    `.backward()`, gradients accumulated over the steps (each loss over num_train_steps, as
    accelerate's gradient accumulation scales it); then, with an optimizer, one clipped step:

    - the prompts are encoded per image (N prompts and N negative prompts, pipe.encode_prompt),
      once per call, and CFG runs as Flow-GRPO's compute_log_prob runs it: one forward of the
      concatenated batch [negative; positive], split with chunk(2);
    - the step is `sde_step_with_logprob`: a per-sample timestep -> schedule index lookup (one host
      sync per sample and step), then mean, std and log_prob with plain torch ops in fp32, the
      formulas of ops/reference.py (reference.sde_step, which is Flow-GRPO's math for kind 'flow');
    - with beta > 0, the KL to a reference from a separate forward without grad: the transformer
      with its LoRA adapters disabled (ref_transformer None), or ref_transformer; its mean from
      the same step, KL = mean((mean - ref_mean)^2) / (2 g^2) (kl="flow_grpo") or / (2 std^2)
      ("exact"), reference.sde_kl;
    - the PPO-clip loss with torch ops, mean(max(-A rho, -A clip(rho, 1 - lo, 1 + hi))) + beta mean(KL).

    rollout: a flowsteer Rollout of pipe (its latents, next_latents, old log_probs [N, S], steps
    and prompts). advantages: [N], or [N, S] per step. clip_range: eps or (eps_low, eps_high).
    num_train_steps: the first K of the S steps (default all). optimizer, params, max_grad_norm:
    the optimizer stepped once after the K backwards, gradients clipped to max_grad_norm over params
    (None: no clipping); without an optimizer the gradients stay in the parameters' .grad.

    Returns detached tensors: log_prob [N, K], kl [N, K] (None when beta == 0), loss [K] (each step's
    loss before the 1 / K scaling), approx_kl [K] and clipfrac [K] (Flow-GRPO's statistics).
    """
    if rollout.guidance is not None:
        raise ValueError("research_train_step: the rollout was sampled with reward guidance (Euphonium); the "
                         "research-style step has no guided mean")
    transformer = pipe.transformer
    device = pipe._execution_device
    N, S = rollout.log_probs.shape
    K = S if num_train_steps is None else num_train_steps
    if not (isinstance(K, int) and 1 <= K <= S):
        raise ValueError(f"num_train_steps must be an int in [1, {S}] (the rollout's stochastic steps); got {K!r}")
    lo, hi = clip_range if isinstance(clip_range, (tuple, list)) else (clip_range, clip_range)
    if advantages.shape not in ((N,), (N, S)):
        raise ValueError(f"advantages must be [N] = [{N}] or [N, S] = [{N}, {S}] (got {tuple(advantages.shape)})")
    num_steps = len(rollout.sigmas) - 1
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(num_steps, device=device)
    if max(abs(a - b) for a, b in zip(sched.sigmas.tolist(), rollout.sigmas)) > 1e-6:
        raise ValueError("research_train_step: pipe.scheduler.set_timesteps gives other sigmas than the rollout's "
                         "(a dynamic shift?); it supports schedules without one")
    sigma_max = float(sched.sigmas[1])
    cfg = rollout.guidance_scale > 1.0
    with torch.no_grad():
        pe, ne, pp, npool = pipe.encode_prompt(prompt=list(rollout.prompts), prompt_2=None, prompt_3=None,
                                               device=device, do_classifier_free_guidance=cfg,
                                               negative_prompt=[""] * N if cfg else None,
                                               max_sequence_length=max_sequence_length)
    embeds, pooled = (torch.cat([ne, pe]), torch.cat([npool, pp])) if cfg else (pe, pp)

    def forward(net, latents, timestep):
        if not cfg:
            return net(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
                       pooled_projections=pooled, return_dict=False)[0]
        v = net(hidden_states=torch.cat([latents] * 2), timestep=torch.cat([timestep] * 2),
                encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        v_uncond, v_text = v.chunk(2)
        return v_uncond + rollout.guidance_scale * (v_text - v_uncond)

    def step_with_log_prob(v, latents, timestep, next_latents):
        index = [sched.index_for_timestep(t) for t in timestep]
        sigma = sched.sigmas[index]
        sigma_next = sched.sigmas[[i + 1 for i in index]]
        return reference.sde_step(v.float(), latents.float(), sigma, sigma_next, rollout.kind, rollout.noise_level,
                                  prev_sample=next_latents.float(), sigma_max=sigma_max if sigma_max < 1 else None,
                                  cps_logprob=rollout.sde_options.get("cps_logprob", "exact"))

    info: Dict[str, list] = {k: [] for k in ("log_prob", "kl", "loss", "approx_kl", "clipfrac")}
    training = transformer.training
    transformer.train()
    try:
        for j in range(K):
            latents, next_latents = rollout.latents[:, j], rollout.next_latents[:, j]
            timestep = sched.timesteps[rollout.steps[j]].expand(N)  # Flow-GRPO's sample["timesteps"][:, j]
            out = step_with_log_prob(forward(transformer, latents, timestep), latents, timestep, next_latents)
            log_prob = out["log_prob"]
            kl_value = None
            if beta > 0:
                with torch.no_grad():
                    if ref_transformer is None:
                        transformer.disable_adapters()
                        try:
                            ref_v = forward(transformer, latents, timestep)
                        finally:
                            transformer.enable_adapters()
                    else:
                        ref_v = forward(ref_transformer, latents, timestep)
                    ref_mean = step_with_log_prob(ref_v, latents, timestep, next_latents)["mean"]
                kl_value = reference.sde_kl(out["mean"], ref_mean, out["g"] if kl == "flow_grpo" else out["std"])
            adv = advantages[:, j] if advantages.ndim == 2 else advantages
            old_log_prob = rollout.log_probs[:, j]
            ratio = torch.exp(log_prob - old_log_prob)
            unclipped_loss = -adv * ratio
            clipped_loss = -adv * torch.clamp(ratio, 1.0 - lo, 1.0 + hi)
            loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
            if kl_value is not None:
                loss = loss + beta * torch.mean(kl_value)
            (loss / K).backward()
            info["log_prob"].append(log_prob.detach())
            info["loss"].append(loss.detach())
            info["approx_kl"].append(0.5 * torch.mean((log_prob.detach() - old_log_prob) ** 2))
            info["clipfrac"].append(torch.mean(((ratio.detach() < 1.0 - lo) | (ratio.detach() > 1.0 + hi)).float()))
            if kl_value is not None:
                info["kl"].append(kl_value.detach())
        if optimizer is not None:
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params if params is not None else transformer.parameters(),
                                               max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
    finally:
        transformer.train(training)
    return {"log_prob": torch.stack(info["log_prob"], dim=1),
            "kl": torch.stack(info["kl"], dim=1) if info["kl"] else None,
            "loss": torch.stack(info["loss"]), "approx_kl": torch.stack(info["approx_kl"]),
            "clipfrac": torch.stack(info["clipfrac"])}
