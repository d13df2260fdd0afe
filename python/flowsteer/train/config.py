"""The training configuration: typed dataclasses loaded strictly from YAML.

Every key is checked: an unknown key is an error that names it, suggests the nearest valid key and
lists the allowed ones; a value of the wrong type or outside its range is an error naming the key
and what is allowed. Nothing is adjusted silently. `load_config` reads a recipe name or a YAML
path (which may start from a recipe with `recipe: NAME`), applies `--set KEY=VALUE` overrides
(dotted keys, values parsed as YAML) and validates the result.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

from ..ops.checks import NOISE_LEVEL_MAX

RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


_YAML12_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A configuration key or value that is not allowed; the message names the key."""


# ----------------------------------------------------------------------------------- sections


@dataclass
class LoraConfig:
    """LoRA on the denoising transformer through peft (diffusers' `add_adapter`)."""

    rank: int = 32
    alpha: float = 64.0
    target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0


@dataclass
class ModelConfig:
    """path: a local diffusers pipeline directory (loaded offline), or "testing:sd3" / "testing:flux" /
    "testing:wan" for the tiny random-weight pipelines of flowsteer.testing. lora: null means full
    fine-tuning. reference: the KL reference, "auto" (the LoRA adapters switched off, or a frozen
    copy for full fine-tuning), "base" or "copy"."""

    path: Optional[str] = None
    lora: Optional[LoraConfig] = field(default_factory=LoraConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Optional[str] = None
    max_sequence_length: Optional[int] = None
    gradient_checkpointing: bool = False
    reference: Literal["auto", "base", "copy"] = "auto"


@dataclass
class PromptsConfig:
    """train / eval: a list of prompts, a text file (one prompt a line) or JSONL ({"prompt": ...,
    other keys become the per-prompt metadata that rewards receive)."""

    train: Union[List[str], str, None] = None
    eval: Union[List[str], str, None] = None


@dataclass
class WindowConfig:
    """Which steps are stochastic and trained. all: every step; random: `size` consecutive steps
    starting in [start_min, start_max] (start_max null: anywhere); progressive: MixGRPO's window of
    `size`, moving `stride` steps every `every` iterations; branch: one ODE prefix per prompt,
    branching into the group at step `at` (size null: every step after it)."""

    type: Literal["all", "random", "progressive", "branch"] = "all"
    size: Optional[int] = None
    start_min: int = 0
    start_max: Optional[int] = None
    stride: int = 1
    every: int = 25
    at: Optional[int] = None


@dataclass
class SamplingConfig:
    num_steps: int = 10
    group_size: int = 24
    guidance_scale: float = 4.5
    kind: Literal["flow", "dance", "cps", "ode"] = "flow"
    noise_level: float = 0.7
    height: Optional[int] = 512
    width: Optional[int] = 512
    num_frames: Optional[int] = None
    same_noise: bool = False
    window: WindowConfig = field(default_factory=WindowConfig)
    max_batch_size: Optional[int] = None
    cps_logprob: Literal["exact", "flow_grpo"] = "exact"


@dataclass
class AdvantageConfig:
    """Group-relative advantages: A = (r - mean_g) / (std + eps), |A| <= clip. std: per "group",
    "global" (all samples) or "none"; ddof 0 (Flow-GRPO) or 1 (DanceGRPO's torch.std)."""

    std: Literal["group", "global", "none"] = "group"
    ddof: Literal[0, 1] = 0
    eps: float = 1e-4
    clip: Optional[float] = 5.0


@dataclass
class TrainConfig:
    """batch_size: samples per minibatch (null: the whole batch); one optimizer step per minibatch,
    gradients accumulated over its trained steps. timestep_fraction: the share of the stochastic
    steps that are trained; timestep_order: "in_order" (the first ones, Flow-GRPO) or
    "random_per_sample" (a random permutation per sample, DanceGRPO). clip_range: eps or
    [eps_low, eps_high]. kl: "flow_grpo" (mean (mu - mu_ref)^2 / (2 g^2)) or "exact"."""

    iterations: int = 100
    prompts_per_iteration: int = 8
    batch_size: Optional[int] = None
    inner_epochs: int = 1
    lr: float = 3e-4
    weight_decay: float = 1e-4
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0
    clip_range: Union[float, Tuple[float, float]] = 1e-4
    beta: float = 0.0
    kl: Literal["flow_grpo", "exact"] = "flow_grpo"
    timestep_fraction: float = 1.0
    timestep_order: Literal["in_order", "random_per_sample"] = "in_order"
    mask_zero_advantage: bool = True
    mixed_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    ema: bool = False
    ema_decay: float = 0.995
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)


