"""CLIP's published image preprocessing, in torch so that it is differentiable.

OpenAI CLIP, transformers' CLIPImageProcessor and open_clip all do, for inference:
resize the shortest side to `resize` with bicubic interpolation, center-crop to `crop`, and
normalise with the mean and std below. Here images are float [N, 3, H, W] in [0, 1]; the resize
is torch's antialiased bicubic (PIL's bicubic filter on floats, so it matches the processors to
within the processors' own uint8 rounding), clamped to [0, 1] as PIL's uint8 output is.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# OpenAI CLIP's normalisation constants (clip/clip.py `_transform`; transformers OPENAI_CLIP_MEAN/STD;
# open_clip OPENAI_DATASET_MEAN/STD). PickScore (CLIP-H) and HPSv2 use them too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocess:
    """resize: the shortest side after resizing (None: no resize); crop: (height, width) of the
    center crop (None: no crop); crop_rounding: where an odd margin goes, "floor" as transformers'
    center_crop, "round" as torchvision's CenterCrop (open_clip)."""

    resize: Optional[int] = 224
    crop: Optional[Tuple[int, int]] = (224, 224)
    mean: Tuple[float, float, float] = CLIP_MEAN
    std: Tuple[float, float, float] = CLIP_STD
    crop_rounding: str = "floor"

    def __call__(self, images: Tensor) -> Tensor:
        """images: [N, 3, H, W] float in [0, 1] -> normalised [N, 3, crop_h, crop_w]; differentiable."""
        return clip_preprocess(images, self)

    @classmethod
    def from_processor_config(cls, path: str, default_size: int) -> "ImagePreprocess":
        """From a transformers `preprocessor_config.json` in directory `path`, else CLIP's defaults at
        `default_size` (the vision tower's image_size)."""
        file = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(file):
            return cls(resize=default_size, crop=(default_size, default_size))
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
        resample = cfg.get("resample", 3)
        if resample not in (3, "bicubic", "BICUBIC"):
            raise ValueError(f"{file}: resample={resample!r} is not bicubic (3); flowsteer's CLIP preprocessing is bicubic only")
        size = cfg.get("size", default_size)
        if cfg.get("do_resize", True) is False:
            resize = None
        elif isinstance(size, dict):
            if "shortest_edge" not in size or size["shortest_edge"] is None:
                raise ValueError(f"{file}: size={size!r}; only a shortest_edge resize is supported")
            resize = int(size["shortest_edge"])
        else:
            resize = int(size)
        crop_size = cfg.get("crop_size", default_size)
        if cfg.get("do_center_crop", True) is False:
            crop = None
        elif isinstance(crop_size, dict):
            crop = (int(crop_size["height"]), int(crop_size["width"]))
        else:
            crop = (int(crop_size), int(crop_size))
        mean = tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN))
        std = tuple(float(v) for v in cfg.get("image_std", CLIP_STD))
        if cfg.get("do_normalize", True) is False:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(resize=resize, crop=crop, mean=mean, std=std)


def resize_shortest(images: Tensor, size: int) -> Tensor:
    """Bicubic resize so that min(H, W) = size; the long side is int(size * long / short), as in
    transformers' get_resize_output_image_size and torchvision's Resize."""
    h, w = images.shape[-2:]
    if min(h, w) == size:
        return images
    if h <= w:
        out_h, out_w = size, int(size * w / h)
    else:
        out_h, out_w = int(size * h / w), size
    out = F.interpolate(images, size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0)


def center_crop(images: Tensor, crop: Tuple[int, int], rounding: str = "floor") -> Tensor:
    h, w = images.shape[-2:]
    ch, cw = crop
    if ch > h or cw > w:
        raise ValueError(f"center crop {crop} is larger than the resized image ({h}, {w})")
    if rounding == "floor":
        top, left = (h - ch) // 2, (w - cw) // 2
    elif rounding == "round":
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    else:
        raise ValueError(f"crop_rounding must be 'floor' or 'round' (got {rounding!r})")
    return images[..., top:top + ch, left:left + cw]


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    return (images - m) / s


def clip_preprocess(images: Tensor, cfg: ImagePreprocess = ImagePreprocess()) -> Tensor:
    """images: [N, 3, H, W] float in [0, 1] -> [N, 3, crop_h, crop_w] normalised, in fp32."""
    x = images.float()
    if cfg.resize is not None:
        x = resize_shortest(x, cfg.resize)
    if cfg.crop is not None:
        x = center_crop(x, cfg.crop, cfg.crop_rounding)
    return normalize(x, cfg.mean, cfg.std)

