"""A procedurally drawn compositional world: coloured shapes on a white background.

A `Scene` asks for one to three flat shapes (circle, square, triangle) in one of five colours,
in one of four categories:

- "single": one object ("a red circle");
- "count": two or three objects of one kind ("two red circles");
- "two_objects": two different objects ("a red circle and a blue square");
- "relation": two different objects and where the first one is ("a red circle left of a blue square").

`render(scene, size, rng)` draws it at random valid positions and sizes (objects never touch, a
relation holds with a margin); `caption(scene)` writes it in plain English and
`spec_from_prompt(caption)` reads it back. Captions use only the words of `VOCABULARY`.

Splits. A two-object scene (either category) is *held out* when its unordered pair of
colour-shape bindings hashes below `HELDOUT_FRACTION`; a count scene when its (count, colour,
shape) does. Single objects are never held out. The rule is a fixed hash (`is_heldout`), so the
held-out compositions never appear in any train prompt, whatever the seed: improvement on them
measures generalisation to compositions never trained on, built from parts that were.

Images are float tensors [3, H, W] in [0, 1]. The background is white (`BACKGROUND`); image rows
grow downwards, so "above" means a smaller row index.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

Tensor = torch.Tensor

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
# Clearly distinct colours, each far from white and from each other (min RGB distance 0.75).
PALETTE: Dict[str, Tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.20, 0.95),
    "yellow": (0.95, 0.85, 0.05),
    "purple": (0.60, 0.10, 0.80),
}
COLOURS: Tuple[str, ...] = tuple(PALETTE)
BACKGROUND: Tuple[float, float, float] = (1.0, 1.0, 1.0)
RELATIONS: Tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: Dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CATEGORIES: Tuple[str, ...] = ("single", "count", "two_objects", "relation")
SPLITS: Tuple[str, ...] = ("train", "heldout")
NUMBERS: Dict[int, str] = {1: "a", 2: "two", 3: "three"}
MAX_OBJECTS = 3
HELDOUT_FRACTION = 0.2
MIN_SIZE = 32
VOCABULARY: Tuple[str, ...] = tuple(
    "a an the of and one two three red green blue yellow purple circle circles square squares "
    "triangle triangles left right above below".split())

# Side of an object's bounding box as a fraction of the image side, by the number of objects.
_SIDE_FRACTION = {1: (0.30, 0.45), 2: (0.25, 0.36), 3: (0.22, 0.30)}
# A rendered relation holds with this direction cosine; the reward asks for RELATION_MIN_COS.
_RENDER_RELATION_COS = 0.65
_PLACEMENT_TRIES = 200
_SPOT_TRIES = 50


# ------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class ObjectSpec:
    """`count` objects of one `shape` and `colour` (count 1-3)."""

    shape: str
    colour: str
    count: int = 1

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)} (got {self.shape!r})")
        if self.colour not in PALETTE:
            raise ValueError(f"colour must be one of {', '.join(COLOURS)} (got {self.colour!r})")
        if not (isinstance(self.count, int) and not isinstance(self.count, bool) and 1 <= self.count <= MAX_OBJECTS):
            raise ValueError(f"count must be an int in [1, {MAX_OBJECTS}] (got {self.count!r})")

    @property
    def binding(self) -> str:
        """"colour shape", the attribute binding that the held-out rule looks at."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """What an image must show: one kind of object (count 1-3), or two different single objects,
    optionally with the relation of the first to the second ("left of", "right of", "above",
    "below"). Build from JSON-able data with `Scene.from_dict`; `to_dict` is its inverse."""

    objects: Tuple[ObjectSpec, ...]
    relation: Optional[str] = None

    def __post_init__(self):
        objs = self.objects
        if isinstance(objs, ObjectSpec) or not isinstance(objs, (tuple, list)):
            raise TypeError(f"objects must be a tuple of ObjectSpec (got {type(objs).__name__})")
        objs = tuple(objs)
        object.__setattr__(self, "objects", objs)
        for i, o in enumerate(objs):
            if not isinstance(o, ObjectSpec):
                raise TypeError(f"objects[{i}] must be an ObjectSpec (got {type(o).__name__})")
        if len(objs) not in (1, 2):
            raise ValueError(f"objects must hold 1 kind (count 1-3) or 2 different kinds (got {len(objs)} kinds)")
        if len(objs) == 2:
            if any(o.count != 1 for o in objs):
                raise ValueError("objects: a two-kind scene has one object of each kind (got counts "
                                 f"{[o.count for o in objs]})")
            if objs[0].binding == objs[1].binding:
                raise ValueError(f"objects must be two different kinds (got {objs[0].binding!r} twice); "
                                 "use count=2 for two of a kind")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"relation must be None or one of {', '.join(map(repr, RELATIONS))} "
                                 f"(got {self.relation!r})")
            if len(objs) != 2:
                raise ValueError("relation needs two kinds of object, one of each")

    @property
    def category(self) -> str:
        """"single", "count", "two_objects" or "relation"."""
        if len(self.objects) == 1:
            return "single" if self.objects[0].count == 1 else "count"
        return "two_objects" if self.relation is None else "relation"

    @property
    def num_objects(self) -> int:
        return sum(o.count for o in self.objects)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able: {"objects": [{"shape", "colour", "count"}, ...], "relation": str | None}."""
        return {"objects": [{"shape": o.shape, "colour": o.colour, "count": o.count} for o in self.objects],
                "relation": self.relation}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Scene":
        """The inverse of `to_dict`; also accepts a dict with the scene under "spec" (prompt metadata)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"spec must be a dict with 'objects' (got {type(data).__name__})")
        if "objects" not in data and isinstance(data.get("spec"), Mapping):
            data = data["spec"]
        if "objects" not in data:
            raise ValueError(f"spec must have an 'objects' list (got keys {sorted(data)})")
        raw = data["objects"]
        if not isinstance(raw, (list, tuple)):
            raise TypeError(f"spec['objects'] must be a list (got {type(raw).__name__})")
        objs = []
        for i, o in enumerate(raw):
            if not isinstance(o, Mapping) or "shape" not in o or "colour" not in o:
                raise ValueError(f"spec['objects'][{i}] must be a dict with 'shape' and 'colour' (got {o!r})")
            objs.append(ObjectSpec(o["shape"], o["colour"], o.get("count", 1)))
        return cls(tuple(objs), data.get("relation"))

    def __str__(self) -> str:
        return caption(self)


SceneLike = Union[Scene, Mapping, str]


def as_scene(spec: SceneLike, name: str = "spec") -> Scene:
    """A Scene from a Scene, its `to_dict()` form, or a caption."""
    if isinstance(spec, Scene):
        return spec
    if isinstance(spec, Mapping):
        return Scene.from_dict(spec)
    if isinstance(spec, str):
        return spec_from_prompt(spec)
    raise TypeError(f"{name} must be a Scene, a spec dict or a caption str (got {type(spec).__name__})")


# ---------------------------------------------------------------------------------- captions


def _phrase(o: ObjectSpec) -> str:
    noun = o.shape if o.count == 1 else o.shape + "s"
    return f"{NUMBERS[o.count]} {o.colour} {noun}"


def caption(spec: SceneLike) -> str:
    """Plain English, in the words of VOCABULARY: "two red circles", "a red circle and a blue
    square", "a blue square left of a yellow triangle"."""
    scene = as_scene(spec)
    phrases = [_phrase(o) for o in scene.objects]
    if scene.relation is not None:
        return f"{phrases[0]} {scene.relation} {phrases[1]}"
    return " and ".join(phrases)


