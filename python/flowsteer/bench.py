"""Rollout throughput: flowsteer.sample against a reference loop written as research code does it.

The reference loop is the same model, settings and math as flowsteer.sample, written the way the
Flow-GRPO / DanceGRPO samplers are: every image's prompt encoded on its own, CFG as two separate
forwards, a per-sample timestep lookup (one host sync per sample and step) and the eager torch
step with torch.randn noise. `flowsteer bench rollout` and benches/ run it.

The training step likewise: research_train_step is GRPOTrainer's training phase on one rollout
batch written as Flow-GRPO's train_sd3.py writes it, check_research_step_matches checks that the
two compute the same log-probs, KL and gradient, and bench_train times a trainer iteration and
the two training steps (benches/bench_train.py).
"""
from __future__ import annotations

import copy
import json
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .ops import backends as _backend
from .ops import philox_normal, reference
from .sampler import Branch, RandomWindow, SD3Adapter, sample
from .sampler import evaluate as evaluate_step


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


def _time(fns: Dict[str, Callable], device: torch.device, repeats: int, reset: Optional[Callable] = None,
          log: Optional[Callable] = None, progress=None) -> Dict[str, float]:
    """Best seconds per call of each function, timed in turns (round r runs every function once),
    so that a machine's drift over the run falls on all of them alike. One warm-up call each first
    (compilation included). reset: called, untimed, before every call (and once at the end);
    log: gets each call's seconds as soon as it is measured; progress: a tqdm bar, told before each
    call what it runs and advanced after it."""

    def once(fn, key=None, r=0):
        if progress is not None:
            progress.set_description_str(f"{key} ({'warm-up' if r == 0 else f'round {r}/{repeats}'})")
        if reset is not None:
            reset()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        if progress is not None:
            progress.update(1)
        return seconds

    for key, fn in fns.items():
        once(fn, key)
    best = {key: float("inf") for key in fns}
    for r in range(repeats):
        for key, fn in fns.items():
            seconds = once(fn, key, r + 1)
            best[key] = min(best[key], seconds)
            if log is not None:
                log(f"  round {r + 1}/{repeats}: {key:32s} {seconds * 1e3:9.1f} ms")
    if reset is not None:
        reset()
    return best


