"""Triton kernel of the group-relative advantages: one program per group, all reward columns at once.

It computes what csrc/cpu/group_advantages.cpp computes for a group g = order[offsets[g] :
offsets[g + 1]]: per column k the mean and the (ddof 0) std in fp64, two passes over the group
(mean, then the centred sum of squares); z = (r - mean) / (std + eps) in fp64, rounded to fp32;
out = clip(sum_k w_k z_k), accumulated in fp32 in column order. A column whose rewards in the group
are all equal (min == max) contributes exactly 0. Groups larger than a tile are walked in tiles.
It launches with `enable_fp_fusion=False`, so no multiply-add is contracted and the result has the
CPU kernel's bits.
"""
import triton
import triton.language as tl

# Rows of one tile; the tile is [rows, next_power_of_2(K)] with at most _MAX_TILE elements. GRPO
# groups hold 8 to 24 samples, so one tile usually covers the group. Compiled for sm_90, 1024
# elements keep the kernel within 111 registers up to K = 64 (4096 spilled at K = 64).
_MAX_TILE = 1024
_MAX_ROWS = 128


@triton.jit
def _group_advantages_kernel(
    rewards_ptr, order_ptr, offsets_ptr, weights_ptr, global_std_ptr, out_ptr,
    K, eps, clip,
    STD_MODE: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr,
):
    group = tl.program_id(0)
    s0 = tl.load(offsets_ptr + group)
    s1 = tl.load(offsets_ptr + group + 1)
    count = (s1 - s0).to(tl.float64)
    cols = tl.arange(0, KP)
    col_ok = cols < K
    rows = tl.arange(0, BLOCK)

    # Pass 1: sum, min and max of every column.
    total = tl.zeros([KP], tl.float64)
    lo = tl.full([KP], float("inf"), tl.float32)
    hi = tl.full([KP], float("-inf"), tl.float32)
    for j0 in range(s0, s1, BLOCK):
        j = j0 + rows
        row_ok = j < s1
        sample = tl.load(order_ptr + j, mask=row_ok, other=0)
        m = row_ok[:, None] & col_ok[None, :]
        r = tl.load(rewards_ptr + sample[:, None] * K + cols[None, :], mask=m, other=0.0)
        total += tl.sum(r.to(tl.float64), axis=0)
        lo = tl.minimum(lo, tl.min(tl.where(m, r, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(m, r, float("-inf")), axis=0))
    mean = total / count

    # Pass 2: centred sum of squares.
    sq = tl.zeros([KP], tl.float64)
    if STD_MODE == 0:
        for j0 in range(s0, s1, BLOCK):
            j = j0 + rows
            row_ok = j < s1
            sample = tl.load(order_ptr + j, mask=row_ok, other=0)
            m = row_ok[:, None] & col_ok[None, :]
            r = tl.load(rewards_ptr + sample[:, None] * K + cols[None, :], mask=m, other=0.0)
            d = tl.where(m, r.to(tl.float64) - mean[None, :], 0.0)
            sq += tl.sum(d * d, axis=0)
        denom = tl.sqrt(sq / count) + tl.cast(eps, tl.float64)
    elif STD_MODE == 1:
        denom = tl.load(global_std_ptr + cols, mask=col_ok, other=1.0).to(tl.float64) + tl.cast(eps, tl.float64)
    else:
        denom = tl.full([KP], 1.0, tl.float64)
    degenerate = lo == hi
    w = tl.load(weights_ptr + cols, mask=col_ok, other=0.0)

    # Pass 3: sum_k w_k z_k in column order, then the clip.
    for j0 in range(s0, s1, BLOCK):
        j = j0 + rows
        row_ok = j < s1
        sample = tl.load(order_ptr + j, mask=row_ok, other=0)
        m = row_ok[:, None] & col_ok[None, :]
        r = tl.load(rewards_ptr + sample[:, None] * K + cols[None, :], mask=m, other=0.0)
        centred = r.to(tl.float64) - mean[None, :]
        if STD_MODE == 2:
            z = centred.to(tl.float32)
        else:
            z = (centred / denom[None, :]).to(tl.float32)
        term = tl.where(degenerate[None, :] | (~m), 0.0, w[None, :] * z)
        acc = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(KP):
            # One nonzero per row: the sum is exactly w_k z_k, added in the CPU code's order.
            acc = acc + tl.sum(tl.where(cols[None, :] == k, term, 0.0), axis=1)
        acc = tl.where(clip > 0.0, tl.minimum(tl.maximum(acc, -clip), clip), acc)
        tl.store(out_ptr + sample, acc, mask=row_ok)


def group_advantages(*, rewards, order, offsets, weights, global_std, out, std_mode: int, eps: float,
                     clip: float) -> None:
    """out[i] = clip(sum_k weights[k] z_g(rewards[i, k])) for every sample i of every group.

    rewards: fp32 [N, K]; order: int64 [N], sample indices grouped; offsets: int64 [G + 1], group g
    is order[offsets[g] : offsets[g + 1]]; weights: fp32 [K]; global_std: fp32 [K] (std_mode 1) or
    None; out: fp32 [N]. std_mode: 0 per group, 1 global, 2 none. clip <= 0: no clip.
    """
    num_groups = offsets.numel() - 1
    n, k = rewards.shape
    if num_groups <= 0 or n == 0:
        return
    if std_mode == 1 and global_std is None:
        raise ValueError("group_advantages: std_mode=1 (global) needs global_std (got None)")
    kp = triton.next_power_of_2(k)
    block = max(16, min(_MAX_ROWS, _MAX_TILE // kp))
    _group_advantages_kernel[(num_groups,)](
        rewards, order, offsets, weights, weights if global_std is None else global_std, out,
        k, float(eps), float(clip),
        STD_MODE=int(std_mode), BLOCK=block, KP=kp, num_warps=4, enable_fp_fusion=False,
    )


@triton.jit
def _win_rate_kernel(prefs_ptr, out_ptr, G, BG: tl.constexpr):
    # One program per group m: row i of prefs[m] without its diagonal, NaN counted as a tie.
    m = tl.program_id(0)
    i = tl.arange(0, BG)
    j = tl.arange(0, BG)
    ok = (i[:, None] < G) & (j[None, :] < G) & (i[:, None] != j[None, :])
    p = tl.load(prefs_ptr + m * G * G + i[:, None] * G + j[None, :], mask=ok, other=0.0)
    p = tl.where(p != p, 0.5, p)
    total = tl.sum(tl.where(ok, p, 0.0), axis=1)
    tl.store(out_ptr + m * G + i, total / (G - 1).to(tl.float32), mask=i < G)


def win_rate(*, prefs, out) -> None:
    """out[m, i] = mean over j != i of prefs[m, i, j], NaN counted as 0.5. prefs fp32 [M, G, G]."""
    m, g, _ = prefs.shape
    if m == 0:
        return
    _win_rate_kernel[(m,)](prefs, out, g, BG=max(16, triton.next_power_of_2(g)), num_warps=4)


@triton.jit
def _pareto_kernel(rewards_ptr, order_ptr, offsets_ptr, out_ptr, K, BS: tl.constexpr):
    # One program per group: all pairs (i, j) of the group at once, column by column.
    group = tl.program_id(0)
    s0 = tl.load(offsets_ptr + group)
    s1 = tl.load(offsets_ptr + group + 1)
    r = tl.arange(0, BS)
    ok = s0 + r < s1
    sample = tl.load(order_ptr + s0 + r, mask=ok, other=0)
    all_ge = ok[:, None] & ok[None, :]  # [i, j]: j >= i so far
    any_gt = tl.zeros([BS, BS], tl.int1)
    for k in range(K):
        x = tl.load(rewards_ptr + sample * K + k, mask=ok, other=0.0)
        all_ge = all_ge & (x[None, :] >= x[:, None])
        any_gt = any_gt | (x[None, :] > x[:, None])
    dominated = tl.max((all_ge & any_gt).to(tl.int32), axis=1)
    tl.store(out_ptr + sample, (1 - dominated).to(tl.uint8), mask=ok)


def pareto_mask(*, rewards, order, offsets, out, max_group: int) -> None:
    """out[i] = 1 where no sample of i's group dominates it. rewards fp32 [N, K]; order, offsets as
    in group_advantages; out uint8 [N]; max_group: the largest group's size."""
    num_groups = offsets.numel() - 1
    n, k = rewards.shape
    if num_groups <= 0 or n == 0:
        return
    _pareto_kernel[(num_groups,)](rewards, order, offsets, out, k, BS=max(16, triton.next_power_of_2(max_group)),
                                  num_warps=4)
