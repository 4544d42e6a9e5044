"""Linear-attention layers (plain, decay, Hedgehog, LAWCAT): quadratic oracle, recurrent
invariant (one pass = pieces with the state carried = token by token), feature maps, errors.

Oracle: the layer written as masked quadratic attention in float64, o_t = Σ_{s≤t} w_ts v_s with
w_ts = φ(q_t)·φ(k_s) · exp(G_t − G_s) (G the cumulative log decay), divided by Σ_s w_ts for the
denominator kinds or scaled and RMS-normalized for `decay`. Everything runs in float64, so an
exact algorithm agrees to ~1e-12; we allow 1e-10.
"""

import pytest
import torch
import torch.nn.functional as F

from ctxscale.models.config import LinearAttentionConfig
from ctxscale.models.linear_attention import HedgehogFeatureMap, LinearAttention, feature_map
from ctxscale.models.transformer import Attention
from tests.models._recurrent_util import KINDS, perturb, small_config

TOL64 = 1e-10


def _conv(t, w):
    """Causal depthwise conv over tokens, t `(b, s, c)`, w `(c, W)`; zeros before t = 0."""
    width = w.shape[1]
    pad = F.pad(t, (0, 0, width - 1, 0))
    return sum(pad[:, j : j + t.shape[1]] * w[:, j] for j in range(width))


def quadratic_oracle(layer: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    b, s, _ = x.shape
    h, hd = layer.num_heads, layer.head_dim
    q, k, v = layer.wq(x), layer.wk(x), layer.wv(x)
    if layer.kind == "lawcat":
        q, k = _conv(q, layer.q_conv), _conv(k, layer.k_conv)
    q, k, v = q.view(b, s, -1, hd), k.view(b, s, -1, hd), v.view(b, s, -1, hd)
    if layer.kind == "hedgehog" or layer.la.feature_map == "hedgehog":
        def hh(t, m):
            p = torch.einsum("bshd,hdf->bshf", t, m.weight) + m.bias
            return torch.cat([p.softmax(-1), (-p).softmax(-1)], -1)
        q, k = hh(q, layer.feature_map_q), hh(k, layer.feature_map_k)
    else:
        q, k = feature_map(q, layer.feature), feature_map(k, layer.feature)
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    free = layer.ungated_heads
    if layer.la.write_gate:  # β_t scales what token t writes, in the heads without decay only
        n = free if layer.kind in ("decay", "lawcat") else h
        if n:
            k = torch.cat([k[:, :, :n] * torch.sigmoid(layer.wb(x))[..., None], k[:, :, n:]], 2)  # the first `free` heads do not decay
    logg = torch.zeros(b, s, h, dtype=x.dtype)
    if layer.kind == "decay" or (layer.kind == "lawcat" and not layer.la.gate):
        slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], dtype=x.dtype)
        logg[..., free:] = -slopes[free:]
    elif layer.kind == "lawcat" and free < h:
        logg[..., free:] = F.logsigmoid(layer.wg(x)) / layer.la.gate_normalizer
        if layer.la.gate_max_half_life:
            logg[..., free:] += torch.log(torch.tensor(0.5, dtype=x.dtype)) / layer.la.gate_max_half_life
    G = logg.cumsum(1).transpose(1, 2)  # b h s
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    decay = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~mask, -torch.inf))
    w = torch.einsum("bthf,bshf->bhts", q, k) * decay
    if layer.normalize == "denominator":
        o = torch.einsum("bhts,bshd->bthd", w, v) / (w.sum(-1).transpose(1, 2)[..., None] + layer.la.eps)
    else:
        o = q.shape[-1] ** -0.5 * torch.einsum("bhts,bshd->bthd", w, v)
        if layer.normalize == "rms":
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.cfg.norm_eps)
            o = o * layer.out_norm.view(h, hd)
    return layer.wo(o.flatten(2))


def _layer(kind, **la):
    cfg = small_config("linear", kind=kind)
    for k, v in la.items():
        setattr(cfg.linear_attention, k, v)
    torch.manual_seed(0)
    layer = LinearAttention(cfg).double()
    perturb(layer)
    return layer


