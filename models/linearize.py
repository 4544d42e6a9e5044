"""Linearizing a pretrained softmax Transformer: student construction and attention transfer.

Papers: Zhang et al., "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax
Mimicry" (ICLR 2024); Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language Models"
(2024); Liu et al., "LAWCAT: Efficient Distillation from Quadratic to Linear Attention with
Convolution across Tokens" (2025).

Student: `linearize(teacher, kind=...)` builds a `HybridLM` with the teacher's config, every layer
whose letter in `layer_pattern` is `L` turned into `LinearAttention` of `kind`, and copies all of
the teacher's weights (embeddings, norms, MLPs, q/k/v/o); the new parameters (Hedgehog feature
maps, initialized to the identity map so φ starts as [softmax(q), softmax(−q)]; LAWCAT's conv taps
initialized to the identity and its gate) are listed by `new_parameter_names`.

Attention transfer (stage 1), per layer l, on the teacher's own normalized input x_l
`(batch, seq, dim)` (the teacher is frozen, so every layer trains independently on exact inputs):

- Hedgehog cross-entropy between the teacher's causal softmax weights
  p_ts = softmax_s(q_t·k_s / √d) (RoPE applied) and the student's normalized linear weights
  a_ts = φ(q_t)·φ(k_s) · exp(G_t − G_s) / Σ_{s'≤t} (same), G_t = Σ_{r≤t} log γ_r (1 without decay):
  CE = −mean_{b,h,t} Σ_{s≤t} p_ts log a_ts. Computed in query tiles of `tile` rows, so memory
  is O(batch · heads · tile · seq) instead of O(seq²). Under context parallelism (contiguous
  layout) each rank computes the CE of its own query rows against the all-gathered keys of the
  whole sequence (teacher k, φ(k) and per-token log decays with gradient, window k), with the
  causal mask offset by the rank's first position (`attention_transfer_ce_cp`); the ranks'
  sums add up to the single-process sum. With `rope` the student's φ sees the
  RoPE'd q/k, like the layer. With a LoLCATs window (`window` > 0) a_ts are the hybrid layer's
  own weights: exp(q·k/√d − m_t) inside the window, λ φ(q)·φ(k)·decay before it, one shared
  normalizer (models/window_attention.py).
- LoLCATs output MSE between the layers' outputs Wo·attn(x_l): mean over (batch, seq, dim).

Layout inside attention `(batch, seq, heads, head_dim)`.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn

from ctxscale.models.config import ModelConfig
from ctxscale.models.hybrid import HybridLM, layer_codes
from ctxscale.models.window_attention import window_attention_weights

TRANSFER_LOSSES = ("ce", "mse", "both")


def student_config(teacher_cfg: ModelConfig, *, kind: str, layer_pattern: str = "L",
                   **linear_attention) -> ModelConfig:
    """The teacher's config with the attention of every `L` layer of `layer_pattern` (repeated
    over the layers; `A` keeps softmax) replaced by linear attention of `kind`."""
    if teacher_cfg.family != "transformer":
        raise ValueError(f"linearize needs a transformer teacher, got family {teacher_cfg.family!r}")
    if not layer_pattern or set(layer_pattern) - set("AL"):
        raise ValueError(f"layer_pattern {layer_pattern!r} must use only A (softmax) and L (linear)")
    cfg = copy.deepcopy(teacher_cfg)
    codes = (layer_pattern * cfg.num_layers)[: cfg.num_layers]
    cfg.family = "linear" if set(codes) == {"L"} else "hybrid"
    cfg.layer_pattern = codes
    cfg.linear_attention.kind = kind
    for key, value in linear_attention.items():
        if not hasattr(cfg.linear_attention, key):
            raise ValueError(f"unknown linear_attention option {key!r}")
        setattr(cfg.linear_attention, key, value)
    cfg.validate()
    return cfg


def linearize(teacher: nn.Module, *, kind: str, layer_pattern: str = "L", parallel=None,
              **linear_attention) -> HybridLM:
    """A `HybridLM` student holding the teacher's weights (see the module docstring)."""
    cfg = student_config(teacher.cfg, kind=kind, layer_pattern=layer_pattern, **linear_attention)
    student = HybridLM(cfg, parallel if parallel is not None else teacher.parallel)
    student.to(next(teacher.parameters()).device)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert set(missing) == set(new_parameter_names(student)), (missing,)
    return student


