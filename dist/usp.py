"""USP: unified sequence parallelism, Ulysses all-to-all x ring attention on a 2D rank grid.

Paper: Fang & Zhao, "USP: A Unified Sequence Parallelism Approach for Long Context Generative
AI" (2024). Building blocks: DeepSpeed-Ulysses (`dist/ulysses.py`) and ring attention
(`dist/ring.py`).

Grid. The P ranks of `group` form a U x R grid (U = `ulysses_degree`, R = P / U). Each rank
belongs to one Ulysses group (U ranks that trade sequence for heads) and one ring group (R ranks
that run ring attention over the sequence, for the heads they share). Group ranks g:
- contiguous and zigzag: Ulysses group ρ = {ρU, ..., ρU+U−1} (consecutive), ring group u =
  {u, U+u, ..., (R−1)U+u}; rank g = ρU + u.
- stripe: Ulysses group ρ = {ρ, ρ+R, ..., ρ+(U−1)R} (strided), ring group u = {uR, ..., uR+R−1};
  rank g = ρ + uR.
Rank g has ring rank ρ in its ring group and Ulysses rank u in its Ulysses group.

Data layout. q/k/v are rank g's shard in `layout` over all P ranks (as for every
context-parallel method: `dist/layout.py`); the output is rank g's shard in the same layout.
The grouping above is chosen so that the tokens of Ulysses group ρ are exactly ring rank ρ's
shard of the same layout over R ranks:
- contiguous: ranks ρU..ρU+U−1 hold tokens [ρUn, (ρ+1)Un) = contiguous ring shard ρ (n = N/P);
- zigzag: they hold the 2P-chunks ρU..ρU+U−1 and 2P−1−ρU−U+1..2P−1−ρU, which are the 2R-chunks
  ρ and 2R−1−ρ = zigzag ring shard ρ;
- stripe: ranks ρ + uR hold tokens ≡ ρ + uR (mod P) for u < U, i.e. all tokens ≡ ρ (mod R) =
  stripe ring shard ρ.
So, per rank: (1) all-to-all in the Ulysses group: (b, n, H, d) → (b, U·n, H_u, d), the group's
tokens for this rank's heads (H_u ≈ H/U; uneven splits and GQA kv replication as in Ulysses);
(2) a local permutation into ring rank ρ's shard order (identity for contiguous); (3) ring
attention over the ring group with `layout` (exact, causal by global position); (4) the inverse
permutation and all-to-all back. Every step is exact, so the result equals single-process
attention on the full sequence.

Bytes per rank: the two Ulysses all-to-alls move (U−1)/U of q, k, v and o (as in Ulysses with
P = U), and the ring moves k/v of the U·n group tokens for H_kv/U heads, R−1 hops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from ctxscale.dist.layout import check_divisible, global_positions
from ctxscale.dist.ulysses import (
    _check_inputs,
    _world,
    head_plan,
    heads_to_seq,
    inverse_permutation,
    seq_to_heads,
    ulysses_attention,
)

_GROUPS: dict[tuple, dict] = {}  # (members, degree, grid kind) -> {ranks: process group}


def usp_grid(world_size: int, ulysses_degree: int, layout: str):
    """(ulysses_groups, ring_groups) as lists of group ranks: ulysses_groups[ρ][u] is the rank
    at ring rank ρ and Ulysses rank u; ring_groups[u][ρ] the same rank."""
    ring_degree = world_size // ulysses_degree
    if layout == "stripe":
        grid = [[rho + u * ring_degree for u in range(ulysses_degree)] for rho in range(ring_degree)]
    else:
        grid = [[rho * ulysses_degree + u for u in range(ulysses_degree)]
                for rho in range(ring_degree)]
    return grid, [[grid[rho][u] for rho in range(ring_degree)] for u in range(ulysses_degree)]


def _grid_groups(group, ulysses_degree: int, layout: str):
    """(Ulysses group, ring group) of this rank, created once per (group, degree, grid kind).

    `torch.distributed.new_group` must be called by every rank of the default group, in the same
    order. With `group` = WORLD that is every caller. For a proper subgroup (a context-parallel
    group of a larger mesh) every rank of the default group must call USP at the same time (as
    every rank of a data x context-parallel mesh does): the ranks exchange their groups' members
    once (all_gather_object) and all create the grid groups of every context-parallel group in
    one sorted order."""
    world = dist.get_world_size(group)
    members = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(
        range(dist.get_world_size()))
    kind = "strided" if layout == "stripe" else "blocked"
    key = (members, ulysses_degree, kind)
    if key not in _GROUPS:
        if len(members) == dist.get_world_size():
            all_members = [members]
        else:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, members)
            all_members = sorted(set(gathered))
        ulysses_groups, ring_groups = usp_grid(world, ulysses_degree, layout)
        for cp_members in all_members:
            made = {}
            for rows in (ulysses_groups, ring_groups):
                for row in rows:
                    ranks = tuple(cp_members[g] for g in row)
                    made[ranks] = dist.new_group(list(ranks))
            _GROUPS[(cp_members, ulysses_degree, kind)] = made
    made = _GROUPS[key]
    rank = dist.get_rank(group)
    ulysses_groups, ring_groups = usp_grid(world, ulysses_degree, layout)
    rho, u = next((r, c) for r, row in enumerate(ulysses_groups) for c, g in enumerate(row)
                  if g == rank)
    u_group = made[tuple(members[g] for g in ulysses_groups[rho])]
    r_group = made[tuple(members[g] for g in ring_groups[u])]
    return u_group, r_group, rho, u


def default_ulysses_degree(world_size: int, num_heads: int) -> int:
    """The largest divisor of the context-parallel size that also divides the query heads."""
    return max(u for u in range(1, world_size + 1) if world_size % u == 0 and num_heads % u == 0)


def usp_attention(q, k, v, *, group=None, layout="contiguous", causal=True, softmax_scale=None,
                  ulysses_degree=None, segments=None):
    """USP attention over the ranks of `group` (see the module docstring for grid and layout).

    q: (batch, N/P, heads, head_dim), k/v: (batch, N/P, kv_heads, head_dim), this rank's shard
    in `layout` over `group`. `ulysses_degree` U must divide P (default: the largest divisor of
    P that divides the number of query heads); U = P is Ulysses, U = 1 is ring attention.
    Returns o: (batch, N/P, heads, head_dim), this rank's shard in `layout`. Differentiable.
    `segments`: the global `(batch, N)` document ids (document masking); the ring groups'
    shards are shards of the same global sequence, so they pass them on unchanged.
    """
    from ctxscale.dist.ring import check_global_segments, ring_attention

    _check_inputs(q, k, v, layout)
    rank, world = _world(group)
    if ulysses_degree is None:
        ulysses_degree = default_ulysses_degree(world, q.shape[2])
    if ulysses_degree < 1 or world % ulysses_degree:
        raise ValueError(
            f"ulysses_degree={ulysses_degree} must divide the context-parallel size {world}; "
            f"valid degrees: {[u for u in range(1, world + 1) if world % u == 0]}"
        )
    seq_len = q.shape[1] * world
    check_divisible(seq_len, world, layout)
    check_global_segments(segments, q, world, "usp_attention")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if ulysses_degree == world:
        return ulysses_attention(q, k, v, group=group, layout=layout, causal=causal,
                                 softmax_scale=scale, segments=segments)
    if ulysses_degree == 1:
        return ring_attention(q, k, v, group=group, layout=layout, causal=causal,
                              softmax_scale=scale, segments=segments)

    ring_degree = world // ulysses_degree
    ulysses_groups, ring_groups = usp_grid(world, ulysses_degree, layout)
    u_group, r_group, rho, u = _grid_groups(group, ulysses_degree, layout)
    assert dist.get_rank(u_group) == u and dist.get_rank(r_group) == rho

    # (1) Ulysses all-to-all inside the Ulysses group.
    q_ranges, kv_lists = head_plan(q.shape[2], k.shape[2], ulysses_degree)
    q_lists = [list(r) for r in q_ranges]
    q_h, k_h, v_h = seq_to_heads([q, k, v], [q_lists, kv_lists, kv_lists], group=u_group)
    # (2) group tokens (rank-major over the Ulysses group) -> ring rank rho's shard order.
    held = torch.cat([global_positions(seq_len, g, world, layout, q.device)
                      for g in ulysses_groups[rho]])
    wanted = global_positions(seq_len, rho, ring_degree, layout, q.device)
    where = torch.full((seq_len,), -1, dtype=torch.long, device=q.device)
    where[held] = torch.arange(held.numel(), device=q.device)
    perm = where[wanted]
    assert perm.min() >= 0, "USP grid invariant: Ulysses group tokens = ring shard"
    identity = bool(torch.equal(perm, torch.arange(perm.numel(), device=q.device)))
    if not identity:
        q_h, k_h, v_h = (t.index_select(1, perm) for t in (q_h, k_h, v_h))
    # (3) ring attention over the ring group.
    o_h = ring_attention(q_h, k_h, v_h, group=r_group, layout=layout, causal=causal,
                         softmax_scale=scale, segments=segments)
    # (4) back to this rank's shard.
    if not identity:
        o_h = o_h.index_select(1, inverse_permutation(perm))
    (o,) = heads_to_seq([o_h], [q_lists], [q.shape[2]], group=u_group)
    return o


__all__ = ["usp_attention", "usp_grid", "default_ulysses_degree"]
