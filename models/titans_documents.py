"""Packed documents for Titans (`data.document_mask`): the padded document layout.

Titans' memory learns by mini-batch gradient descent over chunks (mac: over segments), so a
packed document computes what it computes alone only if its chunks are cut from its own start
and the memory restarts there. `DocumentLayout` lays a row out in slots where every document
begins at a multiple of `unit` (mac: `segment_len`, mag / mal: `chunk_size`), its tokens in
order, then padding up to the next multiple. The memory runs on the slots; padding does not
move it (`titans_memory.neural_memory`'s `pad`), and `resets` restart it from M_0 before the
units that begin a later document.

Context parallelism (contiguous shards of m tokens, m a multiple of `unit`): a unit of a
document may straddle the boundary between ranks r − 1 and r, with o ∈ (0, unit) of its tokens
on r − 1. Rank r then recomputes that whole unit: it prepends the previous rank's last
unit − 1 tokens (`halo`; only the unit's o tokens get slots, the others are `skip`ped), starts
from the state at the unit's start, which rank r − 1 sends in place of its final state
(`handover`: the unit whose start state goes on, per row), and drops the halo tokens' outputs
(rank r − 1 computes them itself). A document that starts exactly at a boundary, or a unit that
ends there, needs neither. `cp_document_layout` derives all of it from the global document ids,
which every rank holds. Where the straddling unit begins a document on rank r − 1, the state
handed over is M_0 already (restarted there), so rank r needs no reset of its own.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor

from ctxscale.kernels.recurrent_segments import runs, starts


def _take(x, index, dim):
    """x gathered along `dim` at `index` `(batch, m)` (the same positions for every channel)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    size = list(x.shape)
    size[dim] = index.shape[1]
    index = index.view(shape).expand(size)
    if isinstance(x, DTensor):  # a replicated activation under tensor parallelism (mac)
        index = DTensor.from_local(index, x.device_mesh, x.placements, run_check=False)
    return x.gather(dim, index)


class DocumentLayout(NamedTuple):
    """Packed documents padded to whole units: a row of `length` slots (a multiple of `unit`,
    the longest row's); module docstring."""

    source: torch.Tensor  # (b, length) long: the token in each slot, or n at padding slots
    index: torch.Tensor  # (b, n) long: the slot of each token (0 for skipped tokens)
    pad: torch.Tensor  # (b, length) bool: padding slots
    resets: torch.Tensor  # (b, length // unit) bool: units that begin a later document
    unit: int
    restarts: list[bool]  # per unit: whether any row restarts there (on the host)
    padded: list[bool]  # per unit: whether any row has padding there
    halo: int = 0  # leading tokens from the previous cp rank (outputs dropped)
    exchange: int = 0  # the halo length every cp rank exchanges (unit − 1; 0 without cp)
    handover: torch.Tensor | None = None  # (b,) long: unit whose start state is sent on; -1
    handover_units: frozenset = frozenset()  # the units >= 0 in handover (on the host)

    @classmethod
    def build(cls, document_ids: torch.Tensor, unit: int, *, skip=None,
              halo: int = 0) -> DocumentLayout:
        """`skip` `(b,)`: leading tokens of each row that get no slot (a skipped token still
        tells whether the next one begins a document)."""
        b, n = document_ids.shape
        dev = document_ids.device
        run = runs(document_ids).long()
        tokens = torch.arange(n, device=dev).expand(b, n)
        present = (torch.ones_like(tokens, dtype=torch.bool) if skip is None
                   else tokens >= skip.view(b, 1))
        n_docs = int(run[:, -1].max()) + 1 if n else 1
        lengths = torch.zeros(b, n_docs, dtype=torch.long, device=dev)
        lengths.scatter_add_(1, run, present.long())
        padded = (lengths + unit - 1) // unit * unit
        first_slot = (padded.cumsum(1) - padded).gather(1, run)
        first_token = (lengths.cumsum(1) - lengths).gather(1, run)
        ordinal = tokens - (0 if skip is None else skip.view(b, 1))
        length = max(int(padded.sum(1).max()), unit)
        slot = torch.where(present, first_slot + ordinal - first_token, length)  # length: none
        source = torch.full((b, length + 1), n, dtype=torch.long, device=dev)
        source.scatter_(1, slot, tokens)
        begins = torch.zeros(b, length + 1, dtype=torch.bool, device=dev)
        begins.scatter_(1, slot, starts(document_ids) & present)
        source, begins = source[:, :length], begins[:, :length]
        pad, resets = source == n, begins[:, ::unit].contiguous()
        return cls(source, torch.where(present, slot, 0), pad, resets, unit,
                   resets.any(0).tolist(), pad.view(b, -1, unit).any(2).any(0).tolist(), halo)

    def pack(self, x, dim: int = 1):
        """`x` with the token axis `dim` (length n) laid out in slots (zeros at padding)."""
        shape = list(x.shape)
        shape[dim] = 1
        return _take(torch.cat([x, x.new_zeros(shape)], dim), self.source, dim)

    def unpack(self, y, dim: int = 1):
        """Back from slots to the tokens, without the halo."""
        y = _take(y, self.index, dim)
        return y.narrow(dim, self.halo, y.shape[dim] - self.halo)


def cp_document_layout(document_ids, unit: int, cp_rank: int, cp_size: int) -> DocumentLayout:
    """This contiguous cp rank's layout from the global `(b, N)` ids (module docstring); one
    rank (cp_size 1) is the plain layout."""
    b, total = document_ids.shape
    m = total // cp_size
    start = cp_rank * m
    change = starts(document_ids)
    pos = torch.arange(total, device=document_ids.device).expand(b, total)
    first = torch.where(change, pos, 0).cummax(1).values  # each token's document start

    def lead(at):  # tokens of the unit holding global position `at` that lie before it
        return (at - first[:, at]) % unit

    halo = unit - 1 if cp_rank > 0 else 0
    skip = (halo - lead(start)) if cp_rank > 0 else None
    lo = start - halo
    layout = DocumentLayout.build(document_ids[:, lo : start + m], unit, skip=skip, halo=halo)
    layout = layout._replace(exchange=unit - 1 if cp_size > 1 else 0)
    if cp_rank == cp_size - 1:
        return layout
    hands = lead(start + m) > 0
    handover = torch.where(hands, layout.index[:, -1] // unit, -1)
    return layout._replace(handover=handover,
                           handover_units=frozenset(handover[hands].tolist()))


__all__ = ["DocumentLayout", "cp_document_layout"]
