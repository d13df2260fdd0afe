"""Rewards off the critical path: seconds per trainer iteration with a slow reward, scored after
the rollout (scoring.chunk_prompts null) against scored chunk by chunk in a background thread while
the next chunk is sampled.

    python benches/bench_pipeline.py [--prompts 8] [--chunk 1] [--iterations 3]

The reward sleeps (a judge behind a network): its total per iteration is set equal to the measured
rollout time, the case where pipelining matters most. Target: the rollout + reward phase takes
about max(rollout, reward) + one chunk's scoring, not rollout + reward. The tiny SD3 pipeline on
the CPU; the numbers of a run are printed as a table (and in BENCHMARKS.md).
"""
import argparse
import os
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per iteration (default 8)")
    ap.add_argument("--group-size", type=int, default=4, help="samples per prompt (default 4)")
    ap.add_argument("--chunk", type=int, default=1, help="prompts per scored chunk (default 1)")
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations per mode, after one warm-up")
    args = ap.parse_args(argv)

    from flowsteer.rewards import reward
    from flowsteer.testing.pipelines import tiny_sd3_pipeline
    from flowsteer.train import GRPOTrainer, load_config

    P, G = args.prompts, args.group_size
    chunks = -(-P // args.chunk)
    state = {"sleep": 0.0}

    @reward(name="slow_brightness", input="pixels")
    def slow(images, prompts, meta):
        time.sleep(state["sleep"] * len(prompts) / (args.chunk * G))
        return images.float().flatten(1).mean(dim=1)

    def config(chunk):
        return load_config("flow_grpo", [
            "model.path=testing:sd3", "model.dtype=float32", "model.max_sequence_length=8", "model.lora.rank=4",
            "model.lora.alpha=8", "sampling.height=32", "sampling.width=32", "sampling.num_steps=8",
            f"sampling.group_size={G}", f"train.prompts_per_iteration={P}", "train.mixed_precision=fp32",
            "train.batch_size=null", f"train.iterations={args.iterations + 1}", "logging.tqdm=false",
            "logging.tensorboard=false", "eval.every=0", "prompts.train=[a red circle, two blue squares, a green star]",
            f"scoring.chunk_prompts={'null' if chunk is None else chunk}", "scoring.queue_depth=2"])

    # the rollout time, with a reward that returns at once
    probe = GRPOTrainer(tiny_sd3_pipeline(0), slow, config(None))
    probe.step()
    rollout_s = statistics.median(probe.step()["time/rollout"] for _ in range(2))
    state["sleep"] = rollout_s / chunks  # per chunk: the reward's total equals the rollout's
    print(f"tiny SD3, {P} prompts x {G}, 8 steps, 32 px, LoRA r4, {torch.get_num_threads()} threads; "
          f"rollout {rollout_s:.2f} s, reward set to sleep {rollout_s:.2f} s per iteration ({chunks} chunks of "
          f"{args.chunk} prompt(s), {state['sleep']:.3f} s each)")
    results = {}
    for name, chunk in (("plain", None), ("pipelined", args.chunk)):
        trainer = GRPOTrainer(tiny_sd3_pipeline(0), slow, config(chunk))
        trainer.step()  # warm-up
        rows = [trainer.step() for _ in range(args.iterations)]
        phase = statistics.median(r["time/rollout"] + r["time/reward"] for r in rows)
        total = statistics.median(r["time/total"] for r in rows)
        results[name] = (phase, total)
    reward_s = rollout_s
    print(f"{'mode':<10} {'rollout+reward s':>17} {'iteration s':>12} {'phase / max(r, s)':>18} "
          f"{'phase / (r + s)':>16}")
    for name, (phase, total) in results.items():
        print(f"{name:<10} {phase:>17.2f} {total:>12.2f} {phase / max(rollout_s, reward_s):>18.2f} "
              f"{phase / (rollout_s + reward_s):>16.2f}")
    speedup = results["plain"][1] / results["pipelined"][1]
    print(f"iteration speed-up {speedup:.2f}x; the ideal phase is max(r, s) + one chunk's scoring = "
          f"{(max(rollout_s, reward_s) + state['sleep']) / max(rollout_s, reward_s):.2f} x max(r, s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
