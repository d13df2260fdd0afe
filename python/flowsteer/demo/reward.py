"""A verifiable GenEval-like reward for the demo world: did the image draw what the prompt asked?

Detection, all in numpy (no scipy, no weights):

1. Pixels. Each pixel is matched to the line from the white background to each palette colour
   (`world.PALETTE`): a pixel close to white is background; one within `line_tol` of a line is
   that colour if it is at least half way along it (anti-aliased edges split at 50 % coverage),
   background otherwise; any other non-white pixel is "other" (no palette colour).
2. Components. Pixels of one class that touch (8-connectivity) form a component. Components
   smaller than `min_area_frac` of the image are specks: ignored as objects, but counted.
3. Shapes, from the component's coverage (the anti-aliased edge included, so that a circle a
   few pixels across is not a square with clipped corners): fill = area / (largest column sum *
   largest row sum), square 1, circle pi/4 ~ 0.785, upward triangle 1/2; and the share of the
   area in the top half of its box, upward triangle ~1/4, else ~1/2. A component much wider
   than tall (or the reverse), of an implausible fill, or over `max_area_frac` of the image has
   no shape (None).
4. Matching. The prompt's objects are slots (a kind repeated `count` times). Each component
   scores +1 per slot for the right colour and +1 for the right shape; slots take components
   greedily, best score first. A component that scores for some slot but gets none is an extra
   object; one that scores for no slot is a stray.

Criteria per image (1.0 or 0.0):

- "colour": some component was matched, and every matched one has its slot's colour;
- "shape": the same for shape;
- "count": every slot is filled, and no extra object is left over;
- "relation": the two matched objects stand in the prompt's relation (GenEval's rule on box
  centres, `world.relation_holds`); 1 when the prompt has no relation;
- "clean": no stray component, and specks cover at most `max_speck_frac` of the image;
- "strict": all of the above, GenEval's binary success. **Train on "strict"**; the others are
  the breakdown to log. `GenEvalLikeReward()` returns strict alone; `criteria="all"` returns
  every criterion, and `training_weights()` gives MultiReward weights that train on strict and
  log the rest.

Uniform noise, blank images and confetti of colour score 0: noise is mostly "other" pixels and
specks, a blank image matches no slot, and confetti is specks or strays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..rewards.base import Reward, fold_frames, frame_mean
from .world import BACKGROUND, COLOURS, PALETTE, Scene, SceneLike, as_scene, relation_holds, spec_from_prompt

Tensor = torch.Tensor

CRITERIA: Tuple[str, ...] = ("strict", "colour", "shape", "count", "relation", "clean")
MIN_IMAGE_SIZE = 16

_OTHER = len(COLOURS)  # class index of a non-background pixel of no palette colour
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclass(frozen=True)
class Blob:
    """One detected component: colour (None: no palette colour), shape (None: none of the three),
    area in pixels, box (x0, y0, x1, y1) with x1, y1 exclusive, fill and top (share of the area
    in the box's top half)."""

    colour: Optional[str]
    shape: Optional[str]
    area: int
    box: Tuple[int, int, int, int]
    fill: float
    top: float


@dataclass(frozen=True)
class Detection:
    """The blobs of one image (components of at least min_area pixels) and the share of the
    image covered by specks (smaller non-background components)."""

    blobs: Tuple[Blob, ...]
    speck_frac: float


# -------------------------------------------------------------------------------- pixels


def classify_pixels(images: Tensor, bg_tol: float = 0.25, line_tol: float = 0.3) -> Tuple[np.ndarray, np.ndarray]:
    """images [N, 3, H, W] in [0, 1] -> (classes, soft):

    - classes int64 [N, H, W]: -1 background, k the k-th colour of world.COLOURS, len(COLOURS)
      for "other" (not background, no palette colour);
    - soft float32 [N, H, W, K]: how far along the background-to-colour-k line each pixel is
      (its coverage by a colour-k shape), 0 where the pixel is off that line.
    """
    x = images.detach().to("cpu", torch.float32).permute(0, 2, 3, 1)
    bg = torch.tensor(BACKGROUND, dtype=torch.float32)
    lines = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32) - bg  # [K, 3]
    d = x - bg
    alpha = ((d @ lines.T) / (lines * lines).sum(1)).clamp(0, 1)  # [N, H, W, K]
    resid = (d.unsqueeze(-2) - alpha.unsqueeze(-1) * lines).norm(dim=-1)
    best_resid, best = resid.min(dim=-1)
    best_alpha = alpha.gather(-1, best.unsqueeze(-1)).squeeze(-1)
    away = d.norm(dim=-1) >= bg_tol
    cls = torch.full(best.shape, -1, dtype=torch.int64)
    on_line = best_resid < line_tol
    cls = torch.where(away & on_line & (best_alpha >= 0.5), best, cls)
    cls = torch.where(away & ~on_line, torch.full_like(best, _OTHER), cls)
    soft = torch.where(resid < line_tol, alpha, torch.zeros_like(alpha))
    return cls.numpy(), soft.numpy()


