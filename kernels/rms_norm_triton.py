"""Fused RMSNorm forward and backward in Triton.

Paper: Zhang & Sennrich, "Root Mean Square Layer Normalization" (NeurIPS 2019).

    r = 1 / sqrt(mean_d(x²) + eps),   n = cast_to_x_dtype(x · r),   y = weight · n

with the normalization in float32 and the cast before the weight multiply, exactly as Hugging Face
Llama's `LlamaRMSNorm` (so a converted model gives the same numbers). The output dtype is
`promote(x.dtype, weight.dtype)`, like the PyTorch expression. Backward (the cast is the identity
for gradients), with x̂ = x · r and g = dy · weight:

    dx = r · (g − x̂ · mean_d(g · x̂)),       dweight = Σ_rows dy · n

Layout: x `(..., dim)` viewed as rows `(N, dim)`, weight `(dim,)`. The forward kernel handles
ROWS rows per program, one row in registers (dim padded to a power of two) and stores r (float32,
one per row) for the backward; the backward kernel walks a contiguous range of rows per program,
writing dx and a float32 partial dweight per program, summed afterwards (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ctxscale.kernels.dispatch import multiprocessor_count, triton_runnable
from ctxscale.kernels.triton_launch import INTERPRET

MAX_DIM = 65536


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, n_rows, dim, eps,
                    ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    c_mask = cols < dim
    w = tl.load(W + cols, mask=c_mask, other=0.0).to(tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < n_rows:
            base = row.to(tl.int64) * dim
            x_raw = tl.load(X + base + cols, mask=c_mask, other=0.0)
            x = x_raw.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / dim + eps)
            normed = (x * rstd).to(x_raw.dtype).to(tl.float32)  # HF: cast before the weight
            tl.store(Y + base + cols, (normed * w).to(Y.dtype.element_ty), mask=c_mask)
            tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd_kernel(X, W, DY, RSTD, DX, DW_PARTIAL, n_rows, dim, rows_per_program,
                    BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    c_mask = cols < dim
    w = tl.load(W + cols, mask=c_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    base = row_start.to(tl.int64) * dim
    for row in range(row_start, row_end):
        x_raw = tl.load(X + base + cols, mask=c_mask, other=0.0)
        x = x_raw.to(tl.float32)
        dy = tl.load(DY + base + cols, mask=c_mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        dw += dy * x_hat.to(x_raw.dtype).to(tl.float32)
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, 0) / dim))
        tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=c_mask)
        base += dim
    tl.store(DW_PARTIAL + pid.to(tl.int64) * dim + cols, dw, mask=c_mask)


def _num_warps(block_d: int) -> int:
    return 1 if INTERPRET else min(16, max(1, block_d // 256))


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm needs weight of shape (dim,) = ({x.shape[-1]},) for x {tuple(x.shape)}; got "
            f"{tuple(weight.shape)}"
        )
    if x.shape[-1] > MAX_DIM:
        raise ValueError(f"the Triton RMSNorm keeps a row in registers: dim must be <= {MAX_DIM}")
    if not triton_runnable(x.device):
        raise RuntimeError(
            "the Triton RMSNorm needs a CUDA tensor, or TRITON_INTERPRET=1 set before "
            "ctxscale.kernels.rms_norm_triton is imported"
        )


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n_rows, dim = x2.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(n_rows, dim, dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_d = triton.next_power_of_2(dim)
        rows = 1 if INTERPRET else (4 if dim <= 1024 else 1)
        if n_rows > 0:
            _rms_fwd_kernel[(triton.cdiv(n_rows, rows),)](
                x2, weight.contiguous(), y, rstd, n_rows, dim, float(eps),
                ROWS=rows, BLOCK_D=block_d, num_warps=_num_warps(block_d))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, dim = x2.shape
        dy2 = dy.reshape(n_rows, dim).contiguous()
        dx = torch.empty_like(x2)
        if INTERPRET:
            programs = min(n_rows, 4)
        else:
            programs = min(n_rows, 4 * multiprocessor_count(x2.device))
        programs = max(programs, 1)
        rows_per_program = triton.cdiv(max(n_rows, 1), programs)
        dw_partial = torch.zeros(programs, dim, dtype=torch.float32, device=x2.device)
        block_d = triton.next_power_of_2(dim)
        if n_rows > 0:
            _rms_bwd_kernel[(programs,)](
                x2, weight.contiguous(), dy2, rstd, dx, dw_partial, n_rows, dim, rows_per_program,
                BLOCK_D=block_d, num_warps=_num_warps(block_d))
        dw = dw_partial.sum(0).to(weight.dtype)
        return dx.reshape(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused RMSNorm: x `(..., dim)`, weight `(dim,)` -> `(..., dim)` in promote(x, weight) dtype."""
    _check(x, weight)
    return _RMSNorm.apply(x, weight, eps)


__all__ = ["rms_norm"]