def bench_rollout(pipe, *, prompts: int = 2, group_size: int = 8, num_steps: int = 10, guidance_scale: float = 4.5,
                  height: int = 32, width: int = 32, kind: str = "flow", noise_level: float = 0.7,
                  compile: bool = False, compile_reference: bool = False, branch_group_size: int = 24,
                  repeats: int = 3, max_sequence_length: int = 256,
                  log=print, progress: bool = False) -> Dict[str, float]:
    """Images per second of the reference loop, flowsteer.sample (and with compile=True), and branch
    mode at k = T/2 against full SDE rollouts with the same number of trained steps per image.

    The transformer-only floor (`transformer_floor`) is timed with them; compile_reference (with
    compile) adds the reference loop and the floor with a compiled transformer. Each group of
    functions is timed in turns, `repeats` rounds, best of each. progress: show a tqdm bar (on
    stderr) of the timed calls, each named as it runs (`flowsteer bench rollout` does).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (got {repeats})")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        calls = 3 + (1 + int(compile_reference) if compile else 0) + (2 if compile and compile_reference else 0) \
            + (2 if branch_group_size > 0 else 0)
        bar = tqdm(total=calls * (repeats + 1), unit="call", dynamic_ncols=True, leave=False)
        print_line = log

        def log(line):  # noqa: F811 - the bar steps aside for each result line
            with tqdm.external_write_mode():
                print_line(line)

    try:
        return _bench_rollout(pipe, prompts, group_size, num_steps, guidance_scale, height, width, kind, noise_level,
                              compile, compile_reference, branch_group_size, repeats, max_sequence_length, log, bar)
    finally:
        if bar is not None:
            bar.close()


def _bench_rollout(pipe, prompts, group_size, num_steps, guidance_scale, height, width, kind, noise_level, compile,
                   compile_reference, branch_group_size, repeats, max_sequence_length, log, bar) -> Dict[str, float]:
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
    }, device, repeats, progress=bar), n)
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
        report(_time(group, device, repeats, progress=bar), n)
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
        }, device, repeats, progress=bar)
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
    }, device, repeats, progress=bar), prompts * branch_group_size)
    results["branch_speedup"] = results[branch_key] / results[full_key]
    log(f"branch vs full SDE rollouts: {results['branch_speedup']:.2f}x")
    return results


# ------------------------------------------------------------------------------------ training


def research_prompt_embeds(pipe, prompts: List[str], cfg: bool, max_sequence_length: int = 256):
    """(embeds, pooled) of N per-image prompts as Flow-GRPO's training loop feeds them to the
    transformer: [2N, L, D] and [2N, D] with CFG ([negative; positive], the negative prompt "" encoded
    per image), [N, L, D] and [N, D] without."""
    N = len(prompts)
    with torch.no_grad():
        pe, ne, pp, npool = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                               device=pipe._execution_device, do_classifier_free_guidance=cfg,
                                               negative_prompt=[""] * N if cfg else None,
                                               max_sequence_length=max_sequence_length)
    return (torch.cat([ne, pe]), torch.cat([npool, pp])) if cfg else (pe, pp)


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
      sync per sample and step, scheduler.index_for_timestep), then mean, std and log_prob with
      plain torch ops in fp32, the formulas of ops/reference.py (reference.sde_step; for kind 'flow'
      Flow-GRPO's mean x (1 + g^2 dt / 2 sigma) + v (1 + g^2 (1 - sigma) / 2 sigma) dt, dt < 0,
      written as x - delta v - g^2 delta / (2 sigma) (x + (1 - sigma) v));
    - with beta > 0, the KL to a reference from a separate forward without grad: the transformer
      with its LoRA adapters disabled (ref_transformer None; diffusers' disable_adapters, where
      Flow-GRPO's peft model has disable_adapter()), or ref_transformer; its mean from the same
      step, KL = mean((mean - ref_mean)^2) / (2 g^2) (kl="flow_grpo") or / (2 std^2) ("exact"),
      reference.sde_kl;
    - the PPO-clip loss with torch ops, mean(max(-A rho, -A clip(rho, 1 - lo, 1 + hi))) + beta mean(KL).

    rollout: a flowsteer Rollout of pipe (its latents, next_latents, old log_probs [N, S], steps
    and prompts). advantages: [N], or [N, S] per step. clip_range: eps or (eps_low, eps_high).
    num_train_steps: the first K of the S steps (default all). optimizer, params, max_grad_norm:
    the optimizer stepped once after the K backwards, gradients clipped to max_grad_norm over params
    (None: no clipping); without an optimizer the gradients stay in the parameters' .grad.

    Returns detached tensors: log_prob [N, K], kl [N, K] (None when beta == 0), loss [K] (each step's
    loss before the 1 / K scaling), approx_kl [K] and clipfrac [K] (Flow-GRPO's statistics).
    """
    if type(pipe).__name__ != "StableDiffusion3Pipeline":
        raise ValueError(f"research_train_step writes the training step of an SD3 pipeline (StableDiffusion3Pipeline); "
                         f"got {type(pipe).__name__}")
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
    embeds, pooled = research_prompt_embeds(pipe, rollout.prompts, cfg, max_sequence_length)

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


