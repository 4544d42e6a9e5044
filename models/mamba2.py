"""The Mamba-2 mixer: state-space duality (SSD) with a short causal convolution.

Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured
State Space Duality", 2024. With E = expand · dim channels in H = E / P heads of P = head_dim
channels, G groups of N = d_state (B and C shared by the H / G heads of a group), for x
`(batch, seq, dim)`:

    z, u, B, C, dt = in_proj_{z,x,B,C,dt}(x)            z, u: E; B, C: G·N; dt: H per token
    [u; B; C]      = silu(causal_depthwise_conv([u; B; C]))     width d_conv
    Δ              = softplus(dt + dt_bias)  (clamped to [dt_limit_min, dt_limit_max])
    A              = −exp(A_log)                               one scalar per head
    h_t            = exp(Δ_t A) h_{t−1} + B_t (Δ_t u_t)ᵀ        h: (N, P) per head
    y_t            = h_tᵀ C_t + D ⊙ u_t
    out            = out_proj(RMSNorm_G(y ⊙ silu(z)))           RMS norm per group of E / G

The scan is exactly causal linear attention with a per-token scalar decay (simple GLA): q = C,
k = B, v = Δ·u, log decay Δ·A, scale 1. So it runs through the model's `ParallelContext` like a
linear-attention layer (`kernels/linear_attention.py`: the Triton chunk kernel on CUDA, the
chunked PyTorch path elsewhere; state passing between context-parallel ranks), and the
convolution like Mamba-1's (halo exchange under cp). B and C enter the scan once per group (the
kernels' grouped q/k: head i reads group i // (H / G)), not copied per head, and the scan's
inputs stay in the projections' dtype (bfloat16 under autocast, on tensor cores in the Triton
kernel) while Δ, the decay and the states are float32.

A Mamba-2 *model* is `models/hybrid.py`'s stack with every layer `S` (family `mamba2`), which is
Hugging Face `Mamba2ForCausalLM` (`models/hf_mamba.py`). Hugging Face fuses the projections
(`in_proj` rows `[z; u; B; C; dt]`) and the convolution (`conv1d` channels `[u; B; C]`); here
each part is its own parameter (split and joined on conversion), so every parameter is per
head, per group or per channel and tensor parallelism shards each one contiguously over the
heads and groups (`dist/tensor_parallel.py`: n_groups divisible by tp as in Megatron-LM, or
one group, whose B and C are then replicated and whose norm is all-reduced).

`step(x, state)`: single device, any number of tokens, carrying
`{"conv": (batch, E + 2·G·N, d_conv − 1), "ssm": (batch, H, N, P) float32}` (None = zeros).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctxscale.dist.context import SINGLE, ParallelContext
from ctxscale.dist.tensor_parallel import local, replicated_output, replicated_parameter
from ctxscale.kernels.linear_attention import linear_attention
from ctxscale.models.config import ModelConfig
from ctxscale.models.mamba import conv_step


def gated_rms_norm(y, z, weight, group_size: int, eps: float, *, process_group=None,
                   full_group_size: int | None = None):
    """RMSNorm over groups of `group_size` channels of y ⊙ silu(z), in float32 (float64 for
    float64 inputs), times weight. With `process_group` (tensor parallelism, one group spread
    over the ranks) the sums of squares are all-reduced over it (forward and backward) and
    divided by `full_group_size`."""
    cdt = torch.promote_types(y.dtype, torch.float32)
    h = y.to(cdt) * F.silu(z.to(cdt))
    g = h.view(*h.shape[:-1], h.shape[-1] // group_size, group_size)
    if process_group is None:
        ms = g.pow(2).mean(-1, keepdim=True)
    else:
        from torch.distributed.nn.functional import all_reduce

        ms = all_reduce(g.pow(2).sum(-1, keepdim=True), group=process_group) / full_group_size
    g = g * torch.rsqrt(ms + eps)
    return weight * g.view_as(h).to(y.dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext | None = None):
        super().__init__()
        m = cfg.mamba
        self.cfg = cfg
        self.parallel = parallel or SINGLE
        self.inner = m.expand * cfg.dim
        self.head_dim = m.head_dim
        self.heads = self.inner // m.head_dim
        self.groups = m.n_groups
        self.d_state = m.d_state
        # tensor parallelism with one group (replicated B and C): the tp group over which that
        # group's norm is spread
        self.norm_group = None
        gn = self.groups * self.d_state
        self.in_proj_z = nn.Linear(cfg.dim, self.inner, bias=m.bias)
        self.in_proj_x = nn.Linear(cfg.dim, self.inner, bias=m.bias)
        self.in_proj_B = nn.Linear(cfg.dim, gn, bias=m.bias)
        self.in_proj_C = nn.Linear(cfg.dim, gn, bias=m.bias)
        self.in_proj_dt = nn.Linear(cfg.dim, self.heads, bias=m.bias)
        conv = {"kernel_size": m.d_conv, "bias": m.conv_bias, "padding": m.d_conv - 1}
        self.conv_x = nn.Conv1d(self.inner, self.inner, groups=self.inner, **conv)
        self.conv_B = nn.Conv1d(gn, gn, groups=gn, **conv)
        self.conv_C = nn.Conv1d(gn, gn, groups=gn, **conv)
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.empty(self.heads))
        self.norm_weight = nn.Parameter(torch.empty(self.inner))
        self.out_proj = nn.Linear(self.inner, cfg.dim, bias=m.bias)
        self.reset_recurrent_parameters()

    def shard_heads(self, rank: int, tp: int, process_group=None) -> None:
        """Keep this rank's 1/tp of the heads and channels (tensor parallelism; the weights
        are sharded by `dist/tensor_parallel.py`). Rank r holds heads [r·H/tp, (r+1)·H/tp):
        with n_groups divisible by tp these are exactly the heads of groups
        [r·G/tp, (r+1)·G/tp), which it holds too; with one group (replicated B and C) its heads
        start at r·H/tp of that group, and the group's norm is all-reduced over
        `process_group`."""
        self.inner //= tp
        self.heads //= tp
        if self.groups % tp == 0:
            self.groups //= tp
        else:
            self.norm_group = process_group

    @torch.no_grad()
    def reset_recurrent_parameters(self) -> None:
        """Mamba-2's initialization: A = 1..H per head, D = 1, softplus(dt_bias) log-uniform in
        [dt_min, dt_max] (at least dt_floor), the norm weight 1, default conv init."""
        m, cfg = self.cfg.mamba, self.cfg
        dev = self.A_log.device
        self.A_log.copy_(torch.log(torch.arange(1, self.heads + 1, dtype=torch.float32, device=dev)))
        self.D.fill_(1.0)
        lo, hi = math.log(m.dt_min), math.log(m.dt_max)
        dt = torch.exp(torch.rand(self.heads, device=dev) * (hi - lo) + lo).clamp(min=m.dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.norm_weight.fill_(1.0)
        for conv in (self.conv_x, self.conv_B, self.conv_C):
            conv.reset_parameters()
        nn.init.normal_(self.out_proj.weight, std=cfg.init_std / math.sqrt(2 * cfg.num_layers))

    def _conv_args(self):
        """The three depthwise convolutions as one over the channels [u; B; C]."""
        convs = (self.conv_x, self.conv_B, self.conv_C)
        # under tp: conv_x a shard; conv_B / conv_C a shard, or (one group) replicated, each
        # rank's gradient then a partial sum like the projections'
        read = [local, replicated_parameter, replicated_parameter]
        w = torch.cat([r(c.weight).squeeze(1) for r, c in zip(read, convs)])
        b = (torch.cat([r(c.bias) for r, c in zip(read, convs)]) if self.cfg.mamba.conv_bias
             else None)
        return w, b

    def _mix(self, x, conv, scan):
        """x `(batch, seq, dim)`; `conv(xbc) -> xbc'` over `(batch, channels, seq)` and
        `scan(q, k, v, log_decay) -> y` do the sequence work. Returns `(batch, seq, dim)`."""
        b, s, _ = x.shape
        m = self.cfg.mamba
        # B and C are replicated projections under tp with one group: each rank keeps its
        # heads' use of them, so their gradient is a partial sum (`replicated_output`)
        xbc = torch.cat([self.in_proj_x(x), replicated_output(self.in_proj_B(x)),
                         replicated_output(self.in_proj_C(x))], -1)
        xbc = conv(xbc.transpose(1, 2)).transpose(1, 2)
        u, B, C = xbc.split([self.inner, self.groups * self.d_state, self.groups * self.d_state], -1)
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        dt = F.softplus(self.in_proj_dt(x).to(cdt) + local(self.dt_bias).to(cdt))
        if m.dt_limit_min > 0 or m.dt_limit_max < math.inf:
            dt = dt.clamp(m.dt_limit_min, m.dt_limit_max)
        log_decay = dt * -torch.exp(local(self.A_log).to(cdt))  # (b, s, H)
        # grouped q/k: this rank's heads are consecutive within its groups (all of them share
        # the one replicated group under tp with n_groups = 1), so local head i reads local
        # group i // (heads / groups) as the kernels index it
        u = u.view(b, s, self.heads, self.head_dim)
        v = (u.to(cdt) * dt.unsqueeze(-1)).to(xbc.dtype)
        y = scan(C.reshape(b, s, self.groups, self.d_state),
                 B.reshape(b, s, self.groups, self.d_state), v, log_decay)
        y = y + local(self.D).to(cdt)[:, None] * u.to(cdt)
        norm_group = self.inner // self.groups
        full = m.expand * self.cfg.dim // m.n_groups  # a norm group's channels over all ranks
        y = gated_rms_norm(y.reshape(b, s, self.inner), self.in_proj_z(x),
                           local(self.norm_weight), norm_group, self.cfg.norm_eps,
                           process_group=self.norm_group, full_group_size=full)
        return self.out_proj(y.to(x.dtype))

    def forward(self, x: torch.Tensor, cos=None, sin=None, document_ids=None) -> torch.Tensor:
        """x `(batch, seq_local, dim)` -> `(batch, seq_local, dim)` over the whole sequence;
        `document_ids` (the whole sequence's, packed rows): the conv and the scan restart at
        every document start."""
        par = self.parallel
        w, bias = self._conv_args()

        def conv(xbc):
            return par.causal_conv1d(xbc, w, bias, activation="silu", document_ids=document_ids)

        def scan(q, k, v, log_decay):
            return par.linear_attention(q, k, v, log_decay=log_decay, scale=1.0,
                                        document_ids=document_ids)

        return self._mix(x, conv, scan)

    def step(self, x: torch.Tensor, state: dict | None = None, cos=None, sin=None):
        """Single device: x `(batch, seq, dim)` continuing from `state`; returns (y, new_state)."""
        new = {}
        conv = conv_step(*self._conv_args(), state, new)

        def scan(q, k, v, log_decay):
            y, new["ssm"] = linear_attention(
                q, k, v, log_decay=log_decay, scale=1.0, return_final_state=True,
                initial_state=None if state is None else state["ssm"],
            )
            return y

        return self._mix(x, conv, scan), new


__all__ = ["Mamba2Mixer", "gated_rms_norm"]
