"""Sample grids as PNG (no imaging library needed) and cheap reward-hacking monitors."""
from __future__ import annotations

import json
import os
import struct
import zlib
from typing import List, Optional, Tuple

import torch

Tensor = torch.Tensor


def _frames(images: Tensor) -> Tensor:
    """[N, 3, H, W], [N, F, 3, H, W] or [N, 3, F, H, W] -> frames [M, 3, H, W] (the first frame of videos)."""
    x = images.detach().float()
    if x.ndim == 5:
        x = x[:, 0] if x.shape[2] == 3 else x[:, :, 0]
    return x


def image_stats(images: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean HSV saturation, mean high-frequency energy) of images in [0, 1], as 0-d tensors on
    their device. Saturation creeping up or high-frequency energy exploding are the usual signs
    that a policy is hacking an aesthetic or preference reward."""
    x = _frames(images).clamp(0, 1)
    mx, mn = x.max(dim=1).values, x.min(dim=1).values
    sat = ((mx - mn) / (mx + 1e-6)).mean()
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    hf = (dx.pow(2).mean() if dx.numel() else x.new_zeros(())) + (dy.pow(2).mean() if dy.numel() else x.new_zeros(()))
    return sat, hf


def png_bytes(rgb: Tensor) -> bytes:
    """uint8 [H, W, 3] -> PNG file bytes."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + bytes(row) for row in rgb.contiguous().numpy().reshape(h, w * 3))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def make_grid(images: Tensor, cols: Optional[int] = None, pad: int = 2) -> Tensor:
    """uint8 [H', W', 3] grid of images [N, 3, H, W] in [0, 1]."""
    x = _frames(images).clamp(0, 1).cpu()
    n, _, h, w = x.shape
    cols = cols or max(1, min(n, int(n ** 0.5 + 0.999)))
    rows = (n + cols - 1) // cols
    grid = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0)


def write_grid(path: str, images: Tensor, prompts: Optional[List[str]] = None, cols: Optional[int] = None) -> None:
    """A PNG grid at `path` and, with prompts, `path` with .json: the prompt of each cell, row-major."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid = make_grid(images, cols)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png_bytes(grid))
    os.replace(tmp, path)
    if prompts is not None:
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump({"prompts": list(prompts), "cols": cols or max(1, min(len(prompts), int(len(prompts) ** 0.5 + 0.999)))},
                      f, indent=1)
