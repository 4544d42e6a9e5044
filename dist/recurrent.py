"""Context parallelism for recurrent layers: state passing between sequence shards.

The sequence is sharded contiguously over the ranks of `group` (rank r holds tokens
[r·N/P, (r+1)·N/P)). Every layer here is linear in its state with an elementwise decay:

    S_out = a ⊙ S_in + S_local,     a = exp(total log decay of the shard)

so each rank first runs its shard from a zero state, producing the summary (S_local, log a),
then the ranks combine the summaries into each rank's true initial state

    S_in(r) = Σ_{j<r} ( Π_{j<i<r} a_i ) ⊙ S_local(j)          (zero on rank 0)

and finally correct their outputs with S_in. Two exchanges (argument `method`):
- "ring": S_in travels rank to rank (recv from r−1, apply, send to r+1): P−1 sequential hops, one
  state per hop; the least traffic, latency grows with P.
- "allgather": one all-gather of every summary, then each rank computes its prefix locally:
  one collective (latency ~log P), P−1 states received per rank.
The backward pass runs the same exchange in the reverse direction (a custom autograd function):
with μ_r = ∂L/∂S_out(r) = λ_{r+1}, the adjoint of S_in(r) is λ_r = ∂L/∂S_in(r)|local + a_r ⊙ μ_r,
so ∂L/∂S_local(r) = μ_r and ∂L/∂log a_r = Σ μ_r ⊙ a_r ⊙ S_in(r).

Output corrections (exact, cheaper than re-running the shard with the initial state, which would
repeat the whole intra-chunk work):
- linear attention (Lightning Attention-2 / simple GLA, see kernels/linear_attention.py):
  o_t += scale · exp(G_t) · q_tᵀ S_in, with G_t the cumulative log decay of the shard up to t
  (≤ 0, so no overflow): one (seq × dim_k × dim_v) product per rank.
- selective scan (Mamba, Gu & Dao 2023): y_t += Σ_i C_it · exp(A_ci · Σ_{s≤t} Δ_s) · x_in,ci, then
  D and the z gate are applied to the corrected y.
- causal conv1d: a halo exchange instead of a state pass: each rank receives the previous rank's
  last width−1 inputs (zeros on rank 0) and uses them as the conv's initial state; in the backward
  pass their gradient goes back to the previous rank.

Packed sequences (`segments`: the `(batch, seq)` document ids of the WHOLE sequence, the same
on every rank, as for softmax attention): each rank runs its shard with its own document resets
(kernels/recurrent_segments.py), its tokens read S_in (the conv: the halo's positions) only while
they are in the document of the previous rank's last token, and a shard holding a document start
passes on no decayed S_in (its a is 0, log a = −∞): the state then reaches no token of another
document across ranks either.

The exchanges are collective over `group`: every rank must make the same calls, forward and
backward (inputs requiring grad on every rank or on none), or the others wait for it.

All communication goes through `ctxscale.dist.comm` (byte accounting). Inputs are this rank's
shard in the layouts of the kernels: q/k/v `(batch, seq_local, heads, dim)`; u/delta/z
`(batch, dim, seq_local)`; B/C `(batch, [groups,] dstate, seq_local)`; conv x `(batch, dim,
seq_local)`. Outputs are this rank's shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ctxscale.dist import comm
from ctxscale.kernels.conv1d import causal_conv1d
from ctxscale.kernels.linear_attention import linear_attention
from ctxscale.kernels.recurrent_segments import check_segments, runs
from ctxscale.kernels.selective_scan import selective_scan
from torch.utils.checkpoint import checkpoint

METHODS = ("ring", "allgather")
CORRECTION_SEGMENT = 1024  # tokens per checkpointed piece of the selective-scan correction


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"state-passing method {method!r} is not one of {METHODS}")


def _world_rank(group):
    return dist.get_world_size(group), dist.get_rank(group)


class _ShardDocuments:
    """This rank's view of the global document ids of a contiguous shard of `n` tokens."""

    def __init__(self, segments, batch: int, n: int, group, device, what: str):
        world, rank = _world_rank(group)
        check_segments(segments, batch, n * world, device, what=f"{what} (the global document "
                       "ids of the whole sequence, the same on every context-parallel rank)")
        r = runs(segments)
        self.start = rank * n
        self.local = r[:, self.start : self.start + n]  # runs serve as the shard's ids
        # the run of the previous rank's last token (rank 0 has no S_in: any run does)
        self.prev = r[:, self.start - 1 : self.start] if rank > 0 else r[:, :1]
        self.runs = r

    def reads(self) -> torch.Tensor:
        """`(batch, n)` True where a token is in the document of the token before the shard."""
        return self.local == self.prev

    def carries(self) -> torch.Tensor:
        """`(batch,)` True where the shard holds no document start (S_in reaches S_out)."""
        if self.local.shape[1] == 0:
            return torch.ones_like(self.prev[:, 0], dtype=torch.bool)
        return self.local[:, -1] == self.prev[:, 0]


