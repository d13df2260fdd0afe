"""CLIP-family reward models: CLIP score, PickScore, the LAION aesthetic predictor and HPSv2.

Every adapter loads its weights from a local path the user gives, never from a hub. It runs in
eval mode with frozen weights, under no_grad unless built with `differentiable=True`, when the
score is differentiable with respect to the input pixels (the preprocessing is torch; see
preprocess.py). Inputs are images [N, 3, H, W] in [0, 1], or videos [N, 3, F, H, W], which are
scored frame by frame and averaged.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._optional import require
from .base import Reward, fold_frames, frame_mean
from .preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocess

Tensor = torch.Tensor


def require_path(path, who: str, what: str, hint: str) -> str:
    """path as a str, or an error that says what to pass. Nothing is ever downloaded."""
    if path is None or (isinstance(path, str) and not path):
        raise TypeError(f"{who} needs {what}: pass {hint}. flowsteer never downloads weights.")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{who}: {what} not found at {path!r}; pass {hint}. flowsteer never downloads weights.")
    return path


def _clip_dir(path, who: str, arg: str, example: str) -> str:
    hint = f"{who}({arg}=DIR) with DIR a local transformers CLIP checkpoint (save_pretrained output, e.g. a download of {example})"
    path = require_path(path, who, "a CLIP checkpoint directory", hint)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{who}: {path!r} is not a transformers checkpoint directory (no config.json); pass {hint}")
    return path


def _transformers(what: str):
    return require("transformers", "rewards", f"{what} (it loads a transformers CLIP model)")


def _load_clip_model(path: str, device, dtype, who: str = "the CLIP-family rewards"):
    CLIPModel = _transformers(who).CLIPModel
    model = CLIPModel.from_pretrained(path, local_files_only=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _load_tokenizer(path: str, who: str):
    AutoTokenizer = _transformers(who).AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"{who}: no tokenizer in {path!r} (tokenizer.json, or vocab.json and merges.txt); "
                                f"pass tokenizer_path=DIR ({exc})") from None


def _need_prompts(name: str, prompts) -> List[str]:
    if prompts is None:
        raise ValueError(f"reward {name!r} scores image-text agreement: pass prompts, one per sample")
    return prompts


class _CLIPReward(Reward):
    """A transformers CLIPModel with its tokenizer and the published preprocessing."""

    input = "pixels"

    def __init__(self, path, *, who: str, arg: str, example: str, processor_path=None, tokenizer_path=None,
                 text: bool = True, device=None, dtype=torch.float32, batch_size: Optional[int] = 32,
                 differentiable: bool = False):
        path = _clip_dir(path, who, arg, example)
        self.path = path
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.batch_size = batch_size
        self.differentiable = bool(differentiable)
        self.model = _load_clip_model(path, self.device, dtype, who)
        if processor_path is not None:
            processor_path = require_path(processor_path, who, "the image processor directory",
                                          f"{who}(processor_path=DIR) with DIR holding preprocessor_config.json")
        self.preprocess = ImagePreprocess.from_processor_config(processor_path or path,
                                                                self.model.config.vision_config.image_size)
        self.tokenizer = _load_tokenizer(tokenizer_path or path, who) if text else None

    def image_embeds(self, images: Tensor) -> Tensor:
        """images [n, 3, H, W] in [0, 1] -> L2-normalised projected embeddings [n, D], fp32."""
        pixels = self.preprocess(images).to(self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_embeds(self, prompts: List[str]) -> Tensor:
        """prompts (n) -> L2-normalised projected embeddings [n, D], fp32; each distinct prompt once."""
        unique = list(dict.fromkeys(prompts))
        max_len = min(int(self.tokenizer.model_max_length), self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(unique, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        pooled = self.model.text_model(**tokens).pooler_output
        emb = F.normalize(self.model.text_projection(pooled).float(), dim=-1)
        index = torch.tensor([unique.index(p) for p in prompts], device=emb.device)
        return emb[index]

    def cosine(self, x: Tensor, prompts: List[str]) -> Tensor:
        """cos(image, text) per sample [n]; videos average over frames."""
        frames, f = fold_frames(x)
        img = self.image_embeds(frames)
        txt = self.text_embeds([p for p in prompts for _ in range(f)])
        return frame_mean((img * txt).sum(dim=-1), f)


class CLIPScore(_CLIPReward):
    """CLIP score: scale * cos(image embedding, text embedding) from a transformers CLIPModel.

    Args:
        path: local CLIP checkpoint directory (e.g. openai/clip-vit-large-patch14, saved with
            save_pretrained or downloaded by the user); holds config.json, the weights, the tokenizer
            and optionally preprocessor_config.json (else CLIP's defaults at the model's image_size).
        scale: 1 gives the cosine; torchmetrics' CLIPScore is 100 * max(cos, 0).
        differentiable: keep the graph to the pixels (for direct reward backprop or guidance).
    """

    name = "clip_score"

    def __init__(self, path=None, *, scale: float = 1.0, processor_path=None, tokenizer_path=None, device=None,
                 dtype=torch.float32, batch_size: Optional[int] = 32, differentiable: bool = False, name: str = "clip_score"):
        super().__init__(path, who="CLIPScore", arg="path", example="openai/clip-vit-large-patch14",
                         processor_path=processor_path, tokenizer_path=tokenizer_path, device=device, dtype=dtype,
                         batch_size=batch_size, differentiable=differentiable)
        self.scale = float(scale)
        self.name = name

    def forward(self, x, prompts, meta):
        return self.scale * self.cosine(x, _need_prompts(self.name, prompts))


class PickScore(_CLIPReward):
    """PickScore (Kirstain et al. 2023): logit_scale.exp() * cos(text, image), as the PickScore repo
    computes it, with a CLIP-H transformers CLIPModel fine-tuned on Pick-a-Pic.

    Args:
        path: local directory of the PickScore model (yuvalkirstain/PickScore_v1).
        processor_path: local directory of its processor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K), for
            preprocessor_config.json and the tokenizer when `path` lacks them.
    """

    name = "pickscore"

    def __init__(self, path=None, *, processor_path=None, tokenizer_path=None, device=None, dtype=torch.float32,
                 batch_size: Optional[int] = 32, differentiable: bool = False, name: str = "pickscore"):
        if tokenizer_path is None and processor_path is not None and not _has_tokenizer(path):
            tokenizer_path = processor_path
        super().__init__(path, who="PickScore", arg="path", example="yuvalkirstain/PickScore_v1",
                         processor_path=processor_path, tokenizer_path=tokenizer_path, device=device, dtype=dtype,
                         batch_size=batch_size, differentiable=differentiable)
        self.name = name

    def forward(self, x, prompts, meta):
        return self.model.logit_scale.exp().float() * self.cosine(x, _need_prompts(self.name, prompts))


def _has_tokenizer(path) -> bool:
    if path is None or not os.path.isdir(os.fspath(path)):
        return False
    files = set(os.listdir(os.fspath(path)))
    return "tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head (sac+logos+ava1-l14-linearMSE.pth): a linear
    stack 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts and no activations. Its state-dict keys
    are layers.{0,2,4,6,7}.{weight,bias}, as saved by the published training script."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds)


class AestheticScore(_CLIPReward):
    """The LAION aesthetic predictor: AestheticMLP on L2-normalised CLIP ViT-L/14 image embeddings
    (as DDPO and Flow-GRPO use it). Ignores prompts.

    Args:
        mlp_path: the predictor's state dict (.pth), e.g. sac+logos+ava1-l14-linearMSE.pth.
        clip_path: local CLIP ViT-L/14 checkpoint directory (openai/clip-vit-large-patch14).
    """

    name = "aesthetic"

    def __init__(self, mlp_path=None, clip_path=None, *, processor_path=None, device=None, dtype=torch.float32,
                 batch_size: Optional[int] = 32, differentiable: bool = False, name: str = "aesthetic"):
        mlp_path = require_path(mlp_path, "AestheticScore", "the aesthetic MLP weights",
                                "AestheticScore(mlp_path=FILE, clip_path=DIR) with FILE the predictor's .pth "
                                "(e.g. sac+logos+ava1-l14-linearMSE.pth)")
        super().__init__(clip_path, who="AestheticScore", arg="clip_path", example="openai/clip-vit-large-patch14",
                         processor_path=processor_path, text=False, device=device, dtype=dtype,
                         batch_size=batch_size, differentiable=differentiable)
        dim = self.model.config.projection_dim
        state = torch.load(mlp_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        w0 = state.get("layers.0.weight") if isinstance(state, dict) else None
        if w0 is None:
            raise ValueError(f"AestheticScore: {mlp_path!r} is not an aesthetic-predictor state dict "
                             "(no layers.0.weight)")
        if w0.shape[1] != dim:
            raise ValueError(f"AestheticScore: the MLP takes {w0.shape[1]}-d embeddings but the CLIP model at "
                             f"{self.path!r} gives {dim}-d ones (the published predictor needs ViT-L/14, 768-d)")
        self.mlp = AestheticMLP(dim)
        self.mlp.load_state_dict(state)
        self.mlp.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.name = name

    def forward(self, x, prompts, meta):
        frames, f = fold_frames(x)
        return frame_mean(self.mlp(self.image_embeds(frames)).squeeze(-1), f)


def import_open_clip():
    return require("open_clip", None, "HPSv2Score",
                   hint="open_clip also needs a torchvision built for your torch")


class HPSv2Score(Reward):
    """HPSv2 / HPSv2.1 (Wu et al. 2023): cos(image, text) of an open_clip ViT-H-14 fine-tuned on human
    preferences, as HPSv2's img_score.py computes it (the diagonal of image_features @ text_features.T).

    Args:
        checkpoint: the HPS checkpoint file (HPS_v2_compressed.pt, HPS_v2.1_compressed.pt): a dict
            with 'state_dict', or a bare state dict.
        arch: the open_clip architecture name; "ViT-H-14" for HPSv2.
        model_config: optional path to an open_clip model-config JSON (registered with
            open_clip.add_model_config, so `arch` may name it); for custom or test architectures.
    Preprocessing follows the model's open_clip preprocess config: resize the shortest side
    (bicubic), center-crop, normalise (OpenAI CLIP constants for ViT-H-14).
    """

    name = "hpsv2"
    input = "pixels"

    def __init__(self, checkpoint=None, arch: str = "ViT-H-14", *, model_config=None, device=None,
                 dtype=torch.float32, batch_size: Optional[int] = 32, differentiable: bool = False, name: str = "hpsv2"):
        checkpoint = require_path(checkpoint, "HPSv2Score", "the HPS checkpoint",
                                  "HPSv2Score(checkpoint=FILE) with FILE e.g. HPS_v2.1_compressed.pt")
        open_clip = import_open_clip()
        if model_config is not None:
            open_clip.add_model_config(require_path(model_config, "HPSv2Score", "the open_clip model config",
                                                    "model_config=FILE.json"))
        self.name = name
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.batch_size = batch_size
        self.differentiable = bool(differentiable)
        model = open_clip.create_model(arch, pretrained=None, pretrained_text=False, output_dict=True)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        model.load_state_dict(state)
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", model.visual.image_size)
        size = (size, size) if isinstance(size, int) else tuple(size)
        mode = cfg.get("resize_mode", "shortest")
        if cfg.get("interpolation", "bicubic") != "bicubic" or mode not in ("shortest", "squash"):
            raise ValueError(f"HPSv2Score: preprocess config {cfg} is not supported (bicubic, shortest or squash only)")
        self._squash = mode == "squash"
        self.preprocess = ImagePreprocess(resize=None if self._squash else min(size), crop=None if self._squash else size,
                                          mean=tuple(cfg.get("mean", CLIP_MEAN)), std=tuple(cfg.get("std", CLIP_STD)),
                                          crop_rounding="round")
        self._size = size

    def forward(self, x, prompts, meta):
        prompts = _need_prompts(self.name, prompts)
        frames, f = fold_frames(x)
        if self._squash:
            frames = F.interpolate(frames.float(), size=self._size, mode="bicubic", antialias=True).clamp(0, 1)
        img = self.model.encode_image(self.preprocess(frames).to(self.dtype), normalize=True).float()
        unique = list(dict.fromkeys(prompts))
        txt = self.model.encode_text(self.tokenizer(unique).to(self.device), normalize=True).float()
        txt = txt[torch.tensor([unique.index(p) for p in prompts for _ in range(f)], device=txt.device)]
        return frame_mean((img * txt).sum(dim=-1), f)
