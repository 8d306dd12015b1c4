"""The Triton kernel of lcot.core.skinny (imported only where Triton runs: a CUDA device, or its CPU interpreter).

One program computes BN outputs of y = x W^T (+ bias) (+ scale * t U^T) for all M <= BM rows of x: it streams its
BN rows of W once, in BK-wide tiles, and folds LoRA's expand product (t = dropout(x) A^T, U = LoRA's B) into the
same accumulator, so an adapted projection is one kernel. fp32 accumulation; fp32 inputs multiply exactly
(input precision "ieee", no TF32).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def skinny_kernel(x_ptr, w_ptr, b_ptr, t_ptr, u_ptr, y_ptr, M, N, K, R, scale,
                  stride_x, stride_w, stride_t, stride_u, stride_y,
                  HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    rows, cols = rm < M, rn < N
    xp = x_ptr + rm[:, None] * stride_x + rk[None, :]
    wp = w_ptr + rn[:, None] * stride_w + rk[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            xs = tl.load(xp, mask=rows[:, None], other=0.0)
            ws = tl.load(wp, mask=cols[:, None], other=0.0)
        else:
            inside = (k0 + rk) < K
            xs = tl.load(xp, mask=rows[:, None] & inside[None, :], other=0.0)
            ws = tl.load(wp, mask=cols[:, None] & inside[None, :], other=0.0)
        acc = tl.dot(xs, tl.trans(ws), acc, input_precision=PRECISION)
        xp += BK
        wp += BK
    if HAS_LORA:
        rr = tl.arange(0, BR)
        ts = tl.load(t_ptr + rm[:, None] * stride_t + rr[None, :], mask=rows[:, None] & (rr[None, :] < R), other=0.0)
        us = tl.load(u_ptr + rn[:, None] * stride_u + rr[None, :], mask=cols[:, None] & (rr[None, :] < R), other=0.0)
        acc += scale * tl.dot(ts, tl.trans(us), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=cols, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rows[:, None] & cols[None, :])


def launch(x, w, bias, t, u, scale: float, out, config: tuple[int, int, int, int]) -> None:
    """y = out (M, N) from x (M, K), w (N, K), bias (N,) or None, t (M, R) and u (N, R) or None; config =
    (BN, BK, num_warps, num_stages)."""
    m, k = x.shape
    n = w.shape[0]
    bn, bk, warps, stages = config
    lora = t is not None
    r = t.shape[1] if lora else 16
    fp32 = x.dtype == w.dtype == torch.float32
    skinny_kernel[(triton.cdiv(n, bn),)](
        x, w, bias if bias is not None else w, t if lora else x, u if lora else w, out, m, n, k, r, float(scale),
        x.stride(0), w.stride(0), t.stride(0) if lora else 0, u.stride(0) if lora else 0, out.stride(0),
        HAS_BIAS=bias is not None, HAS_LORA=lora, EVEN_K=k % bk == 0, PRECISION="ieee" if fp32 else "tf32",
        BM=16, BN=bn, BK=bk, BR=max(16, triton.next_power_of_2(r)), num_warps=warps, num_stages=stages)
