"""Llama-family decoder: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention.

    h = embed(tokens)
    for each block:  h = h + Wo · attn(rope(Wq·norm(h)), rope(Wk·norm(h)), Wv·norm(h))
                     h = h + W2 · (silu(W1·norm(h)) ⊙ W3·norm(h))
    logits = W_out · norm(h)

Activations are `(batch, seq, dim)`; inside attention `(batch, seq, heads, head_dim)`. The
attention itself comes from the model's `ParallelContext` (single device, or context-parallel
over a sequence shard), so other parallelisms swap it without touching this file; tensor
parallelism shards the `nn.Linear`s in place (head counts are inferred from the local width).
`layers` is an `nn.ModuleDict` and `tok_embeddings` / `norm` / `output` may be `None`, so a
pipeline stage is this class with the parts it does not own deleted.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ctxscale.dist.context import SINGLE, ParallelContext
from ctxscale.kernels.attention import attention as attention_kernel
from ctxscale.kernels.norm import RMSNorm
from ctxscale.kernels.rotary import apply_rotary, rope_cos_sin, rope_inv_freq
from ctxscale.models.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext):
        super().__init__()
        hd = cfg.per_head_dim
        self.head_dim = hd
        self.parallel = parallel
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=cfg.attention_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.num_heads * hd, cfg.dim, bias=False)

    def qkv(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def core(self, q, k, v, document_ids=None):
        o = self.parallel.attention(q, k, v, causal=True, document_ids=document_ids)
        return o.flatten(2)

    def forward(self, x, cos, sin, document_ids=None):
        return self.wo(self.core(*self.qkv(x, cos, sin), document_ids))

    def step(self, x, state, cos, sin):
        """Single device inference with a KV cache: (x `(batch, new, dim)`, state None or
        {"k", "v"}) -> (output, new state)."""
        q, k, v = self.qkv(x, cos, sin)
        if state:
            k, v = torch.cat([state["k"], k], 1), torch.cat([state["v"], v], 1)
        # causal masks are bottom-right aligned: new query i sees every cached key
        o = attention_kernel(q, k, v, causal=True)
        return self.wo(o.flatten(2)), {"k": k, "v": v}


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, parallel)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.checkpointing = cfg.activation_checkpointing

    def _pre_attention(self, x, cos, sin):
        return self.attention.qkv(self.attention_norm(x), cos, sin)

    def _post_attention(self, x, o):
        h = x + self.attention.wo(o)
        return h + self.feed_forward(self.ffn_norm(h))

    def _block(self, x, cos, sin, document_ids=None):
        q, k, v = self._pre_attention(x, cos, sin)
        return self._post_attention(x, self.attention.core(q, k, v, document_ids))

    def step(self, x, state, cos, sin):
        """Single device: (x, state) -> (y, new_state) with the attention's KV cache."""
        o, new = self.attention.step(self.attention_norm(x), state, cos, sin)
        h = x + o
        return h + self.feed_forward(self.ffn_norm(h)), new

    def forward(self, x, cos, sin, document_ids=None):
        """`document_ids`: None, or the `(batch, seq)` document ids of the whole sequence
        (document masking; see `ParallelContext.attention`)."""
        mode = self.checkpointing if self.training and torch.is_grad_enabled() else "none"
        if mode == "full":
            return checkpoint(self._block, x, cos, sin, document_ids, use_reentrant=False)
        if mode == "selective":
            # The attention output is the checkpoint boundary: projections, norms and the MLP
            # are recomputed, the attention kernel (which saved q, k, v, o, lse) never is.
            q, k, v = checkpoint(self._pre_attention, x, cos, sin, use_reentrant=False)
            o = self.attention.core(q, k, v, document_ids)
            return checkpoint(self._post_attention, x, o, use_reentrant=False)
        return self._block(x, cos, sin, document_ids)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext | None = None):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before the model is built")
        self.cfg = cfg
        self.parallel = parallel or SINGLE
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = self.build_layers(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        inv_freq, self.rope_attention_scaling = rope_inv_freq(
            cfg.per_head_dim, cfg.rope_base, cfg.rope_scaling
        )
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.init_weights()

    def build_layers(self, cfg: ModelConfig) -> nn.ModuleDict:
        """The residual blocks, keyed "0".."L-1"; other families override only this."""
        return nn.ModuleDict(
            {str(i): TransformerBlock(cfg, self.parallel) for i in range(cfg.num_layers)}
        )

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """(Re)initialize every parameter and buffer; also after `to_empty()` from meta."""
        cfg = self.cfg
        if self.rope_inv_freq.is_meta or buffer_device is not None:
            inv_freq, _ = rope_inv_freq(cfg.per_head_dim, cfg.rope_base, cfg.rope_scaling)
            self.rope_inv_freq = inv_freq.to(buffer_device or self.rope_inv_freq.device)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("wo", "w2")) else cfg.init_std
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=cfg.init_std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    uses_rope = True  # the cos/sin of the positions are needed (HybridLM: by some layers)

    @property
    def can_step(self) -> bool:
        """Whether every block has `step` (recurrent inference, `forward_step`)."""
        return all(hasattr(layer, "step") for layer in self.layers.values())

    @torch.no_grad()
    def forward_step(self, input_ids, state: dict | None = None):
        """Single device inference: input_ids `(batch, new_tokens)` continuing from `state`
        (None: a new sequence) -> (logits `(batch, new_tokens, vocab)`, new state). Every
        block carries its state: a KV cache for softmax attention, recurrent states for
        linear attention and Mamba (HybridLM). One pass, pieces with the state carried, and
        token by token give the same logits."""
        if not self.can_step:
            raise ValueError(f"{type(self).__name__} blocks have no step(); run the full "
                             "forward over the whole sequence instead")
        state = state or {"pos": 0, "layers": {}}
        h = self.tok_embeddings(input_ids)
        b, s = input_ids.shape
        pos = torch.arange(state["pos"], state["pos"] + s, device=h.device).expand(b, s)
        cos, sin = self.rope(pos) if self.uses_rope else (None, None)
        new_layers = {}
        for name, layer in self.layers.items():
            h, new_layers[name] = layer.step(h, state["layers"].get(name), cos, sin)
        return self.output(self.norm(h)), {"pos": state["pos"] + s, "layers": new_layers}

    def rope(self, position_ids: torch.Tensor):
        return rope_cos_sin(position_ids, self.rope_inv_freq, self.rope_attention_scaling)

    def hidden_states(self, input_ids, position_ids=None, document_ids=None):
        """Final-norm hidden states `(batch, seq, dim)` (or the stage output in a pipeline)."""
        # positions from the token shape: a sequence-parallel embedding returns a shard of it
        b, s = input_ids.shape[:2]
        h = self.tok_embeddings(input_ids) if self.tok_embeddings is not None else input_ids
        if position_ids is None:
            position_ids = self.parallel.position_ids(b, s, device=h.device)
        cos, sin = self.rope(position_ids)
        for layer in self.layers.values():
            h = layer(h, cos, sin, document_ids)
        return self.norm(h) if self.norm is not None else h

    def forward(self, input_ids, *, labels=None, position_ids=None, document_ids=None,
                loss_reduction="mean", labelled_logits=False):
        """input_ids `(batch, seq)` -> logits `(batch, seq, vocab)`; with `labels` the
        cross-entropy (`loss_reduction` "mean" over labelled tokens, or "sum"), computed in
        token chunks without materializing float32 logits; with `labelled_logits=True` the
        logits `(n_labelled, vocab)` of the labelled positions only (for evaluation).

        Packed sequences: `document_ids` `(batch, seq)` gives each token's document (for the
        WHOLE sequence: under context parallelism input_ids and position_ids are this rank's
        shard but document_ids are the same global ids on every rank); attention then stays
        inside a document, and recurrent layers (HybridLM) and the Titans memory restart their
        state at each document start. Pass per-document `position_ids` too to restart RoPE positions."""
        h = self.hidden_states(input_ids, position_ids, document_ids)
        if self.output is None:
            return h
        if labels is None:
            return self.output(h)
        if labelled_logits:
            return self.output(h[labels != -100])
        return self.parallel.cross_entropy(h, self.output.weight, labels, reduction=loss_reduction)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.tok_embeddings is not None:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·params + attention's 12·layers·dim_attn·seq (causal half)."""
        cfg = self.cfg
        attn = 12 * cfg.num_layers * cfg.num_heads * cfg.per_head_dim * seq_len / 2
        return 6 * self.num_params(exclude_embeddings=True) + attn