def bench_trainer(pipe, *, prompts: int = 2, group_size: int = 4, num_steps: int = 4, height: int = 16,
                  width: int = 16, lora_rank: int = 4, max_sequence_length: int = 16, overrides: Sequence[str] = ()):
    """A GRPOTrainer on pipe with the flow_grpo recipe made small: `prompts` prompts per iteration
    ("prompt number i") x group_size, num_steps steps of height x width, LoRA rank lora_rank
    (alpha 2 rank) on the recipe's modules, the brightness reward of flowsteer.testing, fp32, one
    minibatch (the whole batch), no EMA, every sample trained; then `overrides` (--set KEY=VALUE
    strings). Adds LoRA adapters to pipe.transformer: give a pipeline that has none."""
    from .train import GRPOTrainer, load_config

    if getattr(pipe.transformer, "_hf_peft_config_loaded", False):
        raise ValueError("bench_trainer adds LoRA adapters to pipe.transformer, which has some already (a trainer "
                         "was built on this pipeline before): pass a freshly built pipeline")
    cfg = load_config("flow_grpo", [
        "model.dtype=float32", f"model.max_sequence_length={max_sequence_length}",
        f"model.lora.rank={lora_rank}", f"model.lora.alpha={2 * lora_rank}",
        "prompts.train=" + json.dumps([f"prompt number {i}" for i in range(prompts)]),
        "rewards=" + json.dumps({"flowsteer.testing.rewards:brightness": {"weight": 1.0}}),
        f"sampling.group_size={group_size}", f"sampling.num_steps={num_steps}", f"sampling.height={height}",
        f"sampling.width={width}", f"train.prompts_per_iteration={prompts}", "train.batch_size=null",
        "train.mixed_precision=fp32", "train.ema=false", "train.mask_zero_advantage=false", "eval.every=0",
        "logging.tqdm=false", "logging.tensorboard=false", *overrides])
    return GRPOTrainer(pipe, None, cfg)


def fixed_batch(trainer):
    """(rollout, advantages) of one iteration's batch as GRPOTrainer.step makes them (its next
    prompts, its current weights), without training on it or advancing the trainer."""
    P = trainer.config.train.prompts_per_iteration
    idx = copy.deepcopy(trainer.sampler).next(P)
    from .sampler import NoiseKeys

    rollout = trainer._rollout([trainer.train_prompts[i] for i in idx], NoiseKeys(tuple(range(P))),
                               trainer.config.sampling.group_size)
    outputs = trainer._score(trainer.reward, rollout, rollout.prompts, None)
    outcome = trainer._advantages(outputs, rollout.group_ids).to(trainer.device)
    return rollout, trainer.algorithm.advantages(trainer, outcome, rollout)


def trainer_snapshot(trainer):
    """A function that puts the trainer's weights, optimizer (and EMA) state and step counters
    back as they are now: GRPOTrainer._train_on and research_train_step update the weights, and
    each timed call starts from the same ones."""
    params = [p.detach().clone() for p in trainer.params]
    optimizer = copy.deepcopy(trainer.optimizer.state_dict())
    ema = None if trainer.ema is None else [s.clone() for s in trainer.ema.shadow]
    counters = trainer.optimizer_steps, trainer.skipped_steps

    def restore():
        with torch.no_grad():
            for p, saved in zip(trainer.params, params):
                p.copy_(saved)
            if ema is not None:
                for s, saved in zip(trainer.ema.shadow, ema):
                    s.copy_(saved)
        # load_state_dict keeps the given tensors, which the next step updates in place: a fresh copy each time
        trainer.optimizer.load_state_dict(copy.deepcopy(optimizer))
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.optimizer_steps, trainer.skipped_steps = counters

    return restore


def research_step_settings(trainer, rollout) -> Dict[str, Any]:
    """research_train_step's keyword arguments for the trainer's training phase on rollout: its
    clip range, beta, KL form and reference (None: the LoRA adapters off; or the frozen copy's
    transformer), T5 tokens, and how many steps it trains (GRPOTrainer._trained_steps)."""
    t = trainer.config.train
    K = trainer._trained_steps(rollout.log_probs.shape[1], 1, torch.Generator()).shape[1]
    ref = None if trainer.ref in (None, "base") else trainer.ref.pipe.transformer
    return dict(clip_range=t.clip_range, beta=t.beta, ref_transformer=ref, kl=t.kl,
                max_sequence_length=trainer.adapter.max_sequence_length, num_train_steps=K)


