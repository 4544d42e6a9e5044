"""Linear + cross-entropy over token chunks, never materializing full float32 logits.

    loss = Σ_t [lse(h_t Wᵀ + b) − (h_t Wᵀ + b)_{y_t}]      over tokens with y_t != ignore_index

hidden `(tokens, dim)`, weight `(vocab, dim)`, labels `(tokens,)`. The forward pass walks
`chunk_size` tokens at a time: it forms that chunk's logits in float32, takes its loss, and, when
a gradient is needed, also the gradient of the loss with respect to the chunk's logits,
`softmax − onehot`, which it turns at once into the chunk's d hidden and its share of d weight.
Peak extra memory is therefore one chunk of logits, not `tokens × vocab` (the fused linear
cross-entropy of Liger-Kernel; Megatron's vocab-parallel variant lives in `dist/`).

`reduction="sum"` returns the summed loss (callers that shard tokens across ranks divide by the
global token count themselves, which keeps the mean exact); `"mean"` divides by the number of
labelled tokens here. Paths: this PyTorch one and `kernels/cross_entropy_triton.py`.
"""

from __future__ import annotations

import torch

from ctxscale.kernels.dispatch import forced_path, log_choice, want_triton

DEFAULT_CHUNK = 4096
# Auto chunk: at most this many logits (128 MiB of float32) per chunk: big enough that the
# matmuls (and the per-chunk grad_weight update) stay efficient, small next to full logits.
CHUNK_LOGITS = 1 << 25


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk: CHUNK_LOGITS // vocab, clamped to [256, DEFAULT_CHUNK]."""
    return min(DEFAULT_CHUNK, max(256, CHUNK_LOGITS // max(vocab_size, 1)))


def cross_entropy_reference(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="sum"):
    """Full-logits reference (for tests)."""
    logits = (hidden.float() @ weight.float().t())
    if bias is not None:
        logits = logits + bias.float()
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum().clamp(min=1)
    return loss


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk_size, needs_grad):
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        grad_bias = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if needs_grad and bias is not None
            else None
        )
        w32 = weight if weight.dtype == torch.float32 else None
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size]
            y = labels[start : start + chunk_size]
            logits = (h @ weight.t()).float() if w32 is None else h.float() @ w32.t()
            if bias is not None:
                logits += bias.float()
            valid = y != ignore_index
            safe_y = torch.where(valid, y, 0).unsqueeze(1)
            picked = logits.gather(1, safe_y).squeeze(1)
            # In place on the chunk's logits (one buffer, few passes over it): exp(logits − max),
            # its row sums give lse, and scaling rows by valid/sum turns it into softmax on
            # labelled rows and 0 elsewhere.
            row_max = logits.amax(dim=1, keepdim=True)
            logits.sub_(row_max).exp_()
            row_sum = logits.sum(dim=1, keepdim=True)
            lse = (row_max + row_sum.log()).squeeze(1)
            total = total + torch.where(valid, lse - picked, 0.0).sum()
            if needs_grad:
                # d loss / d logits = softmax − onehot on labelled rows, 0 elsewhere.
                vf = valid.to(logits.dtype).unsqueeze(1)
                probs = logits.mul_(vf / row_sum)
                probs.scatter_add_(1, safe_y, -vf)
                g = probs.to(hidden.dtype)
                grad_hidden[start : start + chunk_size] = g @ weight
                grad_weight.addmm_(probs.t(), h.float())
                if grad_bias is not None:
                    grad_bias += probs.sum(0)
            del logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("chunked_cross_entropy ran without gradients but backward was called")
        gh = grad_hidden * grad_out.to(grad_hidden.dtype)
        gw = (grad_weight * grad_out).to(ctx.weight_dtype)
        gb = (grad_bias * grad_out).to(ctx.weight_dtype) if ctx.has_bias else None
        return gh, gw, gb, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels` (see module docstring).
    `chunk_size` (tokens per chunk) defaults to CHUNK_LOGITS // vocab, within [256, 4096]."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be (tokens, dim) and labels (tokens,); got {tuple(hidden.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if chunk_size is None:
        chunk_size = auto_chunk_size(weight.shape[0])
    forced = forced_path("cross_entropy")
    if bias is None and (forced == "triton" or (forced is None and want_triton(hidden.device))):
        from ctxscale.kernels import cross_entropy_triton

        log_choice("cross_entropy", "triton")
        return cross_entropy_triton.chunked_cross_entropy(
            hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
            chunk_size=chunk_size,
        )
    log_choice("cross_entropy", "torch")
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    loss = _ChunkedCrossEntropy.apply(
        hidden, weight, bias, labels, ignore_index, chunk_size, needs_grad
    )
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum().clamp(min=1)
    return loss
