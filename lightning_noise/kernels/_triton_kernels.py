"""The Triton kernels, as plain functions: :mod:`lightning_noise.kernels._triton` applies
``triton.jit`` to them at first use, so that ``TRITON_INTERPRET`` is read when a kernel is
first needed rather than when this package is imported.

Every kernel works on a ``[n_rows, n_cols]`` matrix whose columns are contiguous (rows may be
strided), one tile of ``BLOCK_R`` rows per program, looping over the columns in blocks of
``BLOCK_C``. All arithmetic is in float32; loads upcast and stores cast to the output's type.

Softmax uses the online normaliser of Milakov and Gimelshein (2018, arXiv:1805.02867): one
sweep keeps the running maximum ``m`` and the running sum ``d = sum exp(x - m)``, rescaling
``d`` by ``exp(m_old - m_new)`` whenever the maximum grows, so the normaliser costs one read of
the row instead of two. When a row fits in one block (``SINGLE``) it is read once in all.

Cross-entropy reads the logits once in forward (the same online sweep, plus the row sum for
label smoothing and MaxSup's mean, the arg-max for MaxSup's top-1 penalty and one load of the
target logit) and stores three numbers per row; backward reads the logits once more and
writes their gradient, with no other ``[n_rows, n_cols]`` buffer. Per row, with ``lse`` the
log-partition, ``eps`` the label smoothing, ``alpha`` MaxSup's weight and ``zl`` the z-loss
weight::

    loss = (1 - eps) * (lse - x_y) + eps * (lse - mean x) + alpha * (max x - mean x)
           + zl * lse ** 2
    dloss/dx_j = p_j * (1 + 2 * zl * lse) - (eps + alpha) / C + alpha * [j = argmax]
                 - (1 - eps) * [j = y]
"""

from __future__ import annotations

import triton.language as tl

__all__ = ["ce_backward", "ce_forward", "softmax_backward", "softmax_forward"]


def softmax_forward(
    X,
    Y,
    n_rows,
    n_cols,
    stride_x,
    stride_y,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SINGLE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    y_rows = Y + rows.to(tl.int64)[:, None] * stride_y
    if SINGLE:
        cols = tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)  # padding rows: no -inf - -inf
        e = tl.exp(x - m[:, None])
        y = e / tl.where(row_ok, tl.sum(e, axis=1), 1.0)[:, None]
        tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        d = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, n_cols, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            x = tl.load(x_rows + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
            m = m_new
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        d = tl.where(row_ok, d, 1.0)
        for start in range(0, n_cols, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            x = tl.load(x_rows + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            y = tl.exp(x - m_ref[:, None]) / d[:, None]
            tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def softmax_backward(
    Y,
    DY,
    DX,
    n_rows,
    n_cols,
    stride_y,
    stride_dy,
    stride_dx,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SINGLE: tl.constexpr,
):
    # dx = y * (dy - sum_k y_k dy_k)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    r64 = rows.to(tl.int64)[:, None]
    if SINGLE:
        cols = tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        y = tl.load(Y + r64 * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(y * dy, axis=1)
        dx = y * (dy - dot[:, None])
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    else:
        dot = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, n_cols, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            y = tl.load(Y + r64 * stride_y + cols[None, :], mask=mask, other=0.0)
            dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0)
            dot += tl.sum(y.to(tl.float32) * dy.to(tl.float32), axis=1)
        for start in range(0, n_cols, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            y = tl.load(Y + r64 * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0)
            dx = y * (dy.to(tl.float32) - dot[:, None])
            tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


def ce_forward(
    X,
    T,
    LOSS,
    LSE,
    AMAX,
    n_rows,
    n_cols,
    stride_x,
    ignore_index,
    eps,
    alpha,
    zl,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NEED_MEAN: tl.constexpr,
    NEED_AMAX: tl.constexpr,
):
    # NEED_MEAN (label smoothing or MaxSup) and NEED_AMAX (MaxSup) are compile-time flags: a
    # plain cross-entropy compiles without the row sum and the arg-max.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_R], tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    amax = tl.zeros([BLOCK_R], tl.int32)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=1)
        if NEED_AMAX:
            # NaN read as -inf for the arg-max only (the loss stays NaN): the interpreter's
            # argmax (NumPy's nanargmax) fails on an all-NaN block.
            arg = tl.argmax(tl.where(x == x, x, float("-inf")), axis=1).to(tl.int32) + start
            # Strictly greater: the first maximum wins, like torch.max.
            amax = tl.where(block_max > m, arg, amax)
        m_new = tl.maximum(m, block_max)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
        m = m_new
        if NEED_MEAN:
            total += tl.sum(tl.where(mask, x, 0.0), axis=1)
    target = tl.load(T + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (target != ignore_index)
    safe_target = tl.where(valid, target, 0).to(tl.int64)
    x_y = tl.load(X + rows.to(tl.int64) * stride_x + safe_target, mask=valid, other=0.0)
    m = tl.where(row_ok, m, 0.0)  # padding rows stay finite
    log_d = tl.log(tl.where(row_ok, d, 1.0))
    lse = m + log_d
    mean = total / n_cols
    # Differences to the maximum first: exact for logits of magnitude 1e4.
    # A term whose weight is 0 is left out, not multiplied by 0: with a -inf logit (mean -inf)
    # or an lse that overflows, 0 * inf would make a finite or +inf loss NaN.
    loss = (1.0 - eps) * (m - x_y.to(tl.float32)) + tl.where(eps > 0.0, eps * (m - mean), 0.0)
    loss += log_d
    loss += tl.where(alpha > 0.0, alpha * (m - mean), 0.0)
    loss += tl.where(zl > 0.0, zl * lse * lse, 0.0)
    tl.store(LOSS + rows, tl.where(valid, loss, 0.0), mask=row_ok)
    tl.store(LSE + rows, lse, mask=row_ok)
    tl.store(AMAX + rows, amax, mask=row_ok)


def ce_backward(
    X,
    T,
    LSE,
    AMAX,
    G,
    DX,
    n_rows,
    n_cols,
    stride_x,
    stride_dx,
    ignore_index,
    eps,
    alpha,
    zl,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NEED_AMAX: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    r64 = rows.to(tl.int64)[:, None]
    target = tl.load(T + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (target != ignore_index)
    safe_target = tl.where(valid, target, -1).to(tl.int32)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    amax = tl.load(AMAX + rows, mask=row_ok, other=-1)
    g = tl.where(valid, tl.load(G + rows, mask=row_ok, other=0.0).to(tl.float32), 0.0)
    scale = 1.0 + 2.0 * zl * lse
    shift = (eps + alpha) / n_cols
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse[:, None]) * scale[:, None] - shift
        if NEED_AMAX:
            grad += tl.where(cols[None, :] == amax[:, None], alpha, 0.0)
        grad -= tl.where(cols[None, :] == safe_target[:, None], 1.0 - eps, 0.0)
        grad = grad * g[:, None]
        tl.store(DX + r64 * stride_dx + cols[None, :], grad.to(DX.dtype.element_ty), mask=mask)