def new_parameter_names(student: HybridLM) -> list[str]:
    """Parameters a softmax Transformer does not have (feature maps, conv taps, gates, the
    LoLCATs window/linear mix λ)."""
    new = ("feature_map_q", "feature_map_k", "q_conv", "k_conv", ".wg.", ".wb.", "out_norm",
           "linear_mix")
    return [n for n, _ in student.named_parameters() if any(t in n for t in new)]


def linear_layers(student: HybridLM) -> list[str]:
    """Names (keys of `student.layers`) of the linear-attention layers."""
    return [str(i) for i, c in enumerate(layer_codes(student.cfg)) if c == "L"]


# ------------------------------------------------------------------ student attention weights


def student_features(layer, x: torch.Tensor, cos=None, sin=None, *, cumulative: bool = True):
    """The student's φ(q), φ(k) `(b, s, heads, F)` (k/v heads repeated for GQA) and the
    cumulative log decay G `(b, s, heads)` (None without decay) for input x `(b, s, dim)`;
    the same pre-attention math as `LinearAttention._run` (RoPE from cos/sin `(b, s, head_dim)`
    when the layer has `rope`; LAWCAT's conv goes through `layer.parallel`, so under context
    parallelism it receives its halo from the previous rank). `cumulative=False` returns the
    per-token log decays log γ_t `(b, s, heads)` instead of their cumsum (context parallel:
    the cumsum must run over the gathered global sequence)."""
    b, s, _ = x.shape
    hd, rep = layer.head_dim, layer.num_heads // layer.kv_heads
    q, k = layer.wq(x), layer.wk(x)
    if layer.kind == "lawcat":
        par = layer.parallel
        q = par.causal_conv1d(q.transpose(1, 2), layer.q_conv).transpose(1, 2)
        k = par.causal_conv1d(k.transpose(1, 2), layer.k_conv).transpose(1, 2)
    q, k = q.view(b, s, -1, hd), k.view(b, s, -1, hd)
    if layer.rope:
        q, k = layer._rotate(q, cos, sin, "q/k"), layer._rotate(k, cos, sin, "q/k")
    q, k = layer._features(q, k)
    if rep > 1:
        k = k.repeat_interleave(rep, dim=2)
    k = layer.gate_writes(x, k)
    log_decay = layer._log_decay(x)
    if log_decay is None:
        return q, k, None
    if log_decay.dim() == 1:
        log_decay = log_decay.view(1, 1, -1).expand(b, s, -1)
    log_decay = log_decay.to(torch.promote_types(log_decay.dtype, torch.float32))
    return q, k, (torch.cumsum(log_decay, dim=1) if cumulative else log_decay)


def student_window_qk(layer, x: torch.Tensor, cos, sin):
    """The RoPE'd q, k `(b, s, heads, d)` (k repeated for GQA) of a windowed layer's softmax
    window (before any conv), as in `LinearAttention._run`."""
    b, s, _ = x.shape
    hd, rep = layer.head_dim, layer.num_heads // layer.kv_heads
    q = layer._rotate(layer.wq(x).view(b, s, -1, hd), cos, sin, "the window's q/k")
    k = layer._rotate(layer.wk(x).view(b, s, -1, hd), cos, sin, "the window's q/k")
    return q, (k.repeat_interleave(rep, dim=2) if rep > 1 else k)


def teacher_qk(attn, x: torch.Tensor, cos, sin):
    """The teacher's RoPE'd q, k `(b, s, heads, d)` (k heads repeated for GQA)."""
    q, k, _ = attn.qkv(x, cos, sin)
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=2)
    return q, k


