"""FlashAttention-2 forward and backward Triton kernels ("FlashAttention-2: Faster Attention with Better Parallelism and
Work Partitioning", Dao, 2023): tiled online softmax, log-sum-exp saved for a backward that recomputes probabilities.

Masks: causal (query i sees key j when j <= i + causal_offset), key padding [B, S], or a dense bool mask
[B or 1, H or 1, L, S]; grouped-query attention reads each key/value head once per query head of its group.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ..launch import LaunchConfig, launch

LOG2E = 1.4426950408889634


# fmt: off
# Kernel signatures are kept dense, a few parameters per line, as in the rest of the Triton ecosystem.
@triton.jit
def _allowed(keep, rows, cols, key_padding, mask, segment_start, prefix_len, stride_pn, stride_mm, stride_mn, q_len,
             kv_len, causal_offset, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KEY_PADDING: tl.constexpr,
             HAS_MASK: tl.constexpr, PART: tl.constexpr):
    # rows and cols broadcast against each other: [M, 1] x [1, N] (forward, dq) or [1, M] x [N, 1] (dk/dv).
    # PART selects the prefix-grouped rule (see hf_eff.kernels.prefix_grouped): 1 = prefix keys, 2 = keys of the
    # query's own completion, 3 = both; 0 = plain attention.
    if EDGE:
        keep = keep & (cols < kv_len)
        if IS_CAUSAL:
            keep = keep & (cols <= rows + causal_offset)
        if PART != 0:
            own_start = tl.load(segment_start + rows, mask=rows < q_len, other=q_len)
            if PART == 1:
                keep = keep & (cols < prefix_len)
            elif PART == 2:
                keep = keep & (cols >= prefix_len) & (cols >= own_start)
            else:
                keep = keep & ((cols < prefix_len) | (cols >= own_start))
    if HAS_KEY_PADDING:
        keep = keep & (tl.load(key_padding + cols * stride_pn, mask=cols < kv_len, other=0) != 0)
    if HAS_MASK:
        in_bounds = (rows < q_len) & (cols < kv_len)
        keep = keep & (tl.load(mask + rows * stride_mm + cols * stride_mn, mask=in_bounds, other=0) != 0)
    return keep


@triton.jit
def _forward_blocks(acc, m_i, l_i, q, k_ptrs, v_ptrs, key_padding, mask, segment_start, prefix_len, offs_m, offs_n,
                    offs_d, lo, hi,
                    stride_kn, stride_vn, stride_pn, stride_mm, stride_mn, q_len, kv_len, causal_offset, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KEY_PADDING: tl.constexpr,
                    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, PART: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if EDGE:
            col_ok = cols < kv_len
            k_t = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k_t = tl.load(k_ptrs + start_n * stride_kn)
            v = tl.load(v_ptrs + start_n * stride_vn)
        else:
            k_t = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        if EDGE or HAS_KEY_PADDING or HAS_MASK:
            keep = _allowed(tl.full([BLOCK_M, BLOCK_N], 1, tl.int1), offs_m[:, None], cols[None, :], key_padding,
                            mask, segment_start, prefix_len, stride_pn, stride_mm, stride_mn, q_len, kv_len,
                            causal_offset, EDGE, IS_CAUSAL, HAS_KEY_PADDING, HAS_MASK, PART)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps exp2 at exactly 0
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _key_range(start_m, kv_len, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr):
    """Keys of a query block: [0, full) seen in full by every row (no causal or bounds test), [full, hi) tested."""
    if IS_CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), kv_len)
        full = tl.minimum(tl.maximum(start_m + causal_offset + 1, 0), kv_len)
    else:
        hi = kv_len
        full = kv_len
    return (full // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _forward_kernel(Q, K, V, Out, Lse, KeyPadding, Mask,
                    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                    stride_pb, stride_pn, stride_mb, stride_mh, stride_mm, stride_mn,
                    num_heads, group_size, q_len, kv_len, causal_offset, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_KEY_PADDING: tl.constexpr, HAS_MASK: tl.constexpr,
                    PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    kv_head = head // group_size
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < q_len

    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = K + batch * stride_kb + kv_head * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    key_padding = KeyPadding + batch * stride_pb
    mask = Mask + batch * stride_mb + head * stride_mh

    full, hi = _key_range(start_m, kv_len, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _forward_blocks(acc, m_i, l_i, q, k_ptrs, v_ptrs, key_padding, mask, Lse, 0, offs_m, offs_n, offs_d,
                                    0, full, stride_kn, stride_vn, stride_pn, stride_mm, stride_mn, q_len, kv_len,
                                    causal_offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, IS_CAUSAL,
                                    HAS_KEY_PADDING, HAS_MASK, PRECISION, 0)
    acc, m_i, l_i = _forward_blocks(acc, m_i, l_i, q, k_ptrs, v_ptrs, key_padding, mask, Lse, 0, offs_m, offs_n, offs_d,
                                    full, hi, stride_kn, stride_vn, stride_pn, stride_mm, stride_mn, q_len, kv_len,
                                    causal_offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, IS_CAUSAL,
                                    HAS_KEY_PADDING, HAS_MASK, PRECISION, 0)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    # +inf for rows without any visible key: the backward's exp2(s - lse) is then exactly 0 there
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + batch_head * q_len + offs_m, lse, mask=row_ok)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, key_padding, mask, segment_start, prefix_len, cols,
                 offs_m, offs_d, lo, hi,
                 stride_qm, stride_dom, stride_pn, stride_mm, stride_mn, q_len, kv_len, causal_offset, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, HAS_KEY_PADDING: tl.constexpr, HAS_MASK: tl.constexpr,
                 PRECISION: tl.constexpr, PART: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < q_len
        q = tl.load(q_ptrs + start_m * stride_qm, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_ptrs + start_m * stride_dom, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # rows past the end get lse = +inf, hence probability 0, and need no further test
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if EDGE or HAS_KEY_PADDING or HAS_MASK:
            keep = _allowed(tl.full([BLOCK_N, BLOCK_M], 1, tl.int1), rows[None, :], cols[:, None], key_padding,
                            mask, segment_start, prefix_len, stride_pn, stride_mm, stride_mn, q_len, kv_len,
                            causal_offset, EDGE, IS_CAUSAL, HAS_KEY_PADDING, HAS_MASK, PART)
            p_t = tl.where(keep, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, Lse, Delta, KeyPadding, Mask,
                 stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                 stride_pb, stride_pn, stride_mb, stride_mh, stride_mm, stride_mn,
                 num_heads, num_kv_heads, group_size, q_len, kv_len, causal_offset, qk_scale, scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, HAS_KEY_PADDING: tl.constexpr, HAS_MASK: tl.constexpr,
                 PRECISION: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    batch_head = tl.program_id(1)
    batch = (batch_head // num_kv_heads).to(tl.int64)
    kv_head = (batch_head % num_kv_heads).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = cols < kv_len

    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)

    if IS_CAUSAL:
        lo = tl.minimum(tl.maximum(start_n - causal_offset, 0), q_len)
        lo = (lo // BLOCK_M) * BLOCK_M
        full = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), q_len)
        # query blocks from here on see every key of this block: no causal test
        full = ((full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    key_padding = KeyPadding + batch * stride_pb
    for member in range(0, group_size):
        head = kv_head * group_size + member
        q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        do_ptrs = (DO + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dom
                   + offs_d[None, :] * stride_dod)
        lse_ptr = Lse + (batch * num_heads + head) * q_len
        delta_ptr = Delta + (batch * num_heads + head) * q_len
        mask = Mask + batch * stride_mb + head * stride_mh
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, key_padding, mask, Lse, 0, cols,
                              offs_m, offs_d, lo, full, stride_qm, stride_dom, stride_pn, stride_mm, stride_mn, q_len, kv_len,
                              causal_offset, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, True, IS_CAUSAL, HAS_KEY_PADDING,
                              HAS_MASK, PRECISION, 0)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, key_padding, mask, Lse, 0, cols,
                              offs_m, offs_d, full, q_len, stride_qm, stride_dom, stride_pn, stride_mm, stride_mn, q_len,
                              kv_len, causal_offset, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, False, IS_CAUSAL,
                              HAS_KEY_PADDING, HAS_MASK, PRECISION, 0)

    tl.store(DK + batch * stride_dkb + kv_head * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + batch * stride_dvb + kv_head * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_ptrs, v_ptrs, key_padding, mask, segment_start, prefix_len, offs_m, offs_n,
               offs_d, lo, hi,
               stride_kn, stride_vn, stride_pn, stride_mm, stride_mn, q_len, kv_len, causal_offset, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KEY_PADDING: tl.constexpr, HAS_MASK: tl.constexpr,
               PRECISION: tl.constexpr, PART: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if EDGE:
            kv_mask = (cols < kv_len)[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptrs + start_n * stride_kn)
            v = tl.load(v_ptrs + start_n * stride_vn)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=d_ok[None, :], other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if EDGE or HAS_KEY_PADDING or HAS_MASK:
            keep = _allowed(tl.full([BLOCK_M, BLOCK_N], 1, tl.int1), offs_m[:, None], cols[None, :], key_padding,
                            mask, segment_start, prefix_len, stride_pn, stride_mm, stride_mn, q_len, kv_len,
                            causal_offset, EDGE, IS_CAUSAL, HAS_KEY_PADDING, HAS_MASK, PART)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, Lse, Delta, KeyPadding, Mask,
               stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
               stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
               stride_dqb, stride_dqh, stride_dqm, stride_dqd,
               stride_pb, stride_pn, stride_mb, stride_mh, stride_mm, stride_mn,
               num_heads, group_size, q_len, kv_len, causal_offset, qk_scale, scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_KEY_PADDING: tl.constexpr, HAS_MASK: tl.constexpr,
               PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    kv_head = head // group_size
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < q_len
    tile_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=tile_mask, other=0.0)
    do = tl.load(DO + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=tile_mask, other=0.0)
    lse = tl.load(Lse + batch_head * q_len + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + batch_head * q_len + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    key_padding = KeyPadding + batch * stride_pb
    mask = Mask + batch * stride_mb + head * stride_mh

    full, hi = _key_range(start_m, kv_len, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_blocks(dq, q, do, lse, delta, k_ptrs, v_ptrs, key_padding, mask, Lse, 0, offs_m, offs_n, offs_d, 0, full,
                    stride_kn, stride_vn, stride_pn, stride_mm, stride_mn, q_len, kv_len, causal_offset, qk_scale,
                    HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, IS_CAUSAL, HAS_KEY_PADDING, HAS_MASK, PRECISION, 0)
    dq = _dq_blocks(dq, q, do, lse, delta, k_ptrs, v_ptrs, key_padding, mask, Lse, 0, offs_m, offs_n, offs_d, full, hi,
                    stride_kn, stride_vn, stride_pn, stride_mm, stride_mn, q_len, kv_len, causal_offset, qk_scale,
                    HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, IS_CAUSAL, HAS_KEY_PADDING, HAS_MASK, PRECISION, 0)
    tl.store(DQ + batch * stride_dqb + head * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=tile_mask)
# fmt: on


INTERPRETED = isinstance(_forward_kernel, InterpretedFunction)

# The interpreter costs ~1 ms per program instance whatever its size: one small tile serves every head dim on CPU.
_CPU_LADDER = (LaunchConfig(16, 32),)


def _gpu_ladder(kind: str, block_d: int, dtype: torch.dtype) -> tuple[LaunchConfig, ...]:
    """Tile sizes tried in order until one fits the GPU's shared memory (largest first)."""
    if dtype == torch.float32 or block_d > 128:
        return (LaunchConfig(64, 32, 4, 2), LaunchConfig(32, 32, 4, 1), LaunchConfig(16, 16, 4, 1))
    # First rungs: the tiles with the fewest register spills that ptxas (sm_90a) reported for bf16 in a sweep of
    # compiled candidates; the later rungs only matter on GPUs with less shared memory.
    if block_d > 64:
        ladders = {
            "forward": (LaunchConfig(128, 32, 8, 3), LaunchConfig(64, 32, 4, 2), LaunchConfig(32, 32, 4, 1)),
            # dk/dv: a program owns BLOCK_N keys and walks over BLOCK_M queries; dq the other way round
            "dkdv": (LaunchConfig(32, 64, 8, 3), LaunchConfig(32, 64, 4, 2), LaunchConfig(16, 32, 4, 1)),
            "dq": (LaunchConfig(64, 64, 8, 3), LaunchConfig(64, 32, 4, 2), LaunchConfig(32, 16, 4, 1)),
        }
    else:
        ladders = {
            "forward": (LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 2), LaunchConfig(32, 32, 4, 1)),
            "dkdv": (LaunchConfig(32, 128, 8, 3), LaunchConfig(32, 64, 4, 2), LaunchConfig(16, 32, 4, 1)),
            "dq": (LaunchConfig(128, 32, 8, 3), LaunchConfig(64, 32, 4, 2), LaunchConfig(32, 16, 4, 1)),
        }
    return ladders[kind]


