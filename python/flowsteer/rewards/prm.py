"""The latent process reward model (Euphonium): predicts the outcome reward from a noisy latent.

r_phi(x_sigma, sigma[, cond]) ~ E[r(x_0) | x_sigma]. `fit` regresses it online onto the final reward
of each rollout at every stored step; `grad` gives grad_x r_phi, the guidance direction of
ops.sde_step(guidance=...).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


def sigma_embedding(sigma: Tensor, dim: int) -> Tensor:
    """Sinusoidal features [N, dim] of t = 1000 sigma, sigma [N], with frequencies 1 down to 1/1000."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / max(half - 1, 1))
    angles = 1000.0 * sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class _Block(nn.Module):
    """GroupNorm -> FiLM(scale, shift from the embedding) -> SiLU -> strided conv."""

    def __init__(self, conv, channels: int, emb_dim: int, stride):
        super().__init__()
        self.norm = nn.GroupNorm(min(8, channels), channels)
        self.film = nn.Linear(emb_dim, 2 * channels)
        self.conv = conv(channels, channels, 3, stride=stride, padding=1)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.film(emb).chunk(2, dim=1)
        shape = (h.shape[0], -1) + (1,) * (h.ndim - 2)
        h = self.norm(h) * (1 + scale.reshape(shape)) + shift.reshape(shape)
        return self.conv(F.silu(h))


