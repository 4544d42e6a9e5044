"""Hedgehog after RoPE and LoLCATs sliding-window + linear attention (models/window_attention.py).

Oracle: the layer written with full seq × seq masks in float64: q, k rotated (then the feature
map), window weights e_ts = exp(q·k/√d − m_t) for t − w < s ≤ t, linear weights
λ φ(q_t)·φ(k_s) exp(G_t − G_s) for s ≤ t − w, one shared denominator (+eps only without the window terms). Everything float64, so the
blocked / delayed-key algorithm agrees to ~1e-12; we allow 1e-10. float32 against float64:
1e-5 relative to the output scale (float32 rounding of exact sums over ~40 tokens).
Context parallel (cp = 2, 4): float32 sharded model vs float64 single process, 1e-5 relative.
"""

import pytest
import torch
import torch.distributed as dist

from ctxscale.dist.context import ParallelContext
from ctxscale.kernels.rotary import apply_rotary
from ctxscale.models import build_model
from ctxscale.models.linear_attention import LinearAttention, feature_map
from ctxscale.models.transformer import Attention, Transformer
from tests.harness import run_distributed
from tests.models._recurrent_util import perturb, small_config
from tests.models.test_linear_attention_layers import _conv

TOL64 = 1e-10


def _rope(s, head_dim=6, offset=0):
    model = Transformer(small_config("transformer", num_layers=1))
    pos = torch.arange(offset, offset + s).expand(2, s)
    return model.rope(pos)


def _layer(kind, dtype=torch.float64, **la):
    cfg = small_config("linear", kind=kind)
    for key, value in la.items():
        setattr(cfg.linear_attention, key, value)
    torch.manual_seed(0)
    layer = LinearAttention(cfg).to(dtype)
    perturb(layer)
    return layer


def dense_reference(layer, x, cos, sin, mode="both"):
    """The layer with full masks, float64 (see the module docstring)."""
    b, s, _ = x.shape
    h, hd, w = layer.num_heads, layer.head_dim, layer.window
    q, k, v = layer.wq(x), layer.wk(x), layer.wv(x)
    q_w = apply_rotary(q.view(b, s, -1, hd), cos, sin)
    k_w = apply_rotary(k.view(b, s, -1, hd), cos, sin)
    if layer.kind == "lawcat":
        q, k = _conv(q, layer.q_conv), _conv(k, layer.k_conv)
    q, k, v = q.view(b, s, -1, hd), k.view(b, s, -1, hd), v.view(b, s, -1, hd)
    if layer.rope:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if layer.kind == "hedgehog":
        def hh(t, m):
            p = torch.einsum("bshd,hdf->bshf", t, m.weight) + m.bias
            return torch.cat([p.softmax(-1), (-p).softmax(-1)], -1)
        q, k = hh(q, layer.feature_map_q), hh(k, layer.feature_map_k)
    else:
        q, k = feature_map(q, layer.feature), feature_map(k, layer.feature)
    rep = h // k.shape[2]
    k, v, k_w = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), k_w.repeat_interleave(rep, 2)
    if layer.kind == "lawcat" and layer.la.gate:
        logg = torch.nn.functional.logsigmoid(layer.wg(x)) / layer.la.gate_normalizer
    else:
        logg = torch.zeros(b, s, h, dtype=x.dtype)
    G = logg.cumsum(1).transpose(1, 2)
    t_idx, s_idx = torch.arange(s).view(-1, 1), torch.arange(s).view(1, -1)
    causal = s_idx <= t_idx
    in_win = causal & (s_idx > t_idx - w) if w else torch.zeros_like(causal)
    older = causal & ~in_win
    decay = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~causal, -torch.inf))
    a = torch.einsum("bthf,bshf->bhts", q, k) * decay * older
    if w:
        a = a * torch.exp(layer.linear_mix).view(1, h, 1, 1)
        scores = torch.einsum("bthd,bshd->bhts", q_w, k_w) * hd ** -0.5
        scores = scores.masked_fill(~in_win, -torch.inf)
        e = torch.exp(scores - scores.amax(-1, keepdim=True)) * in_win
    else:
        e = torch.zeros_like(a)
    wts = {"both": e + a, "linear_only": a, "window_only": e, "none": 0 * a}[mode]
    eps = layer.la.eps if (mode == "linear_only" or not w) else 0.0
    den = wts.sum(-1).transpose(1, 2)[..., None] + eps
    o = torch.einsum("bhts,bshd->bthd", wts, v) / (den if mode != "none" else 1.0)
    return layer.wo(o.flatten(2))