def _ladder(kind: str, block_d: int, dtype: torch.dtype, device: torch.device) -> tuple[LaunchConfig, ...]:
    return _CPU_LADDER if device.type == "cpu" else _gpu_ladder(kind, block_d, dtype)


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get float32 products (GPUs would otherwise round operands to tf32)
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(tensor: torch.Tensor | None, placeholder: torch.Tensor, dims: int) -> tuple:
    """A mask (viewed as uint8) and its strides, or a never-read placeholder pointer with zero strides."""
    if tensor is None:
        return (placeholder, *([0] * dims))
    as_bytes = tensor.view(torch.uint8)
    return (as_bytes, *as_bytes.stride())


def attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    causal: bool,
    causal_offset: int,
    key_padding_mask: torch.Tensor | None,
    dense_mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward kernel: output [B, L, Hq, D] (contiguous, query dtype) and log2-sum-exp2 [B, Hq, L]."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    out = torch.empty(batch, q_len, heads, head_dim, dtype=query.dtype, device=query.device).transpose(1, 2)
    lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=query.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    padding_args = _mask_args(key_padding_mask, query, 2)
    mask_args = _dense_args(dense_mask, query)
    args = (
        query, key, value, out, lse, padding_args[0], mask_args[0],
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        *padding_args[1:], *mask_args[1:],
        heads, heads // kv_heads, q_len, kv_len, causal_offset, scale * LOG2E,
    )  # fmt: skip
    constants = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, IS_CAUSAL=causal, HAS_KEY_PADDING=key_padding_mask is not None,
        HAS_MASK=dense_mask is not None, PRECISION=_precision(query.dtype),
    )  # fmt: skip
    launch(
        _forward_kernel, ("forward", block_d, query.dtype, query.device.index),
        _ladder("forward", block_d, query.dtype, query.device),
        lambda config: (triton.cdiv(q_len, config.block_m), batch * heads), args, constants,
    )  # fmt: skip
    return out, lse