def _cut_carry(total, carry):
    """Total log decay with −∞ (a = 0) where the shard holds a document start."""
    shape = (carry.shape[0],) + (1,) * (total.dim() - 1)
    return torch.where(carry.view(shape), total, torch.full_like(total, float("-inf")))


# ---------------------------------------------------------------- state passing
class _StatePassing(torch.autograd.Function):
    """S_in(r) from every rank's (S_local, log_decay_total); see the module docstring."""

    @staticmethod
    def forward(ctx, local_state, log_decay, group, method):
        world, rank = _world_rank(group)
        decay = torch.exp(log_decay)  # broadcastable to local_state
        if method == "ring":
            s_in = torch.zeros_like(local_state)
            if rank > 0:
                comm.exchange([], [(s_in, rank - 1)], group=group, tag="state_fwd").wait()
            if rank < world - 1:
                s_out = decay * s_in + local_state
                comm.exchange([(s_out, rank + 1)], [], group=group, tag="state_fwd").wait()
            all_decay = None
        else:
            states, all_decay = _gather_pair(local_state, log_decay, group)
            s_in = torch.zeros_like(local_state)
            for j in range(rank):
                s_in = torch.exp(all_decay[j]) * s_in + states[j]
        ctx.save_for_backward(s_in, decay, all_decay if all_decay is not None else decay)
        ctx.group, ctx.method, ctx.ld_shape = group, method, log_decay.shape
        return s_in

    @staticmethod
    def backward(ctx, grad_in):
        s_in, decay, all_decay = ctx.saved_tensors
        group = ctx.group
        world, rank = _world_rank(group)
        grad_in = grad_in.contiguous()
        mu = torch.zeros_like(grad_in)  # dL/dS_out of this rank = adjoint of S_in(rank + 1)
        if ctx.method == "ring":
            if rank < world - 1:
                comm.exchange([], [(mu, rank + 1)], group=group, tag="state_bwd").wait()
            if rank > 0:
                lam = grad_in + decay * mu
                comm.exchange([(lam, rank - 1)], [], group=group, tag="state_bwd").wait()
        else:
            grads, _ = _gather_pair(grad_in, None, group)
            for j in range(world - 1, rank, -1):
                mu = grads[j] + torch.exp(all_decay[j]) * mu
        d_local = mu
        d_log_decay = (mu * decay * s_in).sum_to_size(ctx.ld_shape)
        return d_local, d_log_decay, None, None


def _gather_pair(state, log_decay, group):
    """All-gather `state` (and `log_decay`) from every rank in one collective."""
    world, _ = _world_rank(group)
    parts = [state.reshape(-1)] + ([log_decay.reshape(-1)] if log_decay is not None else [])
    flat = torch.cat(parts)
    out = flat.new_empty(world * flat.numel())
    comm.all_gather_into_tensor(out, flat, group=group, kind="state_all_gather")
    out = out.view(world, -1)
    states = out[:, : state.numel()].reshape((world,) + state.shape)
    if log_decay is None:
        return states, None
    return states, out[:, state.numel() :].reshape((world,) + log_decay.shape)


def pass_states(local_state, log_decay_total, *, group=None, method: str = "allgather"):
    """This rank's true initial state from every rank's shard summary (differentiable).

    local_state: the state this rank's shard reaches from a zero start; log_decay_total: the
    shard's total log decay, broadcastable to local_state, same dtype. Returns S_in (zeros on
    rank 0)."""
    _check_method(method)
    if dist.get_world_size(group) == 1:
        return torch.zeros_like(local_state)
    log_decay_total = log_decay_total.to(local_state.dtype)
    return _StatePassing.apply(local_state, log_decay_total, group, method)


