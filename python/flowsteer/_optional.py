"""Optional dependencies: one import helper whose error names the extra to install and what needs it.

A base install (`pip install flowsteer`) has torch, numpy, pyyaml, safetensors and tqdm. The rest
comes with the extras of pyproject.toml's [project.optional-dependencies]:

| extra | installs | needed by |
|---|---|---|
| `diffusers` | diffusers, transformers | pipelines, `flowsteer train`, `flowsteer bench`, `flowsteer.testing` |
| `rewards` | transformers, Pillow | the CLIP-family rewards (transformers); JPEG rewards and PNG transport (Pillow) |
| `lora` | peft | LoRA: `model.lora`, diffusers' `add_adapter` |
| `plot` | matplotlib | `flowsteer plot` |
| `demo` | peft, matplotlib | `flowsteer demo` (its default recipe trains LoRA; its figures) |
| `triton` | triton | the Triton kernels |

This module imports nothing heavy: `flowsteer --help` loads it without torch.
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Optional

# The import name of each optional module -> (its pip name, the extra of flowsteer that installs it).
KNOWN = {
    "diffusers": ("diffusers", "diffusers"),
    "transformers": ("transformers", "diffusers"),
    "PIL": ("Pillow", "rewards"),
    "peft": ("peft", "lora"),
    "matplotlib": ("matplotlib", "plot"),
    "triton": ("triton", "triton"),
    "open_clip": ("open_clip_torch", None),
    "pytesseract": ("pytesseract", None),
}


# Modules whose import name is not the name people know them by.
_SHOWN = {"PIL": "Pillow (PIL)"}


class MissingDependency(ModuleNotFoundError):
    """An optional dependency is missing (or fails to import); the message says what to install."""


def install_hint(module: str, extra: Optional[str] = None) -> str:
    """The pip command that installs `module`: the flowsteer extra when there is one."""
    pip_name, default_extra = KNOWN.get(module.split(".")[0], (module.split(".")[0], None))
    extra = default_extra if extra is None else extra
    if extra:
        return f"pip install 'flowsteer[{extra}]' (from a source checkout: pip install '.[{extra}]')"
    return f"pip install {pip_name}"


def require(module: str, extra: Optional[str], what: str, *, hint: str = "") -> ModuleType:
    """Import and return `module`, or raise MissingDependency (an ImportError) saying that `what`
    needs it and how to install it: the flowsteer `extra` (None: the extra KNOWN lists, else the
    plain pip package). `hint` is appended (another way out, a system package to add).

        Image = require("PIL.Image", "rewards", "JpegCompressibility (JPEG encoding)")
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        root = module.split(".")[0]
        shown = _SHOWN.get(root, root)
        missing = getattr(exc, "name", None)
        if isinstance(exc, ModuleNotFoundError) and missing in (root, module, None):
            problem = f"{what} needs {shown}, which is not installed"
        else:  # installed, but it (or something it imports) fails to import
            problem = f"{what} needs {shown}, which is installed but fails to import ({type(exc).__name__}: {exc})"
        message = f"{problem}: {install_hint(module, extra)}"
        if hint:
            message += f"; {hint}"
        raise MissingDependency(message, name=root) from None


def available(module: str) -> bool:
    """Whether `module` imports (without raising)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------- harmless warnings


class _TorchvisionFallbackFilter(logging.Filter):
    """transformers 5 warns "`CLIPImageProcessor` requires torchvision (not installed); falling back
    to `CLIPImageProcessorPil`" (and the same for SiglipImageProcessor) when diffusers' SD3 and FLUX
    pipeline modules import those processor classes for IP-Adapter image encoders. flowsteer never
    uses those processors (its reward preprocessing is its own, in torch), and the PIL fallback is
    what transformers 4 used anyway: the warning says nothing a flowsteer user can act on."""

    _CLASSES = ("CLIPImageProcessor", "SiglipImageProcessor")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not ("requires torchvision (not installed); falling back to" in msg
                    and any(f"`{name}`" in msg for name in self._CLASSES))


_FILTER = _TorchvisionFallbackFilter()


def silence_harmless_warnings() -> None:
    """Install the filter above on the transformers logger that emits it (idempotent; imports
    nothing). Other transformers warnings, and these for other classes, still show."""
    log = logging.getLogger("transformers.utils.import_utils")
    if _FILTER not in log.filters:
        log.addFilter(_FILTER)