@pytest.mark.parametrize("kind", ["hedgehog", "lawcat"])
def test_rope_before_feature_map_matches_reference(kind):
    layer = _layer(kind, rope=True)
    x = torch.randn(2, 37, 30, dtype=torch.float64)
    cos, sin = _rope(37)
    torch.testing.assert_close(layer(x, cos, sin), dense_reference(layer, x, cos, sin),
                               rtol=TOL64, atol=TOL64)
    with pytest.raises(ValueError, match="cos/sin"):
        layer(x)


@pytest.mark.parametrize("kind,window,rope", [("hedgehog", 1, True), ("hedgehog", 13, True),
                                              ("lawcat", 5, False), ("lawcat", 9, True)])
def test_window_matches_dense_reference_forward_and_backward(kind, window, rope):
    ref = _layer(kind, window=window, rope=rope)
    layer = _layer(kind, window=window, rope=rope)
    layer.window_block = 8  # several query blocks, the last one partial
    x = torch.randn(2, 37, 30, dtype=torch.float64)
    cos, sin = _rope(37)
    y, y_ref = layer(x, cos, sin), dense_reference(ref, x, cos, sin)
    torch.testing.assert_close(y, y_ref, rtol=TOL64, atol=TOL64)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    for (name, p), (_, pr) in zip(layer.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-9, atol=1e-9,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert ref.linear_mix.grad.abs().max() > 0  # λ trains


@pytest.mark.parametrize("mode", ["linear_only", "window_only", "none"])
def test_ablation_modes_drop_their_terms(mode):
    layer = _layer("lawcat", window=6, rope=True)
    x = torch.randn(2, 23, 30, dtype=torch.float64)
    cos, sin = _rope(23)
    layer.hybrid_mode = mode
    y = layer(x, cos, sin)
    torch.testing.assert_close(y, dense_reference(layer, x, cos, sin, mode), rtol=TOL64, atol=TOL64)
    if mode == "none":
        assert torch.count_nonzero(y) == 0
    with pytest.raises(ValueError, match="hybrid_mode"):
        layer.hybrid_mode = "softmax_only"


def test_float32_matches_float64_reference():
    ref = _layer("hedgehog", window=7, rope=True)
    layer = _layer("hedgehog", window=7, rope=True).float()
    x = torch.randn(2, 45, 30, dtype=torch.float64)
    cos, sin = _rope(45)
    y64, y32 = dense_reference(ref, x, cos, sin), layer(x.float(), cos, sin)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5 * y64.abs().max().item())


@pytest.mark.parametrize("kind,la", [("hedgehog", {"rope": True}),
                                     ("hedgehog", {"rope": True, "window": 5}),
                                     ("lawcat", {"rope": True, "window": 7})])
def test_one_pass_equals_pieces_equals_token_by_token(kind, la):
    layer = _layer(kind, **la)
    x = torch.randn(2, 41, 30, dtype=torch.float64)
    cos, sin = _rope(41)
    full = layer(x, cos, sin)
    outs, state = [], None
    for lo, hi in [(0, 1), (1, 3), (3, 18), (18, 19), (19, 41)]:  # pieces shorter than the window
        y, state = layer.step(x[:, lo:hi], state, cos[:, lo:hi], sin[:, lo:hi])
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=TOL64, atol=TOL64)
    outs, state = [], None
    for t in range(41):
        y, state = layer.step(x[:, t : t + 1], state, cos[:, t : t + 1], sin[:, t : t + 1])
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=TOL64, atol=TOL64)


