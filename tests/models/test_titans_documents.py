"""Titans on packed documents (document_ids): every document computes exactly what it computes
alone, for mac, mag and mal, with and without activation checkpointing; the pieces behind it
(the padded document layout, memory restarts and handover, the sliding window's document mask);
refusals. Context parallelism: tests/dist/test_titans_cp_documents.py.

Tolerance: float64, 1e-10 for logits (the same operations on the same values: padding slots are
exact zeros and never move the memory); loss and gradients go through the chunked
cross-entropy, which sums in float32, so they get 1e-6 (as tests/models/test_document_mask.py).
"""

import pytest
import torch

from ctxscale.kernels.sliding_window import (
    sliding_window_attention,
    sliding_window_attention_reference,
)
from ctxscale.models.config import ModelConfig, TitansConfig
from ctxscale.models.titans import Titans
from ctxscale.models.titans_documents import DocumentLayout
from ctxscale.models.titans_memory import MemoryState, neural_memory, neural_memory_reference
from tests.models._recurrent_util import assert_packed_equals_alone, packed  # one torch thread

VARIANTS = ["mac", "mag", "mal"]
LENGTHS = [[5, 1, 12, 7], [25]]  # documents shorter and longer than the units, none aligned


def _model(variant, checkpointing="none"):
    t = TitansConfig(variant=variant, chunk_size=2, segment_len=4, persistent_tokens=2,
                     window=3, memory_depth=2, memory_hidden=10, memory_heads=3,
                     memory_head_dim=6, max_lr=0.5)  # a large θ: the memory moves a lot
    cfg = ModelConfig(family="titans", vocab_size=37, dim=24, num_layers=2, num_heads=3,
                      num_kv_heads=1, head_dim=8, titans=t, activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = Titans(cfg).double().train()
    with torch.no_grad():  # gates away from their init: strong forgetting and momentum terms
        for block in model.layers.values():
            block.memory.w_gates.bias.copy_(torch.randn(block.memory.w_gates.bias.shape))
    return model


@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_documents_equal_separate_runs(variant, checkpointing):
    model = _model(variant, checkpointing)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 37, (2, 25), generator=gen)
    labels = torch.randint(0, 37, (2, 25), generator=gen)
    assert_packed_equals_alone(model, ids, labels, LENGTHS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_document_ids_change_the_result(variant):
    """Without document ids the later documents see the earlier ones (the test above is not
    vacuous); the first document has nothing before it either way."""
    model = _model(variant).eval()
    ids = torch.randint(0, 37, (2, 25), generator=torch.Generator().manual_seed(2))
    docs, pos = packed(LENGTHS)
    diff = model(ids, position_ids=pos) - model(ids, position_ids=pos, document_ids=docs)
    assert diff[0, :5].abs().max() <= 1e-12
    assert diff[0, 5:].abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_final_state_is_the_last_documents(variant):
    """The memory state after a packed row is its last document's alone: padding slots
    (mac: the tail of a document's last segment) leave the memory as it is."""
    model = _model(variant).eval()
    ids = torch.randint(0, 37, (2, 25), generator=torch.Generator().manual_seed(4))
    docs, pos = packed(LENGTHS)
    _, state = model.hidden_states(ids, pos, docs, return_state=True)
    for b, lens in enumerate(LENGTHS):
        _, alone = model.hidden_states(ids[b:b + 1, 25 - lens[-1]:], return_state=True)
        for packed_layer, alone_layer in zip(state, alone):
            for x, y in zip(packed_layer.memory.tensors(), alone_layer.memory.tensors()):
                assert (x[b:b + 1] - y).abs().max() <= 1e-10 * y.abs().max()


def test_layout_slots():
    """Documents [3, 1, 4] and [8] in units of 2: every document begins at an even slot."""
    docs, _ = packed([[3, 1, 4], [8]])
    lay = DocumentLayout.build(docs, 2)
    assert lay.index.tolist() == [[0, 1, 2, 4, 6, 7, 8, 9], list(range(8))]
    assert lay.source.tolist() == [[0, 1, 2, 8, 3, 8, 4, 5, 6, 7], list(range(8)) + [8, 8]]
    assert lay.pad.tolist()[0] == [False, False, False, True, False, True, False, False, False,
                                   False]
    assert lay.resets.tolist() == [[False, False, True, True, False], [False] * 5]
    x = torch.randn(2, 8, 3)
    assert torch.equal(lay.unpack(lay.pack(x)), x)
    assert lay.pack(x)[lay.pad].abs().max() == 0


def _memory_inputs(b=2, h=2, n=12, d=4, hidden=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    w = (0.5 * r(b, h, d, hidden), 0.5 * r(b, h, hidden, d))
    state = MemoryState(w, (0.1 * r(b, h, d, hidden), 0.1 * r(b, h, hidden, d)))
    fresh_w = (0.5 * r(1, h, d, hidden).expand(b, -1, -1, -1),
               0.5 * r(1, h, hidden, d).expand(b, -1, -1, -1))
    fresh = MemoryState(fresh_w, tuple(torch.zeros_like(t) for t in fresh_w))
    q, k = (torch.nn.functional.normalize(r(b, h, n, d), dim=-1) for _ in range(2))
    v = r(b, h, n, d)
    gates = (torch.nn.functional.logsigmoid(r(b, h, n) + 1),
             torch.nn.functional.logsigmoid(r(b, h, n) - 1), 0.3 * torch.sigmoid(r(b, h, n)))
    return state, fresh, (q, k, v, *gates)


@pytest.mark.parametrize("recompute", [False, True])
def test_memory_restarts_and_padding_match_the_token_loop(recompute):
    """Chunks of 3 with restarts (row 0 before chunks 2 and 3, row 1 before chunk 1) and
    padding at chunk ends (row 1's last chunk is all padding) = the token-by-token oracle in
    which padding tokens leave the memory alone: outputs of the other tokens, final state and
    gradients of every input, the fresh state included (recompute: the chunk-by-chunk
    backward)."""
    state, fresh, seq = _memory_inputs()
    resets = torch.tensor([[False, False, True, True], [False, True, False, False]])
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[0, [2, 7, 8]] = True
    pad[1, [5, 9, 10, 11]] = True
    leaves = [t.clone().requires_grad_() for t in (*state.tensors(), *fresh.tensors(), *seq)]
    results = []
    for fn, kw in ((neural_memory, {"recompute": recompute}), (neural_memory_reference, {})):
        st, fr = MemoryState.from_tensors(leaves[:4]), MemoryState.from_tensors(leaves[4:8])
        y, final = fn(st, *leaves[8:], chunk_size=3, resets=resets, fresh=fr, pad=pad, **kw)
        out = [y.masked_fill(pad[:, None, :, None], 0.0), *final.tensors()]
        weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i),
                               dtype=t.dtype) for i, t in enumerate(out)]
        total = sum((o * w).sum() for o, w in zip(out, weights))
        results.append((out, torch.autograd.grad(total, leaves)))
    (out, grads), (ref_out, ref_grads) = results
    for a, b in zip(out + list(grads), ref_out + list(ref_grads)):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max().clamp_min(1.0)
    assert grads[4].abs().max() > 0  # the fresh weights got a gradient from the restarts
    plain, _ = neural_memory(state, *seq, chunk_size=3)
    assert (plain - out[0].detach()).abs().max() > 1e-3