_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "the": 1, "two": 2, "three": 3}
_RELATION_WORDS = {("left", "of"): "left of", ("right", "of"): "right of", ("above",): "above", ("below",): "below"}


def _parse_error(prompt: str, why: str) -> ValueError:
    return ValueError(f"prompt {prompt!r} is not a demo caption ({why}); expected e.g. 'two red circles', "
                      "'a red circle and a blue square' or 'a blue square left of a yellow triangle'")


def _parse_phrase(words: List[str], i: int, prompt: str) -> Tuple[ObjectSpec, int]:
    if i + 3 > len(words):
        raise _parse_error(prompt, f"an object phrase needs <number> <colour> <shape> at word {i + 1}")
    number, colour, noun = words[i:i + 3]
    if number not in _COUNT_WORDS:
        raise _parse_error(prompt, f"{number!r} is not a number word ({', '.join(_COUNT_WORDS)})")
    if colour not in PALETTE:
        raise _parse_error(prompt, f"{colour!r} is not a colour ({', '.join(COLOURS)})")
    count = _COUNT_WORDS[number]
    shape = noun[:-1] if noun.endswith("s") else noun
    if shape not in SHAPES:
        raise _parse_error(prompt, f"{noun!r} is not a shape ({', '.join(SHAPES)})")
    if (count == 1) != (noun == shape):
        raise _parse_error(prompt, f"{number!r} does not agree with {noun!r}")
    return ObjectSpec(shape, colour, count), i + 3


