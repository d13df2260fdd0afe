"""Atomic checkpoints: tensors in safetensors, scalars in JSON, nothing that needs pickle.

Layout of a run directory's `checkpoints/`:

    step-000012/            one complete checkpoint (written as .tmp-step-000012-PID, then renamed)
      state.safetensors     every tensor: weights, EMA, optimizer moments, RNG states, the PRM
      state.json            every scalar: counters, data position, optimizer hyper-parameters, RNG
      lora/                 the LoRA in diffusers' format (pipe.load_lora_weights(dir) loads it)
      lora_ema/             the same for the EMA weights, when EMA is on
    latest                  the name of the newest complete checkpoint (replaced atomically)

A write goes to a temporary directory, each file is fsynced, the directory is renamed into place
and fsynced, and only then is `latest` replaced (write, fsync, rename). A process killed at any
moment leaves the previous checkpoint and a `latest` that names it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

Tensor = torch.Tensor
STEP_RE = re.compile(r"^step-(\d+)$")


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_file(os.path.join(dirpath, f))
        _fsync_dir(dirpath)


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def tmp_dir(ckpt_root: str, step: int) -> str:
    """The directory a checkpoint of `step` is written into before it is renamed into place."""
    return os.path.join(ckpt_root, f".tmp-step-{step:06d}-{os.getpid()}")


def save_checkpoint(ckpt_root: str, step: int, tensors: Dict[str, Tensor], meta: Dict[str, Any],
                    write_extra: Optional[Callable[[str], None]] = None, keep: Optional[int] = None,
                    tmp: Optional[str] = None) -> str:
    """Write checkpoint `step` atomically under ckpt_root; returns its directory. tmp: a temporary
    directory that other processes have already written their parts into (a sharded checkpoint);
    it is completed here and renamed into place."""
    from safetensors.torch import save_file

    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step-{step:06d}"
    final = os.path.join(ckpt_root, name)
    if os.path.isfile(os.path.join(final, "state.json")) and tmp is None:
        # This step is saved already (save() after train(), or a resumed run redoing the step whose
        # write finished but whose `latest` update did not): a run's state at a step is the same
        # every time, so the complete copy stays and only `latest` moves to it. Never renaming over
        # it leaves no moment without it.
        _point_latest(ckpt_root, name)
        if keep is not None:
            prune(ckpt_root, keep)
        return final
    if tmp is None:
        tmp = tmp_dir(ckpt_root, step)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(tmp, "state.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    if write_extra is not None:
        write_extra(tmp)
    _fsync_tree(tmp)
    if os.path.exists(final):  # a torn directory without state.json: nothing complete to lose
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    _point_latest(ckpt_root, name)
    if keep is not None:
        prune(ckpt_root, keep)
    return final


def _point_latest(ckpt_root: str, name: str) -> None:
    """Replace `latest` atomically: write, fsync, rename, fsync the directory."""
    latest_tmp = os.path.join(ckpt_root, f".latest-{os.getpid()}")
    with open(latest_tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, os.path.join(ckpt_root, "latest"))
    _fsync_dir(ckpt_root)


def list_checkpoints(ckpt_root: str) -> List[Tuple[int, str]]:
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for n in os.listdir(ckpt_root):
        m = STEP_RE.match(n)
        if m and os.path.isfile(os.path.join(ckpt_root, n, "state.json")):
            out.append((int(m.group(1)), os.path.join(ckpt_root, n)))
    return sorted(out)


def prune(ckpt_root: str, keep: int) -> None:
    """Keep the newest `keep` checkpoints (never the one `latest` names); remove leftovers of
    interrupted writes."""
    ckpts = list_checkpoints(ckpt_root)
    current = latest_checkpoint(ckpt_root)
    for _, path in ckpts[:-keep] if keep > 0 else ckpts:
        if path != current:
            shutil.rmtree(path, ignore_errors=True)
    for n in os.listdir(ckpt_root):
        if n.startswith((".tmp-", ".latest-")):
            pid = n.rsplit("-", 1)[-1]
            if pid != str(os.getpid()):
                p = os.path.join(ckpt_root, n)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)


def latest_checkpoint(ckpt_root: str) -> Optional[str]:
    """The directory `latest` names, else the newest complete step directory, else None."""
    pointer = os.path.join(ckpt_root, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(ckpt_root, name)
        if STEP_RE.match(name) and os.path.isfile(os.path.join(path, "state.json")):
            return path
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1][1] if ckpts else None


def load_checkpoint(path: str) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    from safetensors.torch import load_file

    with open(os.path.join(path, "state.json")) as f:
        meta = json.load(f)
    return load_file(os.path.join(path, "state.safetensors")), meta


def whole_tensors(path: str) -> Dict[str, Tensor]:
    """The weights ("model.netK.x") and EMA ("ema.netK.x") of a checkpoint as whole tensors, also
    when an FSDP run wrote them sharded (read in one process, no process group needed)."""
    tensors, meta = load_checkpoint(path)
    if not meta.get("sharded"):
        return tensors
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "whole.pt")
        dcp_to_torch_save(os.path.join(path, "sharded"), out)
        state = torch.load(out, weights_only=True)
    # the sharded state names the networks after a ModuleList of them: "0.x" is net0's "x"
    whole = {f"model.net{k}": v for k, v in state["model"].items()}
    whole.update({f"ema.{k}": v for k, v in state.get("ema", {}).items()})
    return whole


# ----------------------------------------------------------------------- state (de)flattening


def flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """An optimizer's state_dict as (tensors, JSON scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(opt: torch.optim.Optimizer, tensors: Dict[str, Tensor], meta: Dict[str, Any], prefix: str) -> None:
    state: Dict[int, Dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            idx, k = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Python, numpy, torch CPU and CUDA generator states."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    npst = np.random.get_state()
    tensors["rng.numpy_keys"] = torch.from_numpy(np.asarray(npst[1], dtype=np.int64))
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [npst[0], int(npst[2]), int(npst[3]), float(npst[4])]}
    return tensors, meta


def set_rng_state(tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda][:torch.cuda.device_count()])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
