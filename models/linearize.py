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
  is O(batch · heads · tile · seq) instead of O(seq²). With `rope` the student's φ sees the
  RoPE'd q/k, like the layer. With a LoLCATs window (`window` > 0) a_ts are the hybrid layer's
  own weights: exp(q·k/√d − m_t) inside the window, λ φ(q)·φ(k)·decay before it, one shared
  normalizer (models/window_attention.py).
- LoLCATs output MSE between the layers' outputs Wo·attn(x_l): mean over (batch, seq, dim).

Layout inside attention `(batch, seq, heads, head_dim)`.
"""

from __future__ import annotations

import copy

import torch
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
    new = ("feature_map_q", "feature_map_k", "q_conv", "k_conv", ".wg.", "out_norm", "linear_mix")
    return [n for n, _ in student.named_parameters() if any(t in n for t in new)]


def linear_layers(student: HybridLM) -> list[str]:
    """Names (keys of `student.layers`) of the linear-attention layers."""
    return [str(i) for i, c in enumerate(layer_codes(student.cfg)) if c == "L"]


# ------------------------------------------------------------------ student attention weights


def student_features(layer, x: torch.Tensor, cos=None, sin=None):
    """The student's φ(q), φ(k) `(b, s, heads, F)` (k/v heads repeated for GQA) and the
    cumulative log decay G `(b, s, heads)` (None without decay) for input x `(b, s, dim)`;
    the same pre-attention math as `LinearAttention._run` (single device; RoPE from cos/sin
    `(b, s, head_dim)` when the layer has `rope`)."""
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
    log_decay = layer._log_decay(x)
    cum = None
    if log_decay is not None:
        if log_decay.dim() == 1:
            log_decay = log_decay.view(1, 1, -1).expand(b, s, -1)
        cum = torch.cumsum(log_decay.to(torch.promote_types(log_decay.dtype, torch.float32)), dim=1)
    return q, k, cum


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
                          log_mix=None) -> torch.Tensor:
    """Hedgehog's cross-entropy −mean Σ_s p_ts log a_ts between causal softmax weights of
    (q_t, k_t) `(b, s, h, d)` and normalized linear weights of (phi_q, phi_k) `(b, s, h, F)` with
    cumulative log decay `cum_decay` `(b, s, h)` or None; computed `tile` queries at a time.
    `window` > 0: the student is the LoLCATs hybrid with window q/k `q_w, k_w` `(b, s, h, d)`
    and log λ `log_mix` `(h,)` (`window_attention_weights`)."""
    b, s, h, d = q_t.shape
    scale = d ** -0.5
    total = q_t.new_zeros((), dtype=torch.float32)
    for i0 in range(0, s, tile):
        i1 = min(i0 + tile, s)
        rows = torch.arange(i0, i1, device=q_t.device).view(-1, 1)
        cols = torch.arange(i1, device=q_t.device).view(1, -1)
        mask = cols <= rows  # (tile, i1)
        scores = torch.einsum("bthd,bshd->bhts", q_t[:, i0:i1].float(), k_t[:, :i1].float()) * scale
        p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        if window:
            w = window_attention_weights(q_w, k_w, phi_q, phi_k, cum_decay, window=window,
                                         log_mix=log_mix, start=i0, stop=i1)
        else:
            w = torch.einsum("bthf,bshf->bhts", phi_q[:, i0:i1].float(), phi_k[:, :i1].float())
            if cum_decay is not None:
                g = cum_decay.transpose(1, 2)  # (b, h, s)
                diff = g[:, :, i0:i1, None] - g[:, :, None, :i1]
                w = w * torch.exp(diff.masked_fill(~mask, float("-inf")))
            w = w.masked_fill(~mask, 0.0)
        a = w / (w.sum(-1, keepdim=True) + eps)
        total = total - (p * torch.log(a + eps)).sum()
    return total / (b * h * s)


def attention_transfer_loss(teacher_block, student_block, x_norm, cos, sin, *, loss: str = "both",
                            tile: int = 64, reduction: str = "mean") -> dict:
    """Per-layer transfer losses for the normalized layer input `x_norm` `(b, s, dim)`.

    Returns {"loss": the optimized value, "ce": ..., "mse": ...} (only the computed ones).
    `reduction="sum"` gives the MSE summed over elements (for exact sharded averaging);
    the CE needs the whole sequence on one device."""
    if loss not in TRANSFER_LOSSES:
        raise ValueError(f"transfer loss {loss!r} is not known; choose one of {TRANSFER_LOSSES}")
    t_attn, s_attn = teacher_block.attention, student_block.attention
    out = {}
    if loss in ("ce", "both"):
        with torch.no_grad():
            q_t, k_t = teacher_qk(t_attn, x_norm, cos, sin)
        phi_q, phi_k, cum = student_features(s_attn, x_norm, cos, sin)
        win = {}
        if s_attn.window:
            q_w, k_w = student_window_qk(s_attn, x_norm, cos, sin)
            win = dict(window=s_attn.window, q_w=q_w, k_w=k_w, log_mix=s_attn.linear_mix)
        out["ce"] = attention_transfer_ce(q_t, k_t, phi_q, phi_k, cum, tile=tile, **win)
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


__all__ = ["TRANSFER_LOSSES", "attention_transfer_ce", "attention_transfer_loss",
           "freeze_all_but", "linear_layers", "linearize", "new_parameter_names",
           "student_config", "student_features", "student_window_qk", "teacher_layer_inputs",
           "teacher_qk"]