# ---------------------------------------------------------------- linear attention
def cp_linear_attention(q, k, v, *, log_decay=None, scale=None, group=None, method="allgather",
                        segments=None):
    """Context-parallel `linear_attention` (causal, simple-GLA semantics) on contiguous shards.

    q, k `(batch, seq_local, heads_qk, dim_k)` (heads_qk dividing heads: grouped q/k),
    v `(batch, seq_local, heads, dim_v)`, log_decay `(batch, seq_local, heads)`, `(heads,)` or
    None; segments None or the global `(batch, seq)` document ids. Returns this rank's o
    `(batch, seq_local, heads, dim_v)`, equal to the matching slice of single-process
    `linear_attention`."""
    _check_method(method)
    b, n, hk, dk = q.shape
    h = v.shape[2]
    scale = dk**-0.5 if scale is None else scale
    docs = (None if segments is None else
            _ShardDocuments(segments, b, n, group, q.device, "cp_linear_attention"))
    o_local, s_local = linear_attention(
        q, k, v, log_decay=log_decay, scale=scale, return_final_state=True,
        segments=None if docs is None else docs.local,
    )
    cdt = s_local.dtype
    if log_decay is None:
        cum = None
        total = torch.zeros(b, h, 1, 1, dtype=cdt, device=q.device)
    else:
        if log_decay.shape == (h,):
            steps = torch.arange(1, n + 1, dtype=cdt, device=q.device)
            cum = steps[None, :, None] * log_decay.to(cdt)[None, None, :]  # 1 n h
        else:
            cum = log_decay.to(cdt).cumsum(1)  # b n h
        total = (cum[:, -1] if n > 0 else torch.zeros_like(cum[:, 0])).expand(b, h)[..., None, None]
    if docs is not None:
        total = _cut_carry(total.expand(b, h, 1, 1), docs.carries())
    s_in = pass_states(s_local, total, group=group, method=method)
    # o_t += scale · e^{cum_t} q_tᵀ S_in, per head; a group's q is read once (no per-head copy)
    r = h // hk
    correction = torch.einsum(
        "bngk,bgrkv->bngrv", q.to(cdt) * scale, s_in.view(b, hk, r, dk, -1)
    ).reshape(b, n, h, -1)
    if cum is not None:
        correction = correction * torch.exp(cum).unsqueeze(-1)
    if docs is not None:
        correction = correction * docs.reads()[:, :, None, None]
    return (o_local.to(cdt) + correction).to(q.dtype)


# ---------------------------------------------------------------- selective scan
def _scan_correction(cum_dt, A, x_in, Cg):
    """Σ_i C_it exp(A_ci cum_dt_t) x_in_ci: cum_dt `(b, d, T)`, A `(d, n)`, x_in `(b, d, n)`,
    Cg `(b, g, n, T)`. Returns `(b, d, T)`."""
    b, d, T = cum_dt.shape
    g = Cg.shape[1]
    decay = torch.exp(cum_dt.unsqueeze(-1) * A[:, None, :])  # b d T n
    weighted = (decay * x_in.unsqueeze(2)).view(b, g, d // g, T, -1)
    return torch.einsum("bgctn,bgnt->bgct", weighted, Cg).reshape(b, d, T)


def cp_selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
    group=None, method="allgather", segments=None,
):
    """Context-parallel `selective_scan` (mamba-ssm's `selective_scan_fn` arguments, shards along
    the last axis; segments None or the global `(batch, seq)` document ids). Returns this
    rank's out `(batch, dim, seq_local)`."""
    _check_method(method)
    b, d, n_local = u.shape
    docs = (None if segments is None else
            _ShardDocuments(segments, b, n_local, group, u.device, "cp_selective_scan"))
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    dt = delta.to(cdt)
    if delta_bias is not None:
        if delta_bias.shape != (d,):
            raise ValueError(f"delta_bias has shape {tuple(delta_bias.shape)}; expected {(d,)}")
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    y_local, x_local = selective_scan(u.to(cdt), dt, A, B, C, return_last_state=True,
                                      segments=None if docs is None else docs.local)
    Ac = A.to(cdt)
    cum_dt = dt.cumsum(-1)  # b d L
    total = (cum_dt[..., -1:] if n_local > 0 else dt.new_zeros(b, d, 1)) * Ac  # b d n
    if docs is not None:
        total = _cut_carry(total, docs.carries())
    x_in = pass_states(x_local, total, group=group, method=method)
    # y_t += sum_i C_it exp(A_ci cum_dt_t) x_in_ci, with C in (batch, groups, dstate, seq)
    Cg = C.to(cdt)
    if Cg.dim() == 3:
        Cg = Cg.unsqueeze(1)
    elif Cg.dim() == 2:  # fixed C (dim, dstate)
        Cg = Cg.view(1, d, -1, 1).expand(b, d, Cg.shape[1], n_local)
    # the (batch, dim, seq, dstate) decay factors exist one segment at a time (checkpointed
    # when gradients are needed), so the correction's memory stays O(seq · dim)
    needs_grad = torch.is_grad_enabled() and (x_in.requires_grad or Cg.requires_grad
                                              or cum_dt.requires_grad or Ac.requires_grad)
    pieces = []
    segment = CORRECTION_SEGMENT
    for cum_seg, C_seg in zip(cum_dt.split(segment, -1), Cg.split(segment, -1)):
        if needs_grad:
            pieces.append(
                checkpoint(_scan_correction, cum_seg, Ac, x_in, C_seg, use_reentrant=False)
            )
        else:
            pieces.append(_scan_correction(cum_seg, Ac, x_in, C_seg))
    correction = torch.cat(pieces, -1) if pieces else torch.zeros_like(y_local)
    if docs is not None:
        correction = correction * docs.reads().unsqueeze(1)
    y = y_local + correction
    uc = u.to(cdt)
    if D is not None:
        y = y + uc * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(u.dtype)