@dataclass
class EvalConfig:
    """Held-out evaluation: ODE sampling with num_steps and guidance_scale (null: the sampling
    one), fixed seeds, the EMA weights when EMA is on. every: iterations between evaluations (0:
    never). extra_rewards: rewards scored but not trained on (the `rewards` syntax)."""

    every: int = 0
    num_steps: int = 40
    guidance_scale: Optional[float] = None
    seed: int = 0
    batch_size: int = 16
    max_prompts: Optional[int] = None
    extra_rewards: Dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    """every: iterations between checkpoints (0: only at the end); keep: how many are kept."""

    every: int = 50
    keep: int = 3


@dataclass
class PRMConfig:
    """Euphonium's latent process reward model and its guidance. The PRM is fitted online on
    (x_sigma, sigma, outcome reward) of each rollout and guides the next one through its gradient
    (mean + c G_hat, c = guidance_scale, times delta when scale_by_dt). The advantage of step t is
    outcome_weight A_outcome + process_weight A_process(t)."""

    hidden: int = 64
    depth: int = 3
    fit_steps: int = 50
    fit_lr: float = 1e-3
    fit_batch_size: int = 256
    guidance_scale: float = 1.0
    guidance_norm: Literal["batch", "sample", "none"] = "batch"
    scale_by_dt: bool = True
    outcome_weight: float = 1.0
    process_weight: float = 0.5


@dataclass
class DistributedConfig:
    """Several processes (torchrun --nproc_per_node N -m flowsteer train CONFIG). groups: "whole"
    (each process samples whole groups: prompts_per_iteration must divide by the world size) or
    "split" (each group's samples are shared evenly: group_size must divide by the world size).
    Either way the rewards are gathered before the advantages, so a group is normalised over all
    of its samples. timeout_s: the collectives' timeout (a dead process ends the job instead of
    hanging it). fsdp_min_params: the size from which train.parallel "auto" shards full fine-tuning."""

    groups: Literal["whole", "split"] = "whole"
    timeout_s: float = 1800.0
    fsdp_min_params: int = 1_000_000_000


@dataclass
class ScoringConfig:
    """Rewards off the critical path. chunk_prompts: sample the batch in chunks of this many
    prompts and score each chunk in a background thread while the next one is sampled (null: one
    rollout, then its scores); at most queue_depth chunks wait for their scores. A chunk's samples
    are those the whole batch would have had (per-sample noise), so the run is the same either
    way. retries / backoff_s: a reward that fails with a timeout or connection error is tried again
    after backoff_s, 2 backoff_s, ...; after the last retry the iteration fails and nothing of it
    is applied."""

    chunk_prompts: Optional[int] = None
    queue_depth: int = 2
    retries: int = 2
    backoff_s: float = 1.0


@dataclass
class LoggingConfig:
    tqdm: bool = True
    tensorboard: bool = True


ALGORITHMS = ("flow_grpo", "fast", "dance_grpo", "mix_grpo", "pref_grpo", "euphonium")