def attention_transfer_ce(q_t, k_t, phi_q, phi_k, cum_decay=None, *, tile: int = 64,
                          eps: float = 1e-12, window: int = 0, q_w=None, k_w=None,
                          log_mix=None, q_offset: int = 0, reduction: str = "mean") -> torch.Tensor:
    """Hedgehog's cross-entropy −Σ_s p_ts log a_ts between causal softmax weights of
    (q_t, k_t) and normalized linear weights of (phi_q, phi_k) with cumulative log decay
    `cum_decay` `(b, N, h)` or None; computed `tile` queries at a time.

    Queries q_t `(b, n, h, d)`, phi_q `(b, n, h, F)` (and q_w) sit at global positions
    `q_offset` … `q_offset + n − 1`; keys k_t `(b, N, h, d)`, phi_k `(b, N, h, F)` (and k_w) and
    `cum_decay` cover positions 0 … N − 1 with N ≥ q_offset + n (single process: q_offset = 0,
    n = N; context parallel: this rank's queries against the gathered keys, see
    `attention_transfer_ce_cp`). `reduction`: "mean" over (b, h, local rows) or "sum".
    `window` > 0: the student is the LoLCATs hybrid with window q/k `q_w, k_w` `(b, ·, h, d)`
    and log λ `log_mix` `(h,)` (`window_attention_weights`)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r} is not known; choose 'mean' or 'sum'")
    b, n, h, d = q_t.shape
    if k_t.shape[1] < q_offset + n:
        raise ValueError(f"queries at positions {q_offset}..{q_offset + n - 1} need keys up to "
                         f"there, got {k_t.shape[1]} keys; pass the keys of the whole prefix")
    scale = d ** -0.5
    cdt = torch.promote_types(q_t.dtype, torch.float32)  # float32 (float64 for float64 inputs)
    total = q_t.new_zeros((), dtype=cdt)
    for i0 in range(0, n, tile):
        i1 = min(i0 + tile, n)
        g0, g1 = q_offset + i0, q_offset + i1  # global query positions
        rows = torch.arange(g0, g1, device=q_t.device).view(-1, 1)
        cols = torch.arange(g1, device=q_t.device).view(1, -1)
        mask = cols <= rows  # (tile, g1)
        scores = torch.einsum("bthd,bshd->bhts", q_t[:, i0:i1].to(cdt), k_t[:, :g1].to(cdt)) * scale
        p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        if window:
            w = window_attention_weights(q_w, k_w, phi_q, phi_k, cum_decay, window=window,
                                         log_mix=log_mix, start=g0, stop=g1, q_offset=q_offset)
        else:
            w = torch.einsum("bthf,bshf->bhts", phi_q[:, i0:i1].to(cdt), phi_k[:, :g1].to(cdt))
            if cum_decay is not None:
                g = cum_decay.transpose(1, 2)  # (b, h, N)
                diff = g[:, :, g0:g1, None] - g[:, :, None, :g1]
                w = w * torch.exp(diff.masked_fill(~mask, float("-inf")))
            w = w.masked_fill(~mask, 0.0)
        a = w / (w.sum(-1, keepdim=True) + eps)
        total = total - (p * torch.log(a + eps)).sum()
    return total if reduction == "sum" else total / (b * h * n)


def attention_transfer_ce_cp(q_t, k_t, phi_q, phi_k, log_decay=None, *, group, tile: int = 64,
                             eps: float = 1e-12, window: int = 0, q_w=None, k_w=None,
                             log_mix=None, reduction: str = "sum") -> torch.Tensor:
    """The CE of `attention_transfer_ce` under context parallelism (contiguous layout, P ranks
    of `group`, rank r holding tokens [r·n, (r+1)·n) of the N = P·n).

    All inputs are this rank's shards: q_t, k_t `(b, n, h, d)`, phi_q, phi_k `(b, n, h, F)`,
    per-token log decays `log_decay` `(b, n, h)` (`student_features(..., cumulative=False)`) or
    None, window q_w, k_w `(b, n, h, d)`. Every key-side tensor is all-gathered along the
    sequence: k_t without gradient (the teacher is frozen), φ(k), log γ and k_w with it
    (`gather_sequence` is differentiable: its backward all-reduces the key gradients and hands
    each rank the slice of the keys it owns). G is the cumsum of the gathered log γ, so it is
    the global cumulative decay, exactly as on one device. Then this rank's rows are the
    queries at positions r·n … r·n + n − 1 against keys 0 … N − 1.

    Returns the sum over this rank's (b, h, rows) with `reduction="sum"` (the ranks' sums add
    to the single-process sum; divide by b·h·N for the global mean), or that sum / (b·h·n).
    Memory per rank: O(N · h · (d + F)) for the gathered keys, O(b · h · tile · N) per tile."""
    from ctxscale.dist.layout import gather_sequence

    rank = dist.get_rank(group)
    n = q_t.shape[1]

    def gather(t):
        return None if t is None else gather_sequence(t.contiguous(), group=group,
                                                      layout="contiguous", dim=1)

    with torch.no_grad():
        k_all = gather(k_t)
    cum = gather(log_decay)
    if cum is not None:
        cum = torch.cumsum(cum, dim=1)
    return attention_transfer_ce(q_t, k_all, phi_q, gather(phi_k), cum, tile=tile, eps=eps,
                                 window=window, q_w=q_w, k_w=gather(k_w), log_mix=log_mix,
                                 q_offset=rank * n, reduction=reduction)


def attention_transfer_loss(teacher_block, student_block, x_norm, cos, sin, *, loss: str = "both",
                            tile: int = 64, reduction: str = "mean") -> dict:
    """Per-layer transfer losses for the normalized layer input `x_norm` `(b, s, dim)`.

    Returns {"loss": the optimized value, "ce": ..., "mse": ...} (only the computed ones).
    `reduction="sum"` gives each loss summed (CE over (b, h, rows), MSE over elements) for
    exact sharded averaging: the caller divides each by its global count. Under context
    parallelism (the student layer's `parallel.cp_enabled`, contiguous layout) x_norm, cos, sin
    are this rank's shard and the CE runs `attention_transfer_ce_cp` (collective: every cp rank
    must call this for the same layers in the same order); "mean" is then over this rank's
    rows / elements."""
    if loss not in TRANSFER_LOSSES:
        raise ValueError(f"transfer loss {loss!r} is not known; choose one of {TRANSFER_LOSSES}")
    t_attn, s_attn = teacher_block.attention, student_block.attention
    par = getattr(s_attn, "parallel", None)
    cp = par is not None and par.cp_enabled
    out = {}
    if loss in ("ce", "both"):
        if cp and par.cp_layout != "contiguous":
            raise ValueError(
                f"the attention-transfer CE under context parallelism needs "
                f"parallel.cp_layout=contiguous (got {par.cp_layout!r}): each rank's queries "
                "must be one contiguous piece of the sequence; set parallel.cp_layout=contiguous "
                "or convert.transfer.loss=mse")
        with torch.no_grad():
            q_t, k_t = teacher_qk(t_attn, x_norm, cos, sin)
        phi_q, phi_k, decay = student_features(s_attn, x_norm, cos, sin, cumulative=not cp)
        win = {}
        if s_attn.window:
            q_w, k_w = student_window_qk(s_attn, x_norm, cos, sin)
            win = dict(window=s_attn.window, q_w=q_w, k_w=k_w, log_mix=s_attn.linear_mix)
        if cp:
            out["ce"] = attention_transfer_ce_cp(q_t, k_t, phi_q, phi_k, decay, group=par.cp_group,
                                                 tile=tile, reduction=reduction, **win)
        else:
            out["ce"] = attention_transfer_ce(q_t, k_t, phi_q, phi_k, decay, tile=tile,
                                              reduction=reduction, **win)
    if loss in ("mse", "both"):
        with torch.no_grad():
            y_t = t_attn(x_norm, cos, sin)
        y_s = s_attn(x_norm, cos, sin)
        err = (y_s.float() - y_t.float()).pow(2)
        out["mse"] = err.sum() if reduction == "sum" else err.mean()
    out["loss"] = sum(v for k, v in out.items())
    return out


@torch.no_grad()
def teacher_layer_inputs(teacher, input_ids, position_ids=None):
    """Run the frozen teacher; returns (cos, sin, {layer name: normalized attention input})."""
    h = teacher.tok_embeddings(input_ids)
    b, s = input_ids.shape
    if position_ids is None:
        position_ids = teacher.parallel.position_ids(b, s, device=h.device)
    cos, sin = teacher.rope(position_ids)
    inputs = {}
    for name, layer in teacher.layers.items():
        inputs[name] = layer.attention_norm(h)
        h = layer(h, cos, sin)
    return cos, sin, inputs


def freeze_all_but(model: nn.Module, names) -> list[nn.Parameter]:
    """requires_grad only for the parameters in `names`; returns them."""
    names = set(names)
    out = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            out.append(p)
    return out


__all__ = ["TRANSFER_LOSSES", "attention_transfer_ce", "attention_transfer_ce_cp",
           "attention_transfer_loss",
           "freeze_all_but", "linear_layers", "linearize", "new_parameter_names",
           "student_config", "student_features", "student_window_qk", "teacher_layer_inputs",
           "teacher_qk"]
