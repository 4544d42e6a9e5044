"""Titans' neural long-term memory: an MLP whose weights learn at test time.

Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024), Section 3.

Per head, the memory is an MLP with a normalized residual output (as in the paper's code and
titans-pytorch's ResidualNorm; it keeps the inner gradient steps bounded as the weights grow):

    M(x) = x + LN(z_L),   z_i = h_{i−1} W_i,  h_0 = x,  h_i = silu(z_i)   (row vectors, no biases)

with LN a layer norm without affine parameters (so keys and values share one width). For every
token t with key k_t, value v_t, query q_t and data-dependent gates
(forgetting α_t ∈ (0,1), momentum decay η_t ∈ (0,1), learning rate θ_t > 0), the weights move by
gradient descent with momentum on the associative loss ℓ(M; k, v) = ‖M(k) − v‖²:

    S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{t'}; k_t, v_t)          (momentum: the "surprise")
    M_t = (1 − α_t) M_{t−1} + S_t                           (forgetting gate)
    y_t = M_t(q_t)                                          (retrieval, after the update)

and M_{t'} is the memory at the start of t's chunk of `chunk_size` tokens (mini-batch gradient
descent, the paper's parallel training, Section 3.2). Exact equivalences:

- chunk_size = 1: t' = t − 1, so this is plain sequential (token-by-token) online learning;
  `neural_memory_reference` runs it literally, one token at a time, with autograd for ∇ℓ.
- chunk_size = C: `neural_memory` is the paper's parallel form. Within a chunk every ∇ℓ uses the
  chunk-start weights, so per token u_s^i = h_{i−1,s}ᵀ δ_{i,s} (input of layer i times its
  back-propagated error δ_i = ∂ℓ/∂z_i), and the two linear recurrences unroll to, with cumulative log gates
  Lη_t = Σ_{r≤t} log η_r, Lb_t = Σ_{r≤t} log(1 − α_r), Dη[r,s] = exp(Lη_r − Lη_s)·[r ≥ s],
  Db[t,r] = exp(Lb_t − Lb_r)·[t ≥ r]  (all entries ≤ 1, no overflow):

      M_t = exp(Lb_t) M_0 + g_t S_0 − Σ_{s≤t} K[t,s] θ_s u_s,   K = Db·Dη,  g = Db·exp(Lη)
      S_t = exp(Lη_t) S_0 − Σ_{s≤t} Dη[t,s] θ_s u_s

  (the scan over the chunk in closed form: C×C matmuls). Retrieval never materializes the
  per-token weights: for the input x_t of layer i,
      x_t M_t^i = exp(Lb_t)·x_t W_0^i + g_t·x_t S_0^i − Σ_s K[t,s] θ_s (x_t·h_{i−1,s}) δ_{i,s},
  an attention-like (C×C) product. The memory (weights and momentum) is carried across chunks,
  and `neural_memory_reference(chunk_size=C)` (token loop, gradients at the chunk start) equals
  it exactly.

Packed documents (`resets`): before chunk c the rows with `resets[:, c]` set restart from
`fresh` (the initial memory: the learned M_0 and zero momentum), so a document that begins at a
chunk start learns exactly as it would alone. Padding tokens (`pad`) do not move the memory:
they may only sit at the end of a chunk (after its other tokens, so no token reads past them);
the chunk's final state is taken at its last other token (the start state for a chunk of
padding only), and their outputs are undefined. No choice of gates would do this (η = 1, θ = 0
still adds the momentum to the weights each token). `models/titans_documents.py` pads each
document to whole chunks this way (`DocumentLayout`). `handover` `(b,)` (context parallelism: a chunk that
straddles the next rank) returns, for the rows where it is >= 0, the state at the start of that
chunk (after its restart) instead of the final state.

Layout: q, k, v `(batch, heads, seq, dim)`, gates `(batch, heads,
seq)` given as log η, log(1 − α) (both ≤ 0) and θ. The state is `MemoryState(weights,
momentum)`, each a tuple of per-layer tensors `(batch, heads, d_{i−1}, d_i)` in float32 (float64
for float64 inputs). Outputs `(batch, heads, seq, dim)`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ctxscale.kernels.dispatch import eager


class MemoryState(NamedTuple):
    weights: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.weights, *self.momentum]

    @classmethod
    def from_tensors(cls, tensors) -> MemoryState:
        n = len(tensors) // 2
        return cls(tuple(tensors[:n]), tuple(tensors[n:]))


def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


LN_EPS = 1e-5


def _readout(z, x):
    """The memory's output from the last pre-activation z_L and the input x: x + LN(z_L)."""
    return x + F.layer_norm(z, (z.shape[-1],), eps=LN_EPS)


