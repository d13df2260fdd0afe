"""The `flowsteer` command."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import __version__
from ._optional import MissingDependency, require

# Parsing the command line imports nothing heavy (`flowsteer --help` does not load torch): every
# command imports what it needs when it runs.

# The sizes `flowsteer bench` runs at. "quick" is the default on the CPU and finishes in about a
# minute on two cores (each of rollout and train); "full" (--full, and the default on CUDA) is the
# size BENCHMARKS.md reports, about 10 minutes each on two CPU cores.
# An option given on the command line overrides its entry.
BENCH_SIZES = {
    "rollout": {
        "quick": dict(prompts=2, group_size=4, branch_group_size=8, steps=6, size=16, max_sequence_length=32,
                      repeats=3),
        "full": dict(prompts=2, group_size=8, branch_group_size=24, steps=10, size=32, max_sequence_length=256,
                     repeats=5),
    },
    "train": {
        "quick": dict(prompts=2, group_size=4, steps=6, size=16, max_sequence_length=32, repeats=3),
        "full": dict(prompts=2, group_size=8, steps=10, size=32, max_sequence_length=77, repeats=5),
    },
}
_FULL_HINT = {"quick": "; --full for the size BENCHMARKS.md reports", "full": ""}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bench_settings(args) -> str:
    """Fill the bench options left unset from BENCH_SIZES; returns the size's name."""
    if args.device is None:
        args.device = "cuda" if _cuda() else "cpu"
    size = "full" if args.full or str(args.device).startswith("cuda") else "quick"
    for key, value in BENCH_SIZES[args.what][size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.branch_group_size is None:
        args.branch_group_size = 0
    return size


def _info(args) -> int:
    import flowsteer

    print(json.dumps(flowsteer.backend_info(), indent=2))
    return 0


def _example(args) -> int:
    """A flow-matching sampling loop with a toy velocity field: SDE steps with log-probs, then the
    training-time re-evaluation whose ratio must be exactly 1 on-policy."""
    import torch

    import flowsteer
    from flowsteer.ops import group_advantages, grpo_loss, sde_step

    torch.manual_seed(args.seed)
    info = flowsteer.backend_info()
    print(f"flowsteer {flowsteer.__version__}: backend for CPU tensors = {info['cpu_pick']}, "
          f"CUDA kernels = {info['cuda_kernels']}, Triton = {info['triton']}")
    batch, steps = 8, 10
    target = torch.randn(1, 4, 16, 16)  # the toy "data": every sample flows towards it

    def velocity(x, sigma):  # v = eps - x0 for the exact posterior of a point mass at target
        return (x - target) / sigma

    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    x = torch.randn(batch, 4, 16, 16)
    trajectory, t0 = [], time.perf_counter()
    for i in range(steps):
        v = velocity(x, sigmas[i])
        out = sde_step(v, x, float(sigmas[i]), float(sigmas[i + 1]), "flow", 0.7, seed=args.seed, offset=i,
                       sigma_max=float(sigmas[1]))
        trajectory.append((x, out.prev_sample, out.log_prob, i))
        x = out.prev_sample
    elapsed = time.perf_counter() - t0
    reward = -(x - target).flatten(1).pow(2).mean(1)
    adv = group_advantages(reward, torch.arange(batch) // 4)
    print(f"{steps} SDE steps on [{batch}, 4, 16, 16] in {elapsed * 1e3:.1f} ms; "
          f"final distance to target {float(-reward.mean()):.4f}")
    print("log_prob of the first step:", [round(float(v), 3) for v in trajectory[0][2]])
    print("group advantages:", [round(float(a), 3) for a in adv])
    # Re-evaluate every stored step, differentiably: on-policy the ratio is exactly 1.
    worst = 0.0
    for x_t, x_next, old_lp, i in trajectory[:-1]:
        v = velocity(x_t, sigmas[i]).requires_grad_()
        lp = sde_step(v, x_t, float(sigmas[i]), float(sigmas[i + 1]), "flow", 0.7, prev_sample=x_next,
                      sigma_max=float(sigmas[1])).log_prob
        loss, stats = grpo_loss(lp, old_lp, adv)
        loss.backward()
        worst = max(worst, abs(float(stats.ratio_max) - 1), abs(float(stats.ratio_min) - 1))
    print(f"on-policy re-evaluation: max |ratio - 1| = {worst:.1e} (exactly 0 expected)")
    return 0 if worst == 0.0 else 1


def _bench(args) -> int:
    for module in ("diffusers", "transformers"):
        require(module, "diffusers", f"flowsteer bench {args.what} (it times a tiny random-weight diffusers SD3 "
                                     "pipeline)")
    size = _bench_settings(args)
    if args.repeats < 1:
        raise SystemExit(f"flowsteer bench: --repeats must be >= 1 (got {args.repeats})")
    if args.what == "train":
        return _bench_train(args, size)
    import torch

    from .bench import bench_rollout
    from .testing.pipelines import tiny_sd3_pipeline

    torch.manual_seed(0)
    pipe = tiny_sd3_pipeline(0).to(args.device)
    print(f"rollout benchmark, {size} size{_FULL_HINT[size]}: tiny SD3 transformer with random weights, "
          f"{args.prompts} prompts x {args.group_size}, {args.steps} steps, {args.size}px, "
          f"{args.max_sequence_length} T5 tokens, CFG 4.5, device {args.device}, best of {args.repeats} rounds; "
          "measuring the transformer-only floor, a research-style loop and flowsteer.sample"
          + (", compiled" if args.compile else "")
          + (f", then branch mode against full SDE rollouts at group size {args.branch_group_size}"
             if args.branch_group_size > 0 else ""), flush=True)
    results = bench_rollout(pipe, prompts=args.prompts, group_size=args.group_size, num_steps=args.steps,
                            height=args.size, width=args.size, compile=args.compile, compile_reference=args.compile,
                            branch_group_size=args.branch_group_size, max_sequence_length=args.max_sequence_length,
                            repeats=args.repeats, progress=not args.no_progress)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _bench_train(args, size: str = "full") -> int:
    """Seconds per trainer iteration (rollout, reward, train) on the tiny SD3 pipeline, and the
    training phase against a research-style training step on the same batch and math."""
    import torch

    from .bench import bench_train
    from .testing.pipelines import tiny_sd3_pipeline

    torch.manual_seed(0)
    pipe = tiny_sd3_pipeline(0).to(args.device)
    print(f"train benchmark, {size} size{_FULL_HINT[size]}: tiny SD3 transformer with random weights, flow_grpo "
          f"recipe made small: {args.prompts} prompts x {args.group_size}, {args.steps} steps, {args.size}px, "
          f"{min(args.max_sequence_length, 77)} T5 tokens, device {args.device}, best of {args.repeats}", flush=True)
    results = bench_train(pipe, prompts=args.prompts, group_size=args.group_size, num_steps=args.steps,
                          height=args.size, width=args.size, max_sequence_length=min(args.max_sequence_length, 77),
                          overrides=[f"model.device={args.device}"], repeats=args.repeats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _demo(args) -> int:
    import os

    if args.action == "pretrain":
        from .demo.pretrain import pretrain

        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "weights",
                                       "demo_model.safetensors")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        pretrain(out, steps=args.steps, seed=args.seed, eval_every=args.eval_every or 500)
        print(f"wrote {out}")
        return 0
    from .demo.run import ALGORITHMS, compare, run_demo

    stamp = time.strftime('%Y%m%d-%H%M%S')
    try:
        if args.compare:
            algorithms = ALGORITHMS if args.algorithms is None else [a.strip() for a in args.algorithms.split(",")]
            seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [0, 1, 2]
            compare(args.output_dir or os.path.join("runs", f"demo-compare-{stamp}"), algorithms=algorithms,
                    seeds=seeds, iterations=args.iterations, eval_every=args.eval_every or 5,
                    curve_samples=args.curve_samples, eval_samples=args.eval_samples, device=args.device,
                    weights=args.weights)
        else:
            run_demo(args.output_dir or os.path.join("runs", f"demo-{args.algorithm}-{stamp}"),
                     algorithm=args.algorithm, iterations=args.iterations, seed=args.seed,
                     eval_samples=args.eval_samples, device=args.device, weights=args.weights,
                     eval_every=args.eval_every or 0, curve_samples=args.curve_samples)
    except ValueError as exc:
        print(f"flowsteer demo: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"flowsteer demo: {exc}", file=sys.stderr)
        return 2
    return 0


def _recipes(args) -> int:
    from .train.config import load_config, recipe_names

    for name in recipe_names():
        print(f"{name:12s} {load_config(name).description}")
    return 0


def _train(args) -> int:
    from .train.distributed import env_world_size

    if env_world_size() > 1:
        # torchrun: an exception in any process is written to torchrun's error file (the job ends
        # with the failing rank's traceback), not only to that process's stderr
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_train_run)(args)
    return _train_run(args)


def _join_job(cfg):
    """Under torchrun: this process's device (one GPU per process) and the process group, so that
    rank 0's choices (the run directory's name) reach every process."""
    import torch

    from .train.distributed import Dist

    device = torch.device("cpu")
    if torch.cuda.is_available() and cfg.model.device in (None, "cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    elif cfg.model.device is not None:
        device = torch.device(cfg.model.device)
    return Dist.from_env(cfg.distributed.timeout_s, device)


def _train_run(args) -> int:
    for module in ("diffusers", "transformers"):
        require(module, "diffusers", "flowsteer train (it loads model.path as a diffusers pipeline)")
    from .train import GRPOTrainer, describe_batch, load_config
    from .train.config import ConfigError

    try:
        cfg = load_config(args.config, args.set or [])
    except ConfigError as exc:
        print(f"flowsteer train: {exc}", file=sys.stderr)
        return 2
    if args.check:
        return _train_check(cfg)
    d = _join_job(cfg)

    def say(text):
        if d.main:
            print(text)

    out = args.output_dir
    if args.resume:
        if out is None:
            print("flowsteer train: --resume needs --output-dir, the run directory to continue", file=sys.stderr)
            return 2
        try:
            trainer = GRPOTrainer.resume(out, config=cfg)
        except (ConfigError, FileNotFoundError) as exc:
            print(f"flowsteer train: {exc}", file=sys.stderr)
            return 2
        say(f"resuming {out} at iteration {trainer.iteration} of {cfg.train.iterations}")
    else:
        if out is None:
            name = os.path.splitext(os.path.basename(args.config))[0]
            out = d.broadcast_object(os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"))
        try:
            trainer = GRPOTrainer(None, None, cfg, run_dir=out)
        except (ConfigError, FileExistsError) as exc:
            print(f"flowsteer train: {exc}", file=sys.stderr)
            return 2
        say(f"run directory: {out}")
    say(describe_batch(cfg, d.world))
    trainer.train()
    say(f"done: {trainer.iteration} iterations on {d.world} process(es); metrics in "
        f"{os.path.join(out, 'metrics.jsonl')}")
    if d.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _train_check(cfg) -> int:
    """Build everything, print the resolved config and the batch arithmetic, run one tiny step (one
    prompt group, no files written) and report its on-policy ratio."""
    import dataclasses

    from .train import GRPOTrainer, describe_batch
    from .train.config import ConfigError, dump_yaml

    print(dump_yaml(cfg))
    print(describe_batch(cfg))
    tiny = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, prompts_per_iteration=1, batch_size=None,
                                                              iterations=1),
                               logging=dataclasses.replace(cfg.logging, tqdm=False, tensorboard=False))
    try:
        trainer = GRPOTrainer(None, None, tiny)
    except ConfigError as exc:
        print(f"flowsteer train --check: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    row = trainer.step()
    print(f"check step: 1 prompt x {cfg.sampling.group_size} samples in {time.perf_counter() - t0:.1f} s; "
          f"reward mean {row['reward/mean']:.4g}, on-policy max |ratio - 1| = {row['onpolicy/max_dev']:.1e}, "
          f"grad norm {row['grad_norm']:.3g}")
    print("check: OK")
    return 0


def _export(args) -> int:
    from .train.export import export_run

    path = export_run(args.run_dir, args.out, ema=args.ema)
    print(f"exported {path} to {args.out}")
    return 0


def _plot(args) -> int:
    require("matplotlib", "plot", "flowsteer plot")
    from .train.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `flowsteer` command line (building it imports nothing heavy)."""
    parser = argparse.ArgumentParser(prog="flowsteer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flowsteer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print what backends and kernels were found").set_defaults(func=_info)
    ex = sub.add_parser("example", help="run the quick example: an SDE sampling loop with log-probs")
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(func=_example)
    serve = sub.add_parser("serve-reward", add_help=False,
                           help="serve a local reward over HTTP (see `flowsteer serve-reward --help`)")
    serve.set_defaults(func=None)
    bench = sub.add_parser(
        "bench", help="measure throughput: `flowsteer bench rollout` or `flowsteer bench train`",
        description="Time flowsteer on a tiny random-weight SD3 pipeline (needs the diffusers extra). On the CPU "
                    "the defaults are a quick size that finishes in about a minute on two cores; --full (the "
                    "default on CUDA) runs the size BENCHMARKS.md reports. Each option below overrides its size.")

    def sizes(key: str, what: str = "rollout") -> str:
        quick, full = BENCH_SIZES[what]["quick"][key], BENCH_SIZES[what]["full"][key]
        return f"default {quick}" if quick == full else f"default {quick}, {full} with --full or on CUDA"

    bench.add_argument("what", choices=["rollout", "train"],
                       help="rollout: images per second of flowsteer.sample against a research-style sampling loop "
                            "and the transformer-only floor, and branch mode against full SDE rollouts; train: "
                            "seconds per GRPOTrainer iteration, and its training phase against a research-style "
                            "training step")
    bench.add_argument("--full", action="store_true",
                       help="the size BENCHMARKS.md reports (about 10 minutes on two CPU cores) instead of the quick "
                            "CPU default")
    bench.add_argument("--prompts", type=int, default=None,
                       help=f"distinct prompts per batch ({sizes('prompts')})")
    bench.add_argument("--group-size", type=int, default=None,
                       help=f"samples per prompt ({sizes('group_size')})")
    bench.add_argument("--branch-group-size", type=int, default=None,
                       help=f"rollout: group size of the branch-mode comparison, 0 to skip it "
                            f"({sizes('branch_group_size')})")
    bench.add_argument("--steps", type=int, default=None,
                       help=f"sampling steps ({sizes('steps')})")
    bench.add_argument("--size", type=int, default=None,
                       help=f"image height and width in pixels ({sizes('size')})")
    bench.add_argument("--max-sequence-length", type=int, default=None,
                       help=f"T5 tokens per prompt, SD3's own default 256 (rollout: {sizes('max_sequence_length')}; "
                            f"train: {sizes('max_sequence_length', 'train')}, at most 77)")
    bench.add_argument("--device", default=None, help="where to run (default cuda when available, else cpu)")
    bench.add_argument("--compile", action="store_true",
                       help="rollout: also time flowsteer.sample(compile=True), and the reference loop with the same "
                            "compiled transformer")
    bench.add_argument("--repeats", type=int, default=None,
                       help=f"timed rounds (each runs every loop once, in turn, after one warm-up call each); the best "
                            f"of each is reported ({sizes('repeats')})")
    bench.add_argument("--no-progress", action="store_true", help="rollout: no progress bar (it goes to stderr)")
    bench.add_argument("--out", default=None, help="write the results as JSON to this file")
    bench.set_defaults(func=_bench)
    train = sub.add_parser("train", help="post-train a model: flowsteer train RECIPE_OR_YAML [--set KEY=VALUE ...]")
    train.add_argument("config", help="a shipped recipe (flowsteer recipes) or a YAML file")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key (dotted path, value parsed as YAML); repeatable")
    train.add_argument("--output-dir", default=None, help="the run directory (default runs/NAME-TIMESTAMP)")
    train.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint")
    train.add_argument("--check", action="store_true",
                       help="build everything, print the resolved config and batch arithmetic, run one tiny step")
    train.set_defaults(func=_train)
    sub.add_parser("recipes", help="list the shipped training recipes").set_defaults(func=_recipes)
    demo = sub.add_parser("demo", help="GRPO on the embedded shapes world: held-out strict success before and after")
    demo.add_argument("action", nargs="?", choices=["run", "pretrain"], default="run",
                      help="run (default) the demo, or pretrain its base model")
    demo.add_argument("--algorithm", default="flow_grpo",
                      choices=["flow_grpo", "dance_grpo", "mix_grpo", "fast", "euphonium"])
    demo.add_argument("--iterations", type=int, default=40, help="GRPO iterations")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eval-samples", type=int, default=512, help="held-out samples (fixed noise) before and after")
    demo.add_argument("--output-dir", default=None, help="default runs/demo-ALGORITHM-TIMESTAMP")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--weights", default=None, help="a demo model other than the shipped one")
    demo.add_argument("--compare", action="store_true",
                      help="run every algorithm (or --algorithms) for each of --seeds with the same budget; "
                           "writes compare.md, compare.json and compare.png")
    demo.add_argument("--algorithms", default=None, help="--compare: comma-separated subset (default all five)")
    demo.add_argument("--seeds", default=None, help="--compare: comma-separated seeds (default 0,1,2)")
    demo.add_argument("--curve-samples", type=int, default=128,
                      help="held-out samples of each evaluation during training (--eval-every)")
    demo.add_argument("--steps", type=int, default=3000, help="pretrain: optimizer steps")
    demo.add_argument("--eval-every", type=int, default=None,
                      help="run: iterations between held-out evaluations (default none; 5 with --compare); "
                           "pretrain: steps between them (default 500)")
    demo.add_argument("--out", default=None, help="pretrain: where to write the weights (default: the package's)")
    demo.set_defaults(func=_demo)
    export = sub.add_parser("export", help="write a run's LoRA (or full weights) for a plain diffusers pipeline")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True, help="the output directory")
    export.add_argument("--ema", action="store_true", help="export the EMA weights (when the run kept them)")
    export.set_defaults(func=_export)
    plot = sub.add_parser("plot", help="draw a run's reward and KL curves and its latest sample grid to PNG")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None, help="the output directory (default RUN_DIR/plots)")
    plot.set_defaults(func=_plot)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve-reward"]:
        from .rewards.remote import serve_main

        return serve_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MissingDependency as exc:  # an optional dependency is missing: say which extra, no traceback
        print(f"flowsteer {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
