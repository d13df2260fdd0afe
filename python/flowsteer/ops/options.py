"""The options of one SDE step, declared once.

`sde_step` checks its arguments and builds one SdeOptions; everything below it passes that object
along. The registered torch ops take it as two flat lists (`to_op` / `from_op`: the dispatcher
needs plain ints and floats), the compiled core as keywords of the same names (its field list is
FLOWSTEER_SDE_OPTIONS in csrc/include/flowsteer/sde_args.h), and the Triton and torch backends
read its attributes. Adding an option: a field here, a line in FLOWSTEER_SDE_OPTIONS, and the
kernels and reference that use it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Tuple


@dataclass(frozen=True)
class SdeOptions:
    """kind: codes.KIND_CODE; noise_level: a (Flow-GRPO's noise_level, DanceGRPO's eta);
    sigma_max: Flow-GRPO's sigma~ at sigma == 1; seed, offset: the Philox stream of drawn noise;
    lp_form: codes.LP_FORM (0 Gaussian, 1 Flow-GRPO's cps form); kl_form: codes.KL_FORM (0 none);
    reduce_mean: mean (else sum) over a sample's elements; lp_guided: the log-prob under the
    guided mean."""

    kind: int
    noise_level: float
    sigma_max: float = 0.0
    seed: int = 0
    offset: int = 0
    lp_form: int = 0
    kl_form: int = 0
    reduce_mean: bool = True
    lp_guided: bool = False

    def to_op(self) -> Tuple[List[int], List[float]]:
        """(ints, floats) in field order, for a registered op's list arguments."""
        ints = [int(getattr(self, f.name)) for f in _INT_FIELDS]
        return ints, [float(getattr(self, f.name)) for f in _FLOAT_FIELDS]

    @classmethod
    def from_op(cls, ints: List[int], floats: List[float]) -> Tuple["SdeOptions", List[int]]:
        """The options and the ints after them (the op's own flags)."""
        n = len(_INT_FIELDS)
        values = {f.name: (bool(v) if f.type in ("bool", bool) else int(v)) for f, v in zip(_INT_FIELDS, ints[:n])}
        values.update({f.name: float(v) for f, v in zip(_FLOAT_FIELDS, floats)})
        return cls(**values), [int(v) for v in ints[n:]]

    def keywords(self) -> dict:
        """The options as the compiled core's keyword arguments."""
        return dataclasses.asdict(self)


_FIELDS = dataclasses.fields(SdeOptions)
_FLOAT_FIELDS = [f for f in _FIELDS if f.type in ("float", float)]
_INT_FIELDS = [f for f in _FIELDS if f not in _FLOAT_FIELDS]
