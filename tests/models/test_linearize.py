"""Linearization pieces: student built from a teacher, the tiled Hedgehog CE against a full-matrix
oracle, the student's attention weights against the layer itself, and LoRA.

Everything runs in float64 where exactness is checked, so an exact algorithm agrees to ~1e-12;
we allow 1e-9 (sums over at most a few hundred terms).
"""

import pytest
import torch

from ctxscale.models.config import ModelConfig
from ctxscale.models.linearize import (
    attention_transfer_ce,
    attention_transfer_loss,
    linear_layers,
    linearize,
    new_parameter_names,
    student_features,
    teacher_layer_inputs,
    teacher_qk,
)
from ctxscale.models.lora import apply_lora, lora_parameter_names, merge_lora
from ctxscale.models.transformer import Transformer

TOL64 = 1e-9


def _teacher(dtype=torch.float64, heads=5, kv_heads=1, head_dim=6, layers=2):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=37, dim=heads * head_dim, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=head_dim, init_std=0.3)
    return Transformer(cfg).to(dtype)


def _perturb(model, scale=0.3):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in new_parameter_names(model):
            p = model.get_parameter(n)
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("kind", ["hedgehog", "lawcat"])
def test_student_keeps_teacher_weights(kind):
    teacher = _teacher()
    student = linearize(teacher, kind=kind, layer_pattern="LA").to(torch.float64)
    assert student.codes == "LA" and linear_layers(student) == ["0"]
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for name, t in t_sd.items():
        assert torch.equal(t, s_sd[name]), name
    new = set(new_parameter_names(student))
    assert new and set(s_sd) - set(t_sd) == new
    ids = torch.randint(0, 37, (2, 11))
    # the softmax layer is identical: feeding the same hidden state gives the same output
    cos, sin, inputs = teacher_layer_inputs(teacher, ids)
    h = teacher.tok_embeddings(ids)
    h1 = teacher.layers["0"](h, cos, sin)
    torch.testing.assert_close(student.layers["1"](h1, cos, sin), teacher.layers["1"](h1, cos, sin),
                               rtol=0, atol=0)


STUDENTS = [("hedgehog", {}), ("lawcat", {}),
            ("lawcat", {"ungated_heads": [2, 0], "write_gate": True, "feature_map": "hedgehog"})]


@pytest.mark.parametrize("kind,options", STUDENTS, ids=["hedgehog", "lawcat", "lawcat-gated-writes"])
def test_student_weights_reproduce_the_layer(kind, options):
    """a_ts from `student_features` applied to v (then Wo) equals the layer's own forward (with a
    write gate, the gate is part of φ(k), so the transfer CE sees the same weights)."""
    teacher = _teacher()
    student = linearize(teacher, kind=kind, **options).to(torch.float64)
    _perturb(student)
    layer = student.layers["0"].attention
    x = torch.randn(2, 13, teacher.cfg.dim, dtype=torch.float64)
    phi_q, phi_k, cum = student_features(layer, x)
    s = x.shape[1]
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    w = torch.einsum("bthf,bshf->bhts", phi_q, phi_k)
    if cum is not None:
        g = cum.transpose(1, 2)
        w = w * torch.exp((g[..., :, None] - g[..., None, :]).masked_fill(~mask, -torch.inf))
    w = w.masked_fill(~mask, 0)
    v = layer.wv(x).view(2, s, -1, layer.head_dim).repeat_interleave(5, 2)
    o = torch.einsum("bhts,bshd->bthd", w, v) / (w.sum(-1).transpose(1, 2)[..., None] + layer.la.eps)
    torch.testing.assert_close(layer.wo(o.flatten(2)), layer(x), rtol=TOL64, atol=TOL64)


def _ce_oracle(q, k, phi_q, phi_k, cum, eps=1e-12):
    b, s, h, d = q.shape
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    p = torch.softmax((torch.einsum("bthd,bshd->bhts", q, k) * d ** -0.5).masked_fill(~mask, -torch.inf), -1)
    w = torch.einsum("bthf,bshf->bhts", phi_q, phi_k)
    if cum is not None:
        g = cum.transpose(1, 2)
        w = w * torch.exp((g[..., :, None] - g[..., None, :]).masked_fill(~mask, -torch.inf))
    w = w.masked_fill(~mask, 0)
    a = w / (w.sum(-1, keepdim=True) + eps)
    return -(p * torch.log(a + eps)).sum() / (b * h * s)


