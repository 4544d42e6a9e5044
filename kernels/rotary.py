"""Rotary position embedding (RoPE, Su et al. 2021) with position scaling for context extension.

Frequencies: inv_freq_i = base^(−2i/d) for i < d/2, optionally rescaled:
- `linear` (position interpolation, Chen et al. 2023): positions divided by `factor`;
- `ntk` (NTK-aware): base multiplied by factor^(d/(d−2));
- `llama3`: Llama 3.1's band-wise interpolation (low/high frequency factors around
  `original_max_position_embeddings`);
- `yarn` (Peng et al. 2023): per-band interpolation with the attention temperature
  0.1·ln(factor) + 1 folded into cos/sin.
The rotation uses the "rotate half" convention of Hugging Face Llama: for x = [x1, x2] (halves),
rope(x) = x·cos + [−x2, x1]·sin, with cos/sin repeated over both halves.

Positions are *global* token indices (`position_ids`), so a rank holding a shard of the sequence
(context parallelism, any layout) rotates its tokens exactly as one process would.
x: `(batch, seq, heads, head_dim)`; cos/sin: `(batch, seq, head_dim)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_SCALING_TYPES = ("none", "linear", "ntk", "llama3", "yarn")


@dataclass
class RopeScaling:
    type: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: int = 8192
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def validate(self) -> None:
        if self.type not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"rope scaling type {self.type!r} is not one of {ROPE_SCALING_TYPES}"
            )
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")


def rope_inv_freq(head_dim: int, base: float, scaling: RopeScaling | None = None):
    """Returns (inv_freq float32 (head_dim/2,), attention_scaling float)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    scaling = scaling or RopeScaling()
    scaling.validate()
    d = head_dim
    kind, factor = scaling.type, scaling.factor
    if kind == "ntk":
        base = base * factor ** (d / (d - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    attention_scaling = 1.0
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        old_len = scaling.original_max_position_embeddings

        def dim_for(rotations):
            return (d * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low = max(math.floor(dim_for(scaling.beta_fast)), 0)
        high = min(math.ceil(dim_for(scaling.beta_slow)), d - 1)
        ramp = (torch.arange(d // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)
        extrapolate = 1 - ramp.clamp(0, 1)
        inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
        attention_scaling = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq.float(), attention_scaling


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling=1.0):
    """position_ids: (batch, seq) global indices -> cos, sin (batch, seq, head_dim) float32."""
    freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq.to(position_ids.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, seq, heads, head_dim); cos/sin (batch, seq, head_dim). Returns x's dtype."""
    half = x.shape[-1] // 2
    cos = cos.unsqueeze(2).to(x.dtype)
    sin = sin.unsqueeze(2).to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