def test_handover_returns_a_chunk_start_state():
    """handover (cp: a chunk straddles the next rank): row 0 returns the state at the start of
    chunk 2 (which restarts: fresh), row 1 that of chunk 1, = running the chunks before it;
    with -1 the final state. Gradients through it: recomputed backward = autograd."""
    state, fresh, seq = _memory_inputs()
    resets = torch.tensor([[False, False, True, False], [False, False, False, True]])
    kw = dict(chunk_size=3, resets=resets, fresh=fresh)
    _, final = neural_memory(state, *seq, **kw)
    _, given = neural_memory(state, *seq, **kw, handover=torch.tensor([2, 1]))
    for x, f in zip(given.tensors(), fresh.tensors()):
        assert (x[0] - f[0]).abs().max() == 0
    _, upto = neural_memory(state, *(t[:, :, :3] for t in seq), chunk_size=3,
                            resets=resets[:, :1], fresh=fresh)
    for x, u in zip(given.tensors(), upto.tensors()):
        assert (x[1] - u[1]).abs().max() <= 1e-12
    _, mixed = neural_memory(state, *seq, **kw, handover=torch.tensor([-1, 1]))
    for x, f, g in zip(mixed.tensors(), final.tensors(), given.tensors()):
        assert torch.equal(x[0], f[0]) and torch.equal(x[1], g[1])
    leaves = [t.clone().requires_grad_() for t in (*state.tensors(), *fresh.tensors(), *seq)]
    grads = []
    for recompute in (False, True):
        st, fr = MemoryState.from_tensors(leaves[:4]), MemoryState.from_tensors(leaves[4:8])
        y, out = neural_memory(st, *leaves[8:], chunk_size=3, resets=resets, fresh=fr,
                               handover=torch.tensor([2, 1]), recompute=recompute)
        total = (y * y).sum() + sum((t * t.detach()).sum() for t in out.tensors())
        grads.append(torch.autograd.grad(total, leaves))
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max().clamp_min(1.0)


