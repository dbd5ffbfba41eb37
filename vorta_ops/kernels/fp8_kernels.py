"""FP8 (e4m3) Triton code shared by the attention kernels: the e4m3 rounding, the per-row
quantiser, the K / V preparation pass, the online-softmax step and a dense FP8 attention kernel (the
``@triton.jit`` code only; launchers in ``fp8_triton.py``). The numerics are vorta_ops/fp8.py's
scheme: K smoothed by its head mean, per-token Q scales and one K scale per head (amax / 448), P in
e4m3 scaled by 448 (P_SCALE), per-channel V scales, fp32 accumulation.

The preparation pass (``_fp8_kv_prep_kernel``) writes, per program head, K as e4m3 rows and V as
e4m3 TRANSPOSED ([D, LP]: the reduction axis of P . V contiguous, which Hopper's
FP8 tensor-core instructions want for their second operand), both in a key order given by an
index table (the sliding tile's packed order; identity for dense attention). An attention kernel
then reads contiguous e4m3 blocks: half the bytes of bf16, no per-block quantisation work, and no
dependent index load in its inner loop. Measured on the H200 (Wan-14B 720p, aligned tiles): V in
rows instead of transposed doubles the sliding-tile kernel's time, and quantising K and V per key
block inside the loop instead of once quadruples it.

The softmax step (``_attend_e4m3``) takes the raw e4m3 dot products and one factor per query row
(Q's scale x K's head scale x softmax scale x log2 e): the row max is taken on the raw scores and
scaled once, and P = 448 * exp2(s * c - max) is one multiply-add and one exp2 per score (448 enters
as log2(448) subtracted from the max), which is why K has one scale per head.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _e4m3(x, EMULATE: tl.constexpr):
    """x (fp32) rounded to e4m3. EMULATE (the interpreter, whose conversion drops the carry when a
    value rounds up into the next power of two): the same grid in fp32 arithmetic (3 mantissa bits,
    subnormal step 2**-9, saturating at 448; ties away from zero, where the hardware rounds to even)."""
    if EMULATE:
        ax = tl.abs(x)
        step = tl.math.exp2(tl.math.floor(tl.math.log2(tl.maximum(ax, 0.015625))) - 3.0)
        r = tl.minimum(tl.math.floor(ax / step + 0.5) * step, 448.0)
        return tl.where(x < 0, -r, r)
    else:
        return x.to(tl.float8e4nv)


@triton.jit
def _quant_rows(x, EMULATE: tl.constexpr):
    """Rows of x to e4m3 with one scale per row (amax / 448; 1 for a row of zeros), as
    vorta_ops.fp8.quantize_rows: (x8, scale [R])."""
    xf = x.to(tl.float32)
    amax = tl.max(tl.abs(xf), 1)
    s = tl.where(amax > 1e-12, amax / 448.0, 1.0)
    return _e4m3(xf / s[:, None], EMULATE), s


@triton.jit
def _fp8_kv_prep_kernel(
    K, V, Src, Heads, KMean, KScale, VScale, K8, V8T,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    n_heads, H_ALL, N_SRC, LP,
    HEAD_DIM: tl.constexpr,
    HAS_SRC: tl.constexpr,  # Src: int32 [N_SRC] original position of each slot (-1: padding); else slot = position
    HAS_HEADS: tl.constexpr,  # program head i is head Heads[i] of k and v
    IDX64: tl.constexpr,
    EMULATE: tl.constexpr,  # interpreter: e4m3 rounding in fp32 arithmetic
    BLOCK: tl.constexpr,
):
    """One program: BLOCK slots of one (batch, program head). Writes K8 [B*n_heads, LP, D] e4m3 (K
    minus KMean, over the head's scale KScale [B, H_ALL]) and V8T [B*n_heads, D, LP] e4m3 (V over its
    channel scales VScale [B, H_ALL, D]); slots without a token (padding, or past N_SRC) get zeros."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = bh // n_heads
    off_h = bh % n_heads
    if HAS_HEADS:
        off_h = tl.load(Heads + off_h).to(tl.int32)
    slots = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    if HAS_SRC:
        pos = tl.load(Src + slots, mask=slots < N_SRC, other=-1)
    else:
        pos = tl.where(slots < N_SRC, slots, -1)
    valid = pos >= 0
    if IDX64:
        row = tl.maximum(pos, 0).to(tl.int64)
    else:
        row = tl.maximum(pos, 0)
    off_b64 = off_b.to(tl.int64)
    off_h64 = off_h.to(tl.int64)
    head_row = (off_b64 * H_ALL + off_h64) * HEAD_DIM
    k = tl.load(K + off_b64 * s_kb + off_h64 * s_kh + row[:, None] * s_kn + offs_d[None, :], mask=valid[:, None],
                other=0.0).to(tl.float32)
    k = tl.where(valid[:, None], k - tl.load(KMean + head_row + offs_d)[None, :], 0.0)
    k8 = _e4m3(k / tl.load(KScale + off_b64 * H_ALL + off_h64), EMULATE)
    v = tl.load(V + off_b64 * s_vb + off_h64 * s_vh + row[:, None] * s_vn + offs_d[None, :], mask=valid[:, None],
                other=0.0).to(tl.float32)
    v8 = _e4m3(v / tl.load(VScale + head_row + offs_d)[None, :], EMULATE)
    bh64 = bh.to(tl.int64)
    tl.store(K8 + bh64 * LP * HEAD_DIM + slots[:, None] * HEAD_DIM + offs_d[None, :], k8.to(K8.dtype.element_ty))
    tl.store(V8T + bh64 * HEAD_DIM * LP + offs_d[None, :] * LP + slots[:, None], v8.to(V8T.dtype.element_ty))


