"""The demo's text-to-image flow-matching model and its sampler adapter.

The model works in pixel space: a 32x32 RGB image in [0, 1] is the latent x0 = 2 * image - 1
(3 x 32 x 32), so nothing needs a VAE. It predicts the velocity v = eps - x0 of
x_sigma = (1 - sigma) x0 + sigma eps (flowsteer's convention).

- Text: the prompt's words (the world's small vocabulary) as token ids, a learned embedding with
  positions, two transformer encoder layers; the token states feed cross-attention and their mean
  feeds FiLM. An empty prompt (all padding) is the unconditional input of classifier-free guidance.
- Image: a small convolutional U-Net (32 -> 16 -> 8 px), residual blocks with GroupNorm and FiLM
  from (sigma embedding + pooled text), cross-attention to the tokens at 16 and 8 px.

`DemoAdapter` is its flowsteer.sample adapter: it encodes prompts, runs CFG as one batched forward,
schedules sigmas with a shift, and decodes x0 to pixels.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..rewards.prm import sigma_embedding
from ..sampler.adapters import ModelAdapter, lora_layers_off, step_timesteps
from ..sampler.schedule import shifted_sigmas
from .world import VOCABULARY

Tensor = torch.Tensor
PAD, UNK = 0, 1
MAX_TOKENS = 12


def tokenize(prompts: Sequence[str], max_tokens: int = MAX_TOKENS) -> Tensor:
    """int64 [P, max_tokens]: each word's id in VOCABULARY (+2; 0 pads, 1 is an unknown word)."""
    index = {w: i + 2 for i, w in enumerate(VOCABULARY)}
    out = torch.full((len(prompts), max_tokens), PAD, dtype=torch.long)
    for r, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{r}] must be a str (got {type(p).__name__})")
        words = p.lower().replace(".", " ").replace(",", " ").split()[:max_tokens]
        for c, w in enumerate(words):
            out[r, c] = index.get(w, UNK)
    return out


class TextEncoder(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(len(VOCABULARY) + 2, dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(token states [B, L, D], pooled [B, D], key padding mask [B, L] True where padded)."""
        pad = tokens == PAD
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        # an all-padding row (the unconditional prompt) attends to its first slot, so no row is empty
        attn_pad = pad.clone()
        attn_pad[:, 0] = False
        h = self.norm(self.encoder(h, src_key_padding_mask=attn_pad))
        keep = (~pad).float()[..., None]
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return h, pooled, attn_pad


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class CrossAttention(nn.Module):
    def __init__(self, channels: int, text_dim: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.attn = nn.MultiheadAttention(channels, heads, kdim=text_dim, vdim=text_dim, batch_first=True)

    def forward(self, x: Tensor, text: Tensor, pad: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2)
        out, _ = self.attn(q, text, text, key_padding_mask=pad, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class DemoFlowModel(nn.Module):
    """v = model(x [B, 3, 32, 32], sigma [B], tokens [B, L]). 1.4M parameters at the defaults."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128), text_dim: int = 64, emb_dim: int = 128):
        super().__init__()
        self.config = dict(channels=list(channels), text_dim=text_dim, emb_dim=emb_dim)
        c1, c2, c3 = channels
        self.text = TextEncoder(text_dim)
        self.emb = nn.Sequential(nn.Linear(emb_dim + text_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.emb_dim = emb_dim
        self.stem = nn.Conv2d(3, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, emb_dim)
        self.attn2 = CrossAttention(c2, text_dim)
        self.pool2 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.mid1 = ResBlock(c3, c3, emb_dim)
        self.attn3 = CrossAttention(c3, text_dim)
        self.mid2 = ResBlock(c3, c3, emb_dim)
        self.up2 = nn.ConvTranspose2d(c3, c2, 4, stride=2, padding=1)
        self.dec2 = ResBlock(2 * c2, c2, emb_dim)
        self.attn_dec2 = CrossAttention(c2, text_dim)
        self.up1 = nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1)
        self.dec1 = ResBlock(2 * c1, c1, emb_dim)
        self.out = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, 3, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def encode_text(self, tokens: Tensor):
        return self.text(tokens)

    def forward(self, x: Tensor, sigma: Tensor, tokens: Optional[Tensor] = None, text=None) -> Tensor:
        if text is None:
            text = self.encode_text(tokens)
        states, pooled, pad = text
        emb = self.emb(torch.cat([sigma_embedding(sigma.to(x.device).expand(x.shape[0]), self.emb_dim), pooled], 1))
        h1 = self.down1(self.stem(x), emb)
        h2 = self.attn2(self.down2(self.pool1(h1), emb), states, pad)
        h3 = self.mid1(self.pool2(h2), emb)
        h3 = self.mid2(self.attn3(h3, states, pad), emb)
        d2 = self.attn_dec2(self.dec2(torch.cat([self.up2(h3), h2], 1), emb), states, pad)
        d1 = self.dec1(torch.cat([self.up1(d2), h1], 1), emb)
        return self.out(d1)


class DemoAdapter(ModelAdapter):
    """flowsteer.sample's adapter for DemoFlowModel: token ids once per prompt, CFG in one batch of
    2B (the unconditional half an empty prompt), sigmas shifted by `shift`, pixels = (x + 1) / 2."""

    def __init__(self, model: DemoFlowModel, shift: float = 1.0, size: int = 32):
        self.model = model
        self.shift = float(shift)
        self.size = int(size)

    def networks(self) -> List[nn.Module]:
        return [self.model]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts, guidance_scale):
        tokens = tokenize(prompts).to(self.device)
        cond = {"tokens": tokens}
        if guidance_scale != 1.0:
            cond["uncond"] = torch.zeros_like(tokens[:1])
        return cond

    def model_inputs(self, cond, index, guidance_scale):
        tokens = cond["tokens"].index_select(0, index.to(self.device))
        if "uncond" in cond:
            tokens = torch.cat([cond["uncond"].expand(tokens.shape[0], -1), tokens])
        return {"tokens": tokens}

    def initial_latents(self, n, generator, **size):
        return torch.randn((n, 3, self.size, self.size), generator=generator).to(self.device)

    def schedule(self, num_steps, latents):
        sigmas = shifted_sigmas(num_steps, self.shift)
        return sigmas, torch.tensor(sigmas[:-1], dtype=torch.float32, device=self.device)

    def velocity(self, x, step, timesteps, sigma, inputs, guidance_scale):
        t = step_timesteps(timesteps, step, x.shape[0])
        tokens = inputs["tokens"]
        if tokens.shape[0] == x.shape[0]:
            return self.model(x, t, tokens)
        v_u, v_c = self.model(torch.cat([x, x]), torch.cat([t, t]), tokens).chunk(2)
        return v_u + guidance_scale * (v_c - v_u)

    def decode(self, latents, **size):
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def lora_disabled(self):
        return lora_layers_off([self.model])


def load_demo_model(path: Optional[str] = None, device="cpu") -> DemoFlowModel:
    """The shipped pre-trained weights (flowsteer/demo/weights/demo_model.safetensors), or `path`."""
    import json
    import os

    from safetensors.torch import load_file

    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "demo_model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no demo model weights at {path}; build them with `flowsteer demo pretrain`")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    model = DemoFlowModel(**json.loads(meta.get("config", "{}")))
    model.load_state_dict(load_file(path))
    return model.to(device).eval()
