"""Rollout storage: time and peak RSS of flowsteer.sample with a cheap velocity function, where
the loop's own copies dominate. 2 prompts x 16, 10 steps, latents [16, 64, 64] fp32 (one
trajectory slot of the 32 samples is 8 MB). Run as `python benches/rollout_storage.py`; compare
two versions of the package by running it under each (PYTHONPATH)."""
import resource
import time

import torch

import flowsteer

SHAPE = (16, 64, 64)


def main():
    targets = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))

    def velocity(x, sigma, cond):
        return (x - cond) / sigma.view(-1, 1, 1, 1).clamp_min(1e-3)

    def go():
        return flowsteer.sample(velocity, ["a", "b"], group_size=16, num_steps=10, latent_shape=SHAPE, cond=targets,
                                decode=False)

    go()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        go()
        best = min(best, time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{flowsteer.__file__}: best {best * 1e3:.1f} ms per rollout, peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
