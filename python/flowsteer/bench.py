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
