"""The trainer's configuration without building any model: the shipped recipes, strict key and value
checks with helpful messages, the batch arithmetic, --set overrides and recipe inheritance, the config
hash and diff, prompt loading and the resumable prompt order, and rewards built from a config."""
from __future__ import annotations

import json
import math
import re

import pytest

from flowsteer.train import config as C
from flowsteer.train.config import (ConfigError, batch_arithmetic, describe_batch, diff_configs, load_config,
                                    recipe_names, trained_steps)
from flowsteer.train.data import PromptSampler, load_prompts
from flowsteer.train.rewards import BUILTIN, build_multi_reward

RECIPES = ("flow_grpo", "fast", "dance_grpo", "mix_grpo", "pref_grpo", "euphonium")


def small(*overrides):
    """A default config with a small, dividing batch, plus overrides."""
    return load_config(None, ["train.prompts_per_iteration=2", "sampling.group_size=4", *overrides])


def write(path, text):
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------------ recipes


def test_recipe_names_are_exactly_the_shipped_algorithms():
    assert sorted(recipe_names()) == sorted(RECIPES)
    assert set(recipe_names()) == set(C.ALGORITHMS)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_validates_and_names_its_algorithm(name):
    cfg = load_config(name)
    assert isinstance(cfg, C.Config)
    assert cfg.algorithm == name
    assert isinstance(cfg.description, str) and cfg.description.strip()
    C.validate(cfg)  # idempotent: the loaded config is already valid
    assert load_config(cfg) == cfg  # a Config round-trips through load_config


def test_flow_grpo_published_numbers():
    cfg = load_config("flow_grpo")
    s, t = cfg.sampling, cfg.train
    assert (s.num_steps, s.group_size, s.kind) == (10, 24, "flow")
    assert s.guidance_scale == 4.5 and s.noise_level == 0.7
    assert t.clip_range == pytest.approx(1e-4) and t.beta == pytest.approx(0.04)
    assert t.lr == pytest.approx(3e-4)
    assert cfg.model.lora is not None and (cfg.model.lora.rank, cfg.model.lora.alpha) == (32, 64.0)
    assert t.timestep_fraction == pytest.approx(0.99) and trained_steps(cfg) == 9
    assert (t.advantages.std, t.advantages.ddof, t.advantages.eps) == ("group", 0, pytest.approx(1e-4))


def test_fast_published_numbers_and_inheritance():
    cfg = load_config("fast")
    t, w = cfg.train, cfg.sampling.window
    assert t.clip_range == pytest.approx(1e-5) and t.beta == 0.0
    assert t.advantages.std == "global"
    assert (w.type, w.size) == ("random", 2)
    # inherited from flow_grpo through `recipe: flow_grpo`
    assert (cfg.sampling.num_steps, cfg.sampling.group_size) == (10, 24)
    assert cfg.model.lora is not None and cfg.model.lora.rank == 32
    assert C.stochastic_steps(cfg) == 2 and trained_steps(cfg) == 2


def test_dance_grpo_published_numbers():
    cfg = load_config("dance_grpo")
    s, t = cfg.sampling, cfg.train
    assert s.kind == "dance" and s.noise_level == pytest.approx(0.3) and s.group_size == 12
    assert s.num_steps == 16 and s.same_noise is True
    assert t.advantages.ddof == 1 and t.advantages.eps == pytest.approx(1e-8)
    assert t.timestep_fraction == pytest.approx(0.6) and t.timestep_order == "random_per_sample"
    assert cfg.model.lora is None
    assert t.lr == pytest.approx(1e-5)
    assert trained_steps(cfg) == 9  # int(0.6 * 16)


def test_mix_grpo_published_numbers():
    cfg = load_config("mix_grpo")
    w = cfg.sampling.window
    assert (w.type, w.size, w.every, w.stride) == ("progressive", 4, 25, 1)
    assert cfg.sampling.num_steps == 25 and cfg.sampling.group_size == 12
    assert cfg.rewards_mode == "per_reward" and set(cfg.rewards) == {"hpsv2", "pickscore"}