# ---------------------------------------------------------------------------- components


def _shifted(dy: int, dx: int, h: int, w: int):
    """(dst, src) slices over [N, H, W] such that src is dst's neighbour at (dy, dx)."""
    def axis(d, n):
        return (slice(0, n - d), slice(d, n)) if d >= 0 else (slice(-d, n), slice(0, n + d))
    (dy0, sy0), (dx0, sx0) = axis(dy, h), axis(dx, w)
    return (slice(None), dy0, dx0), (slice(None), sy0, sx0)


def label_components(classes: np.ndarray) -> np.ndarray:
    """Connected components (8-connectivity) of equal non-negative class in classes [N, H, W].
    Returns int64 [N, H, W]: -1 for class -1, else the flat index (over N*H*W) of the
    component's first pixel. Min-label propagation with pointer jumping, in numpy."""
    if classes.ndim != 3:
        raise ValueError(f"classes must be [N, H, W] (got shape {classes.shape})")
    n, h, w = classes.shape
    fg = classes >= 0
    big = n * h * w
    lab = np.where(fg, np.arange(big, dtype=np.int64).reshape(n, h, w), big)
    links = []
    for dy, dx in _NEIGHBOURS:
        dst, src = _shifted(dy, dx, h, w)
        links.append((dst, src, fg[dst] & (classes[dst] == classes[src])))
    while True:
        new = lab.copy()
        for dst, src, same in links:
            np.minimum(new[dst], np.where(same, lab[src], big), out=new[dst])
        flat = new.reshape(-1)
        on = flat < big
        flat[on] = flat[flat[on]]  # pointer jumping: a label is a pixel of the same component
        if np.array_equal(new, lab):
            return np.where(fg, lab, -1)
        lab = new


def shape_features(mass: np.ndarray, box: Tuple[int, int, int, int]) -> Tuple[float, float, float, float]:
    """(area, fill, top, aspect) of a component from its coverage `mass` [h, w] (a window around
    it; 0 outside it) and its pixel box (x0, y0, x1, y1) in window coordinates.

    Measured on coverage rather than on whole pixels, so that a small circle (whose pixels may
    form a square with its corners clipped) stays apart from a square:
    fill = area / (largest column sum * largest row sum): square 1, circle pi/4, upward triangle 1/2;
    aspect = largest row sum / largest column sum (~1 for all three);
    top = the share of the mass above the middle of the box (upward triangle ~1/4, else ~1/2).
    """
    area = float(mass.sum())
    col, row = float(mass.sum(0).max()), float(mass.sum(1).max())
    if area <= 0 or col <= 0 or row <= 0:
        return 0.0, 0.0, 0.5, 1.0
    mid = (box[1] + box[3]) / 2
    centres = np.arange(mass.shape[0]) + 0.5
    weights = (centres < mid) + 0.5 * (centres == mid)
    top = float((mass.sum(1) * weights).sum() / area)
    return area, area / (col * row), top, row / col


def classify_shape(fill: float, top: float, aspect: float) -> Optional[str]:
    """"circle", "square", "triangle" (pointing up) or None, from `shape_features`."""
    if not (0.7 <= aspect <= 1 / 0.7):
        return None
    level = 0.4 <= top <= 0.6
    if fill >= 0.9 and level:
        return "square"
    if 0.7 <= fill < 0.9 and level:
        return "circle"
    if 0.38 <= fill < 0.76 and top < 0.4:
        return "triangle"
    return None