CASES = [("plain", {}), ("plain", {"feature_map": "relu", "normalize": "none"}),
         ("decay", {}), ("decay", {"feature_map": "elu1", "normalize": "denominator"}),
         ("hedgehog", {}), ("lawcat", {}), ("lawcat", {"gate": False, "feature_map": "softmax"}),
         ("lawcat", {"ungated_heads": 2}), ("lawcat", {"ungated_heads": 5}),
         ("lawcat", {"gate": False, "ungated_heads": 3}), ("decay", {"ungated_heads": 1}),
         ("plain", {"write_gate": True}), ("decay", {"write_gate": True}),
         ("lawcat", {"write_gate": True, "ungated_heads": 2}),
         ("lawcat", {"feature_map": "hedgehog"}),
         ("lawcat", {"feature_map": "hedgehog", "write_gate": True, "ungated_heads": 1}),
         ("lawcat", {"gate_max_half_life": 3.5, "ungated_heads": 1, "feature_map": "softmax"}),
         ("lawcat", {"feature_map": "softmax", "write_gate": True, "ungated_heads": 2})]


@pytest.mark.parametrize("kind,opts", CASES)
def test_layer_matches_quadratic_oracle(kind, opts):
    layer = _layer(kind, **opts)
    x = torch.randn(2, 37, 30, dtype=torch.float64)
    torch.testing.assert_close(layer(x), quadratic_oracle(layer, x), rtol=TOL64, atol=TOL64)


# every kind with its defaults, and the write gate on a learned-feature LAWCAT layer
RECURRENT = [(k, {}) for k in KINDS] + [
    ("lawcat", {"write_gate": True, "feature_map": "hedgehog", "ungated_heads": 2}),
    ("lawcat", {"write_gate": True, "feature_map": "softmax", "gate_max_half_life": 5.0,
                "ungated_heads": 1})]


@pytest.mark.parametrize("kind,opts", RECURRENT)
def test_one_pass_equals_pieces_equals_token_by_token(kind, opts):
    layer = _layer(kind, **opts)
    x = torch.randn(2, 41, 30, dtype=torch.float64)
    full = layer(x)
    outs, state = [], None
    for lo, hi in [(0, 1), (1, 18), (18, 19), (19, 41)]:  # pieces shorter than the conv too
        y, state = layer.step(x[:, lo:hi], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=TOL64, atol=TOL64)
    outs, state = [], None
    for t in range(41):
        y, state = layer.step(x[:, t : t + 1], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=TOL64, atol=TOL64)


@pytest.mark.parametrize("kind,opts", RECURRENT)
def test_float32_gradients_match_float64(kind, opts):
    """float32 layer (chunked kernel) vs the float64 oracle: outputs and every parameter's
    gradient agree to 1e-5 relative to their scale (float32 rounding over ~40-token sums)."""
    layer64 = _layer(kind, **opts)
    layer32 = _layer(kind, **opts).float()
    x = torch.randn(2, 45, 30, dtype=torch.float64)
    y64 = quadratic_oracle(layer64, x)
    y32 = layer32(x.float())
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5 * y64.abs().max().item())
    w = torch.randn_like(y64)
    (y64 * w).sum().backward()
    (y32 * w.float()).sum().backward()
    for (name, p64), (_, p32) in zip(layer64.named_parameters(), layer32.named_parameters()):
        scale = max(p64.grad.abs().max().item(), 1e-3)
        torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_hedgehog_feature_map_is_softmax_pair_and_identity_at_init():
    fm = HedgehogFeatureMap(heads=5, head_dim=6, feature_dim=6)
    x = torch.randn(2, 3, 5, 6)
    out = fm(x)
    assert out.shape == (2, 3, 5, 12)
    torch.testing.assert_close(out[..., :6], x.softmax(-1))
    torch.testing.assert_close(out[..., 6:], (-x).softmax(-1))


