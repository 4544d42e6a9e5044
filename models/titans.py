"""Titans language model: attention plus a neural long-term memory that learns at test time.

Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024), Section 4. The
memory itself (an MLP trained online by gradient descent with momentum and forgetting) is in
`models/titans_memory.py`; this file wires it into three block variants (`model.titans.variant`),
each followed by a SwiGLU MLP, in a Llama-style decoder (RMSNorm, RoPE, tied or untied output):

- mac, memory as context: the sequence is cut into segments of `segment_len`. For segment S:
      h = M_{prev}(q(S))                     read the memory as it was before the segment
      y = Attn([P | h | S])                   persistent tokens P, memory tokens h, the segment;
                                              query i sees all of P and h_j, S_j for j ≤ i
      M ← update(M, y);  o = y ⊙ σ(M(y))      the memory learns from the attention output
- mag, memory as gate: o = SWA([P] ; x) ⊙ σ(M(x)), sliding-window attention (window
  `window`, persistent tokens as always-visible keys) gated by the memory branch.
- mal, memory as layer: x ← x + M(x), then x ← x + SWA([P] ; x).

Every block has `forward(x, cos, sin, state=None) -> (x, state)`: the state (memory weights and
momentum, and for mag / mal the last window − 1 keys/values) lets a sequence run in pieces with
the same result as one pass (pieces must be multiples of `segment_len` for mac and of
`chunk_size` for mag / mal, the last piece excepted; continuing from a piece that ended inside
a unit is refused, as its memory would have updated mid-unit). Context parallelism needs no other code
here: the model's `ParallelContext` passes the memory state between ranks in order
(`recv_state` / `send_state`) and supplies the previous rank's keys to the window
(`with_halo`); see `dist/titans_cp.py` for the algorithm and its cost.

Packed documents (`document_ids`, data.document_mask): every document computes what it would
alone. The memory restarts from M_0 (zero momentum) at each document, and its mini-batch chunks
(mac: its segments) are cut from the document's own start: `models/titans_documents.py` lays
every document out padded to whole units (mac: `segment_len`, mag / mal: `chunk_size`), and the
padding slots do not move the memory. mac's segment attention is causal, so a document's tokens
never see the padding behind them. The sliding window of mag / mal runs on the unpadded row and
masks keys of other documents; persistent tokens stay visible to all. Cost: up to unit − 1
padding slots per document. Under context parallelism a unit that straddles two ranks is
recomputed by the later one from a halo of unit − 1 tokens and the state at the unit's start
(`titans_documents`). Not supported with `state` (a continued sequence).

Activations are `(batch, seq, dim)`; attention `(batch, seq, heads, head_dim)`; memory
`(batch, memory_heads, seq, memory_head_dim)`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from ctxscale.dist.context import ParallelContext
from ctxscale.dist.tensor_parallel import local, replicated_output, sequence_shard
from ctxscale.kernels.norm import RMSNorm
from ctxscale.kernels.recurrent_segments import check_segments
from ctxscale.kernels.rotary import apply_rotary
from ctxscale.kernels.sliding_window import sliding_window_attention
from ctxscale.models.config import ModelConfig
from ctxscale.models.titans_documents import DocumentLayout, cp_document_layout
from ctxscale.models.titans_memory import (
    MemoryState,
    handed_over,
    keep_handover,
    neural_memory,
    restart,
    retrieve,
)
from ctxscale.models.transformer import FeedForward, Transformer


class BlockState(NamedTuple):
    memory: MemoryState
    kv: tuple[torch.Tensor, torch.Tensor] | None = None  # last window−1 keys/values (mag, mal)
    # tokens of the piece past its last whole unit (segment_len / chunk_size): such a piece
    # must be the last one, and continuing from its state is refused
    partial: int = 0


# ------------------------------------------------------------------ neural memory layer
class NeuralMemory(nn.Module):
    """Projections and gates around the memory: x `(b, n, dim)` -> `(b, n, dim)`.
    q, k are l2-normalized per head; α, η, θ are per token and head (sigmoids of a linear map,
    θ scaled by max_lr); the retrieved y is RMS-normalized per head before the output map."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext | None = None):
        super().__init__()
        t = cfg.titans
        self.parallel = parallel or ParallelContext()
        self.heads = t.memory_heads or cfg.num_heads
        # this module's heads [head_offset, head_offset + local_heads) (tensor parallelism)
        self.head_offset, self.local_heads = 0, self.heads
        self.head_dim = t.memory_head_dim or cfg.per_head_dim
        hidden = t.memory_hidden or 2 * self.head_dim
        self.layer_dims = [self.head_dim] + [hidden] * (t.memory_depth - 1) + [self.head_dim]
        self.chunk_size = t.chunk_size
        self.max_lr = t.max_lr
        width = self.heads * self.head_dim
        self.wq = nn.Linear(cfg.dim, width, bias=False)
        self.wk = nn.Linear(cfg.dim, width, bias=False)
        self.wv = nn.Linear(cfg.dim, width, bias=False)
        self.w_gates = nn.Linear(cfg.dim, 3 * self.heads, bias=True)
        self.wo = nn.Linear(width, cfg.dim, bias=False)
        # M_0: the memory's initial weights, learned by the outer loop (per head)
        self.init_memory = nn.ParameterList(
            nn.Parameter(torch.empty(self.heads, a, b))
            for a, b in zip(self.layer_dims[:-1], self.layer_dims[1:])
        )
        self.reset_memory_parameters()

    @torch.no_grad()
    def reset_memory_parameters(self) -> None:
        for p in self.init_memory:
            nn.init.normal_(p, std=p.shape[1] ** -0.5)
        # start with little forgetting (α ≈ 0.0025), strong momentum (η ≈ 0.88), θ = max_lr / 2
        bias = self.w_gates.bias.view(3, self.heads)
        bias[0].fill_(-6.0)
        bias[1].fill_(2.0)
        bias[2].zero_()

    def shard_heads(self, rank: int, tp: int) -> None:
        """Keep memory heads [rank·heads/tp, (rank+1)·heads/tp) (tensor parallelism; the weights
        are sharded by `dist/tensor_parallel.py`)."""
        self.local_heads = self.heads // tp
        self.head_offset = rank * self.local_heads

    def state_dtype(self) -> torch.dtype:
        """The memory's compute dtype: float64 for float64 weights, else float32."""
        return torch.float64 if self.init_memory[0].dtype == torch.float64 else torch.float32

    def initial_state(self, batch: int) -> MemoryState:
        dtype = self.state_dtype()
        w = tuple(local(p).to(dtype).unsqueeze(0).expand(batch, -1, -1, -1)
                  for p in self.init_memory)
        return MemoryState(w, tuple(torch.zeros_like(x) for x in w))

    def _split(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.local_heads, self.head_dim).transpose(1, 2)

    def merge(self, y, dtype):
        """Retrieved values `(b, h, n, d)` -> `(b, n, dim)`: RMS norm per head, output map."""
        b, h, n, d = y.shape
        y = F.rms_norm(y, (d,), eps=1e-6)
        return self.wo(y.transpose(1, 2).reshape(b, n, h * d).to(dtype))

    def read(self, x, state: MemoryState):
        """M(q(x)) with the memory held fixed: `(b, n, dim)`."""
        q = F.normalize(self._split(self.wq(x)), dim=-1)
        return self.merge(retrieve(state, q), x.dtype)

    def project(self, x, dtype):
        """q, k (l2-normalized), v `(b, h, n, d)` and the gates log η, log(1 − α), θ
        `(b, h, n)` of this module's heads, the gates in `dtype` (the state's)."""
        q = F.normalize(self._split(self.wq(x)), dim=-1)
        k = F.normalize(self._split(self.wk(x)), dim=-1)
        v = self._split(self.wv(x))
        # rows [α; η; θ] x heads: replicated under tp, every rank forms all and keeps its heads
        gates = replicated_output(self.w_gates(x)).to(dtype).transpose(1, 2)
        lo, hi = self.head_offset, self.head_offset + self.local_heads
        a_raw, e_raw, t_raw = (g[:, lo:hi] for g in gates.chunk(3, dim=1))  # (b, h, n) each
        log_keep = F.logsigmoid(-a_raw)  # log(1 − α), α = σ(a)
        log_eta = F.logsigmoid(e_raw)
        theta = self.max_lr * torch.sigmoid(t_raw)
        return q, k, v, log_eta, log_keep, theta

    def forward(self, x, state: MemoryState | None = None, *, region=None,
                layout: DocumentLayout | None = None, pad=None, receive=None):
        """Learn from every token of x (chunked), reading y_t = M_t(q_t) after each update.
        Returns ((b, n, dim), final MemoryState). `region` (activation checkpointing: a
        function that runs `fn(*args)` as a recomputed region) wraps the projections and the
        output map, and the inner loop then recomputes chunk by chunk in its backward.
        Packed documents: `layout` (units of `chunk_size`) runs the inner loop in its padded
        slots, restarting the memory at each later document (under cp, after the halo; the
        state returned is then the one to send on, `titans_documents`); `pad` `(b, n)` marks
        padding tokens of an input that is already laid out (mac), which must not move it.
        `receive` (in place of `state`): returns the state, called after the halo exchange."""
        run = region or (lambda fn, *args: fn(*args))
        dtype = self.state_dtype() if state is None else state.weights[0].dtype
        inputs = run(self.project, x, dtype)
        resets = fresh = handover = flags = None
        if layout is not None and layout.exchange:  # a unit may straddle the cp boundary
            inputs = self._halo(inputs, layout.exchange)
        if receive is not None:  # after the halo: every rank exchanges in one order
            state = receive()
        if state is None:
            state = self.initial_state(x.shape[0])
        if layout is not None:
            inputs = [layout.pack(t, 2) for t in inputs]
            pad, resets, fresh = layout.pad, layout.resets, self.initial_state(x.shape[0])
            handover = layout.handover
            if layout.unit == self.chunk_size:  # the layout read its units' flags already
                flags = (layout.restarts, layout.padded, layout.handover_units)
        y, state = neural_memory(state, *inputs, chunk_size=self.chunk_size,
                                 recompute=region is not None, resets=resets, fresh=fresh,
                                 pad=pad, handover=handover, host_flags=flags)
        if layout is not None:
            y = layout.unpack(y, 2)
        return run(self.merge, y, x.dtype), state

    def _halo(self, inputs, n):
        """The memory inputs (q, k, v `(b, h, seq, d)`, gates `(b, h, seq)`) with the previous cp
        rank's last n tokens prepended: one exchange."""
        d = inputs[0].shape[-1]
        packed = torch.cat([*inputs[:3], *(g.unsqueeze(-1) for g in inputs[3:])], -1)
        packed = self.parallel.with_halo(packed.transpose(1, 2).contiguous(), n).transpose(1, 2)
        q, k, v = packed[..., :d], packed[..., d : 2 * d], packed[..., 2 * d : 3 * d]
        return [q, k, v, *packed[..., 3 * d :].unbind(-1)]


