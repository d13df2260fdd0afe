"""The demo world and its GenEval-like reward: ground truth scores 1, each single wrong attribute
fails exactly its own criterion, noise / blank / mismatched images score 0, the held-out split
never leaks into train, generation is deterministic, captions round-trip, bad input is named."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowsteer.demo import (
    CATEGORIES,
    COLOURS,
    CRITERIA,
    PALETTE,
    RELATIONS,
    SHAPES,
    VOCABULARY,
    GenEvalLikeReward,
    ObjectSpec,
    Scene,
    all_scenes,
    caption,
    detect,
    draw,
    is_heldout,
    layout,
    prompt_sets,
    render,
    render_batch,
    sample_specs,
    score_images,
    spec_from_prompt,
)
from flowsteer.demo.reward import label_components
from flowsteer.demo.world import OPPOSITE, heldout_key
from flowsteer.rewards import MultiReward

SIZE = 32


def scores_of(images, specs):
    return {k: v.tolist() for k, v in score_images(images, specs).items()}


def assert_all_pass(images, specs):
    s = score_images(images, specs)
    for k in CRITERIA:
        bad = [caption(specs[i]) for i in torch.nonzero(s[k] < 1).flatten().tolist()]
        assert not bad, f"{k} failed on ground truth: {bad[:5]}"


# ------------------------------------------------------------------------------- ground truth


def test_every_attribute_combination_scores_one():
    specs = [Scene((ObjectSpec(s, c, n),)) for s in SHAPES for c in COLOURS for n in (1, 2, 3)]
    # every colour-shape binding as the first and as the second object of every relation
    others = [(s, c) for c in COLOURS for s in SHAPES]
    for i, (s, c) in enumerate(others):
        other = ObjectSpec(*others[(i + 4) % len(others)])
        for rel in RELATIONS:
            specs.append(Scene((ObjectSpec(s, c), other), rel))
            specs.append(Scene((other, ObjectSpec(s, c)), rel))
        specs.append(Scene((ObjectSpec(s, c), other)))
    specs = specs * 2  # two random layouts of each
    assert_all_pass(render_batch(specs, SIZE, seed=1), specs)


@pytest.mark.parametrize("size", [32, 64])
def test_strict_on_random_ground_truth_per_category(size):
    n = 200 if size == 32 else 60
    for category in CATEGORIES:
        specs = sample_specs(n, seed=5, split="train", categories=category)
        if category != "single":
            specs += sample_specs(n // 4, seed=6, split="heldout", categories=category)
        strict = score_images(render_batch(specs, size, seed=2), specs)["strict"]
        assert float(strict.mean()) >= 0.98, (category, size, float(strict.mean()))


def test_ground_truth_survives_mild_pixel_noise():
    specs = sample_specs(120, seed=3)
    x = render_batch(specs, SIZE, seed=3)
    g = torch.Generator().manual_seed(0)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert float(score_images(noisy, specs)["strict"].mean()) >= 0.98


# ----------------------------------------------------------------------- one attribute wrong


def _unused(values, used):
    return next(v for v in values if v not in used)


def _variants(scene: Scene):
    """{criterion: the scene drawn with only that attribute changed} (None where not applicable)."""
    objs = list(scene.objects)
    colours = {o.colour for o in objs}
    shapes = {o.shape for o in objs}
    first = objs[0]
    out = {
        "colour": Scene((ObjectSpec(first.shape, _unused(COLOURS, colours), first.count), *objs[1:]), scene.relation),
        "shape": Scene((ObjectSpec(_unused(SHAPES, shapes), first.colour, first.count), *objs[1:]), scene.relation),
        "relation": None if scene.relation is None else Scene(scene.objects, OPPOSITE[scene.relation]),
        "count": None,
    }
    if scene.category in ("single", "count"):
        out["count"] = Scene((ObjectSpec(first.shape, first.colour, {1: 2, 2: 3, 3: 2}[first.count]),))
    elif scene.category == "two_objects":
        out["count"] = Scene((first,))  # the second object left out
    return out


def _stray(scene: Scene):
    return (_unused(SHAPES, {o.shape for o in scene.objects}), _unused(COLOURS, {o.colour for o in scene.objects}))


def test_each_changed_attribute_fails_exactly_its_criterion():
    rng = np.random.default_rng(11)
    cases = []  # (image, asked scene, the criterion that must fail)
    for category in CATEGORIES:
        for scene in sample_specs(12, seed=21, categories=category):
            for crit, drawn in _variants(scene).items():
                if drawn is not None:
                    cases.append((render(drawn, SIZE, rng), scene, crit))
            cases.append((draw(layout(scene, SIZE, rng, extra=[_stray(scene)]), SIZE), scene, "clean"))
    images = torch.stack([c[0] for c in cases])
    s = score_images(images, [c[1] for c in cases])
    for i, (_, scene, crit) in enumerate(cases):
        got = {k: float(s[k][i]) for k in CRITERIA}
        want = {k: 0.0 if k in ("strict", crit) else 1.0 for k in CRITERIA}
        assert got == want, f"{caption(scene)!r} drawn with a wrong {crit}: {got}"
    assert len(cases) > 150 and {c[2] for c in cases} == {"colour", "shape", "count", "relation", "clean"}


def test_noise_blank_confetti_and_mismatched_score_zero():
    specs = sample_specs(64, seed=4)
    g = torch.Generator().manual_seed(4)
    noise = torch.rand(64, 3, SIZE, SIZE, generator=g)
    assert float(score_images(noise, specs)["strict"].mean()) <= 0.02
    for value in (1.0, 0.0, 0.5):
        assert score_images(torch.full((64, 3, SIZE, SIZE), value), specs)["strict"].sum() == 0
    # confetti: 60 specks of palette colours
    confetti = torch.ones(16, 3, SIZE, SIZE)
    rng = np.random.default_rng(0)
    palette = [torch.tensor(PALETTE[c])[:, None, None] for c in COLOURS]
    for img in confetti:
        for _ in range(60):
            y, x = rng.integers(0, SIZE - 2, 2)
            img[:, y:y + 2, x:x + 2] = palette[rng.integers(len(palette))]
    assert score_images(confetti, specs[:16])["strict"].sum() == 0
    # images of other contents (a different multiset of objects)
    x = render_batch(specs, SIZE, seed=4)

    def content(s):
        return sorted((o.colour, o.shape, o.count) for o in s.objects)

    others = [next(t for t in specs[i + 1:] + specs if content(t) != content(s)) for i, s in enumerate(specs)]
    assert score_images(x, others)["strict"].sum() == 0


# ------------------------------------------------------------------------------------ splits


def test_heldout_compositions_never_appear_in_train():
    train, held = all_scenes("train"), all_scenes("heldout")
    assert {s.category for s in held} == {"count", "two_objects", "relation"}
    train_keys = {heldout_key(s) for s in train}
    held_keys = {heldout_key(s) for s in held}
    assert held_keys and not (train_keys & held_keys)
    assert len(train) + len(held) == 15 + 30 + 210 + 840
    # every binding is still trained on inside some pair, only the held-out pairs are new
    trained_pairs = [s for s in train if len(s.objects) == 2]
    assert {o.binding for s in trained_pairs for o in s.objects} == {f"{c} {s}" for c in COLOURS for s in SHAPES}
    tr, he = prompt_sets(seed=3, n_train=300, n_heldout=100)
    assert not ({heldout_key(spec_from_prompt(p)) for p in tr.prompts} & held_keys)
    assert all(is_heldout(spec_from_prompt(p)) for p in he.prompts)
    assert not any(is_heldout(s) for s in sample_specs(400, seed=9, split="train"))
    assert all(is_heldout(s) for s in sample_specs(100, seed=9, split="heldout"))


def test_generation_is_deterministic_per_seed():
    assert sample_specs(50, seed=1) == sample_specs(50, seed=1)
    assert sample_specs(50, seed=1) != sample_specs(50, seed=2)
    a, b = prompt_sets(seed=7, n_train=40, n_heldout=20), prompt_sets(seed=7, n_train=40, n_heldout=20)
    assert a[0].records() == b[0].records() and a[1].records() == b[1].records()
    assert a[0].prompts != prompt_sets(seed=8, n_train=40, n_heldout=20)[0].prompts
    assert len(set(a[0].prompts)) == 40  # distinct prompts
    assert {m["category"] for m in a[0].meta} == set(CATEGORIES)
    specs = sample_specs(8, seed=1)
    assert torch.equal(render_batch(specs, SIZE, seed=3), render_batch(specs, SIZE, seed=3))
    assert not torch.equal(render_batch(specs, SIZE, seed=3), render_batch(specs, SIZE, seed=4))
    assert torch.equal(render(specs[0], SIZE, 5), render(specs[0], SIZE, np.random.default_rng(5)))


def test_captions_parse_back_and_use_the_vocabulary():
    scenes = all_scenes("train") + all_scenes("heldout")
    for s in scenes:
        text = caption(s)
        assert spec_from_prompt(text) == s
        assert set(text.split()) <= set(VOCABULARY), text
        assert Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert caption(Scene((ObjectSpec("circle", "red", 2),))) == "two red circles"
    assert caption(Scene((ObjectSpec("square", "blue"), ObjectSpec("triangle", "yellow")), "left of")) == \
        "a blue square left of a yellow triangle"
    assert spec_from_prompt("  An RED Circle. ") == Scene((ObjectSpec("circle", "red"),))
    assert len(set(map(caption, scenes))) == len(scenes)


# ------------------------------------------------------------------------- the reward protocol


def test_reward_trains_on_strict_and_logs_the_breakdown():
    tr, _ = prompt_sets(seed=0, n_train=8, n_heldout=4)
    x = render_batch(tr.scenes(), SIZE, seed=0)
    assert torch.equal(GenEvalLikeReward()(x, tr.prompts), torch.ones(8))
    # the spec is read from meta when given: wrong prompts do not matter then, and None works
    assert torch.equal(GenEvalLikeReward()(x, ["a dog"] * 8, tr.meta), torch.ones(8))
    assert torch.equal(GenEvalLikeReward()(x, None, {"spec": [m["spec"] for m in tr.meta]}), torch.ones(8))
    full = GenEvalLikeReward(criteria="all")
    out = full(x, tr.prompts)
    assert list(out) == list(CRITERIA)
    mr = MultiReward([full], weights=full.training_weights())
    res = mr(torch.cat([x, torch.ones_like(x)]), tr.prompts * 2, tr.meta * 2)
    assert "reward/geneval/clean/mean" in mr.last_log and res["geneval/strict"].tolist() == [1.0] * 8 + [0.0] * 8
    assert dict(zip(res.names, res.weights.tolist()))["geneval/colour"] == 0.0
    assert GenEvalLikeReward(criteria=["count", "strict"])(x, tr.prompts).keys() == {"count", "strict"}
    video = torch.stack([x, x], dim=2)  # [N, 3, F, H, W]
    assert torch.equal(GenEvalLikeReward()(video, tr.prompts), torch.ones(8))


def test_labelling_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    classes = np.where(rng.random((3, 20, 24)) < 0.6, rng.integers(0, 3, size=(3, 20, 24)), -1)
    labels = label_components(classes)
    for i in range(3):
        expected = 0
        for c in range(3):
            _, n = ndimage.label(classes[i] == c, structure=np.ones((3, 3)))
            expected += n
            # our components never mix classes
            for root in np.unique(labels[i][classes[i] == c]):
                assert set(classes[i][labels[i] == root]) == {c}
        assert len(np.unique(labels[i][labels[i] >= 0])) == expected


def test_detection_reports_blobs():
    scene = Scene((ObjectSpec("triangle", "purple"), ObjectSpec("square", "green")), "above")
    det = detect(render(scene, SIZE, 0)[None])[0]
    assert sorted((b.colour, b.shape) for b in det.blobs) == [("green", "square"), ("purple", "triangle")]
    assert det.speck_frac < 0.02


# ---------------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    r = GenEvalLikeReward()
    x = render_batch(sample_specs(2, seed=0), SIZE, seed=0)
    with pytest.raises(ValueError, match=r"images \[N, 3, H, W\]"):
        r(x[:, :1], ["a red circle"] * 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        r(x * 2 - 1, ["a red circle"] * 2)
    with pytest.raises(ValueError, match=r"prompts\[1\].*'a purple dog'"):
        r(x, ["a red circle", "a purple dog"])
    with pytest.raises(ValueError, match="needs a spec"):
        r(x, None)
    with pytest.raises(ValueError, match="images must be at least 16x16"):
        r(torch.ones(2, 3, 8, 8), ["a red circle"] * 2)
    with pytest.raises(ValueError, match=r"images must hold values in \[0, 1\]"):
        score_images(x + 0.5, ["a red circle"] * 2)
    with pytest.raises(ValueError, match="specs has 1 entries for 2 images"):
        score_images(x, ["a red circle"])
    with pytest.raises(ValueError, match="criteria must be"):
        GenEvalLikeReward(criteria="colour")
    for prompt, why in [("a red dog", "'dog' is not a shape"), ("two red circle", "does not agree"),
                        ("a red circle near a blue square", "neither 'and' nor a relation"), ("", "empty"),
                        ("a red circle and a red circle", "two different kinds")]:
        with pytest.raises(ValueError, match=f"prompt .*{why}"):
            spec_from_prompt(prompt)
    with pytest.raises(ValueError, match="colour must be one of"):
        ObjectSpec("circle", "orange")
    with pytest.raises(ValueError, match="count must be an int"):
        ObjectSpec("circle", "red", 4)
    with pytest.raises(ValueError, match="relation needs two kinds"):
        Scene((ObjectSpec("circle", "red"),), "above")
    with pytest.raises(ValueError, match="size must be an int >= 32"):
        render("a red circle", size=16)
    with pytest.raises(TypeError, match="rng must be"):
        render("a red circle", rng="seed")
    with pytest.raises(ValueError, match="split must be one of"):
        sample_specs(3, split="test")
    with pytest.raises(ValueError, match="'single' has no held-out"):
        sample_specs(3, split="heldout", categories="single")
