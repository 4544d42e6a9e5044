"""Model configuration, declared field by field (the `model:` section of a job config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ctxscale.kernels.rotary import RopeScaling

MODEL_FAMILIES = ("transformer",)
MODEL_FAMILIES += ("titans",)


@dataclass
class TitansConfig:
    """Titans (Behrouz, Zhong, Mirrokni 2024): the `model.titans:` section, read when
    `model.family: titans`. Attention heads and widths come from the main model fields."""

    # mac: memory as context (segments; memory read + persistent tokens prepended; attention
    # within the segment; then the memory learns from the attention output).
    # mag: memory as gate (sliding-window attention ⊙ σ(memory)); mal: memory as layer
    # (memory layer, then sliding-window attention).
    variant: Literal["mac", "mag", "mal"] = "mac"
    # Memory mini-batch: gradients within a chunk are taken at the chunk-start weights
    # (1 = sequential token-by-token learning). Must divide segment_len (mac).
    chunk_size: int = 16
    # Segment length of memory-as-context (attention is within a segment).
    segment_len: int = 32
    # Learnable persistent-memory tokens (attention keys every query sees).
    persistent_tokens: int = 4
    # Sliding-window length of mag / mal attention (keys per query, itself included).
    window: int = 32
    # Memory MLP: number of layers (>= 2 for a deep memory), hidden width (None: 2 · head
    # width), heads (None: num_heads) and per-head key/value width (None: the head dim).
    memory_depth: int = 2
    memory_hidden: int | None = None
    memory_heads: int | None = None
    memory_head_dim: int | None = None
    # Upper bound of the data-dependent inner learning rate θ_t = max_lr · σ(·). Small steps
    # keep the online learning well conditioned (the memory's x + LN(·) output keeps it
    # bounded either way).
    max_lr: float = 0.02

    def validate(self) -> None:
        for name in ("chunk_size", "segment_len", "window", "memory_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.titans.{name} must be >= 1, got {getattr(self, name)}")
        if self.persistent_tokens < 0:
            raise ValueError("model.titans.persistent_tokens must be >= 0")
        if self.variant == "mac" and self.segment_len % self.chunk_size:
            raise ValueError(
                f"model.titans.chunk_size={self.chunk_size} must divide "
                f"model.titans.segment_len={self.segment_len} (memory chunks may not straddle "
                "segments); change one of them"
            )
        if self.max_lr <= 0:
            raise ValueError("model.titans.max_lr must be > 0")


@dataclass
class ModelConfig:
    # Which model to build. `transformer` is the Llama-family decoder; `titans` is Titans
    # (neural long-term memory, variants in `model.titans`).
    family: Literal["transformer", "titans"] = "transformer"
    # Vocabulary size; 0 means "take it from the data source" (tokenizer or synthetic task).
    vocab_size: int = 0
    # Width of the residual stream.
    dim: int = 128
    num_layers: int = 2
    # Query heads, and key/value heads for grouped-query attention (None: same as num_heads).
    num_heads: int = 4
    num_kv_heads: int | None = None
    # Per-head width (None: dim // num_heads).
    head_dim: int | None = None
    # SwiGLU hidden width (None: Llama's rule, 2/3 · 4 · dim rounded up to ffn_multiple_of).
    ffn_dim: int | None = None
    ffn_multiple_of: int = 32
    norm_eps: float = 1e-5
    # RoPE base (theta) and position scaling for context extension.
    rope_base: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    # Share the input embedding and output projection weights.
    tie_embeddings: bool = False
    # Biases on q/k/v projections (Qwen2 has them) and on the MLP.
    attention_bias: bool = False
    mlp_bias: bool = False
    # Recompute activations in the backward pass: none, full (whole blocks) or selective
    # (everything but the attention kernel, whose output is kept: LightSeq's
    # rematerialization-aware checkpointing, so backward never re-runs attention forward).
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # Standard deviation of the initial weights (residual projections get /sqrt(2·layers)).
    init_std: float = 0.02
    # Longest sequence the model is meant for (checked against data.seq_len).
    max_seq_len: int = 131072
    # Titans settings (used when family is titans).
    titans: TitansConfig = field(default_factory=TitansConfig)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def per_head_dim(self) -> int:
        return self.head_dim or self.dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)

    def validate(self) -> None:
        for name in ("dim", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.vocab_size < 0:
            raise ValueError("model.vocab_size must be >= 0 (0 = take it from the data)")
        if self.head_dim is None and self.dim % self.num_heads:
            raise ValueError(
                f"model.dim={self.dim} is not divisible by model.num_heads={self.num_heads}; "
                "change one of them or set model.head_dim explicitly"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of "
                f"model.num_kv_heads={self.kv_heads} (grouped-query attention)"
            )
        if self.per_head_dim % 2:
            raise ValueError(f"head dim {self.per_head_dim} must be even for RoPE")
        self.rope_scaling.validate()
        if self.family == "titans":
            self.titans.validate()