def test_sliding_window_keeps_to_documents():
    """Blockwise (several query blocks) = the oracle with the document mask = each document
    alone, persistent keys visible to all; GQA."""
    g = torch.Generator().manual_seed(3)
    docs, _ = packed(LENGTHS)
    q = torch.randn(2, 25, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 25, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    pk, pv = (torch.randn(1, 2, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    kw = dict(window=4, prefix_k=pk, prefix_v=pv, segments=docs)
    out = sliding_window_attention(q, k, v, block_size=7, **kw)
    assert (out - sliding_window_attention_reference(q, k, v, **kw)).abs().max() <= 1e-12
    for b, lens in enumerate(LENGTHS):
        start = 0
        for n in lens:
            sl = slice(start, start + n)
            alone = sliding_window_attention_reference(q[b:b + 1, sl], k[b:b + 1, sl],
                                                       v[b:b + 1, sl], window=4, prefix_k=pk,
                                                       prefix_v=pv)
            assert (out[b:b + 1, sl] - alone).abs().max() <= 1e-12
            start += n
    with pytest.raises(ValueError, match="document ids of the keys"):
        sliding_window_attention(q, k, v, window=4, segments=docs[:, :5])


def test_refusals():
    model = _model("mag")
    ids = torch.randint(0, 37, (1, 8))
    docs = torch.zeros(1, 8, dtype=torch.long)
    _, state = model.hidden_states(ids, return_state=True)
    with pytest.raises(ValueError, match="cannot be combined with `state`"):
        model.hidden_states(ids, document_ids=docs, state=state)
    with pytest.raises(ValueError, match=r"shape \(batch, seq\)"):
        model(ids, document_ids=docs[:, :5])


@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("variant", ["mag", "mal"])
def test_memory_takes_the_layouts_host_flags(variant, checkpointing, monkeypatch):
    """mag / mal: the layout (units of chunk_size) read its per-unit restart / padding /
    handover flags once per forward; the memory of every layer uses them instead of reading
    its resets and padding to the host again (3 syncs per layer), and computes the same."""
    import ctxscale.models.titans_memory as tm

    model = _model(variant, checkpointing)
    ids = torch.randint(0, 37, (2, 25), generator=torch.Generator().manual_seed(5))
    docs, pos = packed(LENGTHS)
    read = []
    real = tm._Documents.of
    monkeypatch.setattr(tm._Documents, "of",
                        classmethod(lambda cls, *a, **k: (read.append(1), real(*a, **k))[1]))
    out = model(ids, position_ids=pos, document_ids=docs)
    out.square().sum().backward()
    assert not read
    monkeypatch.setattr(tm._Documents, "of", real)
    ref = model(ids, position_ids=pos, document_ids=docs)
    assert torch.equal(out, ref)


def test_host_flags_must_cover_every_chunk():
    state = MemoryState.from_tensors([torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)])
    x = torch.zeros(1, 1, 6, 2)
    g = torch.zeros(1, 1, 6)
    with pytest.raises(ValueError, match="2 restart and 2 padding flags for 3 chunks of 2"):
        neural_memory(state, x, x, x, g, g, g, chunk_size=2,
                      host_flags=([False, False], [False, False], ()))
