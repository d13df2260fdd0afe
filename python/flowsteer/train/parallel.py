"""Data parallelism for the trainer: "ddp" (each process holds the model, gradients summed once
per optimizer step) and "fsdp" (FSDP2 `fully_shard`, one unit per transformer block).

"ddp" is torch.distributed's all-reduce over flattened gradient buckets, run by the trainer at
the end of each minibatch: the same communication as DistributedDataParallel under `no_sync`
for every backward but the last, without wrapping the network. The trainer calls the network
through the pipeline adapters (sample and evaluate run `pipe.transformer`), which a DDP wrapper
would have to replace inside every pipeline; and a process whose share of a minibatch is empty
(zero-advantage samples are masked) contributes zeros instead of a dummy forward.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from .config import Config, ConfigError
from .distributed import Dist

Tensor = torch.Tensor
BUCKET_BYTES = 64 << 20


def resolve(cfg: Config, world: int, nets: List[nn.Module]) -> str:
    """"none" (one process), "ddp" or "fsdp" from train.parallel."""
    if world <= 1:
        return "none"
    mode = cfg.train.parallel
    full = cfg.model.lora is None
    if mode == "auto":
        n = sum(p.numel() for net in nets for p in net.parameters())
        mode = "fsdp" if full and n >= cfg.distributed.fsdp_min_params else "ddp"
    if mode == "fsdp":
        if not full:
            raise ConfigError("train.parallel 'fsdp' shards full fine-tuning; with model.lora use 'ddp' (or 'auto'): "
                              "every process holds the frozen base and the small adapters")
        if cfg.train.mixed_precision == "fp16":
            raise ConfigError("train.parallel 'fsdp' with train.mixed_precision 'fp16' is not supported (GradScaler "
                              "over sharded gradients); use 'bf16'")
    return mode


def broadcast_parameters(d: Dist, nets: List[nn.Module]) -> None:
    """Rank 0's trainable weights on every process."""
    if d.world == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0, group=d.group)


def all_reduce_gradients(d: Dist, params: List[nn.Parameter]) -> None:
    """Sum the gradients over the processes, in buckets of at most BUCKET_BYTES (one all-reduce for
    a LoRA). A parameter without a gradient here (no local sample in the minibatch) adds zeros."""
    if d.world == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: List[Tensor] = []
    size = 0

    def flush():
        if not bucket:
            return
        flat = _flatten_dense_tensors(bucket)
        d.all_reduce(flat)
        for g, r in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(r)
        bucket.clear()

    for g in grads:
        if bucket and (size + g.numel() * g.element_size() > BUCKET_BYTES or g.dtype != bucket[0].dtype
                       or g.device != bucket[0].device):
            flush()
            size = 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    flush()


def _blocks(net: nn.Module) -> List[nn.Module]:
    """The repeated blocks of a transformer: the members of its ModuleLists (SD3 and FLUX
    transformer_blocks / single_transformer_blocks, Wan blocks)."""
    out = []
    for child in net.children():
        if isinstance(child, nn.ModuleList):
            out.extend(child)
    return out


def shard(nets: List[nn.Module], cfg: Config) -> None:
    """FSDP2: fully_shard each transformer block, then the network (its remaining parameters),
    with the compute dtype of train.mixed_precision and fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = cfg.train.mixed_precision
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mp == "bf16" else None, reduce_dtype=torch.float32)
    for net in nets:
        for block in _blocks(net):
            fully_shard(block, mp_policy=policy)
        fully_shard(net, mp_policy=policy)


def set_gradient_sync(nets: List[nn.Module], enabled: bool) -> None:
    """FSDP2: reduce-scatter the gradients in this backward (True) or keep accumulating (False)."""
    for net in nets:
        if hasattr(net, "set_requires_gradient_sync"):
            net.set_requires_gradient_sync(enabled)


def full_norm(norm: Tensor) -> Tensor:
    """clip_grad_norm_'s result as a plain tensor (a DTensor over sharded gradients)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