def test_pref_grpo_published_numbers():
    cfg = load_config("pref_grpo")
    assert cfg.sampling.group_size == 8 and cfg.sampling.num_steps == 25
    assert "win_rate" in cfg.rewards


def test_euphonium_published_numbers():
    cfg = load_config("euphonium")
    assert cfg.sampling.noise_level == pytest.approx(0.25)
    assert cfg.train.lr == pytest.approx(1e-6)
    assert cfg.sampling.group_size == 8
    assert (cfg.prm.outcome_weight, cfg.prm.process_weight) == (1.0, 0.5)


# -------------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_suggests_and_lists():
    with pytest.raises(ConfigError, match=r"'algoritm'.*Did you mean 'algorithm'\?.*Allowed under the top level:.*"
                                          r"sampling, train"):
        load_config({"algoritm": "fast"})


def test_unknown_nested_key_names_full_dotted_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'\. Did you mean 'train\.lr'\?"
                                          r" Allowed under train: iterations, .*\blr\b.*advantages"):
        load_config(None, ["train.lrr=1e-4"])


def test_unknown_deeply_nested_key():
    with pytest.raises(ConfigError, match=r"'train\.advantages\.stdd'.*Did you mean 'train\.advantages\.std'\?"
                                          r".*Allowed under train\.advantages: std, ddof, eps, clip"):
        load_config({"train": {"advantages": {"stdd": "group"}}})


