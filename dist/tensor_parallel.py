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

A Mamba mixer (`models/mamba.py`, layers M and P of the hybrid stack) splits its E = expand·dim
channels the same way (as Megatron-LM's Mamba layers do): each rank runs the convolution and the
selective scan of E/tp channels over the whole (local context-parallel) sequence.

    u, z = n_full · W_{x,z}[:, shard]                 column-parallel (E/tp channels each)
    u = silu(conv(u))                                 conv taps and bias: this rank's channels
    [δ, B, C] = all_reduce(u · W_xproj[:, shard]ᵀ)    row-parallel: B, C, δ mix all channels
    y = scan(u, δ·W_dt[shard]ᵀ, A[shard], B, C, D[shard], z)       per channel, no communication
    x_s += reduce_scatter_seq(y · W_out[shard, :])    row-parallel

The x_proj all-reduce moves dt_rank + 2·d_state numbers per token, a small fraction of the
sequence-parallel all-gather of the dim-wide input.

A Mamba-2 mixer (layers S, `models/mamba2.py`) splits its heads and their groups (n_groups
divisible by tp): in_proj_{z, x, dt} column-parallel by heads, in_proj_{B, C} by groups, conv
taps, Δ bias, A, D and the gated norm per channel or head, out_proj row-parallel. A group's
heads are contiguous, so a rank's heads read only its own groups' B and C: the SSD scan and
the group norm need no communication. With one group (n_groups = 1, which Megatron-LM does
not split), B and C and their conv taps are replicated (each rank forms them whole; their gradient is
the sum of the ranks' parts, all-reduced in the backward: 2·d_state numbers per token) and
the one norm group spans the ranks, so its sum of squares is all-reduced (one number per
token, forward and backward).

A linear-attention layer (L, `models/linear_attention.py`) splits its heads like softmax
attention (wq, wk, wv column-parallel, wo row-parallel), and every per-head piece goes with its
head: the Hedgehog feature maps, the q/k convolution taps (per channel), the output norm and
the window mix (Shard(0)); fixed decays are taken at the global head index. The gate
projections (wg: a row per decaying head, wb: a row per head without decay) are replicated,
dim x heads each: every rank forms all gates and keeps its heads' (a layer that mixes ungated
and decaying heads has rows that do not split evenly over the ranks). The gates' gradient is the
sum of the ranks' parts (`replicated_output`; the backward all-reduces batch x seq x rows
numbers). Every rank runs the same operations, also one whose heads are all ungated, so the
collectives stay in step and every rank has a gradient for the gates. The recurrence (and its
context-parallel state passing) runs on local heads.

The embedding is vocabulary-parallel (rows of the table sharded, masked lookups summed with a
reduce-scatter onto the sequence shards), the output projection is column-parallel on the
vocabulary, and the loss is the vocabulary-parallel cross-entropy `vocab_parallel_cross_entropy`,
which never gathers the logits: per token chunk each rank forms its `(chunk, vocab/tp)` logits and
the ranks all-reduce three numbers per token, the max, the sum of exp and the target logit:

    m = max_r max_j z_rj,   s = Σ_r Σ_j exp(z_rj − m),   loss = m + log s − z_y