def _boxes(inv: np.ndarray, xs: np.ndarray, ys: np.ndarray, k: int, w: int, h: int):
    """Pixel boxes (x0, y0, x1, y1), x1 and y1 exclusive, of k components given each pixel's
    component index `inv` and coordinates."""
    x0, y0 = np.full(k, w, dtype=np.int64), np.full(k, h, dtype=np.int64)
    x1, y1 = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    np.minimum.at(x0, inv, xs)
    np.minimum.at(y0, inv, ys)
    np.maximum.at(x1, inv, xs + 1)
    np.maximum.at(y1, inv, ys + 1)
    return x0, y0, x1, y1


def detect(images: Tensor, *, min_area_frac: float = 0.006, max_area_frac: float = 0.35,
           bg_tol: float = 0.25, line_tol: float = 0.3) -> List[Detection]:
    """The blobs of each image of images [N, 3, H, W] in [0, 1] (see the module docstring)."""
    check_images(images)
    n, _, h, w = images.shape
    classes, soft = classify_pixels(images, bg_tol, line_tol)
    labels = label_components(classes)
    fg = labels >= 0
    min_area = max(4, int(round(min_area_frac * h * w)))
    _, ys, xs = np.nonzero(fg)
    roots, inv, area = np.unique(labels[fg], return_inverse=True, return_counts=True)
    x0, y0, x1, y1 = _boxes(inv, xs, ys, len(roots), w, h)
    comp_img = roots // (h * w)
    comp_cls = classes.reshape(-1)[roots]
    blobs: List[List[Blob]] = [[] for _ in range(n)]
    specks = np.zeros(n)
    for j in range(len(roots)):
        i = int(comp_img[j])
        if area[j] < min_area:
            specks[i] += area[j]
            continue
        # A window one pixel around the box: the component's pixels and the unclassified edge
        # pixels next to it (anti-aliased coverage under 1/2), weighted by their coverage.
        wy0, wy1, wx0, wx1 = max(0, y0[j] - 1), min(h, y1[j] + 1), max(0, x0[j] - 1), min(w, x1[j] + 1)
        lab = labels[i, wy0:wy1, wx0:wx1]
        mine = lab == roots[j]
        if comp_cls[j] == _OTHER:
            colour, mass = None, mine.astype(np.float64)
        else:
            colour = COLOURS[comp_cls[j]]
            mass = soft[i, wy0:wy1, wx0:wx1, comp_cls[j]] * (mine | (lab < 0))
        box = (int(x0[j]), int(y0[j]), int(x1[j]), int(y1[j]))
        _, fill, top, aspect = shape_features(mass, (box[0] - wx0, box[1] - wy0, box[2] - wx0, box[3] - wy0))
        shape = None if area[j] > max_area_frac * h * w else classify_shape(fill, top, aspect)
        blobs[i].append(Blob(colour, shape, int(area[j]), box, fill, top))
    return [Detection(tuple(b), float(s / (h * w))) for b, s in zip(blobs, specks)]


# ------------------------------------------------------------------------------- scoring


def _match(blobs: Sequence[Blob], slots: Sequence[Tuple[str, str]]) -> Tuple[Dict[int, int], List[int], List[int]]:
    """Greedy slot matching: ({slot: blob}, extra blobs (score for some slot, unmatched), strays
    (score for none))."""
    def score(b, slot):
        return int(b.colour == slot[0]) + int(b.shape == slot[1])
    pairs = sorted((-score(b, s), si, bi) for si, s in enumerate(slots) for bi, b in enumerate(blobs)
                   if score(b, s) > 0)
    taken: Dict[int, int] = {}
    used = set()
    for _, si, bi in pairs:
        if si not in taken and bi not in used:
            taken[si] = bi
            used.add(bi)
    relevant = {bi for _, _, bi in pairs}
    extra = [bi for bi in sorted(relevant) if bi not in used]
    strays = [bi for bi in range(len(blobs)) if bi not in relevant]
    return taken, extra, strays