def _readout_backward(z, err):
    """∂/∂z_L of ⟨err, LN(z_L)⟩: (err − mean(err) − n̂ · mean(err ⊙ n̂)) / σ, n̂ = LN(z_L)."""
    mu = z.mean(-1, keepdim=True)
    sigma = (z.var(-1, unbiased=False, keepdim=True) + LN_EPS).sqrt()
    n_hat = (z - mu) / sigma
    return (err - err.mean(-1, keepdim=True)
            - n_hat * (err * n_hat).mean(-1, keepdim=True)) / sigma


def mlp_apply(weights, x):
    """M(x) with per-(batch, head) weights: x `(b, h, n, d)` -> `(b, h, n, d)`."""
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = F.silu(h)
    return _readout(h, x)


def retrieve(state: MemoryState, q):
    """y = M(q) with the memory held fixed (no update): MAC's read of the previous segment."""
    return mlp_apply(state.weights, q.to(state.weights[0].dtype))


def _associative_grads(weights, k, v):
    """Per-token gradient factors of ‖M(k) − v‖² at `weights`: lists H (layer inputs h_{i−1}) and
    Δ (output errors δ_i), each `(b, h, n, d)`, with ∇_{W_i} ℓ_s = h_{i−1,s}ᵀ δ_{i,s}."""
    inputs, pre = [], []
    x = k
    for i, w in enumerate(weights):
        inputs.append(x)
        z = x @ w
        pre.append(z)
        x = F.silu(z) if i < len(weights) - 1 else z
    delta = _readout_backward(pre[-1], 2 * (_readout(pre[-1], k) - v))
    deltas = [None] * len(weights)
    for i in range(len(weights) - 1, -1, -1):
        deltas[i] = delta
        if i > 0:
            delta = (delta @ weights[i].transpose(-1, -2)) * _silu_grad(pre[i - 1])
    return inputs, deltas


def restart(state: MemoryState, flags, fresh: MemoryState) -> MemoryState:
    """`state` with the rows where `flags` `(batch,)` is True replaced by `fresh` (a document
    starts there; differentiable in both)."""
    f = flags.view(-1, 1, 1, 1)
    return MemoryState.from_tensors([torch.where(f, n, s)
                                     for s, n in zip(state.tensors(), fresh.tensors())])


def keep_handover(given, state: MemoryState, handover, i: int) -> MemoryState:
    """`given` (None before the first) with the rows whose `handover` is unit i set to `state`,
    that unit's start state (context parallelism, module docstring)."""
    return restart(state if given is None else given, handover == i, state)


def handed_over(final: MemoryState, given, handover) -> MemoryState:
    """The state to send on: `given` on the rows that hand over, `final` on the others."""
    return final if given is None else restart(final, handover >= 0, given)


def _decay_matrix(cum):
    """D[t, s] = exp(cum_t − cum_s) for t ≥ s else 0; cum `(b, h, C)` -> `(b, h, C, C)`."""
    n = cum.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool, device=cum.device).tril()
    diff = cum.unsqueeze(-1) - cum.unsqueeze(-2)
    return torch.where(mask, diff, torch.full_like(diff, float("-inf"))).exp()


def _at(t, end):
    """Entries `(b, h)` of `t` `(b, h, C)` at position end `(b,)`, or its rows `(b, h, C)`
    for `t` `(b, h, C, C)`."""
    e = end.clamp_min(0).view(-1, 1, 1).expand(*t.shape[:2], 1)
    if t.dim() == 3:
        return t.gather(-1, e).squeeze(-1)
    return t.gather(-2, e.unsqueeze(-1).expand(*t.shape[:2], 1, t.shape[-1])).squeeze(-2)