def check_research_step_matches(trainer, rollout, advantages: torch.Tensor) -> Dict[str, float]:
    """Check that research_train_step computes GRPOTrainer's training phase on this batch; raises
    AssertionError if not. The trainer's weights and optimizer are left as they were.

    Compares, for each trained step j: the research step's log-probs with flowsteer.evaluate's
    (and with the rollout's own), its KL with evaluate's against the trainer's reference, and the
    gradient it accumulates with the one GRPOTrainer._train_on hands its optimizer. Needs the
    trainer's own settings for a research step: kind flow/dance/cps, the steps trained in order,
    one minibatch, one inner epoch, every sample trained, fp32.
    Returns the largest errors, and the largest error over its tolerance of each quantity.
    """
    t = trainer.config.train
    if not (t.timestep_order == "in_order" and t.batch_size is None and t.inner_epochs == 1
            and not t.mask_zero_advantage and t.mixed_precision == "fp32"):
        raise ValueError("check_research_step_matches needs the training phase research_train_step writes: "
                         "train.timestep_order in_order, batch_size null, inner_epochs 1, mask_zero_advantage false "
                         f"and mixed_precision fp32 (got {t.timestep_order}, {t.batch_size}, {t.inner_epochs}, "
                         f"{t.mask_zero_advantage}, {t.mixed_precision})")
    kwargs = research_step_settings(trainer, rollout)
    K = kwargs["num_train_steps"]
    restore = trainer_snapshot(trainer)
    captured = []
    optimizer_step = trainer._optimizer_step

    def capture():  # the gradient the trainer's optimizer step sees
        captured.append(torch.cat([p.grad.flatten() for p in trainer.params]))
        return optimizer_step()

    trainer._optimizer_step = capture
    try:
        trainer._train_on(rollout, advantages)
    finally:
        del trainer._optimizer_step
        restore()
    try:
        research = research_train_step(trainer.model, rollout, advantages, **kwargs)
        grad_research = torch.cat([p.grad.flatten() for p in trainer.params])
    finally:
        restore()
    eps = torch.finfo(torch.float32).eps
    sigma_max = rollout.sde_options.get("sigma_max")
    out: Dict[str, float] = {"log_prob_max_err": 0.0, "log_prob_err_over_tol": 0.0, "log_prob_vs_rollout_max_err": 0.0,
                             "kl_max_err": 0.0, "kl_err_over_tol": 0.0}
    min_std, x_max = float("inf"), float(rollout.next_latents[:, :K].abs().max())
    with torch.no_grad():
        for j in range(K):
            lp, kl = evaluate_step(rollout, j, ref_model=trainer.ref, kl=t.kl)
            lp_research = research["log_prob"][:, j]
            # tests/helpers.py's floor: the fused kernel and the reference evaluate the same formula
            # in different orders, a few fp32 ulp of the largest term apart (16 ulp allowed).
            tol = 16 * eps * max(1.0, float(lp.abs().max()))
            err = float((lp_research - lp.float()).abs().max())
            err_old = float((lp_research - rollout.log_probs[:, j].float()).abs().max())
            assert err <= tol and err_old <= tol, (
                f"research_train_step's log-prob of trained step {j} differs from flowsteer.evaluate's by {err:.3e} "
                f"(from the rollout's by {err_old:.3e}); tol {tol:.3e}")
            out["log_prob_max_err"] = max(out["log_prob_max_err"], err)
            out["log_prob_err_over_tol"] = max(out["log_prob_err_over_tol"], err / tol)
            out["log_prob_vs_rollout_max_err"] = max(out["log_prob_vs_rollout_max_err"], err_old)
            i = rollout.steps[j]
            _, std, g = reference.sde_coefficients(rollout.sigmas[i], rollout.sigmas[i + 1], rollout.kind,
                                                   rollout.noise_level, sigma_max, torch.zeros(1, 1))
            std, g = float(std), float(g)
            min_std = min(min_std, std)
            if research["kl"] is not None:
                # KL = mean((mean - ref_mean)^2) / (2 s^2): a difference of two means of size |x'|,
                # each 16 ulp of |x'| (e) off at most, moves it by e sqrt(2 KL) / s + e^2 / (2 s^2).
                s = g if t.kl == "flow_grpo" else std
                e = 16 * eps * max(1.0, x_max)
                tol_kl = e * (2 * kl.float()).sqrt() / s + e**2 / (2 * s**2)
                err_kl = (research["kl"][:, j] - kl.float()).abs()
                worst = int((err_kl / tol_kl).argmax())
                assert bool((err_kl <= tol_kl).all()), (
                    f"research_train_step's KL of trained step {j} differs from flowsteer.evaluate's by "
                    f"{float(err_kl[worst]):.3e} at sample {worst} (KL {float(kl[worst]):.3e}; tol "
                    f"{float(tol_kl[worst]):.3e})")
                out["kl_max_err"] = max(out["kl_max_err"], float(err_kl.max()))
                out["kl_err_over_tol"] = max(out["kl_err_over_tol"], float(err_kl[worst] / tol_kl[worst]))
    # The gradient's relative error is that of x' - mean, a few ulp of |x'| over the step's std:
    # twice the 16-ulp bound at the trained step with the smallest std.
    (grad_trainer,) = captured
    rel = float((grad_research - grad_trainer).norm() / grad_trainer.norm().clamp_min(torch.finfo(torch.float32).tiny))
    tol_grad = 2 * 16 * eps * max(1.0, x_max) / min_std
    assert rel <= tol_grad, (f"research_train_step's gradient differs from GRPOTrainer._train_on's by {rel:.3e} "
                             f"relative (norm); tol {tol_grad:.3e}")
    out.update(grad_rel_err=rel, grad_err_over_tol=rel / tol_grad)
    return out