def score_detection(det: Detection, spec: SceneLike, *, max_speck_frac: float = 0.02,
                    relation_min_cos: float = 0.5) -> Dict[str, bool]:
    """Every criterion of CRITERIA for one image's detection against one scene."""
    scene = as_scene(spec)
    slots = [(o.colour, o.shape) for o in scene.objects for _ in range(o.count)]
    taken, extra, strays = _match(det.blobs, slots)
    matched = [(slots[si], det.blobs[bi]) for si, bi in taken.items()]
    out = {
        "colour": bool(matched) and all(b.colour == s[0] for s, b in matched),
        "shape": bool(matched) and all(b.shape == s[1] for s, b in matched),
        "count": len(taken) == len(slots) and not extra,
        "relation": True,
        "clean": not strays and det.speck_frac <= max_speck_frac,
    }
    if scene.relation is not None:
        out["relation"] = (0 in taken and 1 in taken
                           and relation_holds(det.blobs[taken[0]].box, det.blobs[taken[1]].box, scene.relation,
                                              relation_min_cos))
    out["strict"] = all(out.values())
    return {k: bool(out[k]) for k in CRITERIA}


def check_images(images, name: str = "images") -> None:
    """images must be a float tensor [N, 3, H, W] in [0, 1] with H, W >= MIN_IMAGE_SIZE."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, 3, H, W] (got {type(images).__name__})")
    if not images.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point in [0, 1] (got {images.dtype})")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3, H, W] (got {tuple(images.shape)})")
    if min(images.shape[2:]) < MIN_IMAGE_SIZE:
        raise ValueError(f"{name} must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels "
                         f"(got {images.shape[2]}x{images.shape[3]})")
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):
            raise ValueError(f"{name} must hold values in [0, 1] (got [{lo:.3g}, {hi:.3g}])")


def score_images(images: Tensor, specs: Sequence[SceneLike], **options) -> Dict[str, Tensor]:
    """{criterion: fp32 [N] of 0/1} for images [N, 3, H, W] in [0, 1] against one spec each
    (Scene, spec dict or caption). options: GenEvalLikeReward's thresholds."""
    check_images(images)
    if isinstance(specs, (str, Scene, Mapping)):
        raise TypeError("specs must be a sequence with one spec per image (got a single spec)")
    specs = list(specs)
    if len(specs) != images.shape[0]:
        raise ValueError(f"specs has {len(specs)} entries for {images.shape[0]} images")
    scenes = [as_scene(s, f"specs[{i}]") for i, s in enumerate(specs)]
    det_opts = {k: options[k] for k in ("min_area_frac", "max_area_frac", "bg_tol", "line_tol") if k in options}
    score_opts = {k: options[k] for k in ("max_speck_frac", "relation_min_cos") if k in options}
    unknown = set(options) - set(det_opts) - set(score_opts)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    rows = [score_detection(d, s, **score_opts) for d, s in zip(detect(images, **det_opts), scenes)]
    return {k: torch.tensor([float(r[k]) for r in rows], dtype=torch.float32) for k in CRITERIA}


# -------------------------------------------------------------------------------- reward


