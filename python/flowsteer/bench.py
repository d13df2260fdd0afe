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

from .ops import reference
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
                      noise_level: float, seed: int, height: int, width: int, max_sequence_length: int = 256):
    """SD3 rollouts as research code writes them. Returns (final latents [N, ...], log_probs [N, T])."""
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
        for t in sched.timesteps:
            timestep = t.expand(n)
            v_text = pipe.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=pe,
                                      pooled_projections=pp, return_dict=False)[0]
            v_uncond = pipe.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=ne,
                                        pooled_projections=npool, return_dict=False)[0]
            v = v_uncond + guidance_scale * (v_text - v_uncond)
            index = [int((sched.timesteps == t_i).nonzero().item()) for t_i in timestep]
            sigma = sched.sigmas[index].to(device)
            sigma_next = sched.sigmas[[i + 1 for i in index]].to(device)
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            out = reference.sde_step(v, latents, sigma, sigma_next, kind, noise_level, noise=noise,
                                     sigma_max=sigma_max if sigma_max < 1 else None)
            latents = out["prev_sample"].to(pe.dtype)
            log_probs.append(out["log_prob"])
    return latents, torch.stack(log_probs, dim=1)


def transformer_floor(pipe, n: int, num_steps: int, height: int, width: int, max_sequence_length: int = 256):
    """A function running only what every SD3 rollout of n images must run: `num_steps` transformer
    forwards on a CFG batch of 2n, with no scheduler, step or encoding. Its time is the loop's floor."""
    device = pipe._execution_device
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
                pipe.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=hidden,
                                 pooled_projections=pooled, return_dict=False)

    return run


def _time(fn: Callable, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_rollout(pipe, *, prompts: int = 2, group_size: int = 8, num_steps: int = 10, guidance_scale: float = 4.5,
                  height: int = 32, width: int = 32, kind: str = "flow", noise_level: float = 0.7,
                  compile: bool = False, branch_group_size: int = 24, repeats: int = 3, max_sequence_length: int = 256,
                  log=print) -> Dict[str, float]:
    """Images per second of the reference loop, flowsteer.sample (and with compile=True), and branch
    mode at k = T/2 against full SDE rollouts with the same number of trained steps per image."""
    device = pipe._execution_device
    model = SD3Adapter(pipe, max_sequence_length=max_sequence_length)
    model_compiled = SD3Adapter(pipe, max_sequence_length=max_sequence_length, compile=True) if compile else None
    texts = [f"prompt number {i}" for i in range(prompts)]
    n = prompts * group_size
    common = dict(num_steps=num_steps, guidance_scale=guidance_scale, kind=kind, noise_level=noise_level,
                  height=height, width=width)
    results = {}

    def report(key, seconds, images):
        results[key] = images / seconds
        log(f"{key:34s} {images / seconds:9.2f} images/s  ({seconds * 1e3:8.1f} ms for {images} images)")

    report("transformer forwards only (floor)",
           _time(transformer_floor(pipe, n, num_steps, height, width, max_sequence_length), device, repeats), n)
    report("reference_loop", _time(lambda: reference_rollout(pipe, texts, group_size, num_steps, guidance_scale, kind,
                                                             noise_level, 0, height, width, max_sequence_length),
                                       device, repeats), n)
    report("flowsteer.sample", _time(lambda: sample(model, texts, group_size=group_size, decode=False, **common),
                                     device, repeats), n)
    if compile:
        report("flowsteer.sample(compile=True)",
               _time(lambda: sample(model_compiled, texts, group_size=group_size, decode=False, **common), device,
                     repeats), n)
    results["speedup"] = results["flowsteer.sample"] / results["reference_loop"]
    floor = results["transformer forwards only (floor)"]
    log(f"flowsteer.sample vs reference loop: {results['speedup']:.2f}x; time over the floor: flowsteer.sample "
        f"{floor / results['flowsteer.sample']:.2f}x, reference loop {floor / results['reference_loop']:.2f}x")
    if compile:
        results["compile_speedup"] = results["flowsteer.sample(compile=True)"] / results["reference_loop"]
        log(f"flowsteer.sample(compile=True) vs reference loop: {results['compile_speedup']:.2f}x")
    if branch_group_size <= 0:
        return results
    # Branch mode: one ODE prefix per prompt to step T/2, then T/2 stochastic steps per image;
    # against rollouts with a random window of T/2 stochastic steps: equal trained steps per image.
    half = num_steps // 2
    nb = prompts * branch_group_size
    report(f"full SDE, G={branch_group_size}, window {half}",
           _time(lambda: sample(model, texts, group_size=branch_group_size, decode=False, window=RandomWindow(half),
                                **common), device, repeats), nb)
    report(f"branch at {half}, G={branch_group_size}",
           _time(lambda: sample(model, texts, group_size=branch_group_size, decode=False, window=Branch(half),
                                **common), device, repeats), nb)
    results["branch_speedup"] = results[f"branch at {half}, G={branch_group_size}"] / \
        results[f"full SDE, G={branch_group_size}, window {half}"]
    log(f"branch vs full SDE rollouts: {results['branch_speedup']:.2f}x")
    return results
