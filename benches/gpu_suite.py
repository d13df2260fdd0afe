"""One script for a short GPU lease: build, check every kernel against the fp64 reference, time.

    python benches/gpu_suite.py --build --out gpu.json          # on a GPU machine (< 5 min on one H100)
    python benches/gpu_suite.py --device cpu --small --out cpu.json   # the same suite on the CPU

On a GPU it ends with rollouts of an SD3.5-Medium-sized transformer (random weights, 512 px, 10
steps, CFG 4.5, 16 images): the research-style reference loop, flowsteer.sample, and
flowsteer.sample(compile=True), in images per second; then branch mode at T/2 against full SDE
rollouts with G = --branch-group-size (16: 32 images each way, about half a minute on an H100);
last, GRPOTrainer's iteration split and its training phase against a research-style training step
(flowsteer.bench.bench_train) on the same transformer, 8 images at 512 px (--skip-train skips it).

Every figure is printed as soon as it is measured. Kernel times are given as a ratio to the
memory floor (the bytes that must move divided by the copy bandwidth measured on the same device)
and as speedups over the pure-torch reference in eager mode and under torch.compile.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RESULTS: dict = {"checks": [], "timings": []}


OUT_PATH = None


def log(msg: str) -> None:
    """Print at once and rewrite the JSON file, so a run cut off by its time limit keeps what it measured."""
    print(msg, flush=True)
    if OUT_PATH:
        with open(OUT_PATH + ".tmp", "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
        os.replace(OUT_PATH + ".tmp", OUT_PATH)


def build() -> None:
    t0 = time.time()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", root]
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 4))
    subprocess.run(cmd, check=True, env=env)
    log(f"build: {time.time() - t0:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--build", action="store_true", help="pip install the repository first")
    ap.add_argument("--small", action="store_true", help="small shapes (CPU runs)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--skip-rollout", action="store_true", help="skip the SD3.5-Medium rollout section (GPU)")
    ap.add_argument("--rollout-only", action="store_true", help="only the rollout section (GPU)")
    ap.add_argument("--branch-group-size", type=int, default=16,
                    help="rollouts: G of branch mode at T/2 against full SDE (last in the section; 0 skips it)")
    ap.add_argument("--skip-train", action="store_true",
                    help="skip the SD3.5-Medium training-step section (GPU): GRPOTrainer against a research-style step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    global OUT_PATH
    OUT_PATH = args.out
    if args.build:
        build()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch

    import flowsteer
    from flowsteer.ops import reference as R
    from flowsteer.ops.backends import torch as torch_backend

    device = torch.device(args.device)
    info = flowsteer.backend_info()
    RESULTS["info"] = info
    RESULTS["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"device: {RESULTS['device']}; torch {torch.__version__}; backend_info: {json.dumps(info)}")

    backends = []
    if device.type == "cuda":
        if info["cuda_kernels"]:
            backends.append("cuda")
        if info["triton"]:
            backends.append("triton")
    else:
        backends.append("cpu")
        if info["triton"]:
            backends.append("triton")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timeit_graph(fn, calls=10, reps=20):
        """Seconds per call of fn's GPU work: fn captured `calls` times in one CUDA graph and
        replayed, so the host's launch overhead is not what is measured. None if capture fails."""
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
            graph.replay()
            sync()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(reps):
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / calls)
            times.sort()
            return times[len(times) // 2]
        except Exception as exc:  # some baselines cannot be captured; they are timed eagerly
            log(f"  (CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:120]}; timing eagerly)")
            sync()
            return None

    def timeit(fn, reps=None, min_time=0.2, graph=True):
        """Median seconds per call: GPU time under a CUDA graph on CUDA, wall time on the CPU (and for
        graph=False: code with host syncs, which a failed capture would leave the device unusable by)."""
        if device.type == "cuda" and graph:
            t = timeit_graph(fn)
            if t is not None:
                return t
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        one = max(time.perf_counter() - t0, 1e-6)
        reps = reps or max(3, min(200, int(min_time / one)))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2]

    def kernel_sections():
        # ------------------------------------------------------------------ memory floor
        n_copy = (1 << 26) if device.type == "cuda" else (1 << 23)
        src = torch.empty(n_copy, dtype=torch.float32, device=device).normal_()
        dst = torch.empty_like(src)
        t = timeit(lambda: dst.copy_(src))
        bandwidth = 2 * src.numel() * 4 / t
        RESULTS["copy_bandwidth_GBps"] = bandwidth / 1e9
        log(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write)")
        del src, dst

        # ------------------------------------------------------------------ correctness
        def max_rel(a, b):
            a, b = a.detach().double().cpu(), b.detach().double().cpu()
            return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

        check_shape = (3, 4, 7, 9)
        g = torch.Generator().manual_seed(0)
        v64, x64, z64, r64 = (torch.randn(check_shape, generator=g, dtype=torch.float64) for _ in range(4))
        sig = torch.tensor([1.0, 0.6, 0.2], dtype=torch.float64)
        sig_next = torch.tensor([0.95, 0.5, 0.001], dtype=torch.float64)
        for name in backends:
            flowsteer.set_backend(name)
            for kind, nl in (("flow", 0.7), ("dance", 0.3), ("cps", 0.6)):
                for dtype in (torch.float32, torch.bfloat16):
                    v, x, r = (t.to(dtype).to(device) for t in (v64, x64, r64))
                    noise = R.philox_normal(v.numel(), 5, 1).reshape(check_shape)
                    out = flowsteer.ops.sde_step(v, x, sig.float().to(device), sig_next.float().to(device), kind, nl, seed=5,
                                                 offset=1, sigma_max=0.95)
                    ref = R.sde_step(v.double().cpu(), x.double().cpu(), sig, sig_next, kind, nl, noise=noise, sigma_max=0.95)
                    e_sample = max_rel(out.prev_sample, ref["prev_sample"])
                    vg = v.clone().requires_grad_()
                    ev = flowsteer.ops.sde_step(vg, x, sig.float().to(device), sig_next.float().to(device), kind, nl,
                                                prev_sample=out.prev_sample, sigma_max=0.95, ref_v=r)
                    (ev.log_prob.sum() + ev.kl.sum()).backward()
                    vr = v.double().cpu().requires_grad_()
                    rr = R.sde_step(vr, x.double().cpu(), sig, sig_next, kind, nl, prev_sample=out.prev_sample.double().cpu(),
                                    sigma_max=0.95, ref_v=r.double().cpu())
                    (rr["log_prob"].sum() + rr["kl"].sum()).backward()
                    e_lp, e_kl, e_g = max_rel(ev.log_prob, rr["log_prob"]), max_rel(ev.kl, rr["kl"]), max_rel(vg.grad, vr.grad)
                    worst = max(e_sample, e_lp, e_kl, e_g)
                    bound = 1e-5 if dtype == torch.float32 else 2e-2
                    ok = worst < bound
                    RESULTS["checks"].append(dict(backend=name, op="sde_step", kind=kind, dtype=str(dtype), sample=e_sample,
                                                  log_prob=e_lp, kl=e_kl, grad_v=e_g, ok=ok))
                    log(f"check {name:6s} sde_step {kind:5s} {str(dtype):14s} rel err: sample {e_sample:.1e} "
                        f"log_prob {e_lp:.1e} kl {e_kl:.1e} grad_v {e_g:.1e} {'ok' if ok else 'FAIL'}")
            rw = torch.rand(1000, 2, generator=g)
            ids = torch.randint(0, 37, (1000,), generator=g)
            got = flowsteer.ops.group_advantages(rw.to(device), ids.to(device), mode="per_reward")
            want = R.group_advantages(rw.double(), ids, mode="per_reward")
            e = max_rel(got, want)
            RESULTS["checks"].append(dict(backend=name, op="group_advantages", err=e, ok=e < 1e-5))
            log(f"check {name:6s} group_advantages rel err {e:.1e} {'ok' if e < 1e-5 else 'FAIL'}")
            prefs = (torch.randint(0, 3, (9, 12, 12), generator=g).float() / 2)
            e = max_rel(flowsteer.ops.win_rate(prefs.to(device)), R.win_rate(prefs.double()))
            # Compared with the torch backend's vectorised statement (tested against the reference's
            # pairwise loop in tests/test_advantages.py, which is too slow at this size).
            same = bool(torch.equal(flowsteer.ops.pareto_mask(rw.to(device), ids.to(device)).cpu(),
                                    _torch_pareto(torch_backend, rw, ids)))
            ok = e < 1e-6 and same
            RESULTS["checks"].append(dict(backend=name, op="win_rate+pareto_mask", err=e, pareto_equal=same, ok=ok))
            log(f"check {name:6s} win_rate rel err {e:.1e}, pareto_mask {'equal' if same else 'DIFFERENT'} "
                f"{'ok' if ok else 'FAIL'}")
            z = flowsteer.ops.philox_normal((1 << 20,), 3, 0, device=device).double().cpu()
            log(f"check {name:6s} philox noise: mean {float(z.mean()):+.1e} var {float(z.var()):.4f}")
        flowsteer.set_backend("auto")

        # ------------------------------------------------------------------ timings
        def ref_sample(v, x, noise_shape_like):
            noise = torch.randn_like(noise_shape_like, dtype=torch.float32)
            out = R.sde_step(v.float(), x.float(), 0.6, 0.5, "flow", 0.7, noise=noise)
            return out["prev_sample"].to(v.dtype), out["log_prob"]

        def ref_eval(v, x, prev):
            out = R.sde_step(v.float(), x.float(), 0.6, 0.5, "flow", 0.7, prev_sample=prev.float())
            return out["log_prob"]

        compiled_sample = None if args.no_compile else torch.compile(ref_sample, dynamic=True)
        compiled_eval = None if args.no_compile else torch.compile(ref_eval, dynamic=True)

        if args.small:
            shapes = [(2, 4, 32, 32), (1, 4, 5, 16, 16)]
        elif device.type == "cuda":
            shapes = [(16, 16, 64, 64), (8, 16, 128, 128), (4, 16, 21, 60, 104)]
        else:
            shapes = [(8, 16, 64, 64)]
        dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
        for shape in shapes:
            for dtype in dtypes:
                v = torch.randn(shape, device=device).to(dtype)
                x = torch.randn(shape, device=device).to(dtype)
                prev = torch.randn(shape, device=device).to(dtype)
                nbytes = v.numel() * v.element_size()
                rows = {}
                # Sample mode, in-kernel noise: read v, x; write the sample (the mean is not asked for).
                floor_sample = 3 * nbytes / bandwidth
                # Evaluate forward + backward: read v, x, x' twice; write grad_v.
                floor_eval = 7 * nbytes / bandwidth
                for name in backends:
                    if name == "triton" and device.type == "cpu":
                        continue  # the interpreter is a correctness tool, not a speed one
                    flowsteer.set_backend(name)
                    rows[name] = (
                        timeit(lambda: flowsteer.ops.sde_step(v, x, 0.6, 0.5, "flow", 0.7, seed=1, return_mean=False)),
                        timeit(lambda: _eval_kernel(flowsteer, v, x, prev)),
                    )
                flowsteer.set_backend("auto")
                rows["eager"] = (timeit(lambda: ref_sample(v, x, x)), timeit(lambda: _eval_ref(ref_eval, v, x, prev)))
                if compiled_sample is not None:
                    rows["compile"] = (timeit(lambda: compiled_sample(v, x, x)),
                                       timeit(lambda: _eval_ref(compiled_eval, v, x, prev)))
                for mode, idx, floor in (("sample", 0, floor_sample), ("eval fwd+bwd", 1, floor_eval)):
                    for impl, times in rows.items():
                        t = times[idx]
                        entry = dict(op="sde_step", mode=mode, shape=list(shape), dtype=str(dtype), impl=impl, ms=t * 1e3,
                                     x_floor=t / floor, vs_eager=rows["eager"][idx] / t,
                                     vs_compile=(rows["compile"][idx] / t) if "compile" in rows else None)
                        RESULTS["timings"].append(entry)
                        comp = f"{entry['vs_compile']:.2f}x" if entry["vs_compile"] else "-"
                        log(f"time sde_step {mode:12s} {str(list(shape)):22s} {str(dtype):14s} {impl:8s} "
                            f"{t * 1e3:9.3f} ms  {t / floor:6.1f}x floor  vs eager {entry['vs_eager']:6.2f}x  vs compile {comp}")

        # Group advantages: N = 100k rewards in 4k groups, against the research-code loop.
        n, groups = (100_000, 4000) if not args.small else (10_000, 400)
        g = torch.Generator().manual_seed(1)
        rw = torch.rand(n, generator=g).to(device)
        ids = torch.randint(0, groups, (n,), generator=g).to(device)

        from flowsteer.bench import research_group_advantages

        t_loop = timeit(lambda: research_group_advantages(rw, ids), reps=3, graph=False)
        log(f"time group_advantages N={n} G={groups} research loop {t_loop * 1e3:.1f} ms")
        for name in backends:
            if name == "triton" and device.type == "cpu":
                continue
            flowsteer.set_backend(name)
            # Not graph-capturable: torch.unique and the finite check sync; wall time with those syncs.
            t = timeit(lambda: flowsteer.ops.group_advantages(rw, ids), graph=False)
            RESULTS["timings"].append(dict(op="group_advantages", n=n, groups=groups, impl=name, ms=t * 1e3,
                                           vs_loop=t_loop / t))
            log(f"time group_advantages N={n} G={groups} {name:8s} {t * 1e3:8.3f} ms  vs loop {t_loop / t:7.1f}x")
        flowsteer.set_backend("auto")

        # GRPO loss: plain torch; compiled only to show a kernel would buy little.
        lp = torch.randn(4096, device=device, requires_grad=True)
        old, adv = torch.randn(4096, device=device), torch.randn(4096, device=device)

        def loss_step(fn):
            loss, _ = fn(lp, old, adv)
            loss.backward()

        t_eager = timeit(lambda: loss_step(flowsteer.ops.grpo_loss))
        line = f"time grpo_loss B=4096 fwd+bwd eager {t_eager * 1e6:.0f} us"
        if not args.no_compile:
            comp = torch.compile(R.grpo_loss)
            t_comp = timeit(lambda: loss_step(lambda a, b, c: comp(a, b, c, 1e-4)))
            line += f", compiled reference {t_comp * 1e6:.0f} us"
            RESULTS["timings"].append(dict(op="grpo_loss", impl="compile", ms=t_comp * 1e3))
        RESULTS["timings"].append(dict(op="grpo_loss", impl="eager", ms=t_eager * 1e3))
        log(line)

    if not args.rollout_only:
        kernel_sections()

    # ------------------------------------------------------------------ rollouts
    if device.type == "cuda" and not args.skip_rollout:
        from flowsteer.bench import bench_rollout
        from flowsteer.testing.pipelines import sd35_medium_pipeline

        t0 = time.time()
        pipe = sd35_medium_pipeline(device, torch.bfloat16)
        log(f"rollout: SD3.5-Medium-sized transformer, random weights, bf16 ({time.time() - t0:.0f} s to build); "
            "512 px, 10 steps, CFG 4.5, 2 prompts x 8 = 16 images")
        RESULTS["rollout"] = bench_rollout(pipe, prompts=2, group_size=8, num_steps=10, guidance_scale=4.5, height=512,
                                           width=512, compile=not args.no_compile, compile_reference=True,
                                           branch_group_size=args.branch_group_size, repeats=2,
                                           log=lambda m: log("rollout " + m))
        del pipe

    # ------------------------------------------------------------------ training step
    if device.type == "cuda" and not args.skip_train and not args.rollout_only:
        from flowsteer.bench import bench_train
        from flowsteer.testing.pipelines import sd35_medium_pipeline

        t0 = time.time()
        pipe = sd35_medium_pipeline(device, torch.bfloat16)
        log(f"train: SD3.5-Medium-sized transformer, random weights, bf16 ({time.time() - t0:.0f} s to build); "
            "512 px, 10 steps (9 trained), CFG 4.5, 2 prompts x 4 = 8 images, LoRA r32, beta 0.04")
        try:
            RESULTS["train"] = bench_train(pipe, prompts=2, group_size=4, num_steps=10, height=512, width=512,
                                           lora_rank=32, max_sequence_length=256,
                                           overrides=[f"model.device={device}", "train.mixed_precision=bf16"],
                                           repeats=2, log=lambda m: log("train " + m))
            RESULTS["checks"].append(dict(name="train: research step computes the trainer's math", ok=True))
        except (AssertionError, ValueError) as exc:  # the same-math check (tolerances derived for fp32)
            RESULTS["checks"].append(dict(name="train: research step computes the trainer's math", ok=False,
                                          error=str(exc)))
            log(f"train: FAILED {exc}")
        del pipe

    failed = [c for c in RESULTS["checks"] if not c["ok"]]
    log(f"checks: {len(RESULTS['checks']) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


def _torch_pareto(torch_backend, rewards, group_ids):
    """The torch backend's vectorised Pareto mask, as a bool tensor."""
    import torch

    out = torch.empty(rewards.shape[0], dtype=torch.uint8)
    torch_backend.pareto_mask(rewards, group_ids, out)
    return out.bool()


def _eval_kernel(flowsteer, v, x, prev):
    vg = v.detach().requires_grad_()
    lp = flowsteer.ops.sde_step(vg, x, 0.6, 0.5, "flow", 0.7, prev_sample=prev, return_mean=False).log_prob
    lp.sum().backward()


def _eval_ref(fn, v, x, prev):
    vg = v.detach().requires_grad_()
    fn(vg, x, prev).sum().backward()


if __name__ == "__main__":
    sys.exit(main())
