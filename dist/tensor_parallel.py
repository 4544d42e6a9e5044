"""Tensor parallelism with sequence parallelism (Megatron-LM; Shoeybi et al. 2019, Korthikanti et
al. 2022 "Reducing Activation Recomputation in Large Transformer Models").

With `tp` ranks, per Transformer block (x: `(batch, seq, dim)`):

    x_s            (batch, seq/tp, dim)   residual stream, sharded on the sequence (SP)
    n = norm(x_s)                         norm on the sequence shard, weight replicated
    n_full = all_gather_seq(n)            (backward: reduce-scatter)
    q,k,v = n_full · W_{q,k,v}[:, shard]  column-parallel: heads/tp query and kv heads per rank
    o = attention(q, k, v)                local heads only (composes with context parallelism)
    x_s += reduce_scatter_seq(o · W_o[shard, :])      row-parallel, partial sums reduced
    same for the MLP: w1, w3 column-parallel, w2 row-parallel

The embedding is vocabulary-parallel (rows of the table sharded, masked lookups summed with a
reduce-scatter onto the sequence shards), the output projection is column-parallel on the
vocabulary, and the loss is the vocabulary-parallel cross-entropy `vocab_parallel_cross_entropy`,
which never gathers the logits: per token chunk each rank forms its `(chunk, vocab/tp)` logits and
the ranks all-reduce three numbers per token, the max, the sum of exp and the target logit:

    m = max_r max_j z_rj,   s = Σ_r Σ_j exp(z_rj − m),   loss = m + log s − z_y

d loss / d z_r = softmax_r − onehot_r stays local; d hidden is a partial sum over tp ranks (its
reduction is the reduce-scatter of the sequence-parallel all-gather's backward).

Weights are `DTensor`s on the `tp` mesh (`torch.distributed.tensor.parallel`); activations
between modules are local tensors. Requirements: heads, kv heads and the vocabulary divisible by
tp, and the local sequence (seq / cp) divisible by tp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ctxscale.dist import comm

DEFAULT_CHUNK = 4096


# ----------------------------------------------------------------------------- validation
TP_FAMILY_MESSAGE = (
    "parallel.tp={tp} with model.family={family}: tensor parallelism shards the Transformer "
    "family only (its blocks are softmax attention + MLP). The {family} blocks carry per-head and "
    "per-channel parameters (convolution taps, gates, SSM and memory weights) that the tp plan "
    "does not shard, so their local heads would not match. Set parallel.tp=1 and scale with "
    "parallel.dp_shard (FSDP), parallel.cp (context parallelism) and parallel.pp instead."
)


def check_tensor_parallel(model: nn.Module, tp: int) -> None:
    """Raise a ValueError naming the fix when `model` cannot be split over `tp` ranks."""
    cfg = model.cfg
    if tp > 1 and cfg.family != "transformer":
        raise ValueError(TP_FAMILY_MESSAGE.format(family=cfg.family, tp=tp))
    if cfg.num_heads % tp or cfg.kv_heads % tp:
        raise ValueError(
            f"tensor parallelism splits attention heads: model.num_heads={cfg.num_heads} and "
            f"model.num_kv_heads={cfg.kv_heads} must both be divisible by parallel.tp={tp}; "
            "change the head counts or parallel.tp"
        )
    if cfg.vocab_size % tp:
        raise ValueError(
            f"the vocabulary-parallel embedding and loss need model.vocab_size={cfg.vocab_size} "
            f"divisible by parallel.tp={tp}; pad the vocabulary (set model.vocab_size) or change tp"
        )
    if cfg.hidden_dim % tp:
        raise ValueError(
            f"the MLP width {cfg.hidden_dim} must be divisible by parallel.tp={tp}"
        )


# ----------------------------------------------------------------------------- module plan
def _gather_norm_output(keep_dtensor: bool):
    """Forward hook for a SequenceParallel norm: all-gather its output over the sequence.

    keep_dtensor=True returns a Replicate DTensor (the column-parallel linears that consume it
    produce Partial input gradients, which the redistribution's backward reduce-scatters once);
    False returns a local tensor whose gradient is declared Partial (for the loss, which
    computes a per-rank partial d hidden itself)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    def hook(module, inputs, output):
        assert isinstance(output, DTensor)
        full = output.redistribute(placements=[Replicate()])
        return full if keep_dtensor else full.to_local(grad_placements=[Partial()])

    return hook


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> nn.Module:
    """Shard `model` (a Transformer or a pipeline stage of one) in place over `tp_mesh`."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    check_tensor_parallel(model, tp)
    tied = model.cfg.tie_embeddings and model.tok_embeddings is not None and model.output is not None
    if model.tok_embeddings is not None:
        parallelize_module(model.tok_embeddings, tp_mesh,
                           RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)))
    for block in model.layers.values():
        for norm in (block.attention_norm, block.ffn_norm):
            parallelize_module(norm, tp_mesh, SequenceParallel())
            norm.register_forward_hook(_gather_norm_output(keep_dtensor=True))
        attn, ffn = block.attention, block.feed_forward
        for lin in (attn.wq, attn.wk, attn.wv, ffn.w1, ffn.w3):
            parallelize_module(lin, tp_mesh, ColwiseParallel())
        for lin in (attn.wo, ffn.w2):
            parallelize_module(lin, tp_mesh, RowwiseParallel(output_layouts=Shard(1)))
    if model.norm is not None:
        parallelize_module(model.norm, tp_mesh, SequenceParallel())
        model.norm.register_forward_hook(_gather_norm_output(keep_dtensor=False))
    if model.output is not None:
        # logits (evaluation, generation) are gathered; the training loss uses the sharded
        # weight directly through vocab_parallel_cross_entropy
        parallelize_module(model.output, tp_mesh,
                           ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return model


# ----------------------------------------------------------------------------- loss
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight_localᵀ` with the vocabulary split over `group`.
    Gradients are formed in the forward pass, chunk by chunk (like the chunked kernel)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, group, ignore_index, chunk_size,
                needs_grad):
        n = hidden.shape[0]
        v_local = weight.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 inputs
        w32 = weight.to(acc)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(w32) if needs_grad else None
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size].to(acc)
            y = labels[start:start + chunk_size]
            logits = h @ w32.t()                                   # (chunk, vocab/tp)
            valid = y != ignore_index
            local_y = y - vocab_start
            mine = valid & (local_y >= 0) & (local_y < v_local)
            safe = torch.where(mine, local_y, 0)
            m = logits.max(dim=1).values
            comm.all_reduce(m, op=dist.ReduceOp.MAX, group=group, kind="tp_loss")
            exp = torch.exp(logits - m.unsqueeze(1))
            stats = torch.stack([exp.sum(1), logits.gather(1, safe.unsqueeze(1)).squeeze(1) * mine])
            comm.all_reduce(stats, group=group, kind="tp_loss")
            sum_exp, target = stats[0], stats[1]
            total = total + ((m + torch.log(sum_exp) - target) * valid).sum()
            if needs_grad:
                probs = exp / sum_exp.unsqueeze(1)
                probs.scatter_add_(1, safe.unsqueeze(1), -mine.to(probs.dtype).unsqueeze(1))
                probs.mul_(valid.unsqueeze(1))
                grad_hidden[start:start + chunk_size] = (probs @ w32).to(hidden.dtype)
                grad_weight += probs.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype)
        gw = (grad_weight * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None, None


def vocab_parallel_cross_entropy(hidden, weight, labels, *, ignore_index=-100,
                                 reduction="sum", chunk_size=DEFAULT_CHUNK):
    """Cross-entropy of `hidden (tokens, dim)` against `weight`, a DTensor `(vocab, dim)`
    sharded on the vocabulary (Shard(0)) over a 1-D tp mesh; labels `(tokens,)`.

    `hidden` must be the same on every tp rank; its gradient is this rank's partial sum (declare
    it Partial, as `apply_tensor_parallel`'s final-norm hook does). Returns the summed loss
    (or the mean over labelled tokens), identical on every tp rank."""
    from torch.distributed.tensor import Shard

    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    mesh = weight.device_mesh
    if mesh.ndim != 1 or weight.placements[0] != Shard(0):
        raise ValueError(
            "vocab_parallel_cross_entropy needs the output weight sharded on the vocabulary "
            f"(Shard(0)) over a 1-D tp mesh; got placements {weight.placements}"
        )
    group = mesh.get_group()
    w_local = weight.to_local()
    vocab_start = mesh.get_local_rank() * (weight.shape[0] // mesh.size())
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss = _VocabParallelCrossEntropy.apply(hidden, w_local, labels, vocab_start, group,
                                            ignore_index, chunk_size, needs_grad)
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum().clamp(min=1)
    return loss


def is_vocab_sharded(weight) -> bool:
    """True for a DTensor weight sharded on dim 0 over a 1-D mesh (a tp output projection)."""
    from torch.distributed.tensor import DTensor, Shard

    return (isinstance(weight, DTensor) and weight.device_mesh.ndim == 1
            and weight.placements[0] == Shard(0))


__all__ = ["apply_tensor_parallel", "check_tensor_parallel", "is_vocab_sharded",
           "vocab_parallel_cross_entropy"]
