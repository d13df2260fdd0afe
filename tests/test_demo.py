"""`flowsteer demo`, shortened: its files, the real checker on held-out prompts, GRPO moving the policy."""
import json
import math
import os

import torch
from safetensors.torch import load_file

from flowsteer.demo.reward import GenEvalLikeReward
from flowsteer.demo.model import DemoAdapter, DemoFlowModel, load_demo_model, tokenize
from flowsteer.demo.pretrain import pretrain
from flowsteer.demo.run import run_demo
from flowsteer.train import checkpoint as ckpt


def test_tokenize_and_adapter_shapes():
    tokens = tokenize(["two red circles", "a blue square left of a yellow triangle", ""])
    assert tokens.shape == (3, 12) and tokens.dtype == torch.int64
    assert int((tokens[2] != 0).sum()) == 0 and int((tokens[0] != 0).sum()) == 3
    adapter = DemoAdapter(DemoFlowModel())
    cond = adapter.encode(["a red circle", "two blue squares"], 2.0)
    inputs = adapter.model_inputs(cond, torch.tensor([0, 0, 1]), 2.0)
    assert inputs["tokens"].shape == (6, 12)  # CFG: the unconditional half first
    x = torch.randn(3, 3, 32, 32)
    sigmas, timesteps = adapter.schedule(4, x)
    v = adapter.velocity(x, 0, timesteps, sigmas[0], inputs, 2.0)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_shortened_demo(tmp_path):
    weights = str(tmp_path / "demo_model.safetensors")
    pretrain(weights, steps=3, batch_size=8, eval_every=1000, log=lambda m: None)
    loaded = load_demo_model(weights).state_dict()
    saved = load_file(weights)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    out = str(tmp_path / "demo")
    # a barely trained model never succeeds strictly, so GRPO trains on the checker's colour
    # criterion here (dense), to see the policy move; held-out success is still strict
    colour = GenEvalLikeReward(criteria=["colour"])
    summary = run_demo(out, iterations=2, eval_samples=16, weights=weights, log=lambda m: None, reward=colour,
                       extra=["train.prompts_per_iteration=2", "train.batch_size=8", "train.lr=1e-3",
                              "logging.tqdm=false"])
    for name in ("summary.json", "samples_before.png", "samples_after.png", "run/metrics.jsonl"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f) == summary
    # the held-out score comes from the real checker: its criteria breakdown is there, and finite
    assert set(summary["before_criteria"]) == {"strict", "colour", "shape", "count", "relation", "clean"}
    assert all(math.isfinite(v) for v in summary["after_criteria"].values())
    rows = [json.loads(line) for line in open(os.path.join(out, "run", "metrics.jsonl"))]
    assert len(rows) == 2 and all(math.isfinite(r["advantage/std"]) for r in rows)
    # a few GRPO steps moved the policy: the default trains LoRA on the conditioning path, whose B
    # matrices start at zero
    tensors, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(os.path.join(out, "run", "checkpoints")))
    lora_b = [k for k in tensors if k.startswith("model.") and "lora_B" in k]
    assert lora_b and any("film" in k for k in lora_b) and any("linear1" in k for k in lora_b)
    assert rows[0]["trained_samples"] > 0 and any(bool(tensors[k].abs().sum() > 0) for k in lora_b)


def test_the_shipped_model_draws_what_single_prompts_ask():
    """The shipped pre-trained weights load and draw recognisable shapes: ODE samples of single
    objects pass the strict checker most of the time (fixed noise)."""
    from flowsteer import sample
    from flowsteer.demo import caption, sample_specs

    model = load_demo_model()
    specs = sample_specs(32, seed=3, split="train", categories=["single"])
    prompts = [caption(s) for s in specs]
    images = sample(DemoAdapter(model), prompts, num_steps=10, guidance_scale=2.0, kind="ode", noise_level=0.0,
                    seed=0).images
    strict = GenEvalLikeReward()(images, prompts)
    assert float(strict.mean()) >= 0.5, float(strict.mean())


def test_compare_writes_a_table_curves_and_a_plot(tmp_path):
    """`flowsteer demo --compare`, shortened: two algorithms x two seeds, a held-out curve from
    evaluations during training, the table and the plot."""
    from flowsteer.demo.run import compare, steps_to_target

    assert steps_to_target([(0, 0.2), (5, 0.25), (10, 0.31)], 0.3) == 10
    assert steps_to_target([(0, 0.2), (5, 0.25)], 0.3) is None
    weights = str(tmp_path / "demo_model.safetensors")
    pretrain(weights, steps=2, batch_size=8, eval_every=1000, log=lambda m: None)
    out = str(tmp_path / "compare")
    result = compare(out, algorithms=["flow_grpo", "fast"], seeds=[0, 1], iterations=2, eval_every=1,
                     curve_samples=4, eval_samples=8, weights=weights, log=lambda m: None,
                     extra=["train.prompts_per_iteration=2", "train.batch_size=8", "logging.tqdm=false"])
    for name in ("compare.json", "compare.md", "compare.png", "fast-seed1/summary.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert [r["algorithm"] for r in result["table"]] == ["flow_grpo", "fast"]
    run = result["runs"]["fast"][1]
    assert run["seed"] == 1 and [it for it, _ in run["heldout_curve"]] == [0, 1, 2]
    assert all(0.0 <= v <= 1.0 for _, v in run["heldout_curve"])
    # flow_grpo and fast start from the same base and the same held-out noise: the same first point
    assert result["runs"]["flow_grpo"][0]["heldout_curve"][0] == run["heldout_curve"][0]
    table = open(os.path.join(out, "compare.md")).read()
    assert "| flow_grpo |" in table and "| fast |" in table


def test_run_demo_rejects_bad_arguments(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="algorithm must be one of"):
        run_demo(str(tmp_path), algorithm="ppo")
    with pytest.raises(ValueError, match="eval_samples must be an int >= 1"):
        run_demo(str(tmp_path), eval_samples=0)


def test_demo_without_peft_names_the_extra(tmp_path, monkeypatch):
    import sys

    import pytest

    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ImportError, match=r"flowsteer demo .*needs peft.*flowsteer\[demo\]"):
        run_demo(str(tmp_path / "demo"), iterations=1, eval_samples=4, log=lambda m: None)