def memory_chunk(state: MemoryState, q, k, v, log_eta, log_keep, theta, end=None):
    """One chunk of the parallel form (module docstring). Returns (y `(b, h, C, d)`, state).
    `end` `(b,)`: the position whose state is returned (the chunk's last token that is not
    padding; -1: none, the start state is returned); None: the last position."""
    w0, s0 = state.weights, state.momentum
    cum_eta, cum_keep = log_eta.cumsum(-1), log_keep.cumsum(-1)
    d_eta, d_keep = _decay_matrix(cum_eta), _decay_matrix(cum_keep)
    kmat = d_keep @ d_eta  # (b, h, C, C)
    g = (d_keep @ cum_eta.exp().unsqueeze(-1)).squeeze(-1)  # (b, h, C)
    beta = cum_keep.exp()
    a = kmat * theta.unsqueeze(-2)  # A[t, s] = K[t, s] θ_s
    inputs, deltas = _associative_grads(w0, k, v)
    x = q
    n_layers = len(w0)
    for i in range(n_layers):
        z = (beta.unsqueeze(-1) * (x @ w0[i]) + g.unsqueeze(-1) * (x @ s0[i])
             - (a * (x @ inputs[i].transpose(-1, -2))) @ deltas[i])
        x = F.silu(z) if i < n_layers - 1 else _readout(z, q)
    if end is None:
        row_a, row_eta = a[..., -1, :], d_eta[..., -1, :]
        beta_e, g_e, eta_e = beta[..., -1], g[..., -1], cum_eta[..., -1]
    else:  # rows of a later position: its later tokens have zero weight (K is triangular)
        row_a, row_eta = _at(a, end), _at(d_eta, end)
        beta_e, g_e, eta_e = _at(beta, end), _at(g, end), _at(cum_eta, end)
    last_a = row_a.unsqueeze(-1)  # (b, h, C, 1)
    last_m = (row_eta * theta).unsqueeze(-1)
    new_w, new_s = [], []
    for i in range(n_layers):
        h_t = inputs[i].transpose(-1, -2)
        new_w.append(beta_e[..., None, None] * w0[i] + g_e[..., None, None] * s0[i]
                     - h_t @ (last_a * deltas[i]))
        new_s.append(eta_e[..., None, None].exp() * s0[i] - h_t @ (last_m * deltas[i]))
    new = MemoryState(tuple(new_w), tuple(new_s))
    return x, (new if end is None else restart(new, end < 0, state))


def _chunk_end(pad, lo, hi):
    """Per row, the last position of chunk [lo, hi) that is not padding (-1: none)."""
    real = ~pad[:, lo:hi]
    pos = torch.arange(real.shape[1], device=real.device)
    return torch.where(real, pos, -1).amax(1)


