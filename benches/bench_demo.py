"""The full default `flowsteer demo` over seeds: wall time and held-out strict success gain.

    python benches/bench_demo.py [--seeds 0,1,2] [--out runs/bench-demo] [--algorithm flow_grpo]

Not a CI test: one run takes about nine minutes on two CPU cores. Prints one line per seed and the
mean and spread, and writes OUT/bench_demo.json; BENCHMARKS.md records the numbers.
"""
import argparse
import json
import os
import sys
import time

import torch

from flowsteer.demo.run import ALGORITHMS, run_demo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--algorithm", default="flow_grpo", choices=ALGORITHMS)
    ap.add_argument("--out", default="runs/bench-demo")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        t0 = time.time()
        s = run_demo(os.path.join(args.out, f"seed{seed}"), algorithm=args.algorithm, seed=seed, log=lambda m: None)
        rows.append({"seed": seed, "seconds": round(time.time() - t0, 1), "before": s["heldout_strict_before"],
                     "after": s["heldout_strict_after"], "gain": s["gain"], "after_by_category": s["after_by_category"]})
        print(f"seed {seed}: held-out strict {s['heldout_strict_before']:.3f} -> {s['heldout_strict_after']:.3f} "
              f"({s['gain']:+.3f}) in {rows[-1]['seconds']:.0f} s", flush=True)
    gains = [r["gain"] for r in rows]
    mean = sum(gains) / len(gains)
    print(f"{args.algorithm}, {len(seeds)} seeds, torch {torch.__version__}, {torch.get_num_threads()} threads: "
          f"gain mean {mean:+.3f} (min {min(gains):+.3f}, max {max(gains):+.3f}); "
          f"time mean {sum(r['seconds'] for r in rows) / len(rows):.0f} s")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_demo.json"), "w") as f:
        json.dump({"algorithm": args.algorithm, "rows": rows, "gain_mean": mean}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