@pytest.mark.parametrize("kind", ["hedgehog", "lawcat"])
def test_window_covering_the_sequence_is_the_teachers_attention(kind):
    """window ≥ seq: nothing is older than the window, so the layer is softmax attention; with
    the teacher's q/k/v/o (and the identity conv of a fresh lawcat) it is the teacher's output."""
    cfg = small_config("linear", kind=kind)
    cfg.linear_attention.window = 40
    torch.manual_seed(0)
    teacher = Attention(cfg, ParallelContext()).double()
    layer = LinearAttention(cfg).double()
    layer.load_state_dict(teacher.state_dict(), strict=False)
    x = torch.randn(2, 33, 30, dtype=torch.float64)
    cos, sin = _rope(33)
    torch.testing.assert_close(layer(x, cos, sin), teacher(x, cos, sin), rtol=TOL64, atol=TOL64)


def test_model_forward_step_matches_forward():
    cfg = small_config("hybrid", kind="hedgehog", pattern="LA", num_layers=2)
    cfg.linear_attention.window, cfg.linear_attention.rope = 4, True
    torch.manual_seed(0)
    model = build_model(cfg).double()
    perturb(model)
    ids = torch.randint(0, 37, (2, 19))
    full = model(ids)
    a, state = model.forward_step(ids[:, :7])
    b, _ = model.forward_step(ids[:, 7:], state)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=TOL64, atol=TOL64)


def test_window_needs_denominator_normalization():
    with pytest.raises(ValueError, match="normalize=denominator"):
        _layer("decay", window=4)


# ------------------------------------------------------------------ context parallel
SEQ = 44
# (kind, la, document lengths or None); the documents' starts (3, 13, 14, 31) and a window
# of 7 cross the shard boundaries at cp 2 and 4 (shards of 22 and 11 tokens)
DOCS = [3, 10, 1, 17, 13]
CP_CASES = [("hedgehog", {"rope": True}, None), ("hedgehog", {"rope": True, "window": 7}, None),
            ("lawcat", {"rope": True, "window": 11}, None),
            ("hedgehog", {"rope": True, "window": 7}, DOCS),
            ("lawcat", {"rope": True, "window": 7}, DOCS)]


def _cfg(kind, la):
    cfg = small_config("linear", kind=kind, num_layers=2)
    for key, value in la.items():
        setattr(cfg.linear_attention, key, value)
    return cfg


def _close(actual, expected, what):
    scale = max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5 * scale,
                               msg=lambda m: f"{what}: {m}")


def _cp_oracle(rank, world_size, cases):
    for kind, la, lengths in cases:
        torch.manual_seed(0)
        ref = build_model(_cfg(kind, la)).double()
        perturb(ref)
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(0, 37, (2, SEQ), generator=g)
        labels = torch.randint(0, 37, (2, SEQ), generator=g)
        kw = {}
        if lengths is not None:  # packed documents: the same global ids on every rank
            docs = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            kw = {"document_ids": torch.stack([docs, docs.flip(0)])}
        ref_logits = ref(ids, **kw)
        ref(ids, labels=labels, loss_reduction="sum", **kw).backward()
        ctx = ParallelContext(cp_group=dist.group.WORLD, cp_size=world_size, cp_rank=rank,
                              cp_layout="contiguous")
        model = build_model(_cfg(kind, la), ctx)
        model.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        n = SEQ // world_size
        sl = slice(rank * n, (rank + 1) * n)
        what = f"{kind} {la} documents {lengths} cp={world_size} rank {rank}"
        _close(model(ids[:, sl], **kw), ref_logits[:, sl], f"{what} logits")
        model(ids[:, sl], labels=labels[:, sl], loss_reduction="sum", **kw).backward()
        for (name, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad)
            _close(grad, pr.grad, f"{what} grad {name}")
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_single_process(world):
    assert all(run_distributed(_cp_oracle, world, args=(CP_CASES,), timeout=600))