# ------------------------------------------------------------------ attention
class _Projections(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.per_head_dim
        self.head_dim = hd
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=cfg.attention_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.num_heads * hd, cfg.dim, bias=False)
        n_p = cfg.titans.persistent_tokens
        self.persistent = nn.Parameter(torch.empty(n_p, cfg.dim)) if n_p else None

    def split(self, t):
        b, s, _ = t.shape
        return t.view(b, s, -1, self.head_dim)

    def persistent_kv(self):
        if self.persistent is None:
            return None, None
        p = self.persistent.unsqueeze(0)
        return self.split(self.wk(p)), self.split(self.wv(p))


class WindowAttention(_Projections):
    """Sliding-window attention with persistent tokens as always-visible keys (mag, mal).
    `forward` is `qkv`, then `with_context` (the previous cp rank's halo and the cached keys:
    communication), then `attend`; a block that checkpoints activations runs the two
    communication-free parts as separate regions."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext):
        super().__init__(cfg)
        self.window = cfg.titans.window
        self.parallel = parallel

    def qkv(self, x, cos, sin):
        q = apply_rotary(self.split(self.wq(x)), cos, sin)
        k = apply_rotary(self.split(self.wk(x)), cos, sin)
        return q, k, self.split(self.wv(x))

    def with_context(self, k, v, cache=None):
        """Keys and values with the window − 1 earlier ones prepended (the previous cp rank's
        halo, or `cache` from an earlier piece), and the new cache (the last window − 1)."""
        n_halo = self.window - 1
        k, v = self.parallel.with_halo(k, n_halo), self.parallel.with_halo(v, n_halo)
        if cache is not None and self.parallel.cp_rank == 0:
            k, v = torch.cat([cache[0], k], 1), torch.cat([cache[1], v], 1)
        keep = min(n_halo, k.shape[1])
        return k, v, (k[:, k.shape[1] - keep :], v[:, v.shape[1] - keep :])

    def attend(self, q, k, v, segments=None):
        """`segments`: the document ids of the keys (packed documents, no cache or halo)."""
        pk, pv = self.persistent_kv()
        o = sliding_window_attention(q, k, v, window=self.window, prefix_k=pk, prefix_v=pv,
                                     segments=segments)
        return self.wo(o.flatten(2))

    def forward(self, x, cos, sin, cache=None):
        q, k, v = self.qkv(x, cos, sin)
        k, v, new_cache = self.with_context(k, v, cache)
        return self.attend(q, k, v), new_cache


class SegmentAttention(_Projections):
    """Attention within one segment over [persistent | memory tokens | segment] (mac)."""

    def forward(self, x, mem, cos, sin):
        b, n, _ = x.shape
        q = apply_rotary(self.split(self.wq(x)), cos, sin)
        k = torch.cat([apply_rotary(self.split(self.wk(mem)), cos, sin),
                       apply_rotary(self.split(self.wk(x)), cos, sin)], 1)
        v = torch.cat([self.split(self.wv(mem)), self.split(self.wv(x))], 1)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        allowed = torch.cat([causal, causal], 1)
        pk, pv = self.persistent_kv()
        if pk is not None:
            k = torch.cat([pk.expand(b, -1, -1, -1), k], 1)
            v = torch.cat([pv.expand(b, -1, -1, -1), v], 1)
            allowed = torch.cat([allowed.new_ones(n, pk.shape[1]), allowed], 1)
        heads = q.shape[2]
        k = k.repeat_interleave(heads // k.shape[2], dim=2)
        v = v.repeat_interleave(heads // v.shape[2], dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim**-0.5
        cdt = torch.float64 if v.dtype == torch.float64 else torch.float32  # softmax dtype
        scores = scores.to(cdt).masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype)
        o = torch.einsum("bhqk,bkhd->bqhd", scores, v)
        return self.wo(o.flatten(2))


# ------------------------------------------------------------------ blocks
class TitansBlock(nn.Module):
    """One Titans block (module docstring). Under `model.activation_checkpointing` (full or
    selective: the same here) its computation runs as regions recomputed in the backward, cut
    at the context-parallel exchanges (memory state in and out, the window halo), which run
    once forward and once backward as without checkpointing: mac recomputes per segment (the
    memory state between segments is kept), mag / mal per branch; the MLP is its own region."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext):
        super().__init__()
        t = cfg.titans
        self.variant = t.variant
        self.segment_len = t.segment_len
        self.chunk_size = t.chunk_size
        self.unit, self.unit_name = t.unit()
        self.parallel = parallel
        self.checkpointing = cfg.activation_checkpointing
        self.memory_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.memory = NeuralMemory(cfg, parallel)
        if self.variant == "mac":
            self.attention = SegmentAttention(cfg)
        else:
            self.attention = WindowAttention(cfg, parallel)
        if self.variant == "mal":
            self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def _check_shard(self, n):
        if not self.parallel.cp_enabled:
            return
        if n % self.unit:
            raise ValueError(
                f"each context-parallel rank holds {n} tokens, not a multiple of "
                f"model.titans.{self.unit_name}={self.unit}: memory segments/chunks would "
                "straddle the shard boundary. Choose data.seq_len divisible by parallel.cp × "
                f"{self.unit}"
            )

    def _memory_state(self, state, batch):
        mem = state.memory if state is not None else self.memory.initial_state(batch)
        return MemoryState.from_tensors(self.parallel.recv_state(mem.tensors()))

    def _checkpointing(self) -> bool:
        return self.checkpointing != "none" and self.training and torch.is_grad_enabled()

    def _region(self, fn, *args):
        """fn(*args); under activation checkpointing (training) a region whose activations are
        recomputed in the backward. fn must not communicate over cp."""
        if self._checkpointing():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _memory(self, x, mem, **documents):
        """The memory learns from x; under activation checkpointing its projections and output
        map are regions and its inner loop recomputes chunk by chunk (its many small saved
        tensors would cost a Python hook each inside a checkpoint region). `documents`: the
        memory's `layout` or `pad` (packed documents)."""
        return self.memory(x, mem, region=self._region if self._checkpointing() else None,
                           **documents)

    def _mac_attention(self, xs, cos, sin, mem):
        """mac, one segment S: attention over [P | M(q(S)) | S]."""
        return self.attention(xs, self.memory.read(xs, mem), cos, sin)

    def _halo(self, t, n):
        """`t` `(b, seq, ...)` with the previous cp rank's last n tokens (a replicated DTensor
        under tp goes through its local copy)."""
        if isinstance(t, DTensor):
            ext = self.parallel.with_halo(t.to_local(), n)
            return DTensor.from_local(ext, t.device_mesh, t.placements, run_check=False)
        return self.parallel.with_halo(t.contiguous(), n)

    def _key_ids(self, document_ids, k, q):
        """The global document ids of the window's keys (this rank's tokens and the halo)."""
        if document_ids is None:
            return None
        start = self.parallel.cp_rank * q.shape[1] if self.parallel.cp_enabled else 0
        return document_ids[:, start - (k.shape[1] - q.shape[1]) : start + q.shape[1]]

    def _mal_qkv(self, h, cos, sin):
        return self.attention.qkv(self.attention_norm(h), cos, sin)

    def _mlp(self, h):
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x, cos, sin, state: BlockState | None = None,
                layout: DocumentLayout | None = None, document_ids=None):
        """`layout` and `document_ids` (packed documents, module docstring): the document
        layout in units of segment_len (mac) or chunk_size (mag, mal), and the ids."""
        b = x.shape[0]
        self._check_shard(cos.shape[1])  # the whole local sequence (x: a tp shard of it)
        if state is not None and state.partial:
            raise ValueError(
                f"Titans {self.variant}: continuing a sequence from a piece that ended "
                f"{state.partial} tokens into a unit of model.titans.{self.unit_name}="
                f"{self.unit}; the "
                "memory would update mid-unit and differ from one pass. Run pieces of whole "
                "units (only the last may be shorter), or the sequence in one pass")
        kv = state.kv if state is not None else None
        run, attn = self._region, self.attention
        if self.variant == "mac":
            xn = self.memory_norm(x)
            if layout is not None:  # slots: every document begins a segment
                cos, sin = (t.expand(b, -1, -1) for t in (cos, sin))
                if layout.exchange:  # a segment may straddle the cp boundary: recompute it
                    xn, cos, sin = (self._halo(t, layout.exchange) for t in (xn, cos, sin))
            mem = self._memory_state(state, b)  # after the halo: one exchange order everywhere
            if layout is not None:
                xn = layout.pack(xn)
                cos, sin = layout.pack(cos), layout.pack(sin)
                fresh = self.memory.initial_state(b)
            outs, given = [], None
            for s in range(0, xn.shape[1], self.segment_len):
                e = s + self.segment_len
                documents, unit = {}, s // self.segment_len
                if layout is not None and layout.restarts[unit]:
                    mem = restart(mem, layout.resets[:, unit], fresh)
                if layout is not None and unit in layout.handover_units:
                    given = keep_handover(given, mem, layout.handover, unit)
                if layout is not None and layout.padded[unit]:
                    documents = {"pad": layout.pad[:, s:e]}
                y = run(self._mac_attention, xn[:, s:e], cos[:, s:e], sin[:, s:e], mem)
                # the memory learns from the attention output
                m, mem = self._memory(y, mem, **documents)
                outs.append(y * torch.sigmoid(m))
            out = torch.cat(outs, 1)
            sent = mem
            if layout is not None:
                out = layout.unpack(out)
                sent = handed_over(mem, given, layout.handover)
            out = sequence_shard(out)  # under tp: whole inside, then the shard
            h = x + self.parallel.send_state(out, sent.tensors())
        elif self.variant == "mag":
            xn = self.memory_norm(x)
            q, k, v = run(attn.qkv, xn, cos, sin)
            k, v, kv = attn.with_context(k, v, kv)  # halo exchange first, then the memory chain
            a = run(attn.attend, q, k, v, self._key_ids(document_ids, k, q))
            m, mem = self._memory(xn, None, layout=layout,
                                  receive=lambda: self._memory_state(state, b))
            h = x + self.parallel.send_state(a * torch.sigmoid(m), mem.tensors())
        else:  # mal
            m, mem = self._memory(self.memory_norm(x), None, layout=layout,
                                  receive=lambda: self._memory_state(state, b))
            h = x + self.parallel.send_state(m, mem.tensors())
            q, k, v = run(self._mal_qkv, h, cos, sin)
            k, v, kv = attn.with_context(k, v, kv)
            h = h + run(attn.attend, q, k, v, self._key_ids(document_ids, k, q))
        h = run(self._mlp, h)
        return h, BlockState(mem, kv, cos.shape[1] % self.unit)


