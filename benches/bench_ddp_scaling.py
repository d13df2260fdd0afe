"""DDP scaling of the trainer: trained samples per second on 1, 2, ..., N processes (torchrun, one
GPU each), with the batch per process fixed (weak scaling: prompts_per_iteration = P x processes).

    python benches/bench_ddp_scaling.py --nproc 1 2 4 8 [--model /weights/sd3.5-medium] [--prompts 2]

Efficiency(N) = samples/s on N processes / (N x samples/s on 1). Each run trains --iterations
iterations after --warmup untimed ones, through `flowsteer train` under torchrun, and reads
time/total from its metrics.jsonl. Without --model it runs the tiny random-weight SD3 pipeline
(which measures the framework's overhead, not a real model's scaling); on a CPU-only machine the
processes use gloo and share the cores, so its numbers say nothing about GPUs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run(nproc: int, args, workdir: str) -> float:
    out = os.path.join(workdir, f"run-{nproc}")
    iterations = args.warmup + args.iterations
    sets = [f"train.prompts_per_iteration={args.prompts * nproc}", f"train.iterations={iterations}",
            f"sampling.group_size={args.group_size}", f"sampling.num_steps={args.steps}", "train.batch_size=null",
            "logging.tqdm=false", "logging.tensorboard=false", "checkpoint.every=0", "eval.every=0",
            "train.parallel=ddp"]
    if args.model:
        sets += [f"model.path={args.model}", f"sampling.height={args.size}", f"sampling.width={args.size}",
                 "train.mixed_precision=bf16", "model.dtype=bfloat16"]
    else:
        sets += ["model.path=testing:sd3", "model.dtype=float32", "train.mixed_precision=fp32",
                 "model.max_sequence_length=8", "sampling.height=32", "sampling.width=32", "model.lora.rank=4",
                 "model.lora.alpha=8", "rewards={flowsteer.testing.rewards.brightness: 1}"]
    sets += ["prompts.train=[a red circle, two blue squares, a green star, a cat on a mat]"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = launcher + ["-m", "flowsteer", "train", args.recipe, "--output-dir", out]
    for s in sets + list(args.set or []):
        cmd += ["--set", s]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        said = [line for line in res.stderr.splitlines() if line.startswith("flowsteer")]
        sys.exit(f"{nproc} process(es) failed:\n" + ("\n".join(said) or res.stderr[-3000:]))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()][args.warmup:]
    per_iteration = statistics.median(r["time/total"] for r in rows)
    return args.prompts * nproc * args.group_size / per_iteration


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    ap.add_argument("--model", default=None, help="a local diffusers pipeline directory (default: tiny SD3 with a "
                    "brightness reward; with --model, the recipe's rewards, or --set rewards=...)")
    ap.add_argument("--recipe", default="flow_grpo", help="the recipe (default flow_grpo)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per process per iteration (default 2)")
    ap.add_argument("--group-size", type=int, default=8, help="samples per prompt (default 8)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps (default 10)")
    ap.add_argument("--size", type=int, default=512, help="image size with --model (default 512)")
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    ap.add_argument("--set", action="append", help="further config overrides KEY=VALUE")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        base = None
        print(f"{'processes':>9} {'samples/s':>10} {'efficiency':>11}")
        for n in args.nproc:
            rate = run(n, args, workdir)
            if base is None:
                base = rate / n
            print(f"{n:>9} {rate:>10.2f} {rate / (n * base):>11.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
