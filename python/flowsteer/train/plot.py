"""`flowsteer plot RUN_DIR`: the reward and KL curves of metrics.jsonl, and the latest sample grid."""
from __future__ import annotations

import json
import os
import shutil
from typing import List, Optional


def read_metrics(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl")
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def plot_run(run_dir: str, out: Optional[str] = None) -> List[str]:
    """Writes curves.png (reward mean with its std band and the eval reward; KL and approximate KL;
    clip fraction) and latest_samples.png into out (default RUN_DIR/plots); returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("flowsteer plot needs matplotlib: pip install 'flowsteer[plot]'") from None
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no rows yet")
    out = out or os.path.join(run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    it = [r["iteration"] for r in rows]

    def col(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    mean, std = col("reward/mean"), col("reward/std")
    axes[0].plot(it, mean, label="train reward")
    axes[0].fill_between(it, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ev = [(r["iteration"], r["eval/reward/mean"]) for r in rows if "eval/reward/mean" in r]
    if ev:
        axes[0].plot(*zip(*ev), "o-", label="eval reward")
    axes[0].set_title("reward")
    axes[0].legend()
    if any("kl" in r for r in rows):
        axes[1].plot(it, col("kl"), label="KL to reference")
    axes[1].plot(it, col("approx_kl"), label="approx KL (old policy)")
    axes[1].set_title("KL")
    axes[1].legend()
    axes[2].plot(it, col("clip_frac"), label="clip fraction")
    axes[2].plot(it, col("zero_std_group_frac"), label="zero-std groups")
    axes[2].set_title("clipping and dead groups")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("iteration")
    fig.tight_layout()
    paths = [os.path.join(out, "curves.png")]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    samples = os.path.join(run_dir, "samples")
    grids = sorted(f for f in os.listdir(samples) if f.endswith(".png")) if os.path.isdir(samples) else []
    if grids:
        paths.append(os.path.join(out, "latest_samples.png"))
        shutil.copy2(os.path.join(samples, grids[-1]), paths[-1])
    return paths