# ---------------------------------------------------------------- causal conv1d
class _Halo(torch.autograd.Function):
    """Receive the previous rank's last width−1 inputs; send ours to the next rank."""

    @staticmethod
    def forward(ctx, tail, group):
        world, rank = _world_rank(group)
        halo = torch.zeros(tail.shape, dtype=tail.dtype, device=tail.device)  # contiguous
        sends = [(tail.contiguous(), rank + 1)] if rank < world - 1 else []
        recvs = [(halo, rank - 1)] if rank > 0 else []
        comm.exchange(sends, recvs, group=group, tag="conv_halo_fwd").wait()
        ctx.group = group
        return halo

    @staticmethod
    def backward(ctx, grad_halo):
        world, rank = _world_rank(ctx.group)
        grad_tail = torch.zeros(grad_halo.shape, dtype=grad_halo.dtype, device=grad_halo.device)
        sends = [(grad_halo.contiguous(), rank - 1)] if rank > 0 else []
        recvs = [(grad_tail, rank + 1)] if rank < world - 1 else []
        comm.exchange(sends, recvs, group=ctx.group, tag="conv_halo_bwd").wait()
        return grad_tail, None


def cp_causal_conv1d(x, weight, bias=None, *, activation=None, group=None, segments=None):
    """Context-parallel `causal_conv1d`: x `(batch, dim, seq_local)`, weight `(dim, width)`;
    segments None or the global `(batch, seq)` document ids. Every shard must hold at least
    width−1 tokens. Returns this rank's output shard."""
    width = weight.shape[-1]
    if x.dim() != 3:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (batch, dim, seq_local)")
    docs = (None if segments is None else _ShardDocuments(
        segments, x.shape[0], x.shape[-1], group, x.device, "cp_causal_conv1d"))
    local_ids = None if docs is None else docs.local
    if width == 1 or dist.get_world_size(group) == 1:
        return causal_conv1d(x, weight, bias, activation=activation, segments=local_ids)
    if x.shape[-1] < width - 1:
        raise ValueError(
            f"each rank holds {x.shape[-1]} tokens but the conv width {width} needs at least "
            f"{width - 1} per rank; use fewer context-parallel ranks or a longer sequence"
        )
    halo = _Halo.apply(x[..., x.shape[-1] - (width - 1) :].contiguous(), group)
    if docs is not None and docs.start > 0:
        # halo positions of another document than the shard's first token read as zeros
        halo_runs = docs.runs[:, docs.start - (width - 1) : docs.start]
        halo = halo * (halo_runs == docs.local[:, :1]).to(halo.dtype).unsqueeze(1)
    return causal_conv1d(x, weight, bias, activation=activation, initial_state=halo,
                         segments=local_ids)


__all__ = ["METHODS", "cp_causal_conv1d", "cp_linear_attention", "cp_selective_scan", "pass_states"]
