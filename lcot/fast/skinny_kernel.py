"""The Triton kernels of lcot.fast.skinny (imported only where Triton runs: a CUDA device, or its CPU interpreter).

`skinny_kernel`: one program computes BN outputs of y = x W^T (+ bias) (+ scale * t U^T) for all M <= BM rows
of x: it streams its BN rows of W once, in BK-wide tiles, and folds LoRA's expand product into the same
accumulator, so a plain projection is one kernel and an adapted one two. t = xa A^T (LoRA's shrink product of the
dropped-out input xa) comes as partial sums over slices of K from `shrink_kernel`, one program per slice, which
the expand sums first: the shrink is then one short kernel, not cuBLAS's split-K product and its reduction.
fp32 accumulation; fp32 inputs multiply exactly (input precision "ieee", no TF32).
"""

import torch
import triton
import triton.language as tl

BM = 16  # rows of a tile (tl.dot's smallest): lcot.fast.skinny.MAX_ROWS


@triton.jit
def shrink_kernel(xa_ptr, a_ptr, p_ptr, M, K, R, stride_xa, stride_a, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
                  BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """Program s: the partial product xa[:, slice s of K] A[:, slice s]^T, (BM, BR) fp32, into p[s]."""
    s = tl.program_id(0)
    rm, rr, rk = tl.arange(0, BM), tl.arange(0, BR), tl.arange(0, BK)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(s * CHUNK, s * CHUNK + CHUNK, BK):
        inside = (k0 + rk) < K
        xs = tl.load(xa_ptr + rm[:, None] * stride_xa + (k0 + rk)[None, :], mask=(rm[:, None] < M) & inside[None, :],
                     other=0.0)
        As = tl.load(a_ptr + rr[:, None] * stride_a + (k0 + rk)[None, :], mask=(rr[:, None] < R) & inside[None, :],
                     other=0.0)
        acc = tl.dot(xs, tl.trans(As), acc, input_precision=PRECISION)
    tl.store(p_ptr + s * BM * BR + rm[:, None] * BR + rr[None, :], acc)


@triton.jit
def skinny_kernel(x_ptr, w_ptr, b_ptr, p_ptr, u_ptr, y_ptr, M, N, K, R, SPLITS, scale,
                  stride_x, stride_w, stride_u, stride_y,
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
        t = tl.zeros((BM, BR), dtype=tl.float32)
        for s in range(SPLITS):  # the shrink's partial sums (rows past M are zeros, not read)
            t += tl.load(p_ptr + s * BM * BR + rm[:, None] * BR + rr[None, :], mask=rows[:, None], other=0.0)
        us = tl.load(u_ptr + rn[:, None] * stride_u + rr[None, :], mask=cols[:, None] & (rr[None, :] < R), other=0.0)
        acc += scale * tl.dot(t.to(us.dtype), tl.trans(us), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=cols, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rows[:, None] & cols[None, :])


def launch(x, w, bias, xa, a, u, scale: float, out, config: tuple[int, int, int, int]) -> None:
    """out (M, N) = x W^T + bias + scale * (xa a^T) u^T, from x and xa (M, K), w (N, K), bias (N,) or None, a (R, K)
    and u (N, R) or None (no adapter); config = (BN, BK, num_warps, num_stages) of the main kernel."""
    m, k = x.shape
    n = w.shape[0]
    bn, bk, warps, stages = config
    lora = a is not None
    r = a.shape[0] if lora else 16
    br = max(16, triton.next_power_of_2(r))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    splits, partial = 0, out
    if lora:
        chunk = max(128, triton.next_power_of_2(triton.cdiv(k, 32)))
        splits = triton.cdiv(k, chunk)
        partial = torch.empty(splits, BM, br, dtype=torch.float32, device=x.device)
        shrink_kernel[(splits,)](xa, a, partial, m, k, r, xa.stride(0), a.stride(0), CHUNK=chunk,
                                 PRECISION=precision, BM=BM, BR=br, BK=min(chunk, 128), num_warps=4)
    skinny_kernel[(triton.cdiv(n, bn),)](
        x, w, bias if bias is not None else w, partial, u if lora else w, out, m, n, k, r, splits, float(scale),
        x.stride(0), w.stride(0), u.stride(0) if lora else 0, out.stride(0),
        HAS_BIAS=bias is not None, HAS_LORA=lora, EVEN_K=k % bk == 0, PRECISION=precision,
        BM=BM, BN=bn, BK=bk, BR=br, num_warps=warps, num_stages=stages)
