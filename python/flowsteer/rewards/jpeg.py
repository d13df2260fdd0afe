"""JPEG (in)compressibility, the weight-free rewards of DDPO (Black et al. 2023).

The size in kilobytes (1 KB = 1000 bytes) of the image's JPEG encoding at quality 95 with PIL, after
rounding to uint8 as DDPO does. Compressibility is its negative; Flow-GRPO divides it by 500
(`scale=1/500`). Videos [N, 3, F, H, W] average over frames.
"""
from __future__ import annotations

import io
from typing import Optional

import torch

from .._optional import require
from .base import Reward, fold_frames, frame_mean, to_uint8_hwc

Tensor = torch.Tensor


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """images [n, 3, H, W] in [0, 1] -> JPEG sizes in KB [n], fp32 on the CPU."""
    Image = require("PIL.Image", "rewards", "the JPEG (in)compressibility reward (it encodes JPEGs with Pillow)")

    sizes = []
    for arr in to_uint8_hwc(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegCompressibility(Reward):
    """-scale * (JPEG size in KB at `quality`); higher for simpler images. Runs on the CPU."""

    name = "jpeg_compressibility"
    input = "pixels"
    sign = -1.0

    def __init__(self, quality: int = 95, scale: float = 1.0, *, batch_size: Optional[int] = None,
                 name: Optional[str] = None):
        if not (isinstance(quality, int) and 1 <= quality <= 100):
            raise ValueError(f"quality must be an int in [1, 100] (got {quality!r})")
        self.quality = quality
        self.scale = float(scale)
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        if name is not None:
            self.name = name

    def forward(self, x, prompts, meta):
        frames, f = fold_frames(x)
        return self.sign * self.scale * frame_mean(jpeg_size_kb(frames, self.quality), f)


class JpegIncompressibility(JpegCompressibility):
    """+scale * (JPEG size in KB at `quality`)."""

    name = "jpeg_incompressibility"
    sign = 1.0