class GenEvalLikeReward(Reward):
    """The demo world's verifiable reward: 1 for an image that shows exactly the prompt's objects
    (colour, shape, count, relation, nothing else), else 0. Runs on the CPU.

    The scene of sample i is read from meta[i] when it holds one (a Scene, a `Scene.to_dict()`,
    or prompt metadata with it under "spec", as `world.prompt_sets` makes), else parsed from
    prompts[i].

    Args:
        criteria: "strict" (default) returns the strict success alone, a Tensor [N]; "all"
            returns {criterion: [N]} for every criterion of CRITERIA, strict first; a sequence of
            criterion names returns those. MultiReward logs each key as "<name>/<key>".
        min_area_frac: components smaller than this share of the image are specks.
        max_area_frac: components larger than this share of the image have no shape.
        max_speck_frac: the most speck area (share of the image) a clean image has.
        relation_min_cos: the direction cosine a relation needs (GenEval: 0.5).
        bg_tol, line_tol: pixel classification tolerances (RGB distance).
    """

    name = "geneval"
    input = "pixels"

    def __init__(self, criteria: Union[str, Sequence[str]] = "strict", *, min_area_frac: float = 0.006,
                 max_area_frac: float = 0.35, max_speck_frac: float = 0.02, relation_min_cos: float = 0.5,
                 bg_tol: float = 0.25, line_tol: float = 0.3, batch_size: Optional[int] = None,
                 name: Optional[str] = None):
        if isinstance(criteria, str):
            if criteria not in ("strict", "all"):
                raise ValueError(f"criteria must be 'strict', 'all' or a list of {', '.join(CRITERIA)} "
                                 f"(got {criteria!r})")
            self.keys: Optional[Tuple[str, ...]] = None if criteria == "strict" else CRITERIA
        else:
            keys = tuple(criteria)
            bad = [k for k in keys if k not in CRITERIA]
            if bad or not keys or len(set(keys)) != len(keys):
                raise ValueError(f"criteria must name distinct criteria among {', '.join(CRITERIA)} "
                                 f"(got {list(keys)})")
            self.keys = keys
        bounds = (("min_area_frac", min_area_frac, 0, 1), ("max_area_frac", max_area_frac, 0, 1),
                  ("max_speck_frac", max_speck_frac, 0, 1), ("relation_min_cos", relation_min_cos, 0, 1),
                  ("bg_tol", bg_tol, 0, 2), ("line_tol", line_tol, 0, 2))
        for arg, value, lo, hi in bounds:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
                raise ValueError(f"{arg} must be a number in [{lo}, {hi}] (got {value!r})")
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive int or None (got {batch_size!r})")
        self.options = dict(min_area_frac=min_area_frac, max_area_frac=max_area_frac, max_speck_frac=max_speck_frac,
                            relation_min_cos=relation_min_cos, bg_tol=bg_tol, line_tol=line_tol)
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        if name is not None:
            self.name = name

    def training_weights(self) -> Dict[str, float]:
        """MultiReward weights that train on strict and log the other criteria (weight 0)."""
        if self.keys is None:
            return {self.name: 1.0}
        if "strict" not in self.keys:
            raise ValueError(f"reward {self.name!r} does not return 'strict' (criteria {list(self.keys)})")
        return {self.name: 0.0, f"{self.name}/strict": 1.0}

    def scenes(self, prompts: Optional[Sequence[str]], meta: Any, n: int) -> List[Scene]:
        """The scene of each of n samples, from meta where it holds one, else from the prompt."""
        out = []
        for i in range(n):
            m = _meta_item(meta, i)
            if isinstance(m, Scene):
                out.append(m)
            elif isinstance(m, Mapping) and ("objects" in m or "spec" in m):
                try:
                    out.append(Scene.from_dict(m))
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"reward {self.name!r}: meta[{i}] holds a bad spec: {exc}") from None
            elif prompts is not None:
                try:
                    out.append(spec_from_prompt(prompts[i]))
                except ValueError as exc:
                    raise ValueError(f"reward {self.name!r} could not read prompts[{i}]: {exc}") from None
            else:
                raise ValueError(f"reward {self.name!r} needs a spec for sample {i}: pass prompts (demo captions) "
                                 "or meta with a 'spec' per sample (world.prompt_meta)")
        return out

    def forward(self, x: Tensor, prompts, meta):
        frames, f = fold_frames(x)
        scenes = [s for s in self.scenes(prompts, meta, x.shape[0]) for _ in range(f)]
        scores = score_images(frames, scenes, **self.options)
        scores = {k: frame_mean(v, f) for k, v in scores.items()}
        if self.keys is None:
            return scores["strict"]
        return {k: scores[k] for k in self.keys}


def _meta_item(meta, i: int):
    if meta is None:
        return None
    if isinstance(meta, Mapping):  # columns: a per-sample "spec" list, or one shared spec
        spec = meta.get("spec")
        if isinstance(spec, (list, tuple)):
            return spec[i]
        return meta if ("objects" in meta or isinstance(spec, Mapping)) else None
    return meta[i]