@triton.jit
def _scores_e4m3(q8, k8, FP8_UPCAST: tl.constexpr):
    """q8 [M, D] . k8 [N, D]^T in fp32 (both e4m3; the interpreter computes it in fp32)."""
    if FP8_UPCAST:
        return tl.dot(q8.to(tl.float32), tl.trans(k8.to(tl.float32)), input_precision="ieee")
    else:
        return tl.dot(q8, tl.trans(k8))


@triton.jit
def _attend_e4m3(v8t, s, c, m_i, l_i, acc, FP8_UPCAST: tl.constexpr):
    """One online-softmax step of the FP8 kernels. s: the block's raw e4m3 dot products [M, N] in fp32,
    masked keys -inf; c: the row's factor [M] (> 0: Q's scale x K's head scale x softmax scale x
    log2 e). P = 448 * exp2(s * c - max) (vorta_ops.fp8.P_SCALE, as log2(448) off the max: one
    multiply-add per score) is rounded to e4m3 and multiplies V, read as e4m3 [D, N] (transposed);
    l sums the same scaled P, so acc / l needs only V's channel scales at the end."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * c)  # c > 0: max(s) * c is max(s * c), one multiply per row
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * c[:, None] - (m_use - 8.807354922057604)[:, None])  # log2(448)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p8 = _e4m3(p, FP8_UPCAST)
    if FP8_UPCAST:
        acc = tl.dot(p8.to(tl.float32), tl.trans(v8t.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(p8, tl.trans(v8t), acc)
    return m_new, l_i, acc


@triton.jit
def _fp8_attn_kernel(
    Q, K8, KScale, V8T, VScale, O, Bias, Heads,
    s_qb, s_qh, s_qm,
    s_ob, s_oh, s_om,
    s_bias_b, s_bias_h,
    n_heads, H_ALL, M, N, LP, qk_scale,
    HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # Bias: fp32 additive key bias (0 / -inf), [B or 1, n_heads or 1, >= N]
    HAS_HEADS: tl.constexpr,  # program head i reads / writes head Heads[i] of Q and O
    IDX64: tl.constexpr,
    FP8_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Dense attention of BLOCK_M query rows of one (batch, program head) over the N keys prepared
    by _fp8_kv_prep_kernel (identity order). Q is quantised per row on load; rows with no valid key
    give 0."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = bh // n_heads
    prog_h = bh % n_heads
    off_h = prog_h
    if HAS_HEADS:
        off_h = tl.load(Heads + prog_h).to(tl.int32)
    off_b64 = off_b.to(tl.int64)
    off_h64 = off_h.to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if IDX64:
        rows = offs_m.to(tl.int64)
    else:
        rows = offs_m
    q = tl.load(Q + off_b64 * s_qb + off_h64 * s_qh + rows[:, None] * s_qm + offs_d[None, :],
                mask=(offs_m < M)[:, None], other=0.0)
    q8, q_s = _quant_rows(q, FP8_UPCAST)
    c = q_s * (tl.load(KScale + off_b64 * H_ALL + off_h64) * qk_scale)
    k_base = K8 + bh64 * LP * HEAD_DIM
    v_base = V8T + bh64 * HEAD_DIM * LP
    bias_base = Bias + off_b64 * s_bias_b + prog_h.to(tl.int64) * s_bias_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        k8 = tl.load(k_base + cols[:, None] * HEAD_DIM + offs_d[None, :])
        qk = _scores_e4m3(q8, k8, FP8_UPCAST)
        if HAS_BIAS:
            qk += tl.load(bias_base + cols, mask=cols < N, other=float("-inf"))[None, :]
        else:
            qk = tl.where((cols < N)[None, :], qk, float("-inf"))
        v8t = tl.load(v_base + offs_d[:, None] * LP + cols[None, :])
        m_i, l_i, acc = _attend_e4m3(v8t, qk, c, m_i, l_i, acc, FP8_UPCAST)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * tl.load(VScale + (off_b64 * H_ALL + off_h64) * HEAD_DIM + offs_d)[None, :] / l_i[:, None]
    tl.store(O + off_b64 * s_ob + off_h64 * s_oh + rows[:, None] * s_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m < M)[:, None])
