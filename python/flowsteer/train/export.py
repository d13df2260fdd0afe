"""`flowsteer export RUN_DIR --out DIR`: a run's weights for a plain diffusers pipeline."""
from __future__ import annotations

import json
import os
import shutil

from . import checkpoint as ckpt


def export_run(run_dir: str, out: str, ema: bool = False) -> str:
    """Write the latest checkpoint's LoRA (diffusers format: pipe.load_lora_weights(out)) or, for full
    fine-tuning, the network's weights and config (TransformerClass.from_pretrained(out)).
    ema: the EMA weights instead of the trained ones. Returns the checkpoint exported."""
    path = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint (checkpoints/latest)")
    lora = os.path.join(path, "lora_ema" if ema else "lora")
    os.makedirs(out, exist_ok=True)
    if os.path.isdir(os.path.join(path, "lora")):
        if not os.path.isdir(lora):
            raise FileNotFoundError(f"{path} has no EMA LoRA: the run did not keep EMA weights (train.ema)")
        for f in os.listdir(lora):
            shutil.copy2(os.path.join(lora, f), os.path.join(out, f))
        return path
    from safetensors.torch import save_file

    tensors = ckpt.whole_tensors(path)
    prefix = "ema.net0." if ema else "model.net0."
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not weights:
        raise FileNotFoundError(f"{path} holds no {'EMA ' if ema else ''}weights of the network")
    if ema:  # EMA shadows are fp32: export in the network's own dtype
        dtypes = {k[len("model.net0."):]: v.dtype for k, v in tensors.items() if k.startswith("model.net0.")}
        weights = {k: v.to(dtypes.get(k, v.dtype)) for k, v in weights.items()}
    save_file(weights, os.path.join(out, "diffusion_pytorch_model.safetensors"))
    cfg_path = os.path.join(path, "network_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            config = json.load(f)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
    return path