class LatentPRM(nn.Module):
    """A small conv net on (x_sigma, sigma[, cond]) -> predicted outcome reward [N].

    Args:
        latent_channels: C of the latents [N, C, H, W], or [N, C, F, H, W] with video=True.
        cond_dim: size of an optional per-sample conditioning vector (e.g. a pooled prompt
            embedding); None for an unconditional PRM.
        hidden: conv channels. depth: number of FiLM conv blocks (each halves H and W; video keeps F).
        video: Conv3d for 5-D video latents instead of Conv2d.
    Targets are standardised with the mean and std of the rewards seen by the first `fit`, stored as
    buffers; predictions are in reward units.
    """

    def __init__(self, latent_channels: int, cond_dim: Optional[int] = None, hidden: int = 64, depth: int = 3,
                 video: bool = False, emb_dim: int = 64):
        super().__init__()
        if not (isinstance(latent_channels, int) and latent_channels > 0):
            raise ValueError(f"latent_channels must be a positive int (got {latent_channels!r})")
        if cond_dim is not None and not (isinstance(cond_dim, int) and cond_dim > 0):
            raise ValueError(f"cond_dim must be a positive int or None (got {cond_dim!r})")
        self.latent_channels, self.cond_dim, self.video = latent_channels, cond_dim, bool(video)
        conv = nn.Conv3d if video else nn.Conv2d
        stride = (1, 2, 2) if video else 2
        self.emb_dim = emb_dim
        self.sigma_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_proj = nn.Linear(cond_dim, emb_dim) if cond_dim else None
        self.stem = conv(latent_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList([_Block(conv, hidden, emb_dim, stride) for _ in range(depth)])
        self.head = nn.Sequential(nn.Linear(2 * hidden + emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._optimizer: Optional[torch.optim.Optimizer] = None

    # ------------------------------------------------------------------------------ checks

    def _check(self, x: Tensor, sigma, cond: Optional[Tensor]):
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating-point tensor (got {getattr(x, 'dtype', type(x).__name__)})")
        want = 5 if self.video else 4
        layout = "[N, C, F, H, W]" if self.video else "[N, C, H, W]"
        if x.ndim != want or x.shape[1] != self.latent_channels:
            raise ValueError(f"x must be {layout} with C = {self.latent_channels} (got shape {tuple(x.shape)})"
                             + ("; build LatentPRM(video=True) for video latents" if x.ndim == 5 and not self.video else ""))
        n = x.shape[0]
        # The range check is free for floats and CPU tensors; on CUDA it would cost a sync per
        # guided step, so it is skipped there.
        if isinstance(sigma, Tensor):
            if sigma.ndim == 0:
                sigma = sigma.expand(n)
            if sigma.shape != (n,):
                raise ValueError(f"sigma must be a float, a 0-d tensor or [N] = [{n}] (got shape {tuple(sigma.shape)})")
            if sigma.device.type == "cpu" and bool(((sigma < 0) | (sigma > 1)).any()):
                raise ValueError(f"sigma must be in [0, 1] (got values in [{float(sigma.min())}, {float(sigma.max())}])")
            sigma = sigma.to(device=x.device, dtype=torch.float32)
        else:
            if not 0.0 <= float(sigma) <= 1.0:
                raise ValueError(f"sigma must be in [0, 1] (got {float(sigma)})")
            sigma = torch.full((n,), float(sigma), device=x.device)
        if self.cond_proj is not None:
            if cond is None or cond.shape != (n, self.cond_dim):
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"cond must be [N, cond_dim] = [{n}, {self.cond_dim}] for this PRM (got {got})")
            cond = cond.to(device=x.device, dtype=torch.float32)
        elif cond is not None:
            raise ValueError("this PRM was built without conditioning (cond_dim=None); pass cond=None")
        return sigma, cond

    # ----------------------------------------------------------------------------- forward

    def forward(self, x: Tensor, sigma: Union[float, Tensor], cond: Optional[Tensor] = None) -> Tensor:
        """Predicted reward [N] in reward units for x [N, C, (F,) H, W] at noise level sigma, computed in
        the PRM's dtype (fp32 unless converted) whatever x's dtype."""
        sigma, cond = self._check(x, sigma, cond)
        dtype = self.stem.weight.dtype
        emb = self.sigma_mlp(sigma_embedding(sigma, self.emb_dim).to(dtype))
        if self.cond_proj is not None:
            emb = emb + self.cond_proj(cond.to(dtype))
        h = self.stem(x.to(dtype))
        for block in self.blocks:
            h = block(h, emb)
        h = F.silu(h).flatten(2)
        feats = torch.cat([h.mean(dim=2), h.std(dim=2, unbiased=False), emb], dim=1)
        return self.head(feats).squeeze(1) * self.target_std + self.target_mean

    @torch.no_grad()
    def predict(self, x: Tensor, sigma: Union[float, Tensor], cond: Optional[Tensor] = None) -> Tensor:
        """Predicted reward [N] in eval mode, without a graph."""
        was = self.training
        self.eval()
        try:
            return self(x, sigma, cond)
        finally:
            self.train(was)

    def grad(self, x: Tensor, sigma: Union[float, Tensor], cond: Optional[Tensor] = None) -> Tensor:
        """grad_x of the predicted reward, same shape and dtype as x: the guidance direction for
        ops.sde_step(guidance=...). The PRM's own parameters get no gradient."""
        was = self.training
        self.eval()
        try:
            with torch.enable_grad():
                xg = x.detach().to(self.stem.weight.dtype).requires_grad_(True)
                (g,) = torch.autograd.grad(self(xg, sigma, cond).sum(), xg)
        finally:
            self.train(was)
        return g.to(x.dtype)

    # --------------------------------------------------------------------------------- fit

    def fit(self, latents: Union[Tensor, Sequence[Tensor], object], sigmas=None, rewards: Optional[Tensor] = None,
            cond: Optional[Tensor] = None, *, steps: int = 200, lr: float = 1e-3, batch_size: int = 256,
            weight_decay: float = 0.0, generator: Optional[torch.Generator] = None) -> List[float]:
        """Regress onto the outcome reward at every stored step (MSE on standardised targets).

        Args:
            latents: [T, N, C, (F,) H, W], a list of T tensors [N, ...], a flowsteer Rollout (its
                trained steps' latents and sigmas), or another object with `.latents` [T, N, ...] and
                `.sigmas` [T] (then `sigmas` may be None).
            sigmas: [T] (one per stored step) or [T, N] (per sample).
            rewards: [N], the final reward of each trajectory; every step of trajectory n regresses onto it.
            cond: [N, cond_dim] when the PRM is conditional.
            steps, lr, batch_size, weight_decay: AdamW steps on random minibatches of (step, sample) pairs.
                The optimiser persists across calls, so repeated calls train online.
        Returns the loss of each step.
        """
        if hasattr(latents, "latents") and hasattr(latents, "steps") and not isinstance(latents, Tensor):
            # a flowsteer Rollout: latents [N, S, ...] at its trained steps, sigmas the T + 1 of the schedule
            rollout = latents
            if sigmas is None:
                sigmas = [rollout.sigmas[i] for i in rollout.steps]
            latents = rollout.latents.transpose(0, 1)
        elif hasattr(latents, "latents") and not isinstance(latents, Tensor):
            sigmas = getattr(latents, "sigmas") if sigmas is None else sigmas
            latents = getattr(latents, "latents")
        if isinstance(latents, (list, tuple)):
            latents = torch.stack(list(latents))
        if not isinstance(latents, Tensor) or latents.ndim != (6 if self.video else 5):
            layout = "[T, N, C, F, H, W]" if self.video else "[T, N, C, H, W]"
            raise ValueError(f"latents must be {layout} or a list of T tensors [N, ...] "
                             f"(got {tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__})")
        t, n = latents.shape[:2]
        if rewards is None or not isinstance(rewards, Tensor) or rewards.shape != (n,):
            raise ValueError(f"rewards must be a tensor [N] = [{n}] (got {None if rewards is None else tuple(getattr(rewards, 'shape', ()))})")
        if sigmas is None:
            raise ValueError("sigmas is required: [T] or [T, N]")
        sig = torch.as_tensor(sigmas, dtype=torch.float32)
        if sig.shape == (t,):
            sig = sig[:, None].expand(t, n)
        elif sig.shape != (t, n):
            raise ValueError(f"sigmas must be [T] = [{t}] or [T, N] = [{t}, {n}] (got shape {tuple(sig.shape)})")
        y = rewards.detach().float()
        if not bool(torch.isfinite(y).all()):
            raise ValueError("rewards must be finite")
        if not bool(self.fitted):
            self.target_mean.fill_(float(y.mean()))
            self.target_std.fill_(max(float(y.std(unbiased=False)), 1e-6))
            self.fitted.fill_(True)
        if not (isinstance(steps, int) and steps > 0):
            raise ValueError(f"steps must be a positive int (got {steps!r})")
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)
        for group in self._optimizer.param_groups:
            group["lr"], group["weight_decay"] = lr, weight_decay
        device = next(self.parameters()).device
        flat_x = latents.reshape(t * n, *latents.shape[2:])
        flat_s = sig.reshape(t * n)
        flat_y = y.repeat(t)
        sample_of = torch.arange(n).repeat(t)
        self.train()
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, t * n, (min(batch_size, t * n),), generator=generator)
            xb = flat_x[idx].to(device)
            cb = None if cond is None else cond[sample_of[idx]].to(device)
            pred = self(xb, flat_s[idx].to(device), cb)
            loss = F.mse_loss((pred - self.target_mean) / self.target_std,
                              (flat_y[idx].to(device) - self.target_mean) / self.target_std)
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
            losses.append(loss.detach())
        self.eval()
        return torch.stack(losses).tolist()  # one host transfer for the whole fit