d loss / d z_r = softmax_r − onehot_r stays local; d hidden is a partial sum over tp ranks (its
reduction is the reduce-scatter of the sequence-parallel all-gather's backward).

Weights are `DTensor`s on the `tp` mesh (`torch.distributed.tensor.parallel`); activations
between modules are local tensors, and the per-channel parameters that are not a linear layer's
(conv taps, A_log, D, the Δ projection, feature maps, ...) enter the computation through
`local()`. Requirements:
heads, kv heads and the vocabulary divisible by tp, the MLP width and Mamba's E divisible by tp,
and the local sequence (seq / cp) divisible by tp. Families: transformer, linear, mamba and
hybrid (any pattern of A, L, M, P and S), mamba2, and titans (mac, mag, mal).

A Titans block shards its attention like softmax attention (persistent tokens replicated) and
its neural memory by heads: wq/wk/wv column-parallel, wo row-parallel, each head's initial
memory weights on its rank, the gate projection replicated; the memory's chunked inner loop and
its context-parallel state passing run on local heads. mag multiplies the two row-parallel
outputs elementwise on the sequence shard, mal adds them in turn.

mac (memory as context) cannot stay on the sequence shard inside the block: per segment S the
memory read h = M(q(S)) feeds the attention's keys, the attention output y (all of S) feeds the
memory update and multiplies its output. So in a mac block the three row-parallel outputs (the
read, the attention, the memory) are all-reduced into Replicate DTensors instead of
reduce-scattered, the segment loop runs on the whole (cp-local) sequence with local heads, and
the block's output y ⊙ σ(M(y)) is cut to this rank's sequence shard at the end
(`sequence_shard`: no communication; its backward all-gathers). Counting an all-reduce as a
reduce-scatter plus an all-gather, a mac block's forward moves 7 dim-wide activations per token
(the norm's all-gather, three all-reduces) against mag's 3 (all-gather, two reduce-scatters).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ctxscale.dist import comm

DEFAULT_CHUNK = 4096


# ----------------------------------------------------------------------------- validation
def _layer_codes(cfg) -> str:
    """Block letters; a Titans block counts as A (softmax attention + MLP) plus its memory."""
    if cfg.family in ("transformer", "titans"):
        return "A" * cfg.num_layers
    return cfg.layer_codes()


def check_tensor_parallel(model: nn.Module, tp: int) -> None:
    """Raise a ValueError naming the fix when `model` cannot be split over `tp` ranks."""
    check_tensor_parallel_config(model.cfg, tp)


def check_tensor_parallel_config(cfg, tp: int) -> None:
    """`check_tensor_parallel` from the `ModelConfig` alone (job validation, before the model
    is built); a vocabulary size of 0 (taken from the data later) is not checked."""
    if tp == 1:
        return
    if cfg.family == "titans":
        heads = cfg.titans.memory_heads or cfg.num_heads
        if heads % tp:
            raise ValueError(
                f"tensor parallelism splits the Titans memory heads: model.titans.memory_heads="
                f"{heads} must be divisible by parallel.tp={tp}; change it or parallel.tp"
            )
    codes = _layer_codes(cfg)
    if any(c in "APL" for c in codes) and (cfg.num_heads % tp or cfg.kv_heads % tp):
        raise ValueError(
            f"tensor parallelism splits attention heads: model.num_heads={cfg.num_heads} and "
            f"model.num_kv_heads={cfg.kv_heads} must both be divisible by parallel.tp={tp}; "
            "change the head counts or parallel.tp"
        )
    if cfg.vocab_size and cfg.vocab_size % tp:
        raise ValueError(
            f"the vocabulary-parallel embedding and loss need model.vocab_size={cfg.vocab_size} "
            f"divisible by parallel.tp={tp}; pad the vocabulary (set model.vocab_size) or change tp"
        )
    has_mlp = any(c not in "MS" for c in codes) or cfg.mamba.mlp
    if has_mlp and cfg.hidden_dim % tp:
        raise ValueError(
            f"the MLP width {cfg.hidden_dim} must be divisible by parallel.tp={tp}; set "
            "model.ffn_dim (or model.ffn_multiple_of) or change parallel.tp"
        )
    inner = cfg.mamba.expand * cfg.dim
    if "S" in codes:
        heads, groups = inner // cfg.mamba.head_dim, cfg.mamba.n_groups
        if groups % tp and groups != 1:
            raise ValueError(
                f"tensor parallelism splits the Mamba-2 heads with their groups: model.mamba."
                f"n_groups={groups} must be divisible by parallel.tp={tp} (as in Megatron-LM) "
                "or 1 (B and C replicated); change parallel.tp, or set parallel.tp=1 and scale "
                "with parallel.dp_shard, parallel.cp and parallel.pp")
        if heads % tp:
            raise ValueError(
                f"tensor parallelism splits the {heads} Mamba-2 heads (expand x dim / head_dim): "
                f"they must be divisible by parallel.tp={tp}; change model.mamba.head_dim")
    if any(c in "MPS" for c in codes) and inner % tp:
        raise ValueError(
            f"tensor parallelism splits the Mamba channels: model.mamba.expand x model.dim = "
            f"{cfg.mamba.expand} x {cfg.dim} = {inner} must be divisible by parallel.tp={tp}; "
            "change model.dim, model.mamba.expand or parallel.tp"
        )


def replicated_output(t):
    """A Replicate DTensor computed on every tp rank (a replicated projection) as a local
    tensor of which each rank uses its own part: its gradient is declared a partial sum, so the
    backward adds the ranks' parts; a plain tensor is returned as is."""
    from torch.distributed.tensor import DTensor, Partial

    return t.to_local(grad_placements=[Partial()]) if isinstance(t, DTensor) else t


def sequence_shard(t):
    """This rank's sequence shard (dim 1) of a Replicate DTensor, as a local tensor (a slice,
    no communication; the backward all-gathers the shards' gradients), or `t` itself (a plain
    tensor)."""
    from torch.distributed.tensor import DTensor, Shard

    return t.redistribute(placements=[Shard(1)]).to_local() if isinstance(t, DTensor) else t


def replicated_parameter(t):
    """A parameter's local tensor: a shard of a Shard(0) DTensor (as `local`), or the whole of
    a Replicate DTensor that this rank uses for its own part of the work, whose gradient is
    then a partial sum over the ranks (like `replicated_output`); a plain tensor as is."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if isinstance(t, DTensor) and t.placements[0] == Replicate():
        return t.to_local(grad_placements=[Partial()])
    return local(t)


def local(t):
    """The local shard of a DTensor parameter (differentiable: its gradient lands on this
    rank's shard), or `t` itself (a plain tensor or None)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


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


def _settle_async_output(module, inputs, output):
    """Forward hook: the output of a module whose TP style ends in an asynchronous collective
    (RowwiseParallel reduce-scatters with async_op=True) as a plain tensor, waited once here.

    Left as an AsyncCollectiveTensor it would enter the first block, and a compiled block
    (train.compile) hands its gradient back to the collective's backward as a plain tensor
    where DTensor's redistribution expects a DTensor. The copy is of one sequence shard of the
    embeddings; eager runs wait for the same collective on first use anyway."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return output.clone() if isinstance(output, AsyncCollectiveTensor) else output


def _shard_mamba_mixer(mixer: nn.Module, tp_mesh) -> None:
    """Split a `MambaMixer`'s E channels over `tp_mesh` (see the module docstring)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    colwise = ColwiseParallel()
    parallelize_module(mixer, tp_mesh, {
        "in_proj_x": colwise, "in_proj_z": colwise,
        # δ, B, C from this rank's channels are partial sums: all-reduced (Replicate) ...
        "x_proj": RowwiseParallel(input_layouts=Shard(-1), output_layouts=Replicate(),
                                  use_local_output=False),
        "out_proj": RowwiseParallel(output_layouts=Shard(1)),
    })
    # ... and used by this rank's channels only, so their gradient is a partial sum too (the
    # backward all-reduce; a plain to_local() would take one rank's part for the whole)
    mixer.x_proj.register_forward_hook(lambda module, inputs, out: replicated_output(out))
    _shard_parameters(tp_mesh, [(mixer.conv1d, "weight"), (mixer.conv1d, "bias"),
                                (mixer.dt_proj, "weight"), (mixer.dt_proj, "bias"),
                                (mixer, "A_log"), (mixer, "D")])


def _shard_mamba2_mixer(mixer: nn.Module, tp_mesh) -> None:
    """Split a `Mamba2Mixer`'s heads and groups over `tp_mesh`: every projection but out_proj
    column-parallel (z, x, dt by heads, B and C by groups), the conv taps and every per-head
    or per-channel parameter Shard(0), out_proj row-parallel onto the sequence shards. With
    one group, B and C (projections and conv taps) are replicated instead."""
    from torch.distributed.tensor import Shard, distribute_module
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    colwise, tp = ColwiseParallel(), tp_mesh.size()
    by_group = mixer.groups % tp == 0  # else one group: B and C replicated
    bc = ("B", "C") if by_group else ()
    parallelize_module(mixer, tp_mesh, {
        **{f"in_proj_{p}": colwise for p in ("z", "x", "dt", *bc)},
        "out_proj": RowwiseParallel(output_layouts=Shard(1)),
    })
    convs = (mixer.conv_x, mixer.conv_B, mixer.conv_C) if by_group else (mixer.conv_x,)
    _shard_parameters(tp_mesh, [(conv, name) for conv in convs for name in ("weight", "bias")]
                      + [(mixer, name) for name in ("dt_bias", "A_log", "D", "norm_weight")])
    if not by_group:
        for module in (mixer.in_proj_B, mixer.in_proj_C, mixer.conv_B, mixer.conv_C):
            distribute_module(module, tp_mesh)  # every parameter Replicate
    mixer.shard_heads(tp_mesh.get_local_rank(), tp, tp_mesh.get_group())


def _shard_parameters(tp_mesh, named) -> None:
    """Replace each (module, parameter name) by its Shard(0) DTensor over `tp_mesh` (absent or
    None parameters are skipped)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for module, name in named:
        p = getattr(module, name, None)
        if p is not None:
            shard = distribute_tensor(p.detach(), tp_mesh, [Shard(0)])
            module.register_parameter(name, nn.Parameter(shard, requires_grad=p.requires_grad))


def _replicate_parameter(module: nn.Module, name: str, tp_mesh) -> None:
    """A parameter as a Replicate DTensor (used by column-parallel layers as their input)."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    p = getattr(module, name)
    rep = distribute_tensor(p.detach(), tp_mesh, [Replicate()])
    module.register_parameter(name, nn.Parameter(rep, requires_grad=p.requires_grad))


def _shard_titans_memory(memory: nn.Module, tp_mesh, wo) -> None:
    """Split a Titans `NeuralMemory`'s heads over `tp_mesh`: wq/wk/wv column-parallel, wo
    row-parallel (`wo`: the plan onto the sequence shards, or a Replicate output for mac), the
    initial memory weights M_0 (per head) Shard(0), the gate projection (rows [α; η; θ] x
    heads, a strided layout) replicated like the linear layers' gates."""
    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    colwise = ColwiseParallel()
    parallelize_module(memory, tp_mesh, {"wq": colwise, "wk": colwise, "wv": colwise, "wo": wo})
    distribute_module(memory.w_gates, tp_mesh)
    _shard_parameters(tp_mesh, [(memory.init_memory, str(i))
                                for i in range(len(memory.init_memory))])
    memory.shard_heads(tp_mesh.get_local_rank(), tp_mesh.size())


def _shard_linear_attention(attn: nn.Module, tp_mesh) -> None:
    """Split a `LinearAttention`'s heads over `tp_mesh` (wq/wk/wv/wo are sharded by the caller):
    the per-head feature maps, the per-channel q/k convolutions, the output norm and the window
    mix; the gate projections wg / wb are replicated (see the module docstring). Then the module
    keeps its local head counts and first head's index (`shard_heads`)."""
    from torch.distributed.tensor import distribute_module

    for name in ("wg", "wb"):
        if hasattr(attn, name):
            distribute_module(getattr(attn, name), tp_mesh)  # every parameter Replicate
    named = [(attn, name) for name in ("q_conv", "k_conv", "out_norm", "linear_mix")]
    for fmap in ("feature_map_q", "feature_map_k"):
        if hasattr(attn, fmap):
            named += [(getattr(attn, fmap), "weight"), (getattr(attn, fmap), "bias")]
    _shard_parameters(tp_mesh, named)
    attn.shard_heads(tp_mesh.get_local_rank(), tp_mesh.size())


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> nn.Module:
    """Shard `model` (a Transformer, a linear / mamba / hybrid HybridLM, or a pipeline stage of
    one) in place over `tp_mesh`."""
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
        model.tok_embeddings.register_forward_hook(_settle_async_output)
    colwise, rowwise = ColwiseParallel(), RowwiseParallel(output_layouts=Shard(1))
    # Titans mac: outputs that stay whole inside the block (module docstring)
    replicated = RowwiseParallel(output_layouts=Replicate(), use_local_output=False)
    for block in model.layers.values():
        wo = replicated if getattr(block, "variant", None) == "mac" else rowwise
        for name in ("attention_norm", "mixer_norm", "memory_norm", "ffn_norm"):
            norm = getattr(block, name, None)
            if norm is not None:
                parallelize_module(norm, tp_mesh, SequenceParallel())
                norm.register_forward_hook(_gather_norm_output(keep_dtensor=True))
        attn, ffn = block.attention, block.feed_forward
        if attn is not None:
            parallelize_module(attn, tp_mesh, {"wq": colwise, "wk": colwise, "wv": colwise,
                                               "wo": wo})
            if getattr(block, "code", "A") == "L":
                _shard_linear_attention(attn, tp_mesh)
            if getattr(attn, "persistent", None) is not None:  # Titans' persistent tokens
                _replicate_parameter(attn, "persistent", tp_mesh)
        if ffn is not None:
            parallelize_module(ffn, tp_mesh, {"w1": colwise, "w3": colwise, "w2": rowwise})
        if getattr(block, "mixer", None) is not None:
            if block.code == "S":
                _shard_mamba2_mixer(block.mixer, tp_mesh)
            else:
                _shard_mamba_mixer(block.mixer, tp_mesh)
        if getattr(block, "memory", None) is not None:
            _shard_titans_memory(block.memory, tp_mesh, wo)
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


__all__ = ["apply_tensor_parallel", "check_tensor_parallel", "check_tensor_parallel_config",
           "is_vocab_sharded", "local", "replicated_output", "replicated_parameter", "sequence_shard",
           "vocab_parallel_cross_entropy"]
