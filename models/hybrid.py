"""A decoder stack built from a layer pattern: Mamba, linear-attention, softmax and parallel blocks.

`model.layer_pattern` is repeated over `num_layers`; each letter is one pre-norm residual block:

    A  h += Wo·attn(norm(h))                  + MLP   (the Transformer's Attention and FeedForward)
    L  h += linear_attention(norm(h))         + MLP   (models/linear_attention.py, kind from config)
    M  h += mamba(norm(h))           [+ MLP if model.mamba.mlp]  (models/mamba.py)
    S  h += mamba2(norm(h))          [+ MLP if model.mamba.mlp]  (models/mamba2.py, SSD)
    P  h += attn(norm(h)) + mamba(norm(h))    + MLP   (Falcon-H1: attention heads and SSM channels
                                                       side by side on the same input; their
                                                       projected outputs are summed, which is one
                                                       projection of the concatenation)

"LLLA" is 3 linear : 1 softmax (Kimi-Linear style), "MMMA" Mamba with attention (Jamba style).
Families: `mamba` = every layer M (Mamba-1 / Hugging Face MambaForCausalLM), `mamba2` = every
layer S (Mamba-2 / Mamba2ForCausalLM), `linear` = every layer L, `hybrid` = the pattern. Activations `(batch, seq, dim)`.

The model is a `Transformer` (same `forward` with chunked cross-entropy, `labelled_logits`,
`num_params`, `rope`) whose blocks differ. Blocks keep the Transformer's names
(`attention_norm`, `attention`, `ffn_norm`, `feed_forward`) where they have attention, so a
Transformer checkpoint loads into A and L blocks; Mamba blocks use `mixer_norm` and `mixer`.

Parallelism comes only through the `ParallelContext`: softmax attention through
`parallel.attention`, recurrent layers through `parallel.linear_attention` / `selective_scan` /
`causal_conv1d` (state passing between contiguous sequence shards when cp > 1).

Recurrent inference: `forward_step(input_ids, state) -> (logits, state)` runs any number of new
tokens on one device, carrying every layer's state (recurrent states; a KV cache for softmax
attention). One pass, pieces with the state carried, and token-by-token give the same logits.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ctxscale.dist.context import ParallelContext
from ctxscale.kernels.norm import RMSNorm
from ctxscale.models.config import ModelConfig
from ctxscale.models.linear_attention import LinearAttention, linear_attention_flops_per_token
from ctxscale.models.mamba import MambaMixer
from ctxscale.models.mamba2 import Mamba2Mixer
from ctxscale.models.transformer import Attention, FeedForward, Transformer


class HybridBlock(nn.Module):
    """One pre-norm residual block of kind `code` (A, L, M or P; see the module docstring)."""

    def __init__(self, code: str, cfg: ModelConfig, parallel: ParallelContext, layer_index: int = 0):
        super().__init__()
        self.code = code
        self.attention = self.mixer = None
        if code in "ALP":
            self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.attention = (LinearAttention(cfg, parallel, layer_index=layer_index) if code == "L"
                              else Attention(cfg, parallel))
        else:
            self.mixer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if code in "MP":
            self.mixer = MambaMixer(cfg, parallel)
        elif code == "S":
            self.mixer = Mamba2Mixer(cfg, parallel)
        self.feed_forward = None
        if code not in "MS" or cfg.mamba.mlp:
            self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.feed_forward = FeedForward(cfg)
        self.checkpointing = cfg.activation_checkpointing

    @property
    def uses_rope(self) -> bool:
        la = self.attention.la if self.code == "L" else None
        return self.code in "AP" or (la is not None and (la.rope or la.window > 0))

    def _norm(self, x):
        return self.attention_norm(x) if self.attention is not None else self.mixer_norm(x)

    def _mlp(self, h):
        return h if self.feed_forward is None else h + self.feed_forward(self.ffn_norm(h))

    def _block(self, x, cos, sin, document_ids=None):
        n = self._norm(x)
        y = 0
        if self.attention is not None:
            y = self.attention(n, cos, sin, document_ids)
        if self.mixer is not None:
            y = y + self.mixer(n, document_ids=document_ids)
        return self._mlp(x + y)

    def forward(self, x, cos=None, sin=None, document_ids=None):
        """`document_ids`: None, or the `(batch, seq)` ids of the whole sequence (packed rows):
        softmax attention stays inside a document and recurrent layers restart at its start."""
        # "selective" (keep the attention output) only pays off for softmax attention, whose
        # kernel saves o and lse; recurrent kernels checkpoint their own chunks, so a whole
        # block is recomputed for both "full" and "selective".
        if self.checkpointing != "none" and self.training and torch.is_grad_enabled():
            return checkpoint(self._block, x, cos, sin, document_ids, use_reentrant=False)
        return self._block(x, cos, sin, document_ids)

    def step(self, x, state, cos=None, sin=None):
        """Single device: (x, state) -> (y, new_state); state None = the start of a sequence."""
        state = state or {}
        n = self._norm(x)
        y, new = 0, {}
        if self.attention is not None:
            y, new["attention"] = self.attention.step(n, state.get("attention"), cos, sin)
        if self.mixer is not None:
            ym, new["mixer"] = self.mixer.step(n, state.get("mixer"))
            y = y + ym
        return self._mlp(x + y), new


def layer_codes(cfg: ModelConfig) -> str:
    """The block letter of every layer: the family's pattern repeated over num_layers."""
    return cfg.layer_codes()


