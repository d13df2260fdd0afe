"""Rewards named in a config: the built-in adapters, `remote`, or a dotted import path.

    rewards:
      pickscore: {weight: 1.0, path: /weights/pickscore}   # a built-in adapter and its arguments
      remote: {url: "http://127.0.0.1:18085/score"}         # flowsteer serve-reward, or any server
      mypkg.rewards:brightness: {weight: 0.5}               # an import path: a Reward, a callable or a class
      jpeg_2: {type: jpeg, weight: 0.0}                      # `type` when one kind is used twice
      aesthetic: 1.0                                          # a bare number is the weight

`weight` (default 1) goes to MultiReward; every other key is an argument of the reward.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Mapping

from .config import _YAML12_FLOAT, ConfigError


def _builtin(kind: str, key: str) -> Callable[..., Any]:
    from .. import rewards as R

    def win_rate(judge=None, group_size=None, **kw):
        if judge is None:
            raise ConfigError(f"{key} needs a judge: an import path 'module:attr' of a pairwise judge "
                              "(judge(image_a, image_b, prompt) -> 1 / 0 / 0.5)")
        return R.WinRateReward(import_object(judge, f"{key}.judge"), group_size, **kw)

    table = {
        "clip": R.CLIPScore, "clip_score": R.CLIPScore, "pickscore": R.PickScore, "hpsv2": R.HPSv2Score,
        "aesthetic": R.AestheticScore, "jpeg": R.JpegCompressibility, "jpeg_compressibility": R.JpegCompressibility,
        "jpeg_incompressibility": R.JpegIncompressibility, "ocr": R.OCRReward, "remote": R.RemoteReward,
        "win_rate": win_rate,
    }
    return table.get(kind)


BUILTIN = ("clip", "clip_score", "pickscore", "hpsv2", "aesthetic", "jpeg", "jpeg_compressibility",
           "jpeg_incompressibility", "ocr", "remote", "win_rate")


def import_object(path: str, key: str):
    """'package.module:attr' or 'package.module.attr'."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key} must be an import path 'module:attr' (got {path!r})")
    if ":" in path:
        mod, attr = path.split(":", 1)
    elif "." in path:
        mod, attr = path.rsplit(".", 1)
    else:
        raise ConfigError(f"{key}: {path!r} is no built-in reward ({', '.join(BUILTIN)}) and no import path "
                          "'module:attr'")
    try:
        module = importlib.import_module(mod)
    except Exception as exc:  # ImportError, or any error raised while the module runs
        raise ConfigError(f"{key}: cannot import module {mod!r} ({type(exc).__name__}: {exc})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def build_reward(name: str, spec: Any, key: str, group_size: int):
    """(reward, weight) of one `rewards` entry."""
    from ..rewards import Reward, WinRateReward

    if isinstance(spec, bool) or not (spec is None or isinstance(spec, (int, float, Mapping))):
        raise ConfigError(f"{key} must be a weight or a mapping of the weight and the reward's arguments (got {spec!r})")
    if spec is None or isinstance(spec, (int, float)):
        spec = {"weight": 1.0 if spec is None else spec}
    spec = dict(spec)
    weight = spec.pop("weight", 1.0)
    if isinstance(weight, str) and _YAML12_FLOAT.match(weight.strip()):
        weight = float(weight)  # YAML 1.1 reads 1e-4 as a string
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight != weight or abs(weight) == float("inf"):
        raise ConfigError(f"{key}.weight must be a finite number (got {weight!r})")
    kind = spec.pop("type", name)
    factory = _builtin(kind, key)
    if kind == "win_rate":
        spec.setdefault("group_size", group_size)
    if factory is None:
        factory = import_object(kind, key)
    try:
        if isinstance(factory, Reward):
            if spec:
                raise ConfigError(f"{key}: {kind!r} is a reward object and takes no arguments (got {sorted(spec)})")
            reward = factory
        elif isinstance(factory, type) or kind in BUILTIN:
            reward = factory(**spec)
        elif callable(factory):
            if spec:
                raise ConfigError(f"{key}: {kind!r} is a plain function and takes no arguments (got {sorted(spec)})")
            reward = factory
        else:
            raise ConfigError(f"{key}: {kind!r} is not a reward, a reward class or a callable")
    except TypeError as exc:
        raise ConfigError(f"{key}: bad arguments for reward {kind!r}: {exc}") from None
    if isinstance(reward, WinRateReward) and reward.group_size != group_size:
        raise ConfigError(f"{key}: group_size {reward.group_size} differs from sampling.group_size {group_size}")
    return reward, float(weight)


def build_multi_reward(rewards: Dict[str, Any], mode: str, key: str, group_size: int, **kwargs):
    from ..rewards import MultiReward

    if not rewards:
        raise ConfigError(f"{key} is empty: name at least one reward (built-in: {', '.join(BUILTIN)}; or an import "
                          "path 'module:attr')")
    built, weights = {}, {}
    for name, spec in rewards.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"{key}: reward names must be non-empty strings without '/' (got {name!r})")
        short = name.replace(":", ".").split(".")[-1] if (":" in name or "." in name) else name
        if short in built:
            raise ConfigError(f"{key}: two entries are both named {short!r} ({name!r} and an earlier one); give one a "
                              "short name of its own with `type:` (e.g. bright_2: {type: " + name + "})")
        r, w = build_reward(name, spec, f"{key}.{name}", group_size)
        built[short], weights[short] = r, w
    return MultiReward(built, weights, mode=mode, **kwargs)