@pytest.mark.parametrize("kind", ["hedgehog", "lawcat"])
@pytest.mark.parametrize("tile", [1, 4, 64])
def test_tiled_ce_equals_full_matrix(kind, tile):
    teacher = _teacher()
    student = linearize(teacher, kind=kind).to(torch.float64)
    _perturb(student)
    ids = torch.randint(0, 37, (2, 13))
    cos, sin, inputs = teacher_layer_inputs(teacher, ids)
    x = inputs["1"]
    q, k = teacher_qk(teacher.layers["1"].attention, x, cos, sin)
    phi_q, phi_k, cum = student_features(student.layers["1"].attention, x)
    got = attention_transfer_ce(q, k, phi_q, phi_k, cum, tile=tile)
    want = _ce_oracle(q.double(), k.double(), phi_q, phi_k, cum.double() if cum is not None else None)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)  # float32 accumulation


def test_ce_exceeds_entropy_for_a_uniform_student():
    """Gibbs: CE(p, a) >= H(p), with equality only at a = p; a constant feature map gives the
    uniform causal weights a_ts = 1/(t+1), whose CE is exactly mean_t log(t+1)."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 9, 2, 4, dtype=torch.float64), torch.randn(1, 9, 2, 4, dtype=torch.float64)
    phi = torch.ones(1, 9, 2, 3, dtype=torch.float64)
    ce_uniform = attention_transfer_ce(q, k, phi, phi, None, tile=4)
    want = torch.log(torch.arange(1, 10, dtype=torch.float64)).mean()
    torch.testing.assert_close(ce_uniform.double(), want, rtol=1e-6, atol=1e-6)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    p = torch.softmax((torch.einsum("bthd,bshd->bhts", q, k) * 0.5).masked_fill(~mask, -torch.inf), -1)
    entropy = -(p * torch.log(p + 1e-12)).sum() / (2 * 9)
    assert ce_uniform > entropy


def test_transfer_loss_trains_only_new_parameters():
    teacher = _teacher(torch.float32)
    student = linearize(teacher, kind="hedgehog")
    ids = torch.randint(0, 37, (2, 11))
    cos, sin, inputs = teacher_layer_inputs(teacher, ids)
    out = attention_transfer_loss(teacher.layers["0"], student.layers["0"], inputs["0"], cos, sin,
                                  loss="both", tile=4)
    assert set(out) == {"ce", "mse", "loss"}
    torch.testing.assert_close(out["loss"], out["ce"] + out["mse"])
    for p in student.parameters():
        p.requires_grad_(False)
    for n in new_parameter_names(student):
        student.get_parameter(n).requires_grad_(True)
    out["loss"].backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None}
    assert grads and grads <= set(new_parameter_names(student))
    assert all(n.startswith("layers.0.") for n in grads)
    with pytest.raises(ValueError, match="transfer loss"):
        attention_transfer_loss(teacher.layers["0"], student.layers["0"], inputs["0"], cos, sin,
                                loss="kl")


def test_lora_starts_equal_merges_exactly():
    teacher = _teacher()
    student = linearize(teacher, kind="lawcat").to(torch.float64)
    ids = torch.randint(0, 37, (2, 9))
    ref = student(ids)
    wrapped = apply_lora(student, rank=3, alpha=6.0, targets=("wq", "wv"))
    assert len(wrapped) == 4
    torch.testing.assert_close(student(ids), ref, rtol=0, atol=0)  # B = 0
    with torch.no_grad():
        for n in lora_parameter_names(student):
            student.get_parameter(n).normal_(0, 0.1)
    adapted = student(ids)
    assert not torch.allclose(adapted, ref)
    merge_lora(student)
    assert not lora_parameter_names(student)
    assert set(student.state_dict()) == set(linearize(teacher, kind="lawcat").state_dict())
    torch.testing.assert_close(student(ids), adapted, rtol=TOL64, atol=TOL64)
    with pytest.raises(ValueError, match="lora targets"):
        apply_lora(student, rank=2, alpha=2.0, targets=("nope",))