def test_unknown_key_in_yaml_file(tmp_path):
    path = write(tmp_path / "run.yaml", "recipe: flow_grpo\ntrain:\n  lrr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"'train\.lrr'.*Did you mean 'train\.lr'\?.*Allowed under train:"):
        load_config(path)


def test_unknown_section_in_override():
    with pytest.raises(ConfigError, match=r"'trian'.*Did you mean 'train'\?"):
        load_config(None, ["trian.lr=1e-4"])


# ------------------------------------------------------------------------- wrong types / values


@pytest.mark.parametrize("override, pattern", [
    ("train.iterations=abc", r"train\.iterations must be an integer \(got 'abc'\)"),
    ("train.iterations=true", r"train\.iterations must be an integer \(got True\)"),
    ("sampling.group_size=1.5", r"sampling\.group_size must be an integer"),
    ("train.ema=1", r"train\.ema must be true or false"),
    ("train.lr=-1e-3", r"train\.lr must be >= 0 \(got -0\.001\)"),
    ("train.lr=.nan", r"train\.lr must be a finite number \(got nan\)"),
    ("train.lr=.inf", r"train\.lr must be a finite number"),
    ("sampling.num_steps=0", r"sampling\.num_steps must be > 0"),
    ("sampling.kind=sdee", r"sampling\.kind must be one of 'flow', 'dance', 'cps', 'ode' \(got 'sdee'\)"),
    ("train.mixed_precision=bf32", r"train\.mixed_precision must be one of 'fp32', 'bf16', 'fp16' \(got 'bf32'\)"),
    ("train.timestep_fraction=0", r"train\.timestep_fraction must be in \(0, 1\] \(got 0"),
    ("train.timestep_fraction=1.5", r"train\.timestep_fraction must be in \(0, 1\] \(got 1\.5\)"),
    ("train.clip_range=[1e-4, 2e-4, 3e-4]", r"train\.clip_range must be a number or a list of 2 numbers"),
    ("train.advantages.ddof=true", r"train\.advantages\.ddof must be one of 0, 1"),
    ("model.lora.rank=0", r"model\.lora\.rank must be > 0"),
    ("sampling.window={type: random, size: 11}",
     r"sampling\.window\.size must be in \[1, sampling\.num_steps\] = \[1, 10\] for window 'random' \(got 11\)"),
    ("sampling.window.type=branch", r"sampling\.window\.at must be in \[0, num_steps\) = \[0, 10\) \(got None\)"),
    ("sampling.kind=ode", r"sampling\.kind 'ode'.*no stochastic step"),
    ("sampling.noise_level=0", r"noise_level 0 leaves no stochastic step"),
    ("sampling.noise_level=11", r"sampling\.noise_level must be at most 10 \(got 11"),
    ("train=3", r"train must be a mapping \(got 3\)"),
])
def test_bad_value_names_key_and_allowed(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_unknown_algorithm_suggests_nearest():
    with pytest.raises(ConfigError, match=r"algorithm must be one of 'flow_grpo', 'fast'.*\(got 'flow_grpoo'\); "
                                          r"did you mean 'flow_grpo'\?"):
        load_config(None, ["algorithm=flow_grpoo"])


def test_nan_float_in_mapping_source():
    with pytest.raises(ConfigError, match=r"sampling\.noise_level must be a finite number"):
        load_config({"sampling": {"noise_level": float("nan")}})


def test_reference_base_without_lora():
    with pytest.raises(ConfigError, match=r"model\.reference 'base'.*needs model\.lora"):
        load_config(None, ["model.lora=null", "model.reference=base"])


# ----------------------------------------------------------------------------- batch arithmetic


def test_batch_size_that_does_not_divide_shows_the_numbers():
    pattern = (r"train\.batch_size = 3 does not divide.*"
               r"train\.prompts_per_iteration x sampling\.group_size = 2 x 4 = 8.*8 % 3 = 2")
    with pytest.raises(ConfigError, match=pattern):
        small("train.batch_size=3")


def test_batch_arithmetic_and_describe_batch():
    cfg = small("train.batch_size=4", "train.timestep_fraction=0.5", "train.inner_epochs=2")
    a = batch_arithmetic(cfg)
    assert a == dict(prompts_per_iteration=2, group_size=4, samples=8, world_size=1, samples_per_rank=8,
                     batch_size=4, minibatches=2, stochastic_steps=10, trained_steps=5, inner_epochs=2,
                     optimizer_steps=4, forwards_per_sample=10)
    text = describe_batch(cfg)
    assert "2 x 4 = 8" in text
    assert "8 / batch_size 4 = 2" in text and "= 4 optimizer steps" in text
    assert "5 of 10 stochastic steps" in text


def test_batch_arithmetic_world_size_split():
    # train.batch_size is global: 8 samples in minibatches of 2 are 4 optimizer steps on any world size
    a = batch_arithmetic(small("train.batch_size=2"), world_size=2)
    assert (a["samples_per_rank"], a["minibatches"], a["optimizer_steps"]) == (4, 4, 4)


def test_batch_arithmetic_world_size_that_does_not_divide():
    cfg = small()
    with pytest.raises(ConfigError, match=r"prompts_per_iteration \(2\) must divide by the world size \(3\): "
                                          r"2 % 3 = 2"):
        batch_arithmetic(cfg, world_size=3)
    with pytest.raises(ConfigError, match=r"group_size \(4\) must divide by the world size \(3\)"):
        batch_arithmetic(small("distributed.groups=split"), world_size=3)


def test_batch_arithmetic_a_global_minibatch_may_exceed_a_process_share():
    a = batch_arithmetic(small("train.batch_size=8"), world_size=2)  # each process back-propagates its 4
    assert (a["samples_per_rank"], a["minibatches"]) == (4, 1)


# ---------------------------------------------------------------------------------- overrides


def test_override_dotted_keys_and_yaml_values():
    cfg = load_config("flow_grpo", [
        "train.iterations=7",
        "train.adam_betas=[0.8, 0.9]",
        "prompts.train=[a cat, a dog]",
        "sampling.window={type: branch, at: 3}",
        "model.lora=null",
        "eval.guidance_scale=null",
        "rewards={jpeg: {weight: 0.5}}",
    ])
    assert cfg.train.iterations == 7
    assert cfg.train.adam_betas == (0.8, 0.9)
    assert cfg.prompts.train == ["a cat", "a dog"]
    assert (cfg.sampling.window.type, cfg.sampling.window.at) == ("branch", 3)
    assert cfg.model.lora is None and cfg.eval.guidance_scale is None
    assert cfg.rewards == {"jpeg": {"weight": 0.5}}  # a mapping override replaces the rewards
    assert C.stochastic_steps(cfg) == 7


def test_override_exponent_without_dot_is_a_float():
    cfg = load_config("flow_grpo", ["train.lr=1e-4", "train.clip_range=2e-5", "train.max_grad_norm=1E0",
                                    "train.clip_range=[1e-4, 3e-4]"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.max_grad_norm == 1.0
    assert cfg.train.clip_range == (pytest.approx(1e-4), pytest.approx(3e-4))


def test_exponent_without_dot_is_not_accepted_for_int_or_string_keys():
    with pytest.raises(ConfigError, match=r"train\.iterations must be an integer \(got '1e3'\)"):
        load_config(None, ["train.iterations=1e3"])
    assert load_config(None, ["description=1e-4"]).description == "1e-4"


def test_later_override_wins_and_section_can_be_recreated():
    cfg = load_config(None, ["train.lr=1e-3", "train.lr=2e-3", "model.lora=null", "model.lora.rank=8"])
    assert cfg.train.lr == pytest.approx(2e-3)
    assert cfg.model.lora is not None and cfg.model.lora.rank == 8


@pytest.mark.parametrize("bad", ["train.lr", "", "train..lr=1", ".lr=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match=r"--set"):
        load_config(None, [bad])


def test_override_into_a_non_section():
    with pytest.raises(ConfigError, match=r"--set train\.lr\.x: 'lr' is not a section"):
        load_config("flow_grpo", ["train.lr.x=1"])
    with pytest.raises(ConfigError, match=r"train\.lr must be a number \(got \{'x': 1\}\)"):
        load_config(None, ["train.lr.x=1"])


def test_yaml_file_inherits_a_recipe_and_set_overrides_it(tmp_path):
    path = write(tmp_path / "run.yaml",
                 "recipe: flow_grpo\ndescription: mine\ntrain:\n  lr: 1.0e-5\nsampling:\n  group_size: 4\n")
    cfg = load_config(path, ["train.iterations=3"])
    assert cfg.train.lr == pytest.approx(1e-5)  # the file overrides the recipe
    assert cfg.sampling.group_size == 4
    assert cfg.sampling.num_steps == 10 and cfg.train.beta == pytest.approx(0.04)  # the rest is inherited
    assert cfg.train.iterations == 3  # --set overrides the file
    assert cfg.algorithm == "flow_grpo" and cfg.description == "mine"


def test_mapping_source_with_recipe():
    cfg = load_config({"recipe": "dance_grpo", "train": {"iterations": 2}})
    assert cfg.algorithm == "dance_grpo" and cfg.train.iterations == 2 and cfg.sampling.group_size == 12


def test_yaml_file_rewards_replace_the_recipe_rewards(tmp_path):
    path = write(tmp_path / "run.yaml", "recipe: mix_grpo\nrewards:\n  jpeg: 1.0\n")
    assert load_config(path).rewards == {"jpeg": 1.0}


def test_recipe_cycle_raises(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    write(a, f"recipe: {b}\n")
    write(b, f"recipe: {a}\n")
    with pytest.raises(ConfigError, match=r"recipe cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(str(a))


def test_self_cycle_raises(tmp_path):
    a = tmp_path / "a.yaml"
    write(a, f"recipe: {a}\n")
    with pytest.raises(ConfigError, match=r"recipe cycle"):
        load_config(str(a))


def test_missing_source_names_it_and_suggests_a_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"'flow_grpo\.yml' is neither a shipped recipe nor an existing YAML "
                                          r"file\. Did you mean 'flow_grpo'\? Recipes: dance_grpo, .*flow_grpo"):
        load_config("flow_grpo.yml")
    missing = str(tmp_path / "nope" / "run.yaml")
    with pytest.raises(ConfigError, match=re.escape(repr(missing)) + r".*Recipes: .*euphonium"):
        load_config(missing)


def test_recipe_base_that_does_not_exist(tmp_path):
    path = write(tmp_path / "run.yaml", "recipe: dance_grpoo\n")
    with pytest.raises(ConfigError, match=r"'dance_grpoo'.*Did you mean 'dance_grpo'\?"):
        load_config(path)


def test_yaml_file_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path / "run.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match=r"run\.yaml must hold a mapping of config keys \(got list\)"):
        load_config(path)


def test_invalid_yaml_file(tmp_path):
    path = write(tmp_path / "run.yaml", "train: {lr: [\n")
    with pytest.raises(ConfigError, match=r"run\.yaml is not valid YAML"):
        load_config(path)


# ----------------------------------------------------------------------------- hash and diff


def test_hash_is_stable():
    a, b = load_config("flow_grpo"), load_config("flow_grpo")
    assert a.hash() == b.hash()
    assert re.fullmatch(r"[0-9a-f]{16}", a.hash())
    assert load_config(a).hash() == a.hash()


def test_hash_ignores_logging_and_description_but_not_lr():
    base = load_config("flow_grpo").hash()
    assert load_config("flow_grpo", ["logging.tqdm=false", "logging.tensorboard=false"]).hash() == base
    assert load_config("flow_grpo", ["description=another"]).hash() == base
    assert load_config("flow_grpo", ["train.lr=1e-5"]).hash() != base
    assert load_config("flow_grpo", ["seed=1"]).hash() != base


def test_diff_configs_lists_changed_keys_but_not_iterations():
    a = load_config("flow_grpo")
    b = load_config("flow_grpo", ["train.lr=1e-5", "train.iterations=5", "logging.tqdm=false", "description=x",
                                  "sampling.window={type: random, size: 2}"])
    assert diff_configs(a, b) == ["sampling.window.size", "sampling.window.type", "train.lr"]
    assert diff_configs(a, a) == []
    assert "train.iterations" in diff_configs(a, b, allowed=())


def test_diff_configs_lora_removed_and_rewards():
    a = load_config("flow_grpo")
    b = load_config("flow_grpo", ["model.lora=null", "rewards={jpeg: 1.0}"])
    assert diff_configs(a, b) == ["model.lora", "model.lora.alpha", "model.lora.dropout", "model.lora.rank",
                                  "model.lora.target_modules", "rewards"]


# ----------------------------------------------------------------------------------- prompts


def test_load_prompts_from_list():
    assert load_prompts(["a cat", "a dog"], "prompts.train") == (["a cat", "a dog"], None)


def test_load_prompts_from_text_file_skips_blank_lines(tmp_path):
    path = write(tmp_path / "p.txt", "a cat\n\n   \n  a dog  \nthe sea\n")
    assert load_prompts(path, "prompts.train") == (["a cat", "a dog", "the sea"], None)


def test_load_prompts_from_jsonl_with_metadata(tmp_path):
    rows = [{"prompt": "two cats", "count": 2, "tag": "animals"}, {"prompt": "a red cube"}]
    path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts, meta = load_prompts(path, "prompts.train")
    assert prompts == ["two cats", "a red cube"]
    assert meta == [{"count": 2, "tag": "animals"}, {}]


def test_load_prompts_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"prompts\.train is not set"):
        load_prompts(None, "prompts.train")
    with pytest.raises(ConfigError, match=r"prompts\.eval is an empty list"):
        load_prompts([], "prompts.eval")
    with pytest.raises(ConfigError, match=r"prompts\.train\[1\] must be a non-empty string"):
        load_prompts(["ok", "  "], "prompts.train")
    missing = str(tmp_path / "none.txt")
    with pytest.raises(ConfigError, match=r"prompts\.train: no such prompts file " + re.escape(repr(missing))):
        load_prompts(missing, "prompts.train")
    empty = write(tmp_path / "empty.txt", "\n  \n")
    with pytest.raises(ConfigError, match=r"holds no prompts"):
        load_prompts(empty, "prompts.train")


def test_load_prompts_bad_jsonl_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"prompt": "ok"}\n\n{"prompt": oops}\n')
    with pytest.raises(ConfigError, match=r"prompts\.train: .*p\.jsonl:3 is not valid JSON"):
        load_prompts(path, "prompts.train")
    path = write(tmp_path / "q.jsonl", '{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ConfigError, match=r"q\.jsonl:2 must be a JSON object with a string \"prompt\""):
        load_prompts(path, "prompts.train")


def test_prompt_sampler_draws_every_prompt_once_per_epoch():
    n = 7
    s = PromptSampler(n, seed=3)
    for _ in range(3):
        assert sorted(s.next(n)) == list(range(n))
    assert s.consumed == 3 * n


def test_prompt_sampler_epochs_cut_across_batches():
    n = 5
    s = PromptSampler(n, seed=0)
    stream = s.next(3) + s.next(3) + s.next(4)
    assert sorted(stream[:5]) == list(range(n)) and sorted(stream[5:]) == list(range(n))


def test_prompt_sampler_is_deterministic_for_a_seed():
    a, b = PromptSampler(20, seed=11), PromptSampler(20, seed=11)
    assert a.next(50) == b.next(50)
    assert PromptSampler(20, seed=11).next(20) != PromptSampler(20, seed=12).next(20)


def test_prompt_sampler_resumes_from_state_dict():
    ref = PromptSampler(9, seed=5)
    uninterrupted = ref.next(40)
    a = PromptSampler(9, seed=5)
    head = a.next(4) + a.next(9)
    state = a.state_dict()
    assert state == {"consumed": 13, "num_prompts": 9, "seed": 5}
    b = PromptSampler(9, seed=5)
    b.load_state_dict(dict(state))
    assert head + b.next(27) == uninterrupted
    assert a.next(27) == uninterrupted[13:]


def test_prompt_sampler_rejects_a_different_prompt_count():
    with pytest.raises(ValueError, match=r"had 9 prompts; this run has 8"):
        PromptSampler(8, seed=5).load_state_dict({"consumed": 3, "num_prompts": 9, "seed": 5})
    with pytest.raises(ValueError, match=r"at least one prompt"):
        PromptSampler(0, seed=0)


# ----------------------------------------------------------------------------------- rewards


def test_reward_from_dotted_import_path_with_weight():
    from flowsteer.rewards import MultiReward
    from flowsteer.testing.rewards import brightness

    mr = build_multi_reward({"flowsteer.testing.rewards.brightness": {"weight": 0.5}}, "sum", "rewards", 4)
    assert isinstance(mr, MultiReward)
    assert mr.rewards["brightness"] is brightness
    assert mr.weights == {"brightness": 0.5}
    assert mr._weight("brightness") == 0.5


def test_reward_from_colon_import_path_and_bare_weight():
    mr = build_multi_reward({"flowsteer.testing.rewards:brightness": 2}, "per_reward", "rewards", 4)
    assert mr.weights == {"brightness": 2.0} and mr.mode == "per_reward"


def test_unknown_reward_name_lists_builtins():
    with pytest.raises(ConfigError, match=r"rewards\.pikscore: 'pikscore' is no built-in reward "
                                          r"\(clip, .*pickscore.*jpeg.*win_rate\)"):
        build_multi_reward({"pikscore": 1.0}, "sum", "rewards", 4)
    assert "pickscore" in BUILTIN and "remote" in BUILTIN


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf"), True, "heavy"])
def test_non_finite_or_non_numeric_weight(weight):
    with pytest.raises(ConfigError, match=r"rewards\.jpeg\.weight must be a finite number"):
        build_multi_reward({"jpeg": {"weight": weight}}, "sum", "rewards", 4)


def test_reward_module_that_does_not_import():
    with pytest.raises(ConfigError, match=r"rewards\.no_such_pkg_xyz\.mod:fn: cannot import module "
                                          r"'no_such_pkg_xyz\.mod'"):
        build_multi_reward({"no_such_pkg_xyz.mod:fn": 1.0}, "sum", "rewards", 4)


def test_reward_attribute_that_does_not_exist():
    with pytest.raises(ConfigError, match=r"module 'flowsteer\.testing\.rewards' has no attribute 'darkness'"):
        build_multi_reward({"flowsteer.testing.rewards.darkness": 1.0}, "sum", "rewards", 4)


def test_empty_rewards():
    with pytest.raises(ConfigError, match=r"rewards is empty.*built-in: clip"):
        build_multi_reward({}, "sum", "rewards", 4)


def test_jpeg_builtin():
    pytest.importorskip("PIL")
    from flowsteer.rewards import JpegCompressibility

    mr = build_multi_reward({"jpeg": {"weight": 1.0, "quality": 80}}, "sum", "rewards", 4)
    assert isinstance(mr.rewards["jpeg"], JpegCompressibility)
    assert mr.weights == {"jpeg": 1.0}


def test_type_lets_one_kind_be_used_twice():
    from flowsteer.rewards import JpegCompressibility

    mr = build_multi_reward({"jpeg": 1.0, "jpeg_2": {"type": "jpeg", "weight": 0.0}}, "sum", "rewards", 4)
    assert set(mr.rewards) == {"jpeg", "jpeg_2"}
    assert all(isinstance(r, JpegCompressibility) for r in mr.rewards.values())
    assert mr.weights == {"jpeg": 1.0, "jpeg_2": 0.0}


def test_bad_reward_argument():
    with pytest.raises(ConfigError, match=r"rewards\.jpeg: bad arguments for reward 'jpeg'"):
        build_multi_reward({"jpeg": {"qualty": 80}}, "sum", "rewards", 4)


def test_win_rate_without_judge():
    with pytest.raises(ConfigError, match=r"rewards\.win_rate needs a judge"):
        build_multi_reward({"win_rate": {"judge": None}}, "sum", "rewards", 8)
    # the shipped pref_grpo recipe leaves the judge to the user
    with pytest.raises(ConfigError, match=r"needs a judge"):
        build_multi_reward(load_config("pref_grpo").rewards, "sum", "rewards", 8)


def test_remote_builds_without_a_request(monkeypatch):
    import urllib.request

    from flowsteer.rewards import RemoteReward

    def no_network(*args, **kwargs):
        raise AssertionError("a request was made while building the reward")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    mr = build_multi_reward({"remote": {"url": "http://127.0.0.1:9/score", "weight": 2.0}}, "sum", "rewards", 4)
    r = mr.rewards["remote"]
    assert isinstance(r, RemoteReward) and r.url == "http://127.0.0.1:9/score"
    assert mr.weights == {"remote": 2.0}


def test_remote_without_url():
    with pytest.raises(ConfigError, match=r"rewards\.remote: bad arguments for reward 'remote'"):
        build_multi_reward({"remote": {}}, "sum", "rewards", 4)


def test_two_import_paths_with_the_same_short_name_are_not_silently_merged():
    spec = {"flowsteer.testing.rewards.brightness": 0.5, "flowsteer.testing.rewards:brightness": 1.0}
    try:
        mr = build_multi_reward(spec, "sum", "rewards", 4)
    except ConfigError as exc:
        assert "brightness" in str(exc)
    else:
        assert len(mr.rewards) == 2


def test_reward_weight_with_exponent_without_dot():
    cfg = load_config("flow_grpo", ["rewards={jpeg: {weight: 1e-4}}"])
    mr = build_multi_reward(cfg.rewards, cfg.rewards_mode, "rewards", cfg.sampling.group_size)
    assert math.isclose(mr.weights["jpeg"], 1e-4)
