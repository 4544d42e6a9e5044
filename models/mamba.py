"""The Mamba-1 mixer: a selective state-space layer (S6) with a short causal convolution.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023. With
E = expand · dim channels, N = d_state, R = dt_rank, for x `(batch, seq, dim)`:

    u, z     = in_proj_x(x), in_proj_z(x)         u, z: (batch, E, seq)
    u        = silu(causal_depthwise_conv(u))     width d_conv
    [δ, B, C]= x_proj(u)                          δ: R, B and C: N per token
    Δ        = softplus(dt_proj.weight · δ + dt_proj.bias)
    A        = −exp(A_log)                        (E, N)
    h_t      = exp(Δ_t A) ⊙ h_{t−1} + Δ_t B_t u_t ,  y_t = C_t · h_t + D ⊙ u_t
    out      = out_proj(y ⊙ silu(z))

A Mamba *model* is `models/hybrid.py`'s stack with every layer `M` (RMSNorm → mixer → residual),
which is Hugging Face `MambaForCausalLM` (see `models/hf_mamba.py`); the parameter names here
(`conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`, `out_proj`) are the Hugging Face ones, except that
Hugging Face's fused `in_proj` (rows `[x; z]`) is two projections, `in_proj_x` and `in_proj_z`
(split and joined on conversion): every parameter is then per channel (or per channel row), so
tensor parallelism shards each one contiguously over the E channels (`dist/tensor_parallel.py`;
a fused `[x; z]` would need a strided shard, which distributed checkpoints cannot store).

Two ways to run the mixer:
- `forward(x)`: the whole (possibly context-parallel) sequence; the conv and the scan go through
  the model's `ParallelContext` (single device: the kernels; cp > 1: halo exchange for the conv
  and state passing for the scan, `dist/recurrent.py`).
- `step(x, state)`: single device, any number of tokens, carrying the recurrent state
  `{"conv": (batch, E, d_conv − 1), "ssm": (batch, E, N) float32}` (None = zeros). Running a
  sequence in one call, in pieces, or token by token gives the same outputs (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ctxscale.dist.context import SINGLE, ParallelContext
from ctxscale.dist.tensor_parallel import local
from ctxscale.kernels.conv1d import causal_conv1d
from ctxscale.kernels.selective_scan import selective_scan
from ctxscale.models.config import ModelConfig


def conv_step(weight, bias, state: dict | None, new: dict):
    """The silu causal conv of a mixer's `step`: continues from `state["conv"]` (None: zeros)
    and puts the final conv state into `new["conv"]`."""

    def conv(u):
        out, new["conv"] = causal_conv1d(
            u, weight, bias, activation="silu", return_final_state=True,
            initial_state=None if state is None else state["conv"],
        )
        return out

    return conv


class MambaMixer(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext | None = None):
        super().__init__()
        m = cfg.mamba
        self.cfg = cfg
        self.parallel = parallel or SINGLE
        self.inner = m.expand * cfg.dim
        self.d_state = m.d_state
        self.dt_rank = m.rank(cfg.dim)
        self.in_proj_x = nn.Linear(cfg.dim, self.inner, bias=m.bias)
        self.in_proj_z = nn.Linear(cfg.dim, self.inner, bias=m.bias)
        self.conv1d = nn.Conv1d(self.inner, self.inner, m.d_conv, groups=self.inner,
                                bias=m.conv_bias, padding=m.d_conv - 1)
        self.x_proj = nn.Linear(self.inner, self.dt_rank + 2 * m.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.inner, m.d_state))
        self.D = nn.Parameter(torch.empty(self.inner))
        self.out_proj = nn.Linear(self.inner, cfg.dim, bias=m.bias)
        self.reset_recurrent_parameters()

    @torch.no_grad()
    def reset_recurrent_parameters(self) -> None:
        """Mamba's initialization of the SSM parameters (S4D-real A, Δ log-uniform, D = 1)."""
        m, cfg = self.cfg.mamba, self.cfg
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(a).expand(self.inner, -1))
        self.D.fill_(1.0)
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        lo, hi = math.log(m.dt_min), math.log(m.dt_max)
        dt = torch.exp(torch.rand(self.inner, device=self.D.device) * (hi - lo) + lo)
        dt = dt.clamp(min=m.dt_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.conv1d.reset_parameters()
        nn.init.normal_(self.out_proj.weight, std=cfg.init_std / math.sqrt(2 * cfg.num_layers))

    def _mix(self, x, conv, scan):
        """x `(batch, seq, dim)`; `conv(u) -> u'` and `scan(u, delta, A, B, C) -> y` do the
        sequence work. Returns `(batch, seq, dim)`."""
        u = conv(self.in_proj_x(x).transpose(1, 2))  # (b, E, s); E/tp channels under tp
        z = self.in_proj_z(x).transpose(1, 2)
        dt, B, C = torch.split(self.x_proj(u.transpose(1, 2)),
                               [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ local(self.dt_proj.weight).t()).transpose(1, 2)  # (b, E, s), bias in the scan
        A = -torch.exp(local(self.A_log).float())
        y = scan(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), z)
        return self.out_proj(y.transpose(1, 2).to(x.dtype))

    def _conv_args(self):
        return local(self.conv1d.weight).squeeze(1), local(self.conv1d.bias)

    def _scan_args(self):
        """D and the Δ bias in float32 (this rank's channels under tensor parallelism)."""
        return local(self.D).float(), local(self.dt_proj.bias).float()

    def forward(self, x: torch.Tensor, cos=None, sin=None, document_ids=None) -> torch.Tensor:
        """x `(batch, seq_local, dim)` -> `(batch, seq_local, dim)` over the whole sequence;
        `document_ids` (the whole sequence's, packed rows): the conv and the scan restart at
        every document start."""
        par = self.parallel
        w, b = self._conv_args()
        d_skip, dt_bias = self._scan_args()

        def conv(u):
            return par.causal_conv1d(u, w, b, activation="silu", document_ids=document_ids)

        def scan(u, delta, A, B, C, z):
            return par.selective_scan(u, delta, A, B, C, d_skip, z, dt_bias, True,
                                      document_ids=document_ids)

        return self._mix(x, conv, scan)

    def step(self, x: torch.Tensor, state: dict | None = None, cos=None, sin=None):
        """Single device: x `(batch, seq, dim)` continuing from `state`; returns (y, new_state)."""
        d_skip, dt_bias = self._scan_args()
        new = {}
        conv = conv_step(*self._conv_args(), state, new)

        def scan(u, delta, A, B, C, z):
            y, new["ssm"] = selective_scan(
                u, delta, A, B, C, d_skip, z, dt_bias, True,
                return_last_state=True, initial_state=None if state is None else state["ssm"],
            )
            return y

        return self._mix(x, conv, scan), new


__all__ = ["MambaMixer", "conv_step"]