def bench_train(pipe, *, prompts: int = 2, group_size: int = 4, num_steps: int = 4, height: int = 16,
                width: int = 16, lora_rank: int = 4, max_sequence_length: int = 16, overrides: Sequence[str] = (),
                repeats: int = 3, log=print) -> Dict[str, Any]:
    """Seconds of a GRPOTrainer iteration, and of its training phase against research_train_step.

    (i) bench_trainer's GRPOTrainer on pipe (the flow_grpo recipe made small, see there): one
    warm-up iteration, then `repeats` iterations (each on new prompts and updated weights), split
    as GRPOTrainer.step reports it into rollout, reward and train seconds (train: advantages and
    the training phase); best of each.
    (ii) On one fixed batch from the trainer's next prompts: GRPOTrainer._train_on against
    research_train_step, both starting from the same weights and optimizer state (put back before
    every call, untimed) and ending with one clipped AdamW step; the same trained steps, minibatch
    (the whole batch), advantages and loss. check_research_step_matches runs first. Timed in turns
    (trainer, research, trainer, ...), one warm-up call each, best of `repeats`.

    Adds LoRA adapters to pipe.transformer (give a freshly built pipeline). Every figure is logged
    as it is measured. Returns a JSON-able dict: device, shapes, settings, the iteration split, the
    two training steps' seconds and the speedup, and the check's errors.
    """
    from .train.config import batch_arithmetic

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (got {repeats})")
    trainer = bench_trainer(pipe, prompts=prompts, group_size=group_size, num_steps=num_steps, height=height,
                            width=width, lora_rank=lora_rank, max_sequence_length=max_sequence_length,
                            overrides=overrides)
    cfg, device = trainer.config, trainer.device
    batch = batch_arithmetic(cfg)
    N, S, K = batch["samples"], batch["stochastic_steps"], batch["trained_steps"]
    sde_backend = _backend.resolve(device)  # GRPOTrainer's fused step: C++, CUDA, Triton, or the torch reference
    results: Dict[str, Any] = {
        "device": str(device), "sde_backend": sde_backend, "torch_threads": torch.get_num_threads(),
        "shapes": {"prompts": prompts, "group_size": group_size, "samples": N, "num_steps": num_steps,
                   "stochastic_steps": S, "trained_steps": K, "height": height, "width": width,
                   "max_sequence_length": max_sequence_length, "lora_rank": lora_rank},
        "settings": {"recipe": "flow_grpo", "overrides": list(overrides), "guidance_scale": cfg.sampling.guidance_scale,
                     "kind": cfg.sampling.kind, "noise_level": cfg.sampling.noise_level, "beta": cfg.train.beta,
                     "kl": cfg.train.kl, "clip_range": cfg.train.clip_range, "repeats": repeats},
    }
    log(f"training step benchmark on {device}: {prompts} prompts x {group_size} = {N} samples, {num_steps} steps "
        f"({K} of {S} trained), {height}x{width} px, {max_sequence_length} T5 tokens, LoRA rank {lora_rank}, "
        f"CFG {cfg.sampling.guidance_scale}, beta {cfg.train.beta}; {torch.get_num_threads()} torch threads, "
        f"flowsteer's SDE step on the {sde_backend!r} backend")

    # (i) whole iterations
    trainer.step()
    best = {key: float("inf") for key in ("rollout", "reward", "train", "total", "wall")}
    for r in range(repeats):
        t0 = time.perf_counter()
        row = trainer.step()
        split = {key: row[f"time/{key}"] for key in ("rollout", "reward", "train", "total")}
        split["wall"] = time.perf_counter() - t0
        for key, seconds in split.items():
            best[key] = min(best[key], seconds)
        log(f"  iteration {r + 1}/{repeats}: rollout {split['rollout']:.3f} s, reward {split['reward']:.4f} s, "
            f"train {split['train']:.3f} s, total {split['total']:.3f} s (step() wall {split['wall']:.3f} s)")
    results["iteration_s"] = best
    log(f"GRPOTrainer iteration, best of {repeats}: rollout {best['rollout']:.3f} s, reward {best['reward']:.4f} s, "
        f"train {best['train']:.3f} s, total {best['total']:.3f} s ({N / best['rollout']:.1f} images/s sampled)")

    # (ii) the training phase on one batch, same weights each call
    rollout, advantages = fixed_batch(trainer)
    results["shapes"]["latents"] = list(rollout.latents.shape[2:])
    restore = trainer_snapshot(trainer)
    check = check_research_step_matches(trainer, rollout, advantages)
    results["check"] = check
    log(f"same math (largest error, and its share of the tolerance): log-prob {check['log_prob_max_err']:.1e} "
        f"({check['log_prob_err_over_tol']:.2f}), KL {check['kl_max_err']:.1e} ({check['kl_err_over_tol']:.2f}), "
        f"gradient {check['grad_rel_err']:.1e} relative ({check['grad_err_over_tol']:.2f})")
    research_kwargs = research_step_settings(trainer, rollout)
    trainer_key, research_key = "GRPOTrainer._train_on", "research_train_step"
    times = _time({
        trainer_key: lambda: trainer._train_on(rollout, advantages),
        research_key: lambda: research_train_step(pipe, rollout, advantages, optimizer=trainer.optimizer,
                                                  params=trainer.params, max_grad_norm=cfg.train.max_grad_norm,
                                                  **research_kwargs),
    }, device, repeats, restore, log)
    speedup = times[research_key] / times[trainer_key]
    results["train_step_s"] = {trainer_key: times[trainer_key], research_key: times[research_key], "speedup": speedup}
    log(f"training phase, best of {repeats}: GRPOTrainer._train_on {times[trainer_key] * 1e3:.1f} ms, "
        f"research_train_step {times[research_key] * 1e3:.1f} ms: {speedup:.2f}x")
    # The part of the research step that GRPOTrainer does not run again: it reuses the rollout's
    # per-prompt conditioning, encoded once at sampling.
    encode = _time({"encode": lambda: research_prompt_embeds(pipe, rollout.prompts, rollout.guidance_scale > 1.0,
                                                               research_kwargs["max_sequence_length"])},
                   device, repeats)["encode"]
    results["train_step_s"]["research per-image prompt encoding"] = encode
    log(f"  of which the research step's per-image prompt encoding ({N} prompts and {N} negatives): "
        f"{encode * 1e3:.1f} ms")
    return results
