"""The trainer: `GRPOTrainer(pipe, reward, config)` and `flowsteer train RECIPE_OR_YAML`.

One loop for the GRPO family (Flow-GRPO, Flow-GRPO-Fast, DanceGRPO, MixGRPO, Pref-GRPO, Euphonium),
strict typed configs with shipped recipes, atomic checkpoints that resume bit for bit.
"""
from .algorithms import ALGORITHM_CLASSES, Algorithm, make_algorithm
from .config import Config, ConfigError, describe_batch, load_config, recipe_names
from .trainer import GRPOTrainer

__all__ = ["ALGORITHM_CLASSES", "Algorithm", "Config", "ConfigError", "GRPOTrainer", "describe_batch",
           "load_config", "make_algorithm", "recipe_names"]