def _dense_args(mask: torch.Tensor | None, placeholder: torch.Tensor) -> tuple:
    """Dense bool mask [B|1, H|1, L, S] as uint8 with its strides; a size-1 batch or head dimension gets stride 0."""
    if mask is None:
        return (placeholder, 0, 0, 0, 0)
    as_bytes = mask.view(torch.uint8)
    strides = [0 if size == 1 else stride for size, stride in zip(as_bytes.shape[:2], as_bytes.stride()[:2])]
    return (as_bytes, *strides, *as_bytes.stride()[2:])


def attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    causal_offset: int,
    key_padding_mask: torch.Tensor | None,
    dense_mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the dk/dv and dq kernels; gradients come back in the inputs' dtypes and layouts."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    block_d = max(16, triton.next_power_of_2(head_dim))
    # delta_i = sum_d dO_id * O_id, the row term of the softmax backward
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    grad_query = torch.empty_like(query)
    grad_key = torch.empty_like(key)
    grad_value = torch.empty_like(value)
    padding_args = _mask_args(key_padding_mask, query, 2)
    mask_args = _dense_args(dense_mask, query)
    constants = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, IS_CAUSAL=causal, HAS_KEY_PADDING=key_padding_mask is not None,
        HAS_MASK=dense_mask is not None, PRECISION=_precision(query.dtype),
    )  # fmt: skip
    dkdv_args = (
        query, key, value, grad_out, grad_key, grad_value, lse, delta, padding_args[0], mask_args[0],
        *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *grad_key.stride(), *grad_value.stride(),
        *padding_args[1:], *mask_args[1:],
        heads, kv_heads, heads // kv_heads, q_len, kv_len, causal_offset, scale * LOG2E, scale,
    )  # fmt: skip
    launch(
        _dkdv_kernel, ("dkdv", block_d, query.dtype, query.device.index),
        _ladder("dkdv", block_d, query.dtype, query.device),
        lambda config: (triton.cdiv(kv_len, config.block_n), batch * kv_heads), dkdv_args, constants,
    )  # fmt: skip
    dq_args = (
        query, key, value, grad_out, grad_query, lse, delta, padding_args[0], mask_args[0],
        *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *grad_query.stride(),
        *padding_args[1:], *mask_args[1:],
        heads, heads // kv_heads, q_len, kv_len, causal_offset, scale * LOG2E, scale,
    )  # fmt: skip
    launch(
        _dq_kernel, ("dq", block_d, query.dtype, query.device.index),
        _ladder("dq", block_d, query.dtype, query.device),
        lambda config: (triton.cdiv(q_len, config.block_m), batch * heads), dq_args, constants,
    )  # fmt: skip
    return grad_query, grad_key, grad_value


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
