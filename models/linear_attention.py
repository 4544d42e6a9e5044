"""Linear-attention layers: plain, decayed, Hedgehog and LAWCAT, on one recurrent kernel.

Every kind is causal linear attention with a feature map φ and an optional decay γ_t per head
(`ctxscale.kernels.linear_attention`, simple-GLA semantics; states `(batch, heads, F, dim_v)`):

    S_t = γ_t S_{t−1} + φ(k_t) v_tᵀ,     o_t = φ(q_t)ᵀ S_t            then   out = W_o · norm(o)

- `plain` (Katharopoulos et al., "Transformers are RNNs", 2020): φ = elu(x) + 1, γ = 1, and the
  output divided by the denominator φ(q_t)ᵀ Σ_{s≤t} φ(k_s).
- `decay` (TransNormerLLM / Lightning Attention, Qin et al. 2023-24): a fixed per-head decay
  γ_h = exp(−2^{−8(h+1)/H}) (ALiBi slopes), identity φ with scale dim^−½, and a per-head RMSNorm on
  the output instead of the denominator (NormAttention).
- `hedgehog` (Zhang et al., "The Hedgehog & the Porcupine: Expressive Linear Attentions with
  Softmax Mimicry", 2024): a trainable per-head feature map φ(x) = [softmax(xW + b), softmax(−xW − b)]
  (separate maps for q and k; W initialized to the identity), denominator-normalized.
- `lawcat` (Liu et al., "LAWCAT: Efficient Distillation from Quadratic to Linear Attention with
  Convolution across Tokens", 2025): a causal depthwise conv over tokens on q and on k (width
  `conv_width`, initialized to the identity), then normalized gated linear attention: φ = elu+1
  (or `feature_map`; the paper uses a learned map, `feature_map: hedgehog` here),
  γ_t = σ(x_t W_g + b_g)^{1/τ} per head and token (Gated Linear Attention), denominator-normalized;
  `gate_max_half_life` caps the gated heads' memory, γ_t = γ_max · σ(·)^{1/τ}.

`ungated_heads` = n keeps γ = 1 on the first n heads of a decaying kind (decay, lawcat): a mix of
heads with memory over the whole context and heads with a (learned) local decay. A list gives n per
layer (`layer_index` picks this layer's entry), e.g. local-only lower layers.

`write_gate` adds a per-token write gate β_t = σ(x_t W_β + b_β) on the key features of every head
without decay (all heads of plain / hedgehog, the ungated heads of decay / lawcat),
S_t = S_{t−1} + β_t φ(k_t) v_tᵀ (the denominator alike), in the spirit of the input gates of
LSTM/mLSTM and of Mamba's Δ: such a head can keep a few tokens (a pass key) and leave the rest out,
so its normalized readout is not diluted by the length of the context. Decaying heads get none:
behind a normalized readout, a head that writes nothing but the needle returns it however far its
decay has shrunk it, until the shrunk weight falls under eps — a memory whose reach depends on the
length (measured: a half-life-8 head carried 64-84% of its weight to a pass key 100 tokens back at
L = 192 and lost it at 2·L), which is what the decay is there to rule out.

The denominator is computed by the same kernel: v is extended with a column of ones, so the last
output column is φ(q_t)ᵀ z_t with z_t = γ_t z_{t−1} + φ(k_t) (decayed exactly like S). This keeps
one code path, and context parallelism (state passing) covers the denominator for free.

The projections are named `wq`, `wk`, `wv`, `wo` like `models/transformer.py`'s `Attention`, so a
Transformer's weights load into a linear layer (linearization); grouped-query k/v heads are
repeated. Layout `(batch, seq, heads, head_dim)`.

Options (`model.linear_attention`):
- `rope`: apply RoPE (the model's cos/sin at the tokens' global positions) to q and k *before*
  the feature map, φ(R_t q_t)·φ(R_s k_s), as Hedgehog does when linearizing a RoPE Transformer
  (for lawcat: after the conv). Default off for from-scratch layers; `ctxscale convert` turns it
  on for hedgehog students.
- `window` > 0: LoLCATs sliding-window + linear attention (models/window_attention.py): the last
  `window` keys get the teacher's softmax scores exp(q·k/√d − m) (RoPE'd, pre-conv q/k), older
  keys the linear weights above times a trainable per-head λ = exp(`linear_mix`), one shared
  denominator (needs normalize=denominator). `hybrid_mode` (runtime attribute: both,
  linear_only, window_only, none) switches parts off for ablations.

- `forward(x)`: the whole (possibly context-parallel) sequence via the model's
  `ParallelContext` (conv halo exchange and state passing when cp > 1).
- `step(x, state)`: single device, continuing from `state` = {"S": (batch, heads, F, dim_v(+1))
  float32, "q_conv"/"k_conv": (batch, channels, conv_width − 1) for lawcat, "halo": the last
  ≤ window packed (k, v, φ(k), log γ) tokens `(batch, ≤window, heads, P)` with a window}; None =
  zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctxscale.dist.context import SINGLE, ParallelContext
from ctxscale.dist.tensor_parallel import local, replicated_output
from ctxscale.kernels.conv1d import causal_conv1d
from ctxscale.kernels.linear_attention import linear_attention
from ctxscale.kernels.recurrent_segments import check_segments
from ctxscale.kernels.recurrent_segments import runs as document_runs
from ctxscale.kernels.rotary import apply_rotary
from ctxscale.models.config import DECAY_KINDS, ModelConfig
from ctxscale.models.window_attention import HYBRID_MODES, window_linear_attention

DEFAULT_FEATURE_MAP = {"plain": "elu1", "decay": "identity", "lawcat": "elu1"}
DEFAULT_NORMALIZE = {"plain": "denominator", "decay": "rms", "hedgehog": "denominator",
                     "lawcat": "denominator"}


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """Fixed feature maps over the last (head) dim."""
    if name == "elu1":
        return F.elu(x) + 1
    if name == "relu":
        return F.relu(x)
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    return x


class HedgehogFeatureMap(nn.Module):
    """φ(x) = [softmax(xW + b), softmax(−(xW + b))] per head: x `(b, s, h, d)` -> `(b, s, h, 2f)`."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, head_dim, feature_dim))
        self.bias = nn.Parameter(torch.empty(heads, feature_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        h, d, f = self.weight.shape
        eye = torch.eye(d, f, device=self.weight.device)
        self.weight.copy_(eye.expand(h, d, f))
        self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = torch.einsum("bshd,hdf->bshf", x, local(self.weight)) + local(self.bias)
        return torch.cat([torch.softmax(proj, -1), torch.softmax(-proj, -1)], dim=-1)


def fixed_log_decay(heads: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Per-head log decay −2^{−8(h+1)/H} (ALiBi slopes), shape `(heads,)`."""
    h = torch.arange(1, heads + 1, dtype=dtype, device=device)
    return -torch.exp2(-8.0 * h / heads)


class LinearAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext | None = None, *,
                 layer_index: int = 0):
        super().__init__()
        la = cfg.linear_attention
        self.cfg, self.la = cfg, la
        self.ungated_heads = la.ungated_for(layer_index)
        # the first heads_without_decay heads keep γ = 1 (all of them for kinds without decay)
        self.heads_without_decay = self.ungated_heads if la.kind in DECAY_KINDS else cfg.num_heads
        self.parallel = parallel or SINGLE
        self.kind = la.kind
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.per_head_dim
        self.head_offset = 0  # global index of this module's first head (tensor parallelism)
        hd = self.head_dim
        self.normalize = la.normalize or DEFAULT_NORMALIZE[la.kind]
        self.feature = "hedgehog" if la.kind == "hedgehog" else (la.feature_map or DEFAULT_FEATURE_MAP[la.kind])
        if self.normalize == "denominator" and self.feature == "identity":
            raise ValueError(
                "model.linear_attention.normalize=denominator needs a positive feature map, but "
                "feature_map is identity; pick feature_map elu1/relu/softmax or normalize rms"
            )
        self.rope, self.window = la.rope, la.window
        if self.window and self.normalize != "denominator":
            raise ValueError(
                f"model.linear_attention.window={la.window} shares one denominator between the "
                f"window softmax and the linear part, but normalize is {self.normalize!r}; set "
                "normalize=denominator (with a positive feature map) or window=0"
            )
        self._hybrid_mode = "both"
        self.window_block = 64  # query rows per block of the window softmax
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=cfg.attention_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.num_heads * hd, cfg.dim, bias=False)
        if self.feature == "hedgehog":
            fd = la.feature_dim or hd
            self.feature_map_q = HedgehogFeatureMap(cfg.num_heads, hd, fd)
            self.feature_map_k = HedgehogFeatureMap(cfg.kv_heads, hd, fd)
        if la.kind == "lawcat":
            self.q_conv = nn.Parameter(torch.empty(cfg.num_heads * hd, la.conv_width))
            self.k_conv = nn.Parameter(torch.empty(cfg.kv_heads * hd, la.conv_width))
            if la.gate and self.ungated_heads < cfg.num_heads:  # gates of the decaying heads only
                self.wg = nn.Linear(cfg.dim, cfg.num_heads - self.ungated_heads, bias=True)
        if la.write_gate and self.heads_without_decay:
            self.wb = nn.Linear(cfg.dim, self.heads_without_decay, bias=True)
        if self.normalize == "rms":
            self.out_norm = nn.Parameter(torch.ones(cfg.num_heads * hd))
        if self.window:
            self.linear_mix = nn.Parameter(torch.zeros(cfg.num_heads))  # log λ per head
        self.reset_recurrent_parameters()

    def shard_heads(self, rank: int, tp: int) -> None:
        """Keep heads [rank·H/tp, (rank+1)·H/tp) (tensor parallelism; the weights are sharded by
        `dist/tensor_parallel.py`): local head counts and the global index of the first head
        (the fixed decays and the gates are formed for all heads of the layer and cut to these,
        `_local_heads`). `ungated_heads` and `heads_without_decay` stay the layer's counts."""
        self.num_heads, self.kv_heads = self.cfg.num_heads // tp, self.cfg.kv_heads // tp
        self.head_offset = rank * self.num_heads

    def _local_heads(self, t):
        """This module's heads `[head_offset, head_offset + num_heads)` of a per-head tensor
        `(..., all heads of the layer)` (all of it on one device)."""
        return t[..., self.head_offset:self.head_offset + self.num_heads]

    @property
    def hybrid_mode(self) -> str:
        """Which parts of a windowed layer run: both, linear_only, window_only or none."""
        return self._hybrid_mode

    @hybrid_mode.setter
    def hybrid_mode(self, mode: str) -> None:
        if mode not in HYBRID_MODES:
            raise ValueError(f"hybrid_mode {mode!r} is not known; choose one of {HYBRID_MODES}")
        if mode != "both" and not self.window:
            raise ValueError("hybrid_mode ablations need a windowed layer "
                             "(model.linear_attention.window > 0)")
        self._hybrid_mode = mode

    @torch.no_grad()
    def reset_recurrent_parameters(self) -> None:
        for name in ("feature_map_q", "feature_map_k"):
            if hasattr(self, name):
                getattr(self, name).reset_parameters()
        for name in ("q_conv", "k_conv"):
            if hasattr(self, name):  # identity: only the current token's tap is 1
                w = getattr(self, name)
                w.zero_()
                w[:, -1] = 1.0
        if hasattr(self, "wg"):
            # σ(b) ≈ 0.9998: start with γ close to 1 (long memory), as GLA does
            nn.init.normal_(self.wg.weight, std=self.cfg.init_std)
            self.wg.bias.fill_(8.0)
        if hasattr(self, "wb"):
            # σ(4) ≈ 0.982: start with every token written (close to the ungated teacher copy)
            nn.init.normal_(self.wb.weight, std=self.cfg.init_std)
            self.wb.bias.fill_(4.0)
        if hasattr(self, "out_norm"):
            self.out_norm.fill_(1.0)
        if hasattr(self, "linear_mix"):
            self.linear_mix.zero_()

    # -------------------------------------------------------------- pieces
    def _log_decay(self, x):
        """Log decay per head `(heads,)` (fixed) or per token and head `(b, s, heads)` (gated),
        0 for the `ungated_heads` first heads; None when no head decays."""
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        free = self.ungated_heads
        if self.kind not in DECAY_KINDS or free == self.cfg.num_heads:
            return None
        if self.kind == "decay" or not self.la.gate:
            log_decay = fixed_log_decay(self.cfg.num_heads, device=x.device, dtype=cdt)
            heads = torch.arange(self.cfg.num_heads, device=x.device)
            return self._local_heads(log_decay.masked_fill(heads < free, 0.0))
        # every head's gate, then this module's heads: under tp wg is replicated and each rank
        # runs all of it (a rank whose heads are all ungated too), so that every rank runs the
        # same operations and has a gradient for wg
        gates = replicated_output(self.wg(x))  # (b, s, h - free)
        log_decay = F.logsigmoid(gates.to(cdt)) / self.la.gate_normalizer
        if self.la.gate_max_half_life:  # γ ≤ γ_max = 2^(−1/max_half_life)
            log_decay = log_decay - math.log(2.0) / self.la.gate_max_half_life
        return self._local_heads(F.pad(log_decay, (free, 0)) if free else log_decay)

    def _features(self, q, k):
        """φ(q) `(b, s, heads, F)`, φ(k) `(b, s, kv_heads, F)` from q, k `(b, s, *, head_dim)`."""
        if self.feature == "hedgehog":
            return self.feature_map_q(q), self.feature_map_k(k)
        return feature_map(q, self.feature), feature_map(k, self.feature)

    def gate_writes(self, x, k):
        """Key features k `(b, s, heads, F)` (GQA already repeated) with the first
        `heads_without_decay` heads times the write gate β = σ(x W_β + b_β) `(b, s, those heads)`
        of `write_gate` (unchanged without one)."""
        if not hasattr(self, "wb"):
            return k
        # β of every head without decay, 1 for the others, then this module's heads (the same
        # operations on every tp rank, as for wg)
        beta = torch.sigmoid(replicated_output(self.wb(x)))
        beta = F.pad(beta, (0, self.cfg.num_heads - self.heads_without_decay), value=1.0)
        return k * self._local_heads(beta).to(k.dtype).unsqueeze(-1)

    def _rotate(self, t, cos, sin, what):
        if cos is None or sin is None:
            raise ValueError(
                f"this linear-attention layer applies RoPE to {what} (model.linear_attention."
                "rope or window) but got no cos/sin; call it through HybridLM, or pass the "
                "model's rope(position_ids)"
            )
        return apply_rotary(t, cos, sin)

    def _run(self, x, cos, sin, conv, attend, halo, runs=None):
        """x `(batch, seq, dim)`; `conv(t, weight, key) -> t` convolves `(b, channels, s)` over
        tokens; `attend(q, k, v, log_decay, scale) -> o`; `halo(t)` prepends the previous
        ≤ window packed tokens (windowed layers); `runs`: None or the `(batch, seq)` document
        runs of these rows (windowed layers; `attend` restarts at the same starts). Returns
        `(batch, seq, dim)`."""
        b, s, _ = x.shape
        hd, rep = self.head_dim, self.num_heads // self.kv_heads
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.window:  # the softmax window sees the teacher's RoPE'd q/k (before any conv)
            q_w = self._rotate(q.view(b, s, -1, hd), cos, sin, "the window's q/k")
            k_w = self._rotate(k.view(b, s, -1, hd), cos, sin, "the window's q/k")
        if self.kind == "lawcat":
            q = conv(q.transpose(1, 2), local(self.q_conv), "q_conv").transpose(1, 2)
            k = conv(k.transpose(1, 2), local(self.k_conv), "k_conv").transpose(1, 2)
        q, k, v = q.view(b, s, -1, hd), k.view(b, s, -1, hd), v.view(b, s, -1, hd)
        if self.rope:
            q, k = self._rotate(q, cos, sin, "q/k"), self._rotate(k, cos, sin, "q/k")
        q, k = self._features(q, k)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        k = self.gate_writes(x, k)
        log_decay = self._log_decay(x)
        if self.window:
            if rep > 1:
                k_w = k_w.repeat_interleave(rep, dim=2)
            o = window_linear_attention(
                q_w, k_w, v, q, k, log_decay, window=self.window, log_mix=local(self.linear_mix),
                halo=halo, linear=lambda pq, pk, pv, g: attend(pq, pk, pv, g, 1.0),
                mode=self.hybrid_mode, eps=self.la.eps, block=self.window_block, runs=runs)
        elif self.normalize == "denominator":
            v = torch.cat([v, v.new_ones(b, s, self.num_heads, 1)], dim=-1)
            o = attend(q, k, v, log_decay, 1.0)
            o = o[..., :hd] / (o[..., hd:] + self.la.eps)
        else:
            o = attend(q, k, v, log_decay, q.shape[-1] ** -0.5)
            if self.normalize == "rms":
                on = o.double() if o.dtype == torch.float64 else o.float()
                o = (on * torch.rsqrt(on.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)).to(o.dtype)
                o = o * local(self.out_norm).view(self.num_heads, hd)
        return self.wo(o.flatten(2))

    # -------------------------------------------------------------- entry points
    def forward(self, x: torch.Tensor, cos=None, sin=None, document_ids=None) -> torch.Tensor:
        """x `(batch, seq_local, dim)` -> `(batch, seq_local, dim)` over the whole sequence;
        `document_ids` (the whole sequence's, packed rows): the state and lawcat's convs
        restart at every document start, and a windowed layer's softmax window and delayed keys
        stay inside the query's document."""
        par = self.parallel
        runs_local = None
        if document_ids is not None and self.window:
            b, s = x.shape[:2]
            check_segments(document_ids, b, s * par.cp_size, x.device, what=(
                "windowed linear attention: document_ids (the ids of the whole sequence, the "
                "same on every context-parallel rank)"))
            if par.cp_enabled:
                par._require_contiguous("windowed linear attention with document ids")
            runs_local = document_runs(document_ids)[:, par.cp_rank * s : (par.cp_rank + 1) * s]

        def conv(t, weight, key):
            return par.causal_conv1d(t, weight, document_ids=document_ids)

        def attend(q, k, v, log_decay, scale):
            return par.linear_attention(q, k, v, log_decay=log_decay, scale=scale,
                                        document_ids=document_ids)

        def halo(t):
            return par.with_halo(t, self.window)

        return self._run(x, cos, sin, conv, attend, halo, runs_local)

    def step(self, x: torch.Tensor, state: dict | None = None, cos=None, sin=None):
        """Single device: x `(batch, seq, dim)` continuing from `state`; returns (y, new_state)."""
        state = state or {}
        new = {}

        def conv(t, weight, key):
            out, new[key] = causal_conv1d(t, weight, initial_state=state.get(key),
                                          return_final_state=True)
            return out

        def attend(q, k, v, log_decay, scale):
            o, new["S"] = linear_attention(q, k, v, log_decay=log_decay, scale=scale,
                                           initial_state=state.get("S"), return_final_state=True)
            return o

        def halo(t):
            prev = state.get("halo")
            ext = t if prev is None else torch.cat([prev, t], dim=1)
            new["halo"] = ext[:, -self.window:]
            return ext

        return self._run(x, cos, sin, conv, attend, halo), new


def linear_attention_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token of the state update and readout (6 · 2 · heads · F · dim_v)."""
    la = cfg.linear_attention
    hedgehog = la.kind == "hedgehog" or la.feature_map == "hedgehog"
    f = 2 * (la.feature_dim or cfg.per_head_dim) if hedgehog else cfg.per_head_dim
    flops = 6.0 * 2 * cfg.num_heads * f * (cfg.per_head_dim + 1)
    # window softmax: scores and weighted sum over `window` keys (q·k and p·v), fwd + bwd
    return flops + 6.0 * 2 * cfg.num_heads * cfg.per_head_dim * la.window


__all__ = ["HedgehogFeatureMap", "LinearAttention", "feature_map", "fixed_log_decay",
           "linear_attention_flops_per_token"]