class _Documents(NamedTuple):
    """Per chunk, whether any row restarts before it / holds padding / hands its start state
    over (read once, on the host, so chunks without any run the plain chunk)."""

    restarts: list[bool]
    padded: list[bool]
    handover: frozenset

    @classmethod
    def of(cls, resets, pad, n: int, chunk_size: int, handover=None) -> _Documents:
        n_chunks = -(-n // chunk_size)
        restarts = [False] * n_chunks if resets is None else resets.any(0).tolist()
        hands = frozenset() if handover is None else frozenset(handover[handover >= 0].tolist())
        if pad is None:
            return cls(restarts, [False] * n_chunks, hands)
        padded = torch.nn.functional.pad(pad, (0, n_chunks * chunk_size - n))
        return cls(restarts, padded.view(pad.shape[0], n_chunks, chunk_size).any(2).any(0)
                   .tolist(), hands)

    def start(self, state, i, resets, fresh):
        return restart(state, resets[:, i], fresh) if self.restarts[i] else state

    def end(self, pad, i, lo, hi):
        return _chunk_end(pad, lo, hi) if self.padded[i] else None


def _check_inputs(state, q, k, v, log_eta, log_keep, theta, chunk_size, resets=None,
                  fresh=None, pad=None, handover=None):
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    b, h, n, _ = q.shape
    if resets is not None:
        n_chunks = -(-n // chunk_size)
        if resets.dtype != torch.bool or tuple(resets.shape) != (b, n_chunks):
            raise ValueError(f"resets must be a bool tensor (batch, chunks) = {(b, n_chunks)}; "
                             f"got {resets.dtype} {tuple(resets.shape)}")
        if fresh is None:
            raise ValueError("resets need `fresh`, the state a restarted row begins from")
    if pad is not None and (pad.dtype != torch.bool or tuple(pad.shape) != (b, n)):
        raise ValueError(f"pad must be a bool tensor (batch, seq) = {(b, n)}; got {pad.dtype} "
                         f"{tuple(pad.shape)}")
    if handover is not None and tuple(handover.shape) != (b,):
        raise ValueError(f"handover must be a (batch,) = {(b,)} tensor of chunk indices; got "
                         f"{tuple(handover.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape (batch, heads, seq, dim) (the memory's "
                         f"output is x + LN(·)); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    for name, gate in (("log_eta", log_eta), ("log_keep", log_keep), ("theta", theta)):
        if gate.shape != (b, h, n):
            raise ValueError(f"{name} has shape {tuple(gate.shape)}; expected {(b, h, n)}")
    if state.weights[0].shape[:2] != (b, h):
        raise ValueError(f"memory state is for (batch, heads)={tuple(state.weights[0].shape[:2])}"
                         f", inputs are {(b, h)}")


@eager
def neural_memory(state: MemoryState, q, k, v, log_eta, log_keep, theta, *, chunk_size: int,
                  recompute: bool = False, resets=None, fresh: MemoryState | None = None,
                  pad=None, handover=None, host_flags=None):
    """Chunked (parallel) memory over a sequence; returns (y `(b, h, n, d)`, final state).
    A trailing partial chunk is allowed; splitting a sequence at multiples of `chunk_size` and
    carrying the state gives the same result as one call. `resets` `(b, chunks)` bool: the
    rows that restart from `fresh` before each chunk; `pad` `(b, n)` bool: padding tokens, at
    the ends of chunks; `handover` `(b,)`: return the start state of that chunk (packed
    documents, module docstring). `host_flags`: (per chunk whether any row restarts, per chunk
    whether any row has padding, the chunks in `handover`) when the caller has them on the host
    already (a `DocumentLayout` in units of `chunk_size`); otherwise they are read here (one
    host sync each for resets, pad and handover).

    recompute=True (activation checkpointing) keeps only the inputs and the state at every
    chunk start for the backward, which recomputes one chunk at a time from its start state
    (one more forward of the memory; no per-chunk activations are held between the passes)."""
    _check_inputs(state, q, k, v, log_eta, log_keep, theta, chunk_size, resets, fresh, pad,
                  handover)
    docs = None
    if host_flags is not None:
        docs = _Documents(list(host_flags[0]), list(host_flags[1]), frozenset(host_flags[2]))
        n_chunks = -(-q.shape[2] // chunk_size)
        if len(docs.restarts) != n_chunks or len(docs.padded) != n_chunks:
            raise ValueError(f"neural_memory: host_flags hold {len(docs.restarts)} restart and "
                             f"{len(docs.padded)} padding flags for {n_chunks} chunks of "
                             f"{chunk_size}; pass one per chunk (or none)")
    cdt = state.weights[0].dtype
    q, k, v, log_eta, log_keep, theta = (t.to(cdt) for t in (q, k, v, log_eta, log_keep, theta))
    fresh_t = () if resets is None else tuple(t.to(cdt) for t in fresh.tensors())
    inputs = (*state.tensors(), *fresh_t, q, k, v, log_eta, log_keep, theta)
    if (recompute and q.shape[2] and torch.is_grad_enabled()
            and any(t.requires_grad for t in inputs)):
        y, *final = _RecomputedMemory.apply(chunk_size, len(state.weights), resets, pad,
                                            handover, docs, *inputs)
        return y, MemoryState.from_tensors(final)
    fresh = None if resets is None else MemoryState.from_tensors(fresh_t)
    return _chunks(state, q, k, v, log_eta, log_keep, theta, chunk_size, resets=resets,
                   fresh=fresh, pad=pad, handover=handover, docs=docs)


def _chunks(state, q, k, v, log_eta, log_keep, theta, chunk_size, starts=None, resets=None,
            fresh=None, pad=None, handover=None, docs=None):
    """The chunk loop of `neural_memory`; appends each chunk's start state (before any restart)
    to `starts`. `docs`: the `_Documents` of (resets, pad, handover), if already read."""
    ys, given = [], None
    if docs is None:
        docs = _Documents.of(resets, pad, q.shape[2], chunk_size, handover)
    for s in range(0, q.shape[2], chunk_size):
        e, i = s + chunk_size, s // chunk_size
        if starts is not None:
            starts.append(state)
        state = docs.start(state, i, resets, fresh)
        if i in docs.handover:
            given = keep_handover(given, state, handover, i)
        y, state = memory_chunk(state, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                log_eta[:, :, s:e], log_keep[:, :, s:e], theta[:, :, s:e],
                                docs.end(pad, i, s, e))
        ys.append(y)
    y = torch.cat(ys, 2) if ys else q.new_zeros(*q.shape[:3], state.weights[-1].shape[-1])
    return y, handed_over(state, given, handover)


class _RecomputedMemory(torch.autograd.Function):
    """`neural_memory` whose forward saves no activations, only the chunk-start states; the
    backward walks the chunks last to first, recomputing each with autograd from its start
    state and propagating (dy, d state) into d(inputs, previous state). The inputs hold no
    parameters, so gradients are taken with `torch.autograd.grad` over the chunk's own inputs
    (compatible with FSDP and pipeline schedules, unlike a reentrant checkpoint)."""

    @staticmethod
    def forward(ctx, chunk_size, n_layers, resets, pad, handover, docs, *inputs):
        n_state = 2 * n_layers
        n_fresh = 0 if resets is None else n_state
        state = MemoryState.from_tensors(inputs[:n_state])
        fresh = MemoryState.from_tensors(inputs[n_state : n_state + n_fresh]) if n_fresh else None
        seq = inputs[n_state + n_fresh :]
        starts: list[MemoryState] = []
        if docs is None:
            docs = _Documents.of(resets, pad, seq[0].shape[2], chunk_size, handover)
        with torch.no_grad():
            y, final = _chunks(state, *seq, chunk_size, starts, resets, fresh, pad, handover,
                               docs)
        ctx.chunk_size, ctx.n_layers, ctx.n_chunks = chunk_size, n_layers, len(starts)
        ctx.resets, ctx.pad, ctx.n_fresh, ctx.docs = resets, pad, n_fresh, docs
        ctx.handover = handover
        between = (t for st in starts[1:] for t in st.tensors())
        ctx.save_for_backward(*seq, *inputs[n_state : n_state + n_fresh], *between,
                              *inputs[:n_state])
        return (y, *final.tensors())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, *dstate):
        saved = ctx.saved_tensors
        n_state, n_fresh = 2 * ctx.n_layers, ctx.n_fresh
        seq, fresh = saved[:6], saved[6 : 6 + n_fresh]
        base = 6 + n_fresh
        starts = [saved[-n_state:]] + [saved[base + i * n_state : base + (i + 1) * n_state]
                                       for i in range(ctx.n_chunks - 1)]
        c = ctx.chunk_size
        dseq = [torch.zeros_like(t) for t in seq]
        dfresh = [torch.zeros_like(t) for t in fresh]
        dstate = [torch.zeros_like(t) if g is None else g for g, t in zip(dstate, starts[-1])]
        dgiven = None
        if ctx.docs.handover:  # the returned state is a chunk's start state on those rows
            given = (ctx.handover >= 0).view(-1, 1, 1, 1)
            dgiven = [torch.where(given, g, 0.0) for g in dstate]
            dstate = [torch.where(given, 0.0, g) for g in dstate]
        for i in range(ctx.n_chunks - 1, -1, -1):
            lo, hi = i * c, (i + 1) * c
            with torch.enable_grad():
                st = [t.detach().requires_grad_() for t in starts[i]]
                fr = [t.detach().requires_grad_() for t in fresh]
                xs = [t[:, :, lo:hi].detach().requires_grad_() for t in seq]
                begin = MemoryState.from_tensors(st)
                if n_fresh:
                    begin = ctx.docs.start(begin, i, ctx.resets, MemoryState.from_tensors(fr))
                outs, douts = [], [dy[:, :, lo:hi], *dstate]
                if i in ctx.docs.handover:
                    begin = MemoryState.from_tensors([t.view_as(t) for t in begin.tensors()])
                    rows = (ctx.handover == i).view(-1, 1, 1, 1)
                    outs, douts = begin.tensors(), [*douts, *(torch.where(rows, g, 0.0)
                                                              for g in dgiven)]
                y, new = memory_chunk(begin, *xs, ctx.docs.end(ctx.pad, i, lo, hi))
                outs = [y, *new.tensors(), *outs]
                grads = torch.autograd.grad(outs, st + fr + xs, douts, allow_unused=True)
            dstate = [torch.zeros_like(t) if g is None else g for g, t in zip(grads[:n_state], st)]
            for d, g in zip(dfresh, grads[n_state : n_state + n_fresh]):
                if g is not None:
                    d += g
            for d, g in zip(dseq, grads[n_state + n_fresh :]):
                if g is not None:
                    d[:, :, lo:hi] = g
        return (None, None, None, None, None, None, *dstate, *dfresh, *dseq)


def neural_memory_reference(state: MemoryState, q, k, v, log_eta, log_keep, theta, *,
                            chunk_size: int = 1, resets=None, fresh: MemoryState | None = None,
                            pad=None):
    """Token-by-token oracle: per token, ∇ℓ by autograd at the weights of the chunk start, then
    the momentum and forgetting recurrences, then y_t = M_t(q_t). chunk_size=1 is sequential.
    `resets` / `fresh` as in `neural_memory`; a `pad` token leaves the memory as it is."""
    _check_inputs(state, q, k, v, log_eta, log_keep, theta, chunk_size, resets, fresh, pad)
    cdt = state.weights[0].dtype
    q, k, v, log_eta, log_keep, theta = (t.to(cdt) for t in (q, k, v, log_eta, log_keep, theta))
    weights, momentum = list(state.weights), list(state.momentum)
    anchor = weights
    ys = []
    for t in range(q.shape[2]):
        if t % chunk_size == 0:
            if resets is not None:
                st = restart(MemoryState(tuple(weights), tuple(momentum)),
                             resets[:, t // chunk_size], fresh)
                weights, momentum = list(st.weights), list(st.momentum)
            anchor = weights
        with torch.enable_grad():
            w_req = [w if w.requires_grad else w.detach().requires_grad_() for w in anchor]
            err = mlp_apply(w_req, k[:, :, t : t + 1]) - v[:, :, t : t + 1]
            grads = torch.autograd.grad(err.pow(2).sum(), w_req, create_graph=True)
        eta = log_eta[:, :, t].exp()[..., None, None]
        keep = log_keep[:, :, t].exp()[..., None, None]
        th = theta[:, :, t][..., None, None]
        new_s = [eta * s - th * gr for s, gr in zip(momentum, grads)]
        new_w = [keep * w + s for w, s in zip(weights, new_s)]
        if pad is not None:
            skip = pad[:, t].view(-1, 1, 1, 1)
            new_s = [torch.where(skip, s, n) for s, n in zip(momentum, new_s)]
            new_w = [torch.where(skip, w, n) for w, n in zip(weights, new_w)]
        momentum, weights = new_s, new_w
        ys.append(mlp_apply(weights, q[:, :, t : t + 1]))
    y = torch.cat(ys, 2) if ys else q.new_zeros(*q.shape[:3], weights[-1].shape[-1])
    return y, MemoryState(tuple(weights), tuple(momentum))


__all__ = ["MemoryState", "handed_over", "keep_handover", "memory_chunk", "mlp_apply",
           "neural_memory", "neural_memory_reference", "restart", "retrieve"]
