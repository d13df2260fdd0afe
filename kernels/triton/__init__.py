"""Triton kernels of flowsteer, installed as the package `flowsteer._triton`.

`sde_step` holds the fused SDE step (forward and backward) and the Philox normals;
`group_advantages` the segmented group z-scores. `_common` transcribes the math of
csrc/include/flowsteer/ (Philox, Box-Muller, step coefficients), which Triton cannot include.
"""
