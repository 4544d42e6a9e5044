"""LoLCATs sliding-window + linear attention inside one layer, in linear time.

Paper: Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language Models" (2024), the
sliding-window + linear attention of its section 3 ("linear + sliding window attention").
For query t, the last `w` keys (t − w < s ≤ t) get softmax scores and every older key (s ≤ t − w)
the linear weight φ(q_t)·φ(k_s) (times the decay exp(G_t − G_s), G the cumulative log decay,
when the layer has one), with one shared normalizer and a trainable per-head factor λ_h:

    e_ts = exp(q_t·k_s/√d − m_t),   m_t = max_{t−w<s≤t} q_t·k_s/√d
    a_ts = λ_h φ(q_t)·φ(k_s) exp(G_t − G_s)
    o_t  = (Σ_{window} e_ts v_s + Σ_{older} a_ts v_s) / (Σ_{window} e_ts + Σ_{older} a_ts)

(as in LoLCATs' reference, the linear weights are not rescaled by m_t; m_t is part of the
definition). The window always holds s = t, so the denominator is ≥ 1 and needs no epsilon
(only the linear_only ablation adds `eps`). With w ≥ seq nothing is "older" and o is exactly
softmax attention.

Computation, both parts O(seq · (w + block)):
- window: queries in blocks of `block` rows; block j attends to the `block + w` keys ending at its
  last row (`Tensor.unfold` over the left-padded keys), masked to t − w < s ≤ t, so no seq × seq
  mask is ever built.
- older keys: the chunked linear-attention kernel with keys and values *delayed by w*: the key
  at position u is φ(k_{u−w}) (zero for u < w), so the kernel's state at t holds only s ≤ t − w.
  The kernel decays a key from its slot u = s + w to t by exp(G_t − G_{s+w}); the missing
  exp(G_{s+w} − G_s) (a product of w decays ≤ 1, no overflow) is folded into the delayed key.
  The denominator rides along as a column of ones in v, like `models/linear_attention.py`.

Context parallelism (contiguous layout): the window part needs the previous w tokens' k, v (and
for the delayed keys φ(k) and log decay) from the left rank, one halo exchange of a packed tensor
(`ParallelContext.with_halo`); the delayed-key linear part is ordinary linear attention over the
sharded sequence (state passing). `step` carries the same halo plus the kernel state.

Ablations (`mode`): "both", "linear_only" (no window terms), "window_only" (no linear terms),
"none" (output zero). Layout `(batch, seq, heads, dim)`; k, v already repeated to q's heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HYBRID_MODES = ("both", "linear_only", "window_only", "none")


def _window_softmax(q, kk, vv, *, window: int, valid_from: int, scale: float, block: int,
                    q_runs=None, k_runs=None):
    """Blocked sliding-window softmax numerator and denominator.

    q `(b, s, h, d)`; kk, vv `(b, w + s, h, ·)`: keys/values left-padded so local token u sits
    at index w + u; indices < `valid_from` are padding (before the sequence start). q_runs
    `(b, s)` / k_runs `(b, w + s)`: None, or the document of each query / key (a query sees only
    keys of its own document).
    Returns num `(b, s, h, dv)`, den `(b, s, h, 1)` with the row max of the window subtracted."""
    b, s, h, d = q.shape
    w = window
    B = max(1, min(block, s))
    nb = -(-s // B)
    pad = nb * B - s
    qp = F.pad(q, (0, 0, 0, 0, 0, pad)).view(b, nb, B, h, d)
    kp = F.pad(kk, (0, 0, 0, 0, 0, pad)).unfold(1, B + w, B)  # (b, nb, h, d, B+w)
    vp = F.pad(vv, (0, 0, 0, 0, 0, pad)).unfold(1, B + w, B)
    scores = torch.einsum("bnihd,bnhdc->bnhic", qp, kp) * scale  # (b, nb, h, B, B+w)
    i = torch.arange(B, device=q.device).view(B, 1)
    c = torch.arange(B + w, device=q.device).view(1, B + w)
    start = (torch.arange(nb, device=q.device) * B).view(nb, 1, 1)
    mask = (c > i) & (c <= i + w) & (start + c >= valid_from)  # (nb, B, B+w)
    mask = mask.unsqueeze(1)  # (nb, 1, B, B+w) against (b, nb, h, B, B+w)
    if q_runs is not None:
        qr = F.pad(q_runs, (0, pad), value=-1).view(b, nb, B)
        kr = F.pad(k_runs, (0, pad), value=-2).unfold(1, B + w, B)  # (b, nb, B+w)
        mask = mask & (qr.unsqueeze(-1) == kr.unsqueeze(-2)).unsqueeze(2)  # (b, nb, 1, B, B+w)
    scores = scores.masked_fill(~mask, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - m).masked_fill(~mask, 0.0)
    num = torch.einsum("bnhic,bnhec->bnihe", p, vp).reshape(b, nb * B, h, -1)[:, :s]
    den = p.sum(-1).permute(0, 1, 3, 2).reshape(b, nb * B, h, 1)[:, :s]
    return num, den


def window_linear_attention(q, k, v, phi_q, phi_k, log_decay, *, window: int, log_mix,
                            halo, linear, mode: str = "both", eps: float = 1e-6,
                            scale: float | None = None, block: int = 64, runs=None):
    """o `(b, s, h, dv)` of the module docstring.

    q, k `(b, s, h, d)` (RoPE'd, k repeated to q's heads), v `(b, s, h, dv)`; phi_q, phi_k
    `(b, s, h, F)`; log_decay `(b, s, h)`, `(h,)` or None; log_mix `(h,)`: λ = exp(log_mix).
    `halo(t)` returns the packed `(b, s, h, P)` tensor t with up to `window` previous tokens
    prepended (cp: `ParallelContext.with_halo`; step: the carried tail); `linear(phi_q, k, v,
    log_decay)` is unnormalized causal linear attention with scale 1 (kernel or cp state
    passing; `step` keeps the last `window` packed tokens that `halo` saw as its next halo).

    runs: None, or `(b, s)` integer document runs of these rows (packed documents; ids that
    change exactly at each document start, `kernels.recurrent_segments.runs`): the window sees
    only its query's document, and a delayed key whose token lies in another document than its
    slot is dropped, so with `linear` restarting its state at the same starts a query's linear
    part holds exactly its document's keys s ≤ t − w. The runs travel through `halo` with the
    packed keys (exact as floats below 2^24 runs)."""
    if mode not in HYBRID_MODES:
        raise ValueError(f"hybrid mode {mode!r} is not known; choose one of {HYBRID_MODES}")
    b, s, h, d = q.shape
    dv, fdim, w = v.shape[-1], phi_k.shape[-1], window
    cdt = torch.promote_types(q.dtype, torch.float32)
    if log_decay is None:
        g = q.new_zeros(b, s, h, dtype=cdt)
    else:
        g = log_decay.to(cdt).expand(b, s, h) if log_decay.dim() == 1 else log_decay.to(cdt)
    parts = [k.to(cdt), v.to(cdt), phi_k.to(cdt), g.unsqueeze(-1)]
    if runs is not None:
        if runs.shape != (b, s):
            raise ValueError(f"runs must be (batch, seq) = {(b, s)}, got {tuple(runs.shape)}")
        parts.append(runs.to(cdt).view(b, s, 1, 1).expand(b, s, h, 1))
    ext = halo(torch.cat(parts, dim=-1))
    lh = ext.shape[1] - s
    assert 0 <= lh <= w, (lh, w)
    padded = F.pad(ext, (0, 0, 0, 0, w - lh, 0))  # local token u at index w + u
    sizes = [d, dv, fdim, 1] + ([1] if runs is not None else [])
    kk, vv, pk, gg, *rest = padded.split(sizes, dim=-1)
    k_runs = rest[0][:, :, 0, 0].round().long() if rest else None  # (b, w + s)
    num = q.new_zeros(b, s, h, dv, dtype=cdt)
    den = q.new_zeros(b, s, h, 1, dtype=cdt)
    if mode in ("both", "linear_only"):
        # delayed keys: slot u holds token u − w (padded index u); fold in exp(G_u − G_{u−w})
        c0 = F.pad(torch.cumsum(gg.squeeze(-1).double(), dim=1), (0, 0, 1, 0))
        shift = (c0[:, w + 1 : w + 1 + s] - c0[:, 1 : 1 + s]).to(cdt)  # Σ g over (u−w, u]
        k_del = pk[:, :s] * torch.exp(shift).unsqueeze(-1)
        if runs is not None:  # slot u's token u − w must be in the document of slot u
            k_del = k_del * (k_runs[:, :s] == runs).to(cdt)[..., None, None]
        v_del = torch.cat([vv[:, :s], vv.new_ones(b, s, h, 1)], dim=-1)
        lin = linear(phi_q, k_del.to(phi_q.dtype), v_del.to(phi_q.dtype), log_decay).to(cdt)
        lam = torch.exp(log_mix.to(cdt)).view(1, 1, h, 1)
        num = num + lam * lin[..., :dv]
        den = den + lam * lin[..., dv:]
    if mode in ("both", "window_only"):
        sc = d ** -0.5 if scale is None else scale
        nw, dw = _window_softmax(q.to(cdt), kk, vv, window=w, valid_from=w - lh, scale=sc,
                                 block=block, q_runs=runs, k_runs=k_runs)
        num, den = num + nw, den + dw
    if mode == "linear_only":
        den = den + eps
    return (num / den).to(q.dtype) if mode != "none" else num.to(q.dtype)


def window_attention_weights(q, k, phi_q, phi_k, cum_decay, *, window: int, log_mix,
                             start: int, stop: int, mode: str = "both",
                             scale: float | None = None, q_offset: int = 0) -> torch.Tensor:
    """Unnormalized weights `(b, h, stop − start, stop)` of the hybrid for queries
    start ≤ t < stop over keys s < stop: e_ts in the window, a_ts before it, 0 after t.
    k `(b, N, h, d)`, phi_k `(b, N, h, F)`, cum_decay `(b, N, h)` or None over positions 0 … N − 1;
    q `(b, n, h, d)`, phi_q `(b, n, h, F)` hold positions q_offset … q_offset + n − 1 (context
    parallel: this rank's queries against the gathered keys; start, stop are global positions).
    Quadratic in the tile only (for the attention-transfer CE, models/linearize.py); float32
    (float64 for float64 q)."""
    i0, i1 = start, stop
    l0, l1 = i0 - q_offset, i1 - q_offset  # local query rows
    d = q.shape[-1]
    cdt = torch.promote_types(q.dtype, torch.float32)
    sc = d ** -0.5 if scale is None else scale
    t = torch.arange(i0, i1, device=q.device).view(-1, 1)
    sidx = torch.arange(i1, device=q.device).view(1, -1)
    in_win = (sidx <= t) & (sidx > t - window)
    older = sidx <= t - window
    out = 0
    if mode in ("both", "window_only"):
        scores = torch.einsum("bthd,bshd->bhts", q[:, l0:l1].to(cdt), k[:, :i1].to(cdt)) * sc
        scores = scores.masked_fill(~in_win, float("-inf"))
        m = scores.amax(-1, keepdim=True)
        out = torch.exp(scores - m).masked_fill(~in_win, 0.0)
    if mode in ("both", "linear_only"):
        a = torch.einsum("bthf,bshf->bhts", phi_q[:, l0:l1].to(cdt), phi_k[:, :i1].to(cdt))
        if cum_decay is not None:
            g = cum_decay.transpose(1, 2)
            diff = g[:, :, i0:i1, None] - g[:, :, None, :i1]
            a = a * torch.exp(diff.masked_fill(~older, float("-inf")))
        lam = torch.exp(log_mix.to(cdt)).view(1, -1, 1, 1)
        out = out + lam * a.masked_fill(~older, 0.0)
    return out


__all__ = ["HYBRID_MODES", "window_attention_weights", "window_linear_attention"]
