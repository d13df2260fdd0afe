"""The OCR (text rendering) reward of Flow-GRPO.

The target is the text between the first pair of double quotes in the prompt (or meta["text"]).
Recognised and target text are lower-cased with spaces removed; the distance is 0 when the target
occurs in the recognised text, else their Levenshtein distance, capped at the target's length;
the reward is 1 - distance / len(target), in [0, 1]. An engine failure scores 0, as in Flow-GRPO.
Videos [N, 3, F, H, W] average over frames.
"""
from __future__ import annotations

import re
import warnings
from typing import Callable, List, Optional, Union

import numpy as np
import torch

from .base import Reward, fold_frames, frame_mean, to_uint8_hwc

ENGINES = ("tesseract", "paddleocr", "easyocr")
_INSTALL = {
    "tesseract": "pip install pytesseract Pillow, plus the tesseract binary (apt-get install tesseract-ocr)",
    "paddleocr": "pip install paddleocr paddlepaddle",
    "easyocr": "pip install easyocr",
}


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_similarity(recognized: str, target: str) -> float:
    """Flow-GRPO's score: 1 - min(d, len(target)) / len(target), d = 0 if target is in recognized."""
    rec = recognized.replace(" ", "").lower()
    tgt = target.replace(" ", "").lower()
    if not tgt:
        raise ValueError("the OCR target text is empty")
    dist = 0 if tgt in rec else levenshtein(rec, tgt)
    return 1.0 - min(dist, len(tgt)) / len(tgt)


_QUOTED = re.compile(r'"([^"]*)"')


def target_text(prompt: str) -> Optional[str]:
    """The text between the first pair of double quotes, or None."""
    m = _QUOTED.search(prompt)
    return m.group(1) if m else None


def _tesseract(lang: str):
    import pytesseract
    from PIL import Image

    pytesseract.get_tesseract_version()  # raises when the binary is missing
    return lambda arr: pytesseract.image_to_string(Image.fromarray(arr), lang=lang)


def _paddleocr(model_dir: Optional[str], use_gpu: bool):
    from paddleocr import PaddleOCR

    kwargs = dict(use_angle_cls=False, lang="en", use_gpu=use_gpu, show_log=False)
    if model_dir is not None:
        kwargs.update(det_model_dir=f"{model_dir}/det", rec_model_dir=f"{model_dir}/rec")
    ocr = PaddleOCR(**kwargs)

    def read(arr):  # Flow-GRPO's reading of PaddleOCR 2.x results: lines with positive confidence
        result = ocr.ocr(arr, cls=False)
        return "".join(res[1][0] if res[1][1] > 0 else "" for res in result[0]) if result and result[0] else ""

    return read


def _easyocr(model_dir: Optional[str], use_gpu: bool):
    import easyocr

    if model_dir is None:
        raise TypeError("OCRReward(engine='easyocr') needs model_dir=DIR holding EasyOCR's detector and recognizer "
                        "weights; flowsteer never downloads weights")
    reader = easyocr.Reader(["en"], gpu=use_gpu, model_storage_directory=model_dir, download_enabled=False)
    return lambda arr: "".join(reader.readtext(arr, detail=0))


def load_engine(engine: str, *, lang: str = "eng", model_dir: Optional[str] = None, use_gpu: bool = False):
    """An OCR function uint8 [H, W, 3] -> str for `engine` ("auto": the first installed of ENGINES)."""
    if engine == "auto":
        errors = []
        for name in ENGINES:
            try:
                return name, load_engine(name, lang=lang, model_dir=model_dir, use_gpu=use_gpu)[1]
            except ImportError as exc:
                errors.append(f"{name}: {exc}")
        raise ImportError("OCRReward needs an OCR engine and none is installed; install one of: "
                          + "; ".join(_INSTALL[n] for n in ENGINES) + " (" + " | ".join(errors) + ")")
    if engine not in ENGINES:
        raise ValueError(f"engine must be 'auto', one of {ENGINES} or a callable (got {engine!r})")
    try:
        if engine == "tesseract":
            return engine, _tesseract(lang)
        if engine == "paddleocr":
            return engine, _paddleocr(model_dir, use_gpu)
        return engine, _easyocr(model_dir, use_gpu)
    except ImportError as exc:
        raise ImportError(f"OCRReward(engine={engine!r}) needs {_INSTALL[engine]} ({exc})") from None
    except EnvironmentError as exc:  # pytesseract.TesseractNotFoundError
        raise ImportError(f"OCRReward(engine={engine!r}) needs {_INSTALL[engine]} ({exc})") from None


class OCRReward(Reward):
    """Text-rendering accuracy against the quoted text of each prompt.

    Args:
        engine: "auto", "tesseract", "paddleocr", "easyocr", or a callable uint8 [H, W, 3] -> str.
        model_dir: local weights for paddleocr (DIR/det, DIR/rec) or easyocr.
    meta may carry the targets instead of the quotes: {"text": [N strings]}, or a list of N dicts
    with a "text" key.
    """

    name = "ocr"
    input = "pixels"

    def __init__(self, engine: Union[str, Callable[[np.ndarray], str]] = "auto", *, lang: str = "eng",
                 model_dir: Optional[str] = None, use_gpu: bool = False, batch_size: Optional[int] = None,
                 name: str = "ocr"):
        if callable(engine):
            self.engine_name, self.read = getattr(engine, "__name__", "custom"), engine
        else:
            self.engine_name, self.read = load_engine(engine, lang=lang, model_dir=model_dir, use_gpu=use_gpu)
        self.name = name
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        self.failures = 0

    def _targets(self, prompts, meta, n: int) -> List[str]:
        texts = meta.get("text") if isinstance(meta, dict) else None
        if isinstance(meta, list) and meta and all(isinstance(m, dict) and "text" in m for m in meta):
            texts = [m["text"] for m in meta]
        if texts is not None:
            return [str(t) for t in texts]
        if prompts is None:
            raise ValueError(f"reward {self.name!r} needs prompts with the target text in double quotes, "
                             "or meta={'text': [...]}")
        out = []
        for i, p in enumerate(prompts):
            t = target_text(p)
            if not t or not t.replace(" ", ""):
                raise ValueError(f"reward {self.name!r}: prompt {i} has no text in double quotes to render "
                                 f"(got {p!r}); quote the target text or pass meta={{'text': [...]}}")
            out.append(t)
        return out

    def forward(self, x, prompts, meta):
        frames, f = fold_frames(x)
        targets = self._targets(prompts, meta, x.shape[0])
        scores = []
        for k, arr in enumerate(to_uint8_hwc(frames)):
            try:
                text = self.read(np.ascontiguousarray(arr))
            except Exception as exc:  # Flow-GRPO: an engine failure gets the maximum penalty
                self.failures += 1
                warnings.warn(f"reward {self.name!r}: OCR engine {self.engine_name!r} failed on sample "
                              f"{k // f} ({type(exc).__name__}: {exc}); scored 0", RuntimeWarning, stacklevel=2)
                text = ""
            scores.append(ocr_similarity(text, targets[k // f]))
        return frame_mean(torch.tensor(scores, dtype=torch.float32), f)