def test_lawcat_starts_as_gated_linear_attention_without_conv():
    """Identity-initialized convs: LAWCAT at init = the same layer with the conv taps unused."""
    cfg = small_config("linear", kind="lawcat")
    torch.manual_seed(0)
    layer = LinearAttention(cfg).double()
    x = torch.randn(1, 11, 30, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        layer.q_conv.zero_()
        layer.q_conv[:, -1] = 1
        layer.k_conv.zero_()
        layer.k_conv[:, -1] = 1
    torch.testing.assert_close(layer(x), before)
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert (layer(x2)[:, -1] - before[:, -1]).abs().max() > 0  # still mixes over tokens


def test_transformer_attention_weights_load_into_linear_layers():
    cfg = small_config("linear", kind="hedgehog")
    attn = Attention(cfg, None)
    layer = LinearAttention(cfg)
    missing, unexpected = layer.load_state_dict(attn.state_dict(), strict=False)
    assert not unexpected
    assert all(m.startswith("feature_map_") for m in missing)
    assert torch.equal(layer.wq.weight, attn.wq.weight)


def test_denominator_needs_a_positive_feature_map():
    cfg = small_config("linear", kind="plain")
    cfg.linear_attention.feature_map = "identity"
    with pytest.raises(ValueError, match="positive feature map"):
        LinearAttention(cfg)


def test_gate_max_half_life_caps_every_gated_head():
    """With the gate wide open (σ → 1) a capped head keeps half of its memory after exactly
    max_half_life tokens; a shut gate still forgets at once; ungated heads stay at γ = 1."""
    layer = _layer("lawcat", ungated_heads=1, gate_max_half_life=12.0)
    x = torch.randn(2, 9, 30, dtype=torch.float64)
    with torch.no_grad():
        layer.wg.weight.zero_()
        layer.wg.bias.fill_(50.0)
        logg = layer._log_decay(x)
    torch.testing.assert_close(torch.exp(12.0 * logg[..., 1:]), torch.full((2, 9, 4), 0.5,
                               dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(logg[..., 0], torch.zeros(2, 9, dtype=torch.float64))
    with torch.no_grad():
        layer.wg.bias.fill_(-50.0)
        assert (layer._log_decay(x)[..., 1:] < -3.0).all()
    cfg = small_config("linear", kind="lawcat")
    cfg.linear_attention.gate_max_half_life = -1.0
    with pytest.raises(ValueError, match="gate_max_half_life must be >= 0"):
        cfg.validate()


def test_ungated_heads_keep_gamma_one_and_gate_only_the_others():
    """ungated_heads=2 of 5: the gate projection has 3 outputs, heads 0-1 have log γ = 0 at every
    token, heads 2-4 the gate; all 5 ungated: no gate and no decay at all."""
    layer = _layer("lawcat", ungated_heads=2)
    assert layer.wg.out_features == 3
    x = torch.randn(2, 9, 30, dtype=torch.float64)
    logg = layer._log_decay(x)
    assert logg.shape == (2, 9, 5)
    assert torch.equal(logg[..., :2], torch.zeros(2, 9, 2, dtype=torch.float64))
    torch.testing.assert_close(logg[..., 2:], F.logsigmoid(layer.wg(x)) / layer.la.gate_normalizer)
    assert (logg[..., 2:] < 0).all()
    full = _layer("lawcat", ungated_heads=5)
    assert not hasattr(full, "wg") and full._log_decay(x) is None


def test_write_gate_starts_open_and_a_closed_gate_leaves_tokens_out():
    """β starts at σ(4) ≈ 0.98. A token whose gate is shut (β = 0) is left out of every other
    token's memory: changing its input changes no other position's output (plain kind: no conv,
    so token j's input reaches the others only through what it writes)."""
    assert torch.equal(LinearAttention(_fresh_gated(5)).wb.bias, torch.full((5,), 4.0))
    layer = _layer("plain", write_gate=True)
    with torch.no_grad():
        layer.wb.weight.zero_()
        layer.wb.weight[:, 0] = -1000.0  # x[..., 0] = 1 shuts the gate: σ(-940) = 0 in float64
        layer.wb.bias.fill_(60.0)  # x[..., 0] = 0: σ(60) = 1
        x = torch.randn(2, 15, 30, dtype=torch.float64)
        x[..., 0] = 0.0
        closed = [3, 4, 9]
        x[:, closed, 0] = 1.0
        y = layer(x)
        x2 = x.clone()
        x2[:, closed, 1:] += torch.randn(2, 3, 29, dtype=torch.float64)
        y2 = layer(x2)
    others = [t for t in range(15) if t not in closed]
    torch.testing.assert_close(y2[:, others], y[:, others], rtol=TOL64, atol=TOL64)
    assert not torch.allclose(y2[:, closed], y[:, closed])  # they still read the memory


def _fresh_gated(ungated_heads=2):
    cfg = small_config("linear", kind="lawcat")
    cfg.linear_attention.write_gate = True
    cfg.linear_attention.ungated_heads = ungated_heads
    return cfg


def test_write_gate_covers_only_the_heads_without_decay():
    """lawcat with 2 of 5 heads ungated: β for those 2 only, the 3 decaying heads write every
    token; no ungated head: no write gate at all; plain (no decay anywhere): all 5 heads."""
    assert LinearAttention(_fresh_gated(2)).wb.out_features == 2
    assert not hasattr(LinearAttention(_fresh_gated(0)), "wb")
    assert LinearAttention(small_config("linear", kind="plain", linear_attention=LinearAttentionConfig(
        kind="plain", write_gate=True))).wb.out_features == 5
    layer = _layer("lawcat", write_gate=True, ungated_heads=2)
    x = torch.randn(2, 7, 30, dtype=torch.float64)
    k = torch.rand(2, 7, 5, 4, dtype=torch.float64)
    gated = layer.gate_writes(x, k)
    assert torch.equal(gated[:, :, 2:], k[:, :, 2:])
    torch.testing.assert_close(gated[:, :, :2], k[:, :, :2] * torch.sigmoid(layer.wb(x))[..., None])


def test_ungated_heads_per_layer_pick_each_layers_entry():
    """ungated_heads=[0, 2, 0] on pattern LLA: layer 0 gates all 5 heads, layer 1 only 3 (its
    first 2 keep log γ = 0); the softmax layer 2 has no linear attention. The oracle above reads
    each layer's own count, so the layer still matches it."""
    from ctxscale.models.hybrid import HybridLM

    cfg = small_config("hybrid", kind="lawcat", pattern="LLA")
    cfg.linear_attention.ungated_heads = [0, 2, 0]
    cfg.validate()
    model = HybridLM(cfg).double()
    perturb(model)
    first, second = model.layers["0"].attention, model.layers["1"].attention
    assert (first.ungated_heads, first.wg.out_features) == (0, 5)
    assert (second.ungated_heads, second.wg.out_features) == (2, 3)
    x = torch.randn(2, 9, 30, dtype=torch.float64)
    assert (first._log_decay(x) < 0).all()
    assert torch.equal(second._log_decay(x)[..., :2], torch.zeros(2, 9, 2, dtype=torch.float64))
    with torch.no_grad():
        for layer in (first, second):
            torch.testing.assert_close(layer(x), quadratic_oracle(layer, x), rtol=TOL64, atol=TOL64)


@pytest.mark.parametrize("n,match", [([1, 1], "has 2 entries but model.num_layers=3"),
                                     ([0, 6, 0], r"ungated_heads\[1\]=6 is more than"),
                                     ([0, 1, 1], r"layer 2 is 'A'.*set that entry to 0"),
                                     ([0, -1, 0], "must be >= 0")])
def test_ungated_heads_per_layer_errors_name_the_fix(n, match):
    cfg = small_config("hybrid", kind="lawcat", pattern="LLA")
    cfg.linear_attention.ungated_heads = n
    with pytest.raises(ValueError, match=match):
        cfg.validate()


@pytest.mark.parametrize("kind,n,match", [("lawcat", -1, "must be >= 0"),
                                          ("lawcat", 6, "at most 5"),
                                          ("hedgehog", 1, "has no decay"),
                                          ("hedgehog", [0, 1, 0], "has no decay")])
def test_ungated_heads_errors_name_the_fix(kind, n, match):
    cfg = small_config("linear", kind=kind)
    cfg.linear_attention.ungated_heads = n
    with pytest.raises(ValueError, match=match):
        cfg.validate()
