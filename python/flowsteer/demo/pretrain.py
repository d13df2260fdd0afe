"""Pre-training of the demo model by plain flow matching on the world's train split.

    flowsteer demo pretrain --steps 3000 --out demo_model.safetensors

Deterministic for a seed (one process, the same torch build and thread count): every batch is
rendered from a generator seeded by (seed, step), sigma ~ sigmoid(N(0, 1)) (SD3's logit-normal),
10 % of prompts dropped to the empty prompt for classifier-free guidance, AdamW with a 200-step
warm-up and a cosine decay to a tenth, and an EMA of the weights (decay 0.999), which is what is
saved. Held-out strict success is measured every `eval_every` steps (ODE, 10 steps, CFG 2) and
logged with the loss to OUT.log.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .model import DemoAdapter, DemoFlowModel, tokenize
from .world import caption, prompt_sets, render_batch, sample_specs


def save_model(model: DemoFlowModel, path: str, extra: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    meta = {"config": json.dumps(model.config), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp, metadata=meta)
    os.replace(tmp, path)


@torch.no_grad()
def heldout_strict(model: DemoFlowModel, n: int = 256, seed: int = 0, num_steps: int = 10, guidance_scale: float = 2.0,
                   shift: float = 1.0, split_seed: int = 0) -> dict:
    """Strict success of ODE samples on n held-out prompts (fixed noise), overall and per category."""
    from .. import sample
    from .reward import GenEvalLikeReward

    _, heldout = prompt_sets(split_seed, n_train=16, n_heldout=min(n, 209))
    prompts = [heldout.prompts[i % len(heldout.prompts)] for i in range(n)]
    meta = [heldout.meta[i % len(heldout.prompts)] for i in range(n)]
    adapter = DemoAdapter(model, shift=shift)
    images = torch.cat([sample(adapter, prompts[s:s + 64], num_steps=num_steps, guidance_scale=guidance_scale,
                               kind="ode", noise_level=0.0, seed=seed + s).images for s in range(0, n, 64)])
    strict = GenEvalLikeReward()(images, prompts, meta)
    out = {"strict": float(strict.mean())}
    for cat in sorted({m["category"] for m in meta}):
        rows = torch.tensor([m["category"] == cat for m in meta])
        out[cat] = float(strict[rows].mean())
    return out


def pretrain(out: str, steps: int = 4000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
             eval_every: int = 500, log: Callable[[str], None] = print, resume: Optional[str] = None) -> DemoFlowModel:
    torch.manual_seed(seed)
    model = DemoFlowModel()
    ema = DemoFlowModel()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = 200

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    log_path = out + ".log.jsonl"
    t0 = time.time()
    for step in range(steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        specs = sample_specs(batch_size, seed=seed * 1_000_003 + step, split="train")
        x0 = render_batch(specs, 32, seed=seed * 1_000_003 + step) * 2 - 1
        prompts = [caption(s) if float(torch.rand((), generator=g)) >= 0.1 else "" for s in specs]
        tokens = tokenize(prompts)
        sigma = torch.sigmoid(torch.randn(batch_size, generator=g))
        eps = torch.randn(x0.shape, generator=g)
        x = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * eps
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = F.mse_loss(model(x, sigma, tokens), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        row = {"step": step + 1, "loss": float(loss.detach()), "lr": lr_at(step), "seconds": round(time.time() - t0, 1)}
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            row["heldout"] = heldout_strict(ema.eval(), n=128)
            save_model(ema, out, {"step": step + 1, "seed": seed, "heldout": row["heldout"]})
        if (step + 1) % 50 == 0 or "heldout" in row:
            log(json.dumps(row))
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
    return ema