def spec_from_prompt(prompt: str) -> Scene:
    """The Scene a caption describes (the inverse of `caption`). Case, surrounding spaces and a
    final full stop are ignored; "an", "one" and "the" read as "a". Raises ValueError naming the
    prompt and the first word that does not fit."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str (got {type(prompt).__name__})")
    words = prompt.strip().lower().rstrip(".").split()
    if not words:
        raise _parse_error(prompt, "it is empty")
    first, i = _parse_phrase(words, 0, prompt)
    if i == len(words):
        return Scene((first,))
    relation = None
    if words[i] == "and":
        i += 1
    else:
        for key, rel in _RELATION_WORDS.items():
            if tuple(words[i:i + len(key)]) == key:
                relation, i = rel, i + len(key)
                break
        else:
            raise _parse_error(prompt, f"{words[i]!r} after the first object is neither 'and' nor a relation "
                                       f"({', '.join(RELATIONS)})")
    second, i = _parse_phrase(words, i, prompt)
    if i != len(words):
        raise _parse_error(prompt, f"unexpected words after the second object: {' '.join(words[i:])!r}")
    try:
        return Scene((first, second), relation)
    except ValueError as exc:
        raise _parse_error(prompt, str(exc)) from None


# ---------------------------------------------------------------------------- relations


def relation_cosines(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> Tuple[float, float]:
    """GenEval's relative position of box A to box B (boxes are (x0, y0, x1, y1), rows down):
    the centre offset shrunk by `threshold` * (the summed box sides) on each axis, over the
    offset's length. Returns (dx, dy): dx < -c means "left of" at cosine c, dy < -c "above"."""
    ax, ay = (box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2
    bx, by = (box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2
    off = np.array([ax - bx, ay - by], dtype=np.float64)
    dims = np.array([box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1]])
    norm = float(np.hypot(*off))
    if norm == 0:
        return 0.0, 0.0
    revised = np.maximum(np.abs(off) - threshold * dims, 0) * np.sign(off)
    return float(revised[0] / norm), float(revised[1] / norm)


def relation_holds(box_a: Sequence[float], box_b: Sequence[float], relation: str, min_cos: float = 0.5) -> bool:
    """Whether A is `relation` B (GenEval's rule: the shrunk offset's direction cosine > min_cos)."""
    dx, dy = relation_cosines(box_a, box_b)
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation] > min_cos


# --------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Placed:
    """One drawn object: its shape, colour, centre (cx, cy) in pixels and the side of its square
    bounding box. A triangle points up: apex at the top middle, base along the bottom."""

    shape: str
    colour: str
    cx: float
    cy: float
    side: float

    @property
    def box(self) -> Tuple[float, float, float, float]:
        h = self.side / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def _as_rng(rng) -> np.random.Generator:
    if rng is None or isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(None if rng is None else int(rng))
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None (got {type(rng).__name__})")


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size must be an int >= {MIN_SIZE} (got {size!r})")
    return int(size)


def _apart(a: Placed, b: Placed, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def layout(spec: SceneLike, size: int = 32, rng=None, *, extra: Sequence[Tuple[str, str]] = ()) -> List[Placed]:
    """Random valid placements for every object of `spec` (the kinds in order, each repeated
    `count` times): inside the image with a 1-pixel border, bounding boxes at least
    max(2, size / 16) pixels apart, and the relation (if any) holding with a margin.

    extra: (shape, colour) pairs of further objects to place after the scene's (distractors, for
    negative examples); at most one, so that everything still fits."""
    scene, size, rng = as_scene(spec), _check_size(size), _as_rng(rng)
    kinds = [(o.shape, o.colour) for o in scene.objects for _ in range(o.count)]
    extra = list(extra)
    if len(extra) > 1:
        raise ValueError(f"extra holds at most one (shape, colour) pair (got {len(extra)})")
    for i, pair in enumerate(extra):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"extra[{i}] must be a (shape, colour) pair (got {pair!r})")
        ObjectSpec(*pair)  # checks the names
        kinds.append(tuple(pair))
    lo, hi = _SIDE_FRACTION[min(len(kinds), MAX_OBJECTS)]
    gap, border = max(2.0, size / 16), 1.0
    for _ in range(_PLACEMENT_TRIES):
        placed = _place_in_turn(kinds, scene.relation, size, lo, hi, gap, border, rng)
        if placed is not None:
            return placed
    raise RuntimeError(f"could not place {caption(scene)!r} in a {size}x{size} image after "
                       f"{_PLACEMENT_TRIES} tries")  # not reached for the sizes above