# ------------------------------------------------------------------ model
class Titans(Transformer):
    """Titans language model: the Transformer's embedding, head, loss and initialization
    around `TitansBlock`s (memory + attention variant per `model.titans.variant`)."""

    def build_layers(self, cfg: ModelConfig) -> nn.ModuleDict:
        return nn.ModuleDict(
            {str(i): TitansBlock(cfg, self.parallel) for i in range(cfg.num_layers)}
        )

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """The Transformer's initialization, then the memories and persistent tokens."""
        super().init_weights(buffer_device)
        for module in self.modules():
            if isinstance(module, NeuralMemory):
                module.reset_memory_parameters()
            elif isinstance(module, _Projections) and module.persistent is not None:
                nn.init.normal_(module.persistent, std=1.0)

    can_step = True  # forward_step below (not per block: the memory learns per unit)

    @torch.no_grad()
    def forward_step(self, input_ids, state: dict | None = None):
        """Single device inference: input_ids `(batch, new_tokens)` continuing from `state`
        (None: a new sequence) -> (logits `(batch, new_tokens, vocab)`, new state). The memory
        learns per unit (mac: segment_len, mag / mal: chunk_size), so the state holds every
        layer's BlockState at the last whole unit and the tokens since then (fewer than a
        unit); each call reruns only those plus the new ones from that state, and moves the
        state on by the whole units they complete. The same logits as one pass."""
        unit, _ = self.cfg.titans.unit()
        state = state or {"base": None, "start": 0, "tail": input_ids[:, :0]}
        tail = torch.cat([state["tail"], input_ids], 1)
        b, n, start = tail.shape[0], tail.shape[1], state["start"]
        pos = torch.arange(start, start + n, device=tail.device).expand(b, n)
        h = self.hidden_states(tail, pos, state=state["base"])
        logits = self.output(h[:, n - input_ids.shape[1]:])
        whole = n - n % unit
        base = state["base"]
        if whole:  # the completed units: their end state becomes the new base
            _, base = self.hidden_states(tail[:, :whole], pos[:, :whole], state=base,
                                         return_state=True)
        return logits, {"base": base, "start": start + whole, "tail": tail[:, whole:]}

    def hidden_states(self, input_ids, position_ids=None, document_ids=None, *, state=None,
                      return_state=False):
        """Final-norm hidden states `(batch, seq, dim)`. `state` (a list with one BlockState per
        layer, from an earlier call with `return_state=True`) continues a sequence; then pass
        the continuing `position_ids` too. `document_ids` `(batch, seq)`: packed documents
        (module docstring), with per-document `position_ids`."""
        # positions from the token shape: a sequence-parallel embedding returns a shard of it
        b, s = input_ids.shape[:2]
        h = self.tok_embeddings(input_ids) if self.tok_embeddings is not None else input_ids
        if position_ids is None:
            position_ids = self.parallel.position_ids(b, s, device=h.device)
        cos, sin = self.rope(position_ids)
        layout = None
        if document_ids is not None:
            layout = self._document_layout(document_ids, b, s, state, cos)
        new_state = []
        for i, layer in enumerate(self.layers.values()):
            h, st = layer(h, cos, sin, None if state is None else state[i], layout, document_ids)
            new_state.append(st)
        h = self.norm(h) if self.norm is not None else h
        return (h, new_state) if return_state else h

    def _document_layout(self, document_ids, b, s, state, cos) -> DocumentLayout:
        if state is not None:
            raise ValueError("Titans: document_ids cannot be combined with `state` (continuing a "
                             "sequence); pass one packed sequence whole")
        par = self.parallel  # a non-contiguous cp layout fails at the first halo exchange
        world, rank = (par.cp_size, par.cp_rank) if par.cp_enabled else (1, 0)
        check_segments(document_ids, b, s * world, cos.device,
                       what="Titans document_ids (the whole sequence's, on every cp rank)")
        return cp_document_layout(document_ids, self.cfg.titans.unit()[0], rank, world)

    def flops_per_token(self, seq_len: int) -> float:
        """Estimate: 6·params, plus attention over the keys a query sees (segment or window,
        persistent tokens), plus the memory's inner loop (3 MLP passes: the key pass and its
        backward for ∇ℓ, the query pass; and the C×C chunk products), ×3 for training."""
        cfg, t = self.cfg, self.cfg.titans
        n_p = t.persistent_tokens
        keys = (t.segment_len + n_p) if t.variant == "mac" else (min(t.window, seq_len) + n_p)
        attn = 12 * cfg.num_layers * cfg.num_heads * cfg.per_head_dim * keys / 2
        mem = next(iter(self.layers.values())).memory
        mlp = sum(a * b for a, b in zip(mem.layer_dims[:-1], mem.layer_dims[1:]))
        reads = 2 if t.variant == "mac" else 1
        inner = mem.heads * (3 * 2 * mlp * (reads + 1) + 4 * t.chunk_size * sum(mem.layer_dims))
        return 6 * self.num_params(exclude_embeddings=True) + attn + 3 * cfg.num_layers * inner
