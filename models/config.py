"""Model configuration, declared field by field (the `model:` section of a job config)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ctxscale.kernels.rotary import RopeScaling

MODEL_FAMILIES = ("transformer", "titans", "mamba", "mamba2", "linear", "hybrid")


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

    def unit(self) -> tuple[int, str]:
        """(tokens, field name) of the memory's unit of learning: a segment (mac) or a chunk
        (mag, mal). Context-parallel shards and continued pieces come in whole units."""
        return ((self.segment_len, "segment_len") if self.variant == "mac"
                else (self.chunk_size, "chunk_size"))

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
RECURRENT_FAMILIES = ("mamba", "mamba2", "linear", "hybrid")
LINEAR_ATTENTION_KINDS = ("plain", "decay", "hedgehog", "lawcat")
# The linear-attention kinds whose heads decay (and so can be left ungated).
DECAY_KINDS = ("decay", "lawcat")
HYBRID_LAYER_CODES = "AMLPS"
# The layer pattern of the families that do not read model.layer_pattern.
FAMILY_PATTERNS = {"mamba": "M", "mamba2": "S", "linear": "L"}


@dataclass
class MambaConfig:
    """The selective-SSM mixers: Mamba-1 (Gu & Dao 2023; layers M and P) and Mamba-2 (Dao & Gu
    2024; layers S); names follow Hugging Face MambaConfig / Mamba2Config."""

    # SSM state size N per channel (Mamba-1) or per group (Mamba-2, typically 64-128).
    d_state: int = 16
    # Width of the causal depthwise convolution in front of the scan.
    d_conv: int = 4
    # Inner width = expand · dim.
    expand: int = 2
    # Rank of the Δ projection (None: ceil(dim / 16)).
    dt_rank: int | None = None
    # Biases on in_proj / out_proj, and on the convolution.
    bias: bool = False
    conv_bias: bool = True
    # Δ initialization: softplus(dt_proj.bias) is log-uniform in [dt_min, dt_max], at least dt_floor.
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_floor: float = 1e-4
    # Append a SwiGLU MLP sub-block to every Mamba block (Jamba style); Mamba-1 has none.
    mlp: bool = False
    # Mamba-2 only: channels per head (heads = expand · dim / head_dim), groups sharing B and C
    # (heads / n_groups heads each), and the clamp of Δ after the softplus.
    head_dim: int = 64
    n_groups: int = 1
    dt_limit_min: float = 0.0
    dt_limit_max: float = math.inf

    def rank(self, dim: int) -> int:
        return self.dt_rank or math.ceil(dim / 16)

    def validate(self) -> None:
        for name in ("d_state", "d_conv", "expand", "head_dim", "n_groups"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.mamba.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.dt_limit_min < self.dt_limit_max:
            raise ValueError(f"model.mamba.dt_limit_min={self.dt_limit_min} and dt_limit_max="
                             f"{self.dt_limit_max} must satisfy 0 <= min < max")

    def validate_mamba2(self, dim: int) -> None:
        """Mamba-2 (S layers): expand · dim must split into heads of head_dim channels, and the
        heads into n_groups groups."""
        inner = self.expand * dim
        if inner % self.head_dim:
            raise ValueError(
                f"Mamba-2 splits expand x dim = {self.expand} x {dim} = {inner} channels into "
                f"heads of model.mamba.head_dim={self.head_dim}: it must divide {inner}; change "
                "model.mamba.head_dim, model.mamba.expand or model.dim")
        heads = inner // self.head_dim
        if heads % self.n_groups:
            raise ValueError(
                f"Mamba-2 has {heads} heads (expand x dim / head_dim), which must be divisible "
                f"by model.mamba.n_groups={self.n_groups}; change n_groups or head_dim")


@dataclass
class LinearAttentionConfig:
    """Linear-attention layers (see models/linear_attention.py for the math of each kind)."""

    # plain: φ(q)ᵀS with S = Σ φ(k)vᵀ (Katharopoulos et al. 2020); decay: a fixed per-head decay
    # with output RMSNorm (TransNormerLLM / Lightning Attention); hedgehog: trainable softmax
    # feature map (Zhang et al. 2024); lawcat: causal conv over tokens on q and k, then
    # normalized gated linear attention (Liu et al. 2025).
    kind: Literal["plain", "decay", "hedgehog", "lawcat"] = "plain"
    # Feature map φ on q and k for plain / decay / lawcat (hedgehog always uses its own):
    # elu1 = elu(x)+1, relu, identity, softmax (over the head dim), or hedgehog: the trainable
    # per-head [softmax(xW + b), softmax(−xW − b)] of the hedgehog kind (for lawcat: after the
    # conv; width feature_dim). None picks the kind's default (plain, lawcat: elu1; decay: identity).
    feature_map: Literal["elu1", "relu", "identity", "softmax", "hedgehog"] | None = None
    # Output normalization: denominator (divide by φ(q)ᵀΣφ(k)), rms (per-head RMSNorm) or none.
    # None picks the kind's default (decay: rms; the others: denominator).
    normalize: Literal["denominator", "rms", "none"] | None = None
    # Hedgehog: feature width per half ([softmax(xW), softmax(-xW)] has 2× this); None = head dim.
    feature_dim: int | None = None
    # LAWCAT: width of the causal depthwise conv on q and k.
    conv_width: int = 4
    # LAWCAT: data-dependent gate log σ(x W_g + b) / gate_normalizer per head and token
    # (Gated Linear Attention); false uses a fixed per-head decay like `decay`.
    gate: bool = True
    gate_normalizer: float = 16.0
    # LAWCAT: the longest half-life (tokens) a gated head may have, γ_t = γ_max · σ(x W_g + b)^{1/τ}
    # with γ_max = 2^{−1/max_half_life}; 0 = no cap. A gate is initialized near 1 and a student
    # distilled at L has no reason to shorten it below L, so without a cap the "gated" heads
    # keep memories of thousands of tokens (measured at L = 192: median half-lives of 4-8K in
    # layer 0) that behave differently at 8·L than at L. With a cap well under L, every gated
    # head is strictly local and sees at L everything it will see at any length; memory beyond
    # the cap goes through the ungated heads.
    gate_max_half_life: float = 0.0
    # Heads (the first ones of every layer) that keep no decay at all, γ = 1, whatever `gate`
    # says: memory over the whole context. A student distilled at a short length L lets every
    # gated head learn a decay that fits L (half-lives of 1-20 tokens measured at L = 192) and
    # forgets a pass key placed further back; ungated heads keep it (benchmarks/conversion.py).
    # Applies to the kinds with a decay (decay, lawcat); 0 = all heads decay. A list gives one
    # count per layer of the stack (model.num_layers entries; a softmax or Mamba layer's entry
    # must be 0), e.g. [0, 1]: every head of layer 0 gated (local), one long-memory head in layer 1.
    ungated_heads: int | list[int] = 0
    # Write (input) gate on the heads without decay (every head of plain / hedgehog, the
    # ungated heads of decay / lawcat): key features times β_t = σ(x_t W_β + b_β) per token,
    # S_t = S_{t−1} + β_t φ(k_t) v_tᵀ (and z_t alike), so a head can leave tokens out of its
    # memory altogether. The normalized readout of an ungated head is a weighted average over
    # the whole context: without β, filler text dilutes a pass key by 1/length; with it, tokens
    # the head does not need get a weight exponentially small in the gate logit. Starts open
    # (b_β = 4, β ≈ 0.98). Decaying heads are not gated (see models/linear_attention.py), nor is
    # the window softmax of a hybrid.
    write_gate: bool = False
    # Epsilon of the denominator normalization.
    eps: float = 1e-6
    # Apply RoPE to q and k before the feature map (Hedgehog on a RoPE teacher: φ(R q)·φ(R k));
    # needs the model's cos/sin. `ctxscale convert` turns it on for hedgehog students.
    rope: bool = False
    # LoLCATs sliding window: the last `window` keys of each query use softmax attention
    # (RoPE'd q·k/√d), older ones the linear attention, one shared normalizer and a trainable
    # per-head mix λ (models/window_attention.py). 0 = off; needs normalize=denominator.
    window: int = 0

    def ungated_counts(self) -> list[int]:
        """`ungated_heads` as a list (one entry when it is a single count for every layer)."""
        n = self.ungated_heads
        return n if isinstance(n, list) else [n]

    def ungated_for(self, layer_index: int) -> int:
        """How many heads of layer `layer_index` keep γ = 1 (`ungated_heads`, int or per layer)."""
        if isinstance(self.ungated_heads, list):
            return self.ungated_heads[layer_index]
        return self.ungated_heads

    def validate(self) -> None:
        if self.conv_width <= 0:
            raise ValueError(f"model.linear_attention.conv_width must be positive, got {self.conv_width}")
        if self.feature_dim is not None and self.feature_dim <= 0:
            raise ValueError("model.linear_attention.feature_dim must be positive or null")
        if self.gate_normalizer <= 0:
            raise ValueError("model.linear_attention.gate_normalizer must be positive")
        if self.gate_max_half_life < 0:
            raise ValueError("model.linear_attention.gate_max_half_life must be >= 0 (0 = no "
                             f"cap), got {self.gate_max_half_life}")
        if self.window < 0:
            raise ValueError(f"model.linear_attention.window must be >= 0 (0 = off), got {self.window}")
        counts = self.ungated_counts()
        if any(n < 0 for n in counts):
            raise ValueError("model.linear_attention.ungated_heads must be >= 0 (0 = every head "
                             f"decays), got {self.ungated_heads}")
        if any(counts) and self.kind not in DECAY_KINDS:
            raise ValueError(
                f"model.linear_attention.ungated_heads={self.ungated_heads}: kind {self.kind!r} has "
                "no decay to switch off; use kind decay or lawcat, or set ungated_heads: 0"
            )


@dataclass
class ModelConfig:
    # Which model to build. `transformer` is the Llama-family decoder; `titans` is Titans
    # (neural long-term memory, variants in `model.titans`); `mamba`: Mamba-1 blocks;
    # `linear`: linear-attention blocks; `hybrid`: a stack built from `layer_pattern`
    # (see models/hybrid.py).
    family: Literal["transformer", "titans", "mamba", "mamba2", "linear", "hybrid"] = "transformer"
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
    # Linear / Mamba / hybrid blocks recompute whole for both; Titans blocks recompute in
    # regions cut at their context-parallel exchanges, the memory chunk by chunk.
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # Standard deviation of the initial weights (residual projections get /sqrt(2·layers)).
    init_std: float = 0.02
    # Longest sequence the model is meant for (checked against data.seq_len).
    max_seq_len: int = 131072
    # Titans settings (used when family is titans).
    titans: TitansConfig = field(default_factory=TitansConfig)
    # Mamba mixer settings (families mamba, mamba2 and hybrid).
    mamba: MambaConfig = field(default_factory=MambaConfig)
    # Linear-attention settings (families linear and hybrid).
    linear_attention: LinearAttentionConfig = field(default_factory=LinearAttentionConfig)
    # Hybrid layer pattern, repeated over num_layers: A = softmax attention + MLP, L = linear
    # attention + MLP, M = Mamba (+ MLP if mamba.mlp), P = parallel block (attention heads and
    # SSM side by side on the same input, Falcon-H1 style) + MLP, S = Mamba-2 (+ MLP if
    # mamba.mlp). "LLLA" = 3 linear : 1 softmax.
    layer_pattern: str = "LLLA"

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

    def layer_codes(self) -> str:
        """The block letter of every layer (hybrid stacks): the family's pattern repeated over
        num_layers."""
        pattern = FAMILY_PATTERNS.get(self.family, self.layer_pattern)
        return (pattern * self.num_layers)[: self.num_layers]

    def _validate_ungated_heads(self) -> None:
        n = self.linear_attention.ungated_heads
        key = "model.linear_attention.ungated_heads"
        if not isinstance(n, list):
            if n > self.num_heads:
                raise ValueError(f"{key}={n} is more than model.num_heads={self.num_heads}; "
                                 f"set it to at most {self.num_heads}")
            return
        if len(n) != self.num_layers:
            raise ValueError(f"{key}={n} has {len(n)} entries but model.num_layers="
                             f"{self.num_layers}; give one count per layer (or one int for all)")
        for i, (count, code) in enumerate(zip(n, self.layer_codes())):
            if count > self.num_heads:
                raise ValueError(f"{key}[{i}]={count} is more than model.num_heads="
                                 f"{self.num_heads}; set it to at most {self.num_heads}")
            if count and code != "L":
                raise ValueError(f"{key}[{i}]={count}, but layer {i} is {code!r}, not a linear-"
                                 "attention layer (L); set that entry to 0")

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
        self.mamba.validate()
        if "S" in self.layer_codes():
            self.mamba.validate_mamba2(self.dim)
        self.linear_attention.validate()
        self._validate_ungated_heads()
        bad = sorted(set(self.layer_pattern) - set(HYBRID_LAYER_CODES))
        if not self.layer_pattern or bad:
            raise ValueError(
                f"model.layer_pattern={self.layer_pattern!r} must be a non-empty string of the "
                f"letters {HYBRID_LAYER_CODES!r} (A attention, M Mamba, L linear, P parallel, "
                "S Mamba-2)"
            )
