"""Titans model (MAC / MAG / MAL): state carry-over, causality, gradients, config checks.

Tolerances: a sequence run in pieces with the state carried over performs the same float64
operations on the same values up to association order (the KV cache concatenation and chunk
loop): <= 1e-12 relative.
"""

import pytest
import torch

from ctxscale.models import build_model
from ctxscale.models.config import ModelConfig, TitansConfig
from ctxscale.models.titans import Titans

VARIANTS = ["mac", "mag", "mal"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: intra-op threads only add synchronization cost (and contend on shared CI)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _cfg(variant, checkpointing="none", **titans):
    t = dict(variant=variant, chunk_size=3, segment_len=9, persistent_tokens=2, window=6,
             memory_depth=2, memory_hidden=10, memory_heads=5, memory_head_dim=6)
    t.update(titans)
    return ModelConfig(family="titans", vocab_size=37, dim=48, num_layers=2, num_heads=6,
                       num_kv_heads=3, head_dim=8, titans=TitansConfig(**t),
                       activation_checkpointing=checkpointing)


def _model(variant, **titans):
    torch.manual_seed(0)
    return Titans(_cfg(variant, **titans)).double()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_pieces_with_state_equal_one_pass(variant):
    """One pass over 36 tokens == pieces of 9, 18, 9 with every layer's state carried over."""
    model = _model(variant)
    ids = torch.randint(0, 37, (2, 36), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(36).expand(2, 36)
    full, final = model.hidden_states(ids, return_state=True)
    pieces, state = [], None
    for s, e in [(0, 9), (9, 27), (27, 36)]:
        h, state = model.hidden_states(ids[:, s:e], pos[:, s:e], state=state, return_state=True)
        pieces.append(h)
    assert _rel(torch.cat(pieces, 1), full) <= 1e-12
    for a, b in zip(state, final):
        for x, y in zip(a.memory.tensors(), b.memory.tensors()):
            assert _rel(x, y) <= 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
def test_continuing_from_a_piece_that_ends_inside_a_unit_is_refused(variant):
    """A piece that is not a multiple of the unit (segment_len / chunk_size) may only be the
    last: continuing from its state would update the memory mid-unit (by ~1e-2 in the logits)
    and is refused, naming the unit."""
    model = _model(variant)
    unit = model.cfg.titans.segment_len if variant == "mac" else model.cfg.titans.chunk_size
    ids = torch.randint(0, 37, (2, unit + 4), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(unit + 4).expand(2, -1)
    _, state = model.hidden_states(ids[:, : unit - 1], pos[:, : unit - 1], return_state=True)
    assert state[0].partial == unit - 1
    name = "segment_len" if variant == "mac" else "chunk_size"
    with pytest.raises(ValueError, match=rf"ended {unit - 1} tokens into a unit of "
                                         rf"model.titans.{name}={unit}.*whole units"):
        model.hidden_states(ids[:, unit - 1 :], pos[:, unit - 1 :], state=state)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
    """Changing tokens from position 20 on leaves the outputs before 20 unchanged (MAC's memory
    tokens h_j are only visible to queries i >= j, so no future token leaks in)."""
    model = _model(variant)
    ids = torch.randint(0, 37, (1, 36), generator=torch.Generator().manual_seed(2))
    other = ids.clone()
    other[:, 20:] = (other[:, 20:] + 5) % 37
    a, b = model(ids), model(other)
    assert _rel(a[:, :20], b[:, :20]) <= 1e-12
    assert _rel(a[:, 20:], b[:, 20:]) > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_and_every_parameter_gets_a_gradient(variant):
    model = _model(variant)
    ids = torch.randint(0, 37, (2, 30), generator=torch.Generator().manual_seed(3))
    loss = model(ids, labels=ids)
    assert abs(loss.item() - torch.log(torch.tensor(37.0)).item()) < 0.5  # near uniform at init
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing
    logits = model(ids)
    assert logits.shape == (2, 30, 37)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    assert abs(ce.item() - loss.item()) <= 1e-6  # the chunked loss accumulates in float32


def _saved_bytes_and_grads(model, ids):
    """Bytes that autograd saves outside checkpointed regions during the forward, the loss,
    and every parameter's gradient."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids)
    loss.backward()
    return sum(saved), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_gradients_fewer_saved(variant, mode):
    """With activation checkpointing the loss and every gradient are the same float64 numbers
    (the regions recompute the same operations), and autograd keeps under a quarter of the
    activations it keeps without (the regions' insides are recomputed, not saved)."""
    ids = torch.randint(0, 37, (2, 36), generator=torch.Generator().manual_seed(4))
    plain = _model(variant)
    ck = Titans(_cfg(variant, mode)).double()
    ck.load_state_dict(plain.state_dict())
    base_bytes, base_loss, base_grads = _saved_bytes_and_grads(plain, ids)
    ck_bytes, ck_loss, ck_grads = _saved_bytes_and_grads(ck, ids)
    assert _rel(ck_loss, base_loss) <= 1e-12
    for name, g in base_grads.items():
        assert _rel(ck_grads[name], g) <= 1e-12, name
    assert ck_bytes < 0.25 * base_bytes, (ck_bytes, base_bytes)


def test_build_model_and_flops():
    cfg = _cfg("mag")
    model = build_model(cfg)
    assert isinstance(model, Titans)
    assert model.num_params() > model.num_params(exclude_embeddings=True)
    assert model.flops_per_token(64) > 6 * model.num_params(exclude_embeddings=True)


def test_config_errors():
    with pytest.raises(ValueError, match="chunk_size"):
        _cfg("mac", chunk_size=4, segment_len=9).validate()
    with pytest.raises(ValueError, match="window"):
        _cfg("mag", window=0).validate()
