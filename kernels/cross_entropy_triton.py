"""Fused linear + cross-entropy over token chunks in Triton (never the full float32 logits).

The fused linear cross-entropy of Liger-Kernel (Hsu et al., "Liger Kernel: Efficient Triton
Kernels for LLM Training", 2024): the gradient of the loss with respect to the logits is formed in
the forward pass, chunk by chunk, and immediately contracted with the weight and the hidden states.

    z = h Wᵀ   (per chunk of C tokens: (C, V)),   loss_t = logsumexp(z_t) − z_t[y_t]
    d loss / d z_t = softmax(z_t) − onehot(y_t)      (0 on rows with y_t == ignore_index)
    d h_chunk = (d z) W,        d W += (d z)ᵀ h_chunk

hidden `(tokens, dim)`, weight `(vocab, dim)`, labels `(tokens,)`. The two matmuls per chunk are
PyTorch (cuBLAS); the Triton kernel runs one program per row of the chunk: an online
max / sum-of-exp pass over the vocabulary in float32 tiles gives the row's lse and loss, and a
second pass overwrites the logits buffer in place with `scale · (softmax − onehot)`. Peak extra
memory is one `(chunk, vocab)` logits buffer in the input dtype plus a float32 dW accumulator.
Backward only multiplies the stored gradients by the incoming scalar gradient.

`reduction="sum"` returns the summed loss, `"mean"` divides by the number of labelled tokens.
The PyTorch path and dispatcher are `kernels/cross_entropy.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ctxscale.kernels.dispatch import triton_runnable
from ctxscale.kernels.triton_launch import INTERPRET

DEFAULT_CHUNK = 4096


@triton.jit
def _ce_rows_kernel(Z, LABELS, LOSS, stride_z, vocab, ignore_index, grad_scale,
                    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    label = tl.load(LABELS + row)
    offs = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, vocab, BLOCK_V):
                cols = start + offs
                tl.store(z_row + cols, tl.zeros([BLOCK_V], dtype=tl.float32).to(Z.dtype.element_ty),
                         mask=cols < vocab)
    else:
        m = float("-inf")
        s = 0.0
        for start in range(0, vocab, BLOCK_V):
            cols = start + offs
            z = tl.load(z_row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        z_label = tl.load(z_row + label).to(tl.float32)
        tl.store(LOSS + row, lse - z_label)
        if COMPUTE_GRAD:
            for start in range(0, vocab, BLOCK_V):
                cols = start + offs
                z = tl.load(z_row + cols, mask=cols < vocab, other=0.0).to(tl.float32)
                g = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
                tl.store(z_row + cols, (g * grad_scale).to(Z.dtype.element_ty), mask=cols < vocab)


def _block_v(vocab: int) -> int:
    if INTERPRET:
        return min(64, triton.next_power_of_2(vocab))
    return min(4096, triton.next_power_of_2(vocab))


def _rows_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, grad_scale: float,
               compute_grad: bool) -> torch.Tensor:
    """Per-row loss (float32); with `compute_grad`, logits are overwritten by d loss / d logits."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block_v = _block_v(vocab)
        _ce_rows_kernel[(rows,)](
            logits, labels, loss, logits.stride(0), vocab, ignore_index, grad_scale,
            COMPUTE_GRAD=compute_grad, BLOCK_V=block_v,
            num_warps=1 if INTERPRET else (16 if block_v >= 4096 else 8))
    return loss


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, needs_grad):
        n = hidden.shape[0]
        labels = labels.contiguous()
        n_valid = int((labels != ignore_index).sum())
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size]
            logits = (h @ weight.t()).contiguous()  # (C, V) in the input dtype
            total += _rows_loss(logits, labels[start : start + chunk_size], ignore_index, scale,
                                needs_grad).sum()
            if needs_grad:
                grad_hidden[start : start + chunk_size] = logits @ weight
                if grad_weight.dtype == logits.dtype:
                    grad_weight.addmm_(logits.t(), h)
                else:
                    grad_weight += (logits.t() @ h).float()
            del logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("chunked_cross_entropy ran without gradients but backward was called")
        gh = grad_hidden * grad_out.to(grad_hidden.dtype)
        gw = (grad_weight * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          ignore_index: int = -100, reduction: str = "sum",
                          chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels` (see the module docstring).
    hidden `(tokens, dim)`, weight `(vocab, dim)`, labels `(tokens,)` int64. Returns a float32
    scalar; differentiable in hidden and weight."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            "hidden must be (tokens, dim), weight (vocab, dim) and labels (tokens,); got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden dim {hidden.shape[1]} != weight dim {weight.shape[1]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not triton_runnable(hidden.device):
        raise RuntimeError(
            "the Triton cross-entropy needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "ctxscale.kernels.cross_entropy_triton is imported"
        )
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction,
                                          int(chunk_size), needs_grad)


__all__ = ["chunked_cross_entropy"]