def _place_in_turn(kinds, relation, size, lo, hi, gap, border, rng) -> Optional[List[Placed]]:
    """One attempt: each object in turn at a random spot clear of the ones before it (the second
    also in `relation` to the first); None when an object finds no spot."""
    placed: List[Placed] = []
    for shape, colour in kinds:
        for _ in range(_SPOT_TRIES):
            side = rng.uniform(lo, hi) * size
            cx, cy = rng.uniform(border + side / 2, size - border - side / 2, size=2)
            p = Placed(shape, colour, float(cx), float(cy), float(side))
            if not all(_apart(p, q, gap) for q in placed):
                continue
            if relation is not None and len(placed) == 1 and not relation_holds(placed[0].box, p.box, relation,
                                                                               _RENDER_RELATION_COS):
                continue
            placed.append(p)
            break
        else:
            return None
    return placed


def _coverage(p: Placed, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The fraction of each pixel inside the shape; xs, ys: sub-pixel sample coordinates [H, W, k]."""
    dx, dy, r = xs - p.cx, ys - p.cy, p.side / 2
    if p.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif p.shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:  # triangle pointing up: half-width grows from 0 at the apex to r at the base
        down = dy + r
        inside = (down >= 0) & (dy <= r) & (np.abs(dx) <= down / 2)
    return inside.mean(axis=-1)


def draw(placed: Sequence[Placed], size: int = 32, antialias: int = 4) -> Tensor:
    """Draws placed objects on the white background: float32 [3, size, size] in [0, 1]. Each
    pixel blends background and colour by the shape's coverage of `antialias`^2 sub-pixel samples.
    antialias=1 draws hard edges; the reward then cannot always tell a circle under ~10 pixels
    across from a square (their pixels coincide), so keep antialias >= 2 for images it scores."""
    size = _check_size(size)
    if isinstance(antialias, bool) or not isinstance(antialias, int) or antialias < 1:
        raise ValueError(f"antialias must be an int >= 1 (got {antialias!r})")
    offs = (np.arange(antialias) + 0.5) / antialias
    sub_y, sub_x = np.meshgrid(offs, offs, indexing="ij")
    grid = np.arange(size, dtype=np.float64)
    xs = grid[None, :, None] + sub_x.reshape(1, 1, -1)
    ys = grid[:, None, None] + sub_y.reshape(1, 1, -1)
    for i, p in enumerate(placed):
        if not isinstance(p, Placed):
            raise TypeError(f"placed[{i}] must be a Placed (got {type(p).__name__})")
    img = np.broadcast_to(np.asarray(BACKGROUND, dtype=np.float64)[:, None, None], (3, size, size)).copy()
    for p in placed:
        cov = _coverage(p, xs, ys)[None]
        colour = np.asarray(PALETTE[p.colour], dtype=np.float64)[:, None, None]
        img = img * (1 - cov) + colour * cov
    return torch.from_numpy(img.astype(np.float32)).clamp_(0, 1)


def render(spec: SceneLike, size: int = 32, rng=None, *, antialias: int = 4) -> Tensor:
    """A random image of `spec` (a Scene, its dict or its caption): float32 [3, size, size] in
    [0, 1] on a white background. rng: a numpy Generator, an int seed, or None (fresh entropy)."""
    return draw(layout(spec, size, rng), size, antialias)


def render_batch(specs: Sequence[SceneLike], size: int = 32, seed: int = 0, *, antialias: int = 4) -> Tensor:
    """Images of every spec, [N, 3, size, size], drawn with one Generator seeded by `seed`."""
    if isinstance(specs, (str, Scene, Mapping)):
        raise TypeError("specs must be a sequence of specs (got a single spec); wrap it in a list")
    specs = list(specs)
    if not specs:
        raise ValueError("specs must hold at least one spec (got none)")
    rng = _as_rng(seed)
    return torch.stack([render(s, size, rng, antialias=antialias) for s in specs])


# ------------------------------------------------------------------------------------ splits


def heldout_key(spec: SceneLike) -> Optional[str]:
    """The composition the held-out rule hashes: None for a single object; "count:<n> <colour>
    <shape>" for a count scene; "pair:<binding>+<binding>" (sorted, so order and relation do not
    matter) for a two-object or relation scene."""
    scene = as_scene(spec)
    if scene.category == "single":
        return None
    if scene.category == "count":
        o = scene.objects[0]
        return f"count:{o.count} {o.binding}"
    return "pair:" + "+".join(sorted(o.binding for o in scene.objects))


def is_heldout(spec: SceneLike) -> bool:
    """Whether the scene's composition belongs to the held-out split: sha256 of `heldout_key`
    below HELDOUT_FRACTION. Fixed for all seeds and runs."""
    key = heldout_key(spec)
    if key is None:
        return False
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return int(digest[:13], 16) / 16 ** 13 < HELDOUT_FRACTION


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))} (got {split!r})")
    return split


def _all_of_category(category: str) -> Iterator[Scene]:
    kinds = [(s, c) for c in COLOURS for s in SHAPES]
    if category == "single":
        yield from (Scene((ObjectSpec(s, c),)) for s, c in kinds)
    elif category == "count":
        yield from (Scene((ObjectSpec(s, c, n),)) for n in (2, 3) for s, c in kinds)
    else:
        relations = [None] if category == "two_objects" else list(RELATIONS)
        for a in kinds:
            for b in kinds:
                if a != b:
                    for rel in relations:
                        yield Scene((ObjectSpec(*a), ObjectSpec(*b)), rel)


def _check_categories(categories, split: str) -> List[str]:
    allowed = [c for c in CATEGORIES if not (split == "heldout" and c == "single")]
    if categories is None:
        return allowed
    if isinstance(categories, str):
        categories = [categories]
    categories = list(categories)
    for c in categories:
        if c not in CATEGORIES:
            raise ValueError(f"categories must be among {', '.join(map(repr, CATEGORIES))} (got {c!r})")
        if c not in allowed:
            raise ValueError(f"categories: {c!r} has no held-out scenes (single objects are all in train)")
    if not categories:
        raise ValueError("categories must name at least one category (got none)")
    return categories


def all_scenes(split: str = "train", categories=None) -> List[Scene]:
    """Every distinct scene of `split` in the given categories (default: all that the split has),
    in a fixed order."""
    split = _check_split(split)
    want_heldout = split == "heldout"
    return [s for c in _check_categories(categories, split) for s in _all_of_category(c)
            if is_heldout(s) == want_heldout]


def sample_specs(n: int, seed: int = 0, split: str = "train", categories=None) -> List[Scene]:
    """n scenes of `split`, drawn with replacement: a category uniformly among `categories`
    (default: all the split has; "heldout" has no "single"), then a scene uniformly within it.
    Deterministic per (n, seed, split, categories)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0 (got {n!r})")
    split = _check_split(split)
    pools = {c: all_scenes(split, c) for c in _check_categories(categories, split)}
    names = list(pools)
    rng = _as_rng(seed)
    out = []
    for _ in range(n):
        pool = pools[names[int(rng.integers(len(names)))]]
        out.append(pool[int(rng.integers(len(pool)))])
    return out