@dataclass
class Config:
    algorithm: Literal["flow_grpo", "fast", "dance_grpo", "mix_grpo", "pref_grpo", "euphonium"] = "flow_grpo"
    seed: int = 0
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    rewards: Dict[str, Any] = field(default_factory=dict)
    rewards_mode: Literal["sum", "per_reward", "log_tamed"] = "sum"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> Dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def hash(self) -> str:
        """sha256 of the resolved config (logging and description excluded: they do not change the run)."""
        d = self.to_dict()
        d.pop("logging", None)
        d.pop("description", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ strict loading


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (tuple, Tuple):
        return f"a list of {len(typing.get_args(tp))} numbers"
    if origin in (dict, Dict):
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(tp, value, key: str):
    """value checked against the type tp (raises ConfigError naming key)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None or isinstance(value, tp):
            return value if value is not None else tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (got {value!r})")
        return _from_dict(tp, value, key + ".")
    if origin is Union:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must be {_type_name(tp)} (got null)")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r})")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
            raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in allowed)} (got {value!r})")
        if value not in allowed or (isinstance(value, float) and not any(isinstance(a, float) for a in allowed)):
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in allowed)} (got {value!r}){hint}")
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r})")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r})")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, Dict):
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key} must be a mapping with string keys (got {value!r})")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer (got {value!r})")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML12_FLOAT.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; YAML 1.2 and users read a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number (got {value!r})")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} must be a finite number (got {value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (got {value!r})")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config type {tp} of {key} is not supported")  # a bug in this module


def _from_dict(cls, data: Dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.5)
            hint = f" Did you mean {prefix + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {prefix + str(k)!r}.{hint} Allowed under "
                              f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
    kwargs = {k: _convert(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("rewards", "extra_rewards"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def recipe_names() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml"))


def _read_yaml(path: str) -> Dict[str, Any]:
    import yaml

    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys (got {type(data).__name__})")
    return data


def _raw(source: str, seen: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """The raw mapping of a recipe name or YAML path, with `recipe:` bases merged in."""
    if source in recipe_names():
        path = os.path.join(RECIPE_DIR, source + ".yaml")
    elif os.path.exists(source):
        path = source
    else:
        names = recipe_names()
        close = difflib.get_close_matches(source, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source!r} is neither a shipped recipe nor an existing YAML file.{hint} "
                          f"Recipes: {', '.join(names)}")
    if path in seen:
        raise ConfigError(f"recipe cycle: {' -> '.join(seen + (path,))}")
    data = _read_yaml(path)
    base = data.pop("recipe", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"recipe must be a recipe name (got {base!r})")
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), base)
        if base not in recipe_names() and not os.path.isabs(base) and os.path.exists(beside):
            base = beside
        data = _merge(_raw(base, seen + (path,)), data)
    return data


def parse_override(text: str) -> Tuple[List[str], Any]:
    """"train.lr=1e-4" -> (["train", "lr"], 1e-4); the value is parsed as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set takes KEY=VALUE with a dotted key, e.g. train.lr=1e-4 (got {text!r})")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set: bad key {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: the value {value!r} is not valid YAML ({exc})") from None
    return parts, parsed


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    data = _merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"--set {'.'.join(parts)}: {p!r} is not a section")
            node[p] = dict(node[p])
            node = node[p]
        node[parts[-1]] = value
    return data


def config_from_dict(data: Dict[str, Any]) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"a config is a mapping (got {type(data).__name__})")
    data = dict(data)
    data.pop("recipe", None)
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def load_config(source: Union[str, Dict[str, Any], Config, None] = None, overrides: Sequence[str] = ()) -> Config:
    """A validated Config from a recipe name, a YAML path, a mapping or a Config, with --set overrides."""
    if isinstance(source, Config):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = dict(source)
        if "recipe" in data:
            data = _merge(_raw(data.pop("recipe")), data)
    elif source is None:
        data = {}
    else:
        data = _raw(source)
    return config_from_dict(apply_overrides(data, overrides))


# ------------------------------------------------------------------------------------ checks