class HybridLM(Transformer):
    """Decoder LM over `HybridBlock`s; the `mamba`, `linear` and `hybrid` families."""

    def build_layers(self, cfg: ModelConfig) -> nn.ModuleDict:
        self.codes = layer_codes(cfg)
        return nn.ModuleDict(
            {str(i): HybridBlock(c, cfg, self.parallel, layer_index=i) for i, c in enumerate(self.codes)}
        )

    @property
    def uses_rope(self) -> bool:
        """cos/sin are needed by softmax layers and by linear layers with rope or a window."""
        la = self.cfg.linear_attention
        return any(c in "AP" for c in self.codes) or ("L" in self.codes and (la.rope or la.window > 0))

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """The Transformer's initialization, then each recurrent mixer's own (A_log, Δ, ...)."""
        super().init_weights(buffer_device)
        for module in self.modules():
            if hasattr(module, "reset_recurrent_parameters"):
                module.reset_recurrent_parameters()

    def _rope_for(self, position_ids, b, s, device):
        if not self.uses_rope:
            return None, None
        if position_ids is None:
            position_ids = self.parallel.position_ids(b, s, device=device)
        return self.rope(position_ids)

    def hidden_states(self, input_ids, position_ids=None, document_ids=None):
        """Final-norm hidden states `(batch, seq, dim)` (or the stage output in a pipeline)."""
        # positions from the token shape: a sequence-parallel embedding returns a shard of it
        b, s = input_ids.shape[:2]
        h = self.tok_embeddings(input_ids) if self.tok_embeddings is not None else input_ids
        cos, sin = self._rope_for(position_ids, b, s, h.device)
        for layer in self.layers.values():
            h = layer(h, cos, sin, document_ids)
        return self.norm(h) if self.norm is not None else h

    def flops_per_token(self, seq_len: int) -> float:
        """6·params + softmax attention (A, P layers, causal half) + linear-attention state work
        + Mamba-2's SSD state update and readout (heads · d_state · head_dim each)."""
        cfg, m = self.cfg, self.cfg.mamba
        n_attn = sum(c in "AP" for c in self.codes)
        n_lin = self.codes.count("L")
        attn = 12 * n_attn * cfg.num_heads * cfg.per_head_dim * seq_len / 2
        lin = n_lin * linear_attention_flops_per_token(cfg)
        ssd = self.codes.count("S") * 6.0 * 2 * m.expand * cfg.dim * m.d_state
        return 6 * self.num_params(exclude_embeddings=True) + attn + lin + ssd


__all__ = ["HybridBlock", "HybridLM", "layer_codes"]