def prompt_meta(spec: SceneLike, split: Optional[str] = None) -> Dict[str, Any]:
    """The per-prompt metadata a reward receives: {"category", "split", "spec": Scene.to_dict()}."""
    scene = as_scene(spec)
    return {"category": scene.category, "split": split or ("heldout" if is_heldout(scene) else "train"),
            "spec": scene.to_dict()}


@dataclass
class PromptSet:
    """Prompts with their per-prompt metadata (`prompt_meta`), in matching order."""

    prompts: List[str] = field(default_factory=list)
    meta: List[Dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def scenes(self) -> List[Scene]:
        return [Scene.from_dict(m["spec"]) for m in self.meta]

    def records(self) -> List[Dict[str, Any]]:
        """[{"prompt": ..., **meta}], the .jsonl records that `flowsteer train` reads."""
        return [{"prompt": p, **m} for p, m in zip(self.prompts, self.meta)]

    def write_jsonl(self, path: str) -> str:
        with open(path, "w", encoding="utf-8") as f:
            for rec in self.records():
                f.write(json.dumps(rec, sort_keys=True) + "\n")
        return path


def _distinct(split: str, n: int, rng: np.random.Generator) -> PromptSet:
    """Up to n distinct scenes, the categories taken in turn from shuffled pools."""
    pools = []
    for c in _check_categories(None, split):
        pool = all_scenes(split, c)
        pools.append([pool[i] for i in rng.permutation(len(pool))])
    chosen: List[Scene] = []
    depth = 0
    while len(chosen) < n and any(depth < len(p) for p in pools):
        chosen.extend(p[depth] for p in pools if depth < len(p))
        depth += 1
    chosen = chosen[:n]
    return PromptSet([caption(s) for s in chosen], [prompt_meta(s, split) for s in chosen])


def prompt_sets(seed: int = 0, n_train: int = 256, n_heldout: int = 64) -> Tuple[PromptSet, PromptSet]:
    """(train, heldout): distinct prompts of each split with their metadata, the categories
    balanced (taken in turn until a category runs out). Deterministic per arguments."""
    for name, value in (("n_train", n_train), ("n_heldout", n_heldout)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1 (got {value!r})")
    rng = _as_rng(seed)
    return _distinct("train", n_train, rng), _distinct("heldout", n_heldout, rng)