def _positive(key: str, value, allow_zero: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = value is not None and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'} (got {value!r})")


def validate(cfg: Config) -> None:
    """Range checks that a type cannot express, and the batch arithmetic."""
    s, t, w = cfg.sampling, cfg.train, cfg.sampling.window
    if not 0 <= cfg.seed < 2**62:
        raise ConfigError(f"seed must be in [0, 2**62) (got {cfg.seed})")
    for key, value in (("sampling.num_steps", s.num_steps), ("sampling.group_size", s.group_size),
                       ("train.iterations", t.iterations), ("train.prompts_per_iteration", t.prompts_per_iteration),
                       ("train.inner_epochs", t.inner_epochs), ("eval.num_steps", cfg.eval.num_steps),
                       ("eval.batch_size", cfg.eval.batch_size), ("checkpoint.keep", cfg.checkpoint.keep),
                       ("prm.hidden", cfg.prm.hidden), ("prm.depth", cfg.prm.depth), ("prm.fit_steps", cfg.prm.fit_steps),
                       ("prm.fit_lr", cfg.prm.fit_lr), ("prm.fit_batch_size", cfg.prm.fit_batch_size),
                       ("distributed.timeout_s", cfg.distributed.timeout_s),
                       ("distributed.fsdp_min_params", cfg.distributed.fsdp_min_params),
                       ("scoring.queue_depth", cfg.scoring.queue_depth)):
        _positive(key, value)
    for key, value in (("train.lr", t.lr), ("sampling.noise_level", s.noise_level), ("sampling.guidance_scale", s.guidance_scale),
                       ("train.weight_decay", t.weight_decay), ("train.lr_warmup_steps", t.lr_warmup_steps),
                       ("train.beta", t.beta), ("eval.every", cfg.eval.every), ("checkpoint.every", cfg.checkpoint.every),
                       ("train.advantages.eps", t.advantages.eps), ("prm.guidance_scale", cfg.prm.guidance_scale),
                       ("scoring.retries", cfg.scoring.retries), ("scoring.backoff_s", cfg.scoring.backoff_s)):
        _positive(key, value, allow_zero=True)
    for key, value in (("sampling.height", s.height), ("sampling.width", s.width), ("sampling.num_frames", s.num_frames),
                       ("sampling.max_batch_size", s.max_batch_size), ("train.batch_size", t.batch_size),
                       ("train.max_grad_norm", t.max_grad_norm), ("train.advantages.clip", t.advantages.clip),
                       ("model.max_sequence_length", cfg.model.max_sequence_length),
                       ("eval.max_prompts", cfg.eval.max_prompts), ("eval.guidance_scale", cfg.eval.guidance_scale),
                       ("scoring.chunk_prompts", cfg.scoring.chunk_prompts)):
        _positive(key, value, allow_none=True)
    if not 0 <= cfg.eval.seed < 2**62:
        raise ConfigError(f"eval.seed must be in [0, 2**62) (got {cfg.eval.seed})")
    if cfg.model.dtype != "float32" and t.mixed_precision == "fp32" and cfg.model.lora is None:
        raise ConfigError(f"model.dtype {cfg.model.dtype!r} with train.mixed_precision 'fp32': full fine-tuning keeps "
                          "the trained weights in fp32, so the compute must run under autocast; set "
                          "train.mixed_precision to 'bf16' or 'fp16' (or model.dtype to 'float32')")
    if not 0.0 < t.timestep_fraction <= 1.0:
        raise ConfigError(f"train.timestep_fraction must be in (0, 1] (got {t.timestep_fraction})")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (got {t.ema_decay})")
    lo, hi = t.clip_range if isinstance(t.clip_range, tuple) else (t.clip_range, t.clip_range)
    if not (lo >= 0 and hi >= 0):
        raise ConfigError(f"train.clip_range must be >= 0 (got {t.clip_range!r})")
    if not all(0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"train.adam_betas must be in [0, 1) (got {list(t.adam_betas)})")
    _positive("train.adam_eps", t.adam_eps)
    if s.noise_level > NOISE_LEVEL_MAX:
        raise ConfigError(f"sampling.noise_level must be at most {NOISE_LEVEL_MAX:g} (got {s.noise_level})")
    if s.kind == "cps" and s.noise_level > 1:
        raise ConfigError(f"sampling.noise_level must be in [0, 1] for kind 'cps' (got {s.noise_level})")
    if s.kind == "ode" or s.noise_level == 0:
        raise ConfigError("sampling.kind 'ode' or sampling.noise_level 0 leaves no stochastic step to train; "
                          "use kind flow, dance or cps with noise_level > 0")
    if cfg.model.lora is not None:
        lora = cfg.model.lora
        _positive("model.lora.rank", lora.rank)
        _positive("model.lora.alpha", lora.alpha)
        if not lora.target_modules:
            raise ConfigError("model.lora.target_modules must name at least one module")
        if not 0 <= lora.dropout < 1:
            raise ConfigError(f"model.lora.dropout must be in [0, 1) (got {lora.dropout})")
    if cfg.scoring.chunk_prompts is not None and cfg.algorithm == "euphonium" and cfg.prm.guidance_norm == "batch":
        raise ConfigError("scoring.chunk_prompts with algorithm 'euphonium' and prm.guidance_norm 'batch' would "
                          "normalise the guidance over each chunk instead of the batch; set prm.guidance_norm to "
                          "'sample' or 'none', or scoring.chunk_prompts to null")
    if cfg.model.reference == "base" and cfg.model.lora is None:
        raise ConfigError("model.reference 'base' (the LoRA adapters switched off) needs model.lora; "
                          "full fine-tuning takes reference 'copy' or 'auto'")
    # the window
    T = s.num_steps
    if w.type in ("random", "progressive"):
        if w.size is None or not 1 <= w.size <= T:
            raise ConfigError(f"sampling.window.size must be in [1, sampling.num_steps] = [1, {T}] for window "
                              f"{w.type!r} (got {w.size!r})")
    if w.type == "random":
        hi_start = T - w.size if w.start_max is None else w.start_max
        if not 0 <= w.start_min <= hi_start <= T - w.size:
            raise ConfigError(f"sampling.window: start_min {w.start_min} and start_max {w.start_max} must satisfy "
                              f"0 <= start_min <= start_max <= num_steps - size = {T - w.size}")
    if w.type == "progressive" and (w.stride < 1 or w.every < 1):
        raise ConfigError(f"sampling.window.stride and .every must be >= 1 (got {w.stride}, {w.every})")
    if w.type == "branch":
        if w.at is None or not 0 <= w.at < T:
            raise ConfigError(f"sampling.window.at must be in [0, num_steps) = [0, {T}) (got {w.at!r})")
        if w.size is not None and not 1 <= w.size <= T - w.at:
            raise ConfigError(f"sampling.window.size must be in [1, {T - w.at}] after step {w.at} (got {w.size})")
        if s.group_size < 2:
            raise ConfigError("sampling.window 'branch' needs sampling.group_size >= 2")
    batch_arithmetic(cfg)


def stochastic_steps(cfg: Config) -> int:
    """How many steps of each rollout are stochastic (and stored)."""
    s, w = cfg.sampling, cfg.sampling.window
    if w.type == "all":
        return s.num_steps
    if w.type == "branch":
        return s.num_steps - w.at if w.size is None else w.size
    return w.size


def num_trained(stochastic: int, fraction: float) -> int:
    """How many of a rollout's `stochastic` steps each sample trains on: int(fraction * S), at least 1
    (0 when there is none)."""
    return min(stochastic, max(1, int(fraction * stochastic + 1e-9)))


def trained_steps(cfg: Config) -> int:
    """num_trained for the stochastic steps the config's window gives."""
    return num_trained(stochastic_steps(cfg), cfg.train.timestep_fraction)


def batch_arithmetic(cfg: Config, world_size: int = 1) -> Dict[str, int]:
    """The numbers of one iteration, checked to divide; raises ConfigError showing the arithmetic.
    train.batch_size is global (the samples of a minibatch over all processes)."""
    s, t = cfg.sampling, cfg.train
    n = t.prompts_per_iteration * s.group_size
    if world_size > 1:
        from .distributed import Layout

        Layout.of(cfg, world_size, 0)  # raises showing the numbers when the groups do not split
    bs = n if t.batch_size is None else t.batch_size
    if n % bs:
        raise ConfigError(f"train.batch_size = {bs} does not divide the samples per iteration: "
                          f"train.prompts_per_iteration x sampling.group_size = {t.prompts_per_iteration} x "
                          f"{s.group_size} = {n}, and {n} % {bs} = {n % bs}")
    minibatches = n // bs
    S, K = stochastic_steps(cfg), trained_steps(cfg)
    return dict(prompts_per_iteration=t.prompts_per_iteration, group_size=s.group_size, samples=n,
                world_size=world_size, samples_per_rank=n // world_size, batch_size=bs, minibatches=minibatches,
                stochastic_steps=S, trained_steps=K, inner_epochs=t.inner_epochs,
                optimizer_steps=minibatches * t.inner_epochs, forwards_per_sample=K * t.inner_epochs)


def describe_batch(cfg: Config, world_size: int = 1) -> str:
    a = batch_arithmetic(cfg, world_size)
    return "\n".join([
        f"samples per iteration: prompts_per_iteration x group_size = {a['prompts_per_iteration']} x {a['group_size']} "
        f"= {a['samples']} ({a['samples_per_rank']} per process, {a['world_size']} process(es))",
        f"minibatches: {a['samples']} / batch_size {a['batch_size']} = {a['minibatches']} (global), "
        f"x {a['inner_epochs']} inner epoch(s) = {a['optimizer_steps']} optimizer steps per iteration "
        "(before zero-advantage samples are masked)",
        f"trained steps per sample: {a['trained_steps']} of {a['stochastic_steps']} stochastic steps "
        f"(timestep_fraction {cfg.train.timestep_fraction}, {cfg.train.timestep_order}); "
        f"{a['forwards_per_sample']} training forwards per sample",
    ])


# how a run is executed, not what it computes (to fp32 rounding): free to change on resume
EXECUTION_KEYS = ("logging.", "distributed.", "scoring.", "train.parallel")


def diff_configs(a: Config, b: Config, allowed: Sequence[str] = ("train.iterations",)) -> List[str]:
    """Dotted keys whose values differ between a and b, except the allowed ones, the description and
    the execution keys (logging, distributed, scoring, train.parallel)."""
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if fa.get(k) != fb.get(k) and k not in allowed
            and not k.startswith(EXECUTION_KEYS) and k != "description"]


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("rewards", "extra_rewards"):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = json.dumps(v, sort_keys=True)
    return out


def dump_yaml(cfg: Config, extra: Optional[Dict[str, Any]] = None) -> str:
    import yaml

    d = cfg.to_dict()
    head = ""
    if extra:
        head = "".join(f"# {k}: {v}\n" for k, v in extra.items())
    return head + yaml.safe_dump(d, sort_keys=False)
