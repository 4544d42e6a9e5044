"""Document boundaries for the recurrent kernels (packed sequences): validation and run ids.

A packed row holds several documents one after another. The recurrent kernels (linear attention,
the selective scan, the causal conv1d) take `segments`, the `(batch, seq)` document id of every
token (int32 or int64, on the inputs' device), and keep each document's recurrence to itself:

- a document starts at every position t > 0 where `segments[:, t] != segments[:, t - 1]`; the
  state is reset to zero there (linear attention and the scan: S_t = k_t v_tᵀ, no decayed
  S_{t-1}; the conv: no tap reaches a token of an earlier document);
- `initial_state` belongs to the row's first document (the tokens before the first change) and
  reaches no later document;
- the final state is the state after the row's last token, so it holds the last document only
  (with the initial state in it when the row has no change).

Only changes between neighbours count: ids [0, 0, 1, 1, 0] are three documents (the state resets
at the third and the fifth token), unlike softmax document masking, which lets equal ids see each
other wherever they are. Ids made by `launch/data/text.document_layout` rise by one at each
document start, so both readings agree there.

`runs(segments)` numbers the documents of each row 0, 1, 2, ... (int32, the cumulative count of
changes), so "same document" is equality of runs and contiguity is built in.
"""

from __future__ import annotations

import torch


def check_segments(segments, batch: int, seq: int, device: torch.device, *, what: str) -> None:
    """Raise a ValueError naming the problem and the fix unless `segments` is an int32/int64
    `(batch, seq)` tensor on `device`."""
    shape = (batch, seq)
    if not isinstance(segments, torch.Tensor):
        raise ValueError(f"{what}: segments must be an int32 or int64 tensor of shape (batch, seq) "
                         f"= {shape} (each token's document id); got a {type(segments).__name__}")
    if tuple(segments.shape) != shape or segments.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what}: segments must be an int32 or int64 tensor of shape (batch, seq) "
                         f"= {shape} (each token's document id); got {segments.dtype} "
                         f"{tuple(segments.shape)}")
    if segments.device != torch.device(device):
        raise ValueError(f"{what}: segments are on {segments.device} and the inputs on {device}; "
                         "put the document ids on the inputs' device")


def valid_segments(segments, batch: int, seq: int, device: torch.device) -> bool:
    """Whether `segments` passes `check_segments` (for the Triton kernels' `supports`)."""
    return segments is None or (
        isinstance(segments, torch.Tensor) and segments.dtype in (torch.int32, torch.int64)
        and tuple(segments.shape) == (batch, seq) and segments.device == torch.device(device))


def starts(segments: torch.Tensor) -> torch.Tensor:
    """`(batch, seq)` bool: True where a document starts after the row's first token (the id
    differs from the previous token's)."""
    out = torch.zeros(segments.shape, dtype=torch.bool, device=segments.device)
    out[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return out


def runs(segments: torch.Tensor) -> torch.Tensor:
    """Document index of every token within its row, `(batch, seq)` int32: 0 up to the first
    change of id, +1 at each change."""
    return starts(segments).cumsum(1, dtype=torch.int32)


def runs_with_previous(segments: torch.Tensor) -> torch.Tensor:
    """`(batch, seq + 1)` runs with the run of a virtual token before the row prepended (equal to
    the first token's: the initial state belongs to the first document)."""
    r = runs(segments)
    return torch.cat([r[:, :1], r], dim=1)


def pad_runs(run: torch.Tensor, length: int) -> torch.Tensor:
    """`run` `(batch, ·)` extended to `length` entries with its last run (padding tokens stay in
    the last document)."""
    pad = length - run.shape[1]
    return torch.cat([run, run[:, -1:].expand(run.shape[0], pad)], dim=1) if pad > 0 else run


__all__ = ["check_segments", "pad_runs", "runs", "runs_with_previous", "valid_segments"]
