"""Context parallelism for Titans (Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at
Test Time", 2024): the neural memory's state is passed rank to rank, in order.

The sequence is sharded contiguously over the ranks of `group` (rank r holds tokens
[r·N/P, (r+1)·N/P)). The memory update M_t = (1 − α_t) M_{t−1} + S_t is *not* linear in the
memory (the surprise S_t is a gradient taken at the memory itself), so the trick of
`dist/recurrent.py` (run every shard from zero, then correct with the true initial state) does
not apply. Instead:

- forward: rank r receives rank r−1's final memory state (weights and momentum of every memory
  layer, flattened into one buffer), runs its shard from it, and sends its own final state to
  r+1 (`recv_state` / `send_state`);
- backward (custom autograd): rank r receives ∂L/∂(its final state) from r+1, back-propagates
  through its shard, and sends ∂L/∂(its initial state) to r−1, so the ranks finish in reverse
  order.

Cost: the memory branch is sequential over the ranks, so context parallelism gives it no
speedup (each rank idles while the earlier ranks run; the work per rank is 1/P of the sequence,
the latency that of the whole sequence), only the memory footprint of the activations is split.
Communication is P−1 hops forward and P−1 hops backward per memory layer, each of the memory
state's size: Σ_i 2 · batch · heads · d_{i−1} · d_i floats (weights + momentum), independent of
the sequence length.

Sliding-window attention needs only the previous rank's last `window − 1` keys and values: one
halo exchange (`with_halo`), all ranks at once, whose gradient returns to the previous rank in the
backward pass. Memory-as-context segments must not straddle shard boundaries (the model checks
and raises a ValueError). All communication goes through `ctxscale.dist.comm`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ctxscale.dist import comm


def _world_rank(group):
    return dist.get_world_size(group), dist.get_rank(group)


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat, like):
    out, pos = [], 0
    for t in like:
        out.append(flat[pos : pos + t.numel()].view_as(t))
        pos += t.numel()
    return out


class _RecvState(torch.autograd.Function):
    """Rank 0: identity. Rank r > 0: the state received from r−1 (the inputs are only shape
    templates and get zero gradient); backward sends the state's gradient to r−1."""

    @staticmethod
    def forward(ctx, group, *state):
        world, rank = _world_rank(group)
        ctx.group = group
        if rank == 0:
            return tuple(t.clone() for t in state)
        buf = torch.empty(sum(t.numel() for t in state), dtype=state[0].dtype,
                          device=state[0].device)
        comm.exchange([], [(buf, rank - 1)], group=group, tag="titans_state_fwd",
                      kind="titans_state").wait()
        return tuple(t.clone() for t in _unflat(buf, state))

    @staticmethod
    def backward(ctx, *grads):
        _, rank = _world_rank(ctx.group)
        if rank == 0:
            return (None, *grads)
        comm.exchange([(_flat(grads), rank - 1)], [], group=ctx.group, tag="titans_state_bwd",
                      kind="titans_state").wait()
        return (None, *(torch.zeros_like(g) for g in grads))


class _SendState(torch.autograd.Function):
    """Identity on `y`; sends the final state to r+1. Backward first receives the gradient of
    the final state from r+1 (the last rank: zero), so `y` must be on the loss path."""

    @staticmethod
    def forward(ctx, group, y, *state):
        world, rank = _world_rank(group)
        ctx.group = group
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in state]
        if rank < world - 1:
            comm.exchange([(_flat(state), rank + 1)], [], group=group, tag="titans_state_fwd",
                          kind="titans_state").wait()
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        world, rank = _world_rank(ctx.group)
        zeros = [torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes]
        if rank == world - 1:
            return (None, grad_y, *zeros)
        buf = torch.empty(sum(z.numel() for z in zeros), dtype=zeros[0].dtype,
                          device=zeros[0].device)
        comm.exchange([], [(buf, rank + 1)], group=ctx.group, tag="titans_state_bwd",
                      kind="titans_state").wait()
        return (None, grad_y, *_unflat(buf, zeros))


def recv_state(state: list[torch.Tensor], *, group=None) -> list[torch.Tensor]:
    """This rank's initial memory state: `state` itself on rank 0 (the start of the sequence),
    the previous rank's final state elsewhere. Call `send_state` after the shard, on every rank
    (the two pair up in the forward and the backward pass)."""
    if dist.get_world_size(group) == 1:
        return list(state)
    dtypes = {t.dtype for t in state}
    if len(dtypes) != 1:
        raise ValueError(f"memory state tensors must share one dtype, got {dtypes}")
    return list(_RecvState.apply(group, *state))


def send_state(y: torch.Tensor, state: list[torch.Tensor], *, group=None) -> torch.Tensor:
    """Send this rank's final state to the next rank; returns `y` (use it: the backward pass of
    the exchange hangs off it)."""
    if dist.get_world_size(group) == 1:
        return y
    return _SendState.apply(group, y, *state)


class _Halo(torch.autograd.Function):
    """[previous rank's last n tokens | x] along dim 1 (rank 0: x). Backward: the halo's
    gradient goes back to the previous rank and is added to its last n tokens."""

    @staticmethod
    def forward(ctx, group, x, n):
        world, rank = _world_rank(group)
        halo_buf = x.new_empty(x.shape[0], n, *x.shape[2:])
        sends = [(x[:, x.shape[1] - n :].contiguous(), rank + 1)] if rank < world - 1 else []
        recvs = [(halo_buf, rank - 1)] if rank > 0 else []
        comm.exchange(sends, recvs, group=group, tag="titans_halo_fwd", kind="titans_halo").wait()
        ctx.group, ctx.n = group, n
        return torch.cat([halo_buf, x], 1) if rank > 0 else x.clone()

    @staticmethod
    def backward(ctx, grad):
        world, rank = _world_rank(ctx.group)
        n = ctx.n
        grad_x = grad[:, n:].clone() if rank > 0 else grad.clone()
        grad_tail = grad_x.new_zeros(grad_x.shape[0], n, *grad_x.shape[2:])
        sends = [(grad[:, :n].contiguous(), rank - 1)] if rank > 0 else []
        recvs = [(grad_tail, rank + 1)] if rank < world - 1 else []
        comm.exchange(sends, recvs, group=ctx.group, tag="titans_halo_bwd",
                      kind="titans_halo").wait()
        grad_x[:, grad_x.shape[1] - n :] += grad_tail
        return None, grad_x, None


def with_halo(x: torch.Tensor, n: int, *, group=None) -> torch.Tensor:
    """`x` `(batch, seq_local, ...)` with the previous rank's last `n` tokens prepended (rank 0:
    `x` unchanged). Differentiable; every rank must hold at least `n` tokens."""
    world, _ = _world_rank(group)
    if world == 1 or n == 0:
        return x
    if x.shape[1] < n:
        raise ValueError(
            f"each rank holds {x.shape[1]} tokens but the attention window needs the previous "
            f"{n}; use fewer context-parallel ranks, a longer sequence or a smaller window"
        )
    return _Halo.apply(group, x, n)


__all__ = ["recv_state", "send_state", "with_halo"]
