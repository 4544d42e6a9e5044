"""Selective scan (the S6 layer of Mamba), and its dispatcher.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023. Per channel
c, state index i and time t (zero-order-hold discretization, as in mamba-ssm):

    Δ_t   = softplus(delta_t + delta_bias)         (softplus and bias optional)
    x_t   = exp(Δ_t A_ci) · x_{t-1} + Δ_t B_it u_t  (state, (batch, dim, dstate))
    y_t   = Σ_i C_it x_t,i  + D_c u_t
    out_t = y_t · silu(z_t)                          (when z is given)

Signature and shapes follow mamba-ssm's `selective_scan_fn`: u, delta, z `(batch, dim, seq)`;
A `(dim, dstate)` (real); B, C `(batch, dstate, seq)`, grouped `(batch, groups, dstate, seq)`
(channel c uses group c // (dim / groups)) or fixed `(dim, dstate)`; D, delta_bias `(dim,)`.
Returns out `(batch, dim, seq)` in u's dtype, or `(out, last_state)` with last_state
`(batch, dim, dstate)` in float32 (float64 for float64 inputs). `initial_state` (an extension,
same shape as last_state) starts the scan from a given state; context parallelism uses it.

Paths:
- `reference`: the recurrence token by token; the oracle for tests (float64 capable).
- `chunked`: exact and parallel inside a chunk. With G_t = Σ_{s≤t} Δ_s A (cumulative sum in log
  space within the chunk), x_t = e^{G_t} x_start + Σ_{s≤t} e^{G_t−G_s} Δ_s B_s u_s. When every
  |G| of a segment is below `cumsum_limit` (60 in float32), the sum is computed as
  e^{G_t} · cumsum_s(e^{−G_s} Δ_s B_s u_s): O(chunk) work per state and no overflow (for
  monotone G every partial sum is bounded by e^{−G_t}, so the rounding stays relative to the
  result). Stronger decays halve the segment's chunk (down to 4 tokens) until |G| fits, so they
  cost more chunk-to-chunk steps rather than chunk² work (forward+backward at 4K tokens, dim 64,
  dstate 16 with the kernel benchmark's decays, 2-core CPU: 3.4 s at chunk 32 masked, 0.29 s).
  Only when even 4-token chunks exceed the limit is the difference matrix e^{G_t−G_s}, masked to
  −∞ for s > t *before* the exponential, used: every exponent is ≤ 0 for A ≤ 0, nothing
  overflows however strong the decay, at O(chunk²) work. Chunk-end states are chained chunk to
  chunk. Chunks are processed a segment at a time, recomputed in the backward when
  gradients are needed so autograd memory stays O(seq · dim · dstate / chunk) + one segment;
  segment outputs and gradients go into preallocated full-length buffers (no per-segment
  allocation outlives its segment, which keeps glibc's heap from fragmenting, see
  `_scan_segments_into`).
- `triton`: `ctxscale.kernels.selective_scan_triton.selective_scan` (same signature) when that
  module exists and its `supports(...)` accepts the call.
- `mamba_ssm`: mamba-ssm's CUDA `selective_scan_fn` on CUDA when installed (no initial_state,
  no segments).

Packed sequences: `segments` `(batch, seq)` (document ids, see `kernels/recurrent_segments.py`)
resets the state at every document start (x_t = Δ_t B_t u_t there) and keeps `initial_state` to
the first document. The chunked form then runs each chunk's recurrence as a log-depth scan of
the pairs (e^{Δ_t A}, Δ_t B_t u_t) with the decay set to 0 at document starts
(`_document_chunk_scan`; `cumsum_limit` does not apply): the running products of the decays
are also what each token reads of the chunk's start state, and the last one what the chunk
carries to the next. (A cumulative sum minus its value before the document's first token
would cancel: measured 1e-13 in float64 and 1.3e-5 in float32 on B's gradient for decays
above 1, against 1e-16 / 5e-8 without documents.)
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ctxscale.kernels.dispatch import (
    eager,
    forced_path,
    log_choice,
    module_available,
    want_triton,
)
from ctxscale.kernels.recurrent_segments import check_segments, pad_runs, runs_with_previous

DEFAULT_CHUNK = 32
DEFAULT_SEGMENT_CHUNKS = 32
# strong decays halve the chunk down to this before the O(chunk²) masked form is used
MIN_ADAPTIVE_CHUNK = 4
# |G| up to which e^{±G} is used directly: e^60 ~ 1e26 leaves float32 headroom for the inputs
CUMSUM_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped_bc(X: torch.Tensor, name: str, b: int, d: int, n: int, L: int, cdt) -> torch.Tensor:
    """B or C as `(batch, groups, dstate, seq)` (possibly an expanded view) in the compute dtype."""
    if X.dim() == 3:
        if X.shape != (b, n, L):
            raise ValueError(f"{name} has shape {tuple(X.shape)}; expected (batch, dstate, seq) = {(b, n, L)}")
        return X.to(cdt).unsqueeze(1)
    if X.dim() == 4:
        g = X.shape[1]
        if X.shape != (b, g, n, L) or g < 1 or d % g != 0:
            raise ValueError(
                f"{name} has shape {tuple(X.shape)}; expected (batch, groups, dstate, seq) with "
                f"dim ({d}) divisible by groups, batch {b}, dstate {n}, seq {L}"
            )
        return X.to(cdt)
    if X.dim() == 2:
        if X.shape != (d, n):
            raise ValueError(f"{name} has shape {tuple(X.shape)}; a fixed {name} must be (dim, dstate) = {(d, n)}")
        return X.to(cdt).view(1, d, n, 1).expand(b, d, n, L)
    raise ValueError(
        f"{name} has shape {tuple(X.shape)}; expected (batch, dstate, seq), "
        "(batch, groups, dstate, seq) or (dim, dstate)"
    )


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, segments=None):
    """Check shapes; return (u, Δ, A, B, C) in the compute dtype with Δ fully transformed."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(
            f"u {tuple(u.shape)} and delta {tuple(delta.shape)} must both be (batch, dim, seq)"
        )
    b, d, L = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A has shape {tuple(A.shape)}; expected (dim, dstate) with dim = {d}")
    if A.is_complex():
        raise ValueError("complex A is not supported; use a real (dim, dstate) A as in Mamba")
    n = A.shape[1]
    cdt = _compute_dtype(u.dtype)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (dim,) = {(d,)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z has shape {tuple(z.shape)}; expected (batch, dim, seq) = {(b, d, L)}")
    if initial_state is not None and initial_state.shape != (b, d, n):
        raise ValueError(
            f"initial_state has shape {tuple(initial_state.shape)}; expected (batch, dim, dstate) "
            f"= {(b, d, n)}"
        )
    if segments is not None:
        check_segments(segments, b, L, u.device, what="selective_scan")
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Bg = _grouped_bc(B, "B", b, d, n, L, cdt)
    Cg = _grouped_bc(C, "C", b, d, n, L, cdt)
    return u.to(cdt), dt, A.to(cdt), Bg, Cg


def _finish(y, u, D, z, out_dtype):
    """out = (y + D u) · silu(z)."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def _per_channel(X: torch.Tensor, d: int) -> torch.Tensor:
    """`(batch, groups, dstate, seq)` -> `(batch, dim, seq, dstate)` (channel c in group c // (d/g))."""
    b, g, n, L = X.shape
    return X.transpose(-1, -2).unsqueeze(2).expand(b, g, d // g, L, n).reshape(b, d, L, n)


# ---------------------------------------------------------------- reference
def selective_scan_reference(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, *, initial_state=None, segments=None,
):
    """Token-by-token recurrence (the oracle); same arguments and returns as `selective_scan`."""
    uc, dt, Ac, Bg, Cg = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  initial_state, segments)
    b, d, L = u.shape
    n = A.shape[1]
    Bc = _per_channel(Bg, d)
    Cc = _per_channel(Cg, d)
    x = (
        initial_state.to(uc.dtype)
        if initial_state is not None
        else uc.new_zeros(b, d, n)
    )
    ys = []
    for t in range(L):
        if segments is not None and t > 0:  # a document starts: forget the state
            x = x * (segments[:, t] == segments[:, t - 1]).to(x.dtype)[:, None, None]
        x = torch.exp(dt[:, :, t, None] * Ac) * x + (dt[:, :, t] * uc[:, :, t])[..., None] * Bc[:, :, t]
        ys.append((x * Cc[:, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else uc.new_zeros(b, d, 0)
    out = _finish(y, uc, D, z, u.dtype)
    return (out, x) if return_last_state else out


# ---------------------------------------------------------------- chunked
def _chunk_plan(dt, A, chunk: int, cumsum_limit: float):
    """(chunk, padding, G `(b, d, nc, chunk, n)`, fits) for one segment: the largest chunk, from
    `chunk` halving down to `MIN_ADAPTIVE_CHUNK`, whose within-chunk log decays G all have
    |G| <= cumsum_limit (fits=True: the O(chunk) cumulative-sum form applies); when none does,
    the smallest tried (fits=False: the masked-difference form, O(chunk²), cheapest at small
    chunks). Strong decays thus cost more chunk-to-chunk steps, not chunk² work."""
    b, d, T = dt.shape
    c = chunk
    while True:
        nc = -(-T // c)
        pad = nc * c - T
        # Δ = 0 means decay 1 and no input: padded steps leave the state unchanged
        dtp = F.pad(dt, (0, pad)) if pad else dt
        G = (dtp.reshape(b, d, nc, c).unsqueeze(-1) * A[:, None, None, :]).cumsum(-2)
        fits = bool(G.abs().amax() <= cumsum_limit)
        if fits or c <= MIN_ADAPTIVE_CHUNK:
            return c, pad, G, fits
        c = max(MIN_ADAPTIVE_CHUNK, c // 2)


def _document_chunk_scan(dt, A, bu, run, nc: int, C: int):
    """Within-chunk states with document resets: the linear recurrence x_t = a_t x_{t−1} + bu_t
    (a_t = e^{Δ_t A}, 0 at a document start) as a log-depth Hillis–Steele scan of the pairs
    (a, bu) over each chunk. dt `(b, d, T)`, A `(d, n)`, bu `(b, d, nc, C, n)` (padded), run
    `(b, T + 1)` (the run of the token before the segment, then each token's). Returns
    (x_local: the states from the chunk's inputs alone, and P: the products of a from the
    chunk's start, which are how much of the chunk's start state each token reads; both
    `(b, d, nc, C, n)`).

    Exact and stable: P and every partial product are products of decays ≤ 1 (no e^{−G} as in
    the cumulative-sum form, whose difference at a document start would cancel), at
    ~3·log2(C) elementwise passes instead of ~5."""
    b, d, T = dt.shape
    pad = nc * C - T
    dtp = F.pad(dt, (0, pad)) if pad else dt
    run = pad_runs(run, nc * C + 1)  # padded tokens: Δ = 0, no input, they change nothing
    keep = (run[:, 1:] == run[:, :-1]).to(dt.dtype).reshape(b, 1, nc, C, 1)
    prod = torch.exp(dtp.reshape(b, d, nc, C, 1) * A[:, None, None, :]) * keep
    x_local = bu
    step = 1
    while step < C:  # (P, x)_t ∘= (P, x)_{t − step}
        x_local = torch.cat([x_local[..., :step, :],
                             x_local[..., step:, :] + prod[..., step:, :] * x_local[..., :-step, :]],
                            dim=-2)
        prod = torch.cat([prod[..., :step, :], prod[..., step:, :] * prod[..., :-step, :]], dim=-2)
        step *= 2
    return x_local, prod


def _scan_segment(dt, bu_scale, A, Bg, Cg, x, chunk: int, cumsum_limit: float, run=None):
    """One segment of the scan without D/z. dt, bu_scale (= Δ·u) `(b, d, T)`; A `(d, n)`;
    Bg, Cg `(b, g, n, T)`; x `(b, d, n)`; run None or `(b, T + 1)` (document resets, see
    `_document_chunk_scan`). Returns (y `(b, d, T)`, state after the segment).
    Without documents, uses the cumulative-sum form at the largest chunk (<= `chunk`) where
    every |G| is <= cumsum_limit, else the masked-difference form (see `_chunk_plan`)."""
    b, d, T = dt.shape
    n = A.shape[1]
    if run is None:
        chunk, pad, G, fits = _chunk_plan(dt, A, chunk, cumsum_limit)  # G: b d nc C n
    else:
        pad = -T % chunk
    nc = (T + pad) // chunk
    Bc = _per_channel(Bg, d)  # b d T n
    Cc = _per_channel(Cg, d)
    if pad:
        bu_scale = F.pad(bu_scale, (0, pad))
        Bc, Cc = F.pad(Bc, (0, 0, 0, pad)), F.pad(Cc, (0, 0, 0, pad))
    bu = bu_scale.reshape(b, d, nc, chunk, 1) * Bc.reshape(b, d, nc, chunk, n)
    if run is not None:
        x_local, read = _document_chunk_scan(dt, A, bu, run, nc, chunk)
    elif fits:
        # e^{±G} cannot overflow: x_local_t = e^{G_t} Σ_{s≤t} e^{−G_s} bu_s, O(chunk) per state
        read = torch.exp(G)
        x_local = read * (torch.exp(-G) * bu).cumsum(-2)
    else:
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=dt.device).tril()
        diff = G.unsqueeze(-2) - G.unsqueeze(-3)  # [t, s] = G_t - G_s : b d nc C C n
        W = torch.exp(torch.where(causal[:, :, None], diff, float("-inf")))
        x_local = (W * bu.unsqueeze(-3)).sum(-2)
        read = torch.exp(G)
    # x_local: b d nc C n, the state reached from this chunk's inputs alone; read: the factor
    # of the chunk's start state in each token's state
    decay_end = read[:, :, :, -1]  # b d nc n
    before = []
    # unbind once: indexing inside the loop would cost a full-size gradient per chunk
    for decay_c, local_c in zip(decay_end.unbind(2), x_local[:, :, :, -1].unbind(2)):
        before.append(x)
        x = decay_c * x + local_c
    x_start = torch.stack(before, dim=2)  # b d nc n
    states = x_local + read * x_start.unsqueeze(-2)
    y = (states * Cc.reshape(b, d, nc, chunk, n)).sum(-1).reshape(b, d, nc * chunk)[:, :, :T]
    return y, x


def _run_slice(run, s0: int, s1: int):
    """The `(b, s1 - s0 + 1)` runs a segment [s0, s1) needs (its previous token's first)."""
    return None if run is None else run[:, s0 : s1 + 1]


def _scan_segments_into(dt, bu_scale, A, Bg, Cg, x, chunk: int, seg: int, limit: float, starts=None,
                        run=None):
    """All segments in order, each segment's y copied into one preallocated `(b, d, L)` output
    (and, when `starts` `(nseg, b, d, n)` is given, each segment's start state into it).
    Returns (y, final state).

    Why preallocate: a segment allocates ~25 MB of temporaries; when its small results (y, the
    state) are allocated after them and kept (a list to concatenate), they pin the top of the
    heap and glibc (whose aligned allocations cannot reuse an exactly-sized hole) serves the next
    segment from fresh memory, so the heap grows by the temporaries of every segment (8.6 GB for
    one 256K-token Mamba layer instead of ~2 GB) and each segment touches cold memory."""
    b, d, L = dt.shape
    y = dt.new_empty(b, d, L)
    for i, s0 in enumerate(range(0, L, seg)):
        s1 = min(s0 + seg, L)
        if starts is not None:
            starts[i].copy_(x)
        y_seg, x = _scan_segment(dt[..., s0:s1], bu_scale[..., s0:s1], A, Bg[..., s0:s1],
                                 Cg[..., s0:s1], x, chunk, limit, _run_slice(run, s0, s1))
        y[..., s0:s1].copy_(y_seg)
        del y_seg
    return y, x


class _SegmentedScan(torch.autograd.Function):
    """The segment loop with recomputation: forward keeps only each segment's start state
    `(nseg, b, d, n)`; backward recomputes one segment at a time (last first) and writes its input
    gradients into preallocated full-length buffers (same arithmetic as checkpointing each
    segment, without the per-segment allocations that fragment the heap, see
    `_scan_segments_into`)."""

    @staticmethod
    def forward(ctx, dt, bu_scale, A, Bg, Cg, x0, chunk, seg, limit, run):
        b, d, L = dt.shape
        nseg = -(-L // seg)
        starts = x0.new_empty(nseg, *x0.shape)
        with torch.no_grad():
            y, x = _scan_segments_into(dt, bu_scale, A, Bg, Cg, x0, chunk, seg, limit, starts, run)
        ctx.save_for_backward(dt, bu_scale, A, Bg, Cg, starts)
        ctx.cfg = (chunk, seg, limit)
        ctx.run = run  # integer runs (no gradient) or None
        return y, x

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gx):
        dt, bu_scale, A, Bg, Cg, starts = ctx.saved_tensors
        chunk, seg, limit = ctx.cfg
        need = ctx.needs_input_grad[:6]
        L = dt.shape[-1]
        grads = [torch.zeros_like(t) if need[i] else None
                 for i, t in enumerate((dt, bu_scale, A, Bg, Cg))]
        gx = torch.zeros_like(starts[0]) if gx is None else gx
        if gy is None:
            gy = dt.new_zeros(dt.shape)
        for i in reversed(range(starts.shape[0])):
            s0, s1 = i * seg, min((i + 1) * seg, L)
            ins = [dt[..., s0:s1], bu_scale[..., s0:s1], A, Bg[..., s0:s1], Cg[..., s0:s1], starts[i]]
            ins = [t.detach().requires_grad_(True) for t in ins]
            with torch.enable_grad():
                y_seg, x_end = _scan_segment(*ins, chunk, limit, _run_slice(ctx.run, s0, s1))
                got = torch.autograd.grad((y_seg, x_end), ins, (gy[..., s0:s1], gx), allow_unused=True)
            del y_seg, x_end
            for j, g in enumerate(got[:5]):
                if grads[j] is None or g is None:
                    continue
                if j == 2:
                    grads[j] += g
                else:
                    grads[j][..., s0:s1].copy_(g)
            gx = got[5] if got[5] is not None else torch.zeros_like(gx)
            del got, ins
        return (*grads, gx if need[5] else None, None, None, None, None)


def selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, *, initial_state=None, chunk_size: int = DEFAULT_CHUNK,
    segment_chunks: int = DEFAULT_SEGMENT_CHUNKS, recompute: bool | None = None,
    cumsum_limit: float | None = None, segments=None,
):
    """Chunked exact scan (see the module docstring); same returns as `selective_scan`.
    `recompute` recomputes each segment in the backward (default: when gradients are needed and there is more
    than one segment). `chunk_size` is the largest chunk; strong decays use smaller ones.
    `cumsum_limit` bounds |G| for the cumulative-sum form (default 60 in float32, 600 in
    float64; 0 forces the masked-difference form, at chunk min(chunk_size, 4))."""
    if chunk_size < 1 or segment_chunks < 1:
        raise ValueError(f"chunk_size ({chunk_size}) and segment_chunks ({segment_chunks}) must be >= 1")
    uc, dt, Ac, Bg, Cg = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  initial_state, segments)
    b, d, L = u.shape
    n = A.shape[1]
    run = runs_with_previous(segments) if segments is not None else None
    x = initial_state.to(uc.dtype) if initial_state is not None else uc.new_zeros(b, d, n)
    bu_scale = dt * uc
    limit = CUMSUM_LIMIT[uc.dtype] if cumsum_limit is None else cumsum_limit
    seg = chunk_size * segment_chunks
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias, initial_state)
    )
    if recompute is None:
        recompute = needs_grad and L > seg
    if recompute:
        y, x = _SegmentedScan.apply(dt, bu_scale, Ac, Bg, Cg, x, chunk_size, seg, limit, run)
    elif L <= seg:
        y, x = _scan_segment(dt, bu_scale, Ac, Bg, Cg, x, chunk_size, limit, run)
    elif not needs_grad:
        # no autograd: nothing is kept per segment but the preallocated output
        y, x = _scan_segments_into(dt, bu_scale, Ac, Bg, Cg, x, chunk_size, seg, limit, run=run)
    else:
        ys = []
        # split (not slicing in the loop): its backward is one concatenation, while each slice's
        # backward would materialize a full-length gradient, quadratic in the number of segments
        pieces = [t.split(seg, dim=-1) for t in (dt, bu_scale, Bg, Cg)]
        for i, (dt_seg, bu_seg, B_seg, C_seg) in enumerate(zip(*pieces)):
            run_seg = _run_slice(run, i * seg, (i + 1) * seg)
            y, x = _scan_segment(dt_seg, bu_seg, Ac, B_seg, C_seg, x, chunk_size, limit, run_seg)
            ys.append(y)
        y = torch.cat(ys, dim=-1) if ys else uc.new_zeros(b, d, 0)
    out = _finish(y, uc, D, z, u.dtype)
    return (out, x) if return_last_state else out


# ---------------------------------------------------------------- dispatcher
def _import(name: str):
    if not module_available(name):
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _mamba_ssm_fn():
    mod = _import("mamba_ssm.ops.selective_scan_interface")
    return getattr(mod, "selective_scan_fn", None) if mod is not None else None


@eager
def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, *, initial_state=None, segments=None,
):
    """Selective scan with mamba-ssm's `selective_scan_fn` signature (see the module docstring).

    The path is `CTXSCALE_KERNELS_SELECTIVE_SCAN` (reference | chunked | triton | mamba_ssm) when
    set; else Triton where `CTXSCALE_KERNELS` asks for it and the kernel supports the call; else
    mamba-ssm's CUDA kernel on CUDA when installed (and no initial_state); else chunked.
    `segments`: None or the `(batch, seq)` document ids of packed rows (the state resets at each
    document start; see the module docstring)."""
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    path = forced_path("selective_scan")
    if path == "reference":
        log_choice("selective_scan", "reference", "forced")
        return selective_scan_reference(*args, initial_state=initial_state, segments=segments)
    reason = "forced" if path else "pytorch path"
    if path == "triton" or (path is None and want_triton(u.device)):
        mod = _import("ctxscale.kernels.selective_scan_triton")
        if mod is not None and mod.supports(*args, initial_state=initial_state, segments=segments):
            log_choice("selective_scan", "triton", reason if path else "auto")
            return mod.selective_scan(*args, initial_state=initial_state, segments=segments)
        if path == "triton":
            raise RuntimeError(
                "CTXSCALE_KERNELS_SELECTIVE_SCAN=triton but the Triton selective-scan kernel is "
                "missing or does not support these inputs; unset the variable to fall back"
            )
        reason = "triton kernel missing or unsupported for these inputs"
    if path == "mamba_ssm" or (path is None and u.device.type == "cuda"):
        fn = _mamba_ssm_fn() if u.device.type == "cuda" else None
        if fn is not None and initial_state is None and segments is None:
            log_choice("selective_scan", "mamba_ssm", reason if path else "installed")
            return fn(*args)
        if path == "mamba_ssm":
            raise RuntimeError(
                "CTXSCALE_KERNELS_SELECTIVE_SCAN=mamba_ssm needs mamba-ssm installed, CUDA inputs, "
                "no initial_state and no segments (document resets); unset the variable to fall "
                "back"
            )
    log_choice("selective_scan", "chunked", reason)
    return selective_scan_chunked(*args, initial_state=initial_state, segments=segments)
