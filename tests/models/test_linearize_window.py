"""Linearization with Hedgehog-after-RoPE and the LoLCATs window: the student's attention weights
(what the transfer CE sees) reproduce the layer, the tiled CE equals a full-matrix oracle, λ is a
new (trained) parameter, and a window covering the sequence gives back the teacher exactly.

float64 throughout where exactness is checked: ~1e-12 agreement, we allow 1e-9; the CE
accumulates in float32 (1e-6, as in tests/models/test_linearize.py).
"""

import pytest
import torch

from ctxscale.models.linearize import (
    attention_transfer_ce,
    attention_transfer_loss,
    linearize,
    new_parameter_names,
    student_features,
    student_window_qk,
    teacher_layer_inputs,
    teacher_qk,
)
from ctxscale.models.window_attention import window_attention_weights
from tests.models.test_linearize import _perturb, _teacher

TOL64 = 1e-9
STUDENTS = [("hedgehog", {"rope": True}), ("hedgehog", {"rope": True, "window": 4}),
            ("lawcat", {"window": 3}), ("lawcat", {"rope": True, "window": 5})]


def _student(kind, la):
    student = linearize(_teacher(), kind=kind, **la).to(torch.float64)
    _perturb(student)
    return student


def _weights(layer, x, cos, sin):
    """The student's unnormalized attention weights `(b, h, s, s)` from the transfer helpers."""
    s = x.shape[1]
    phi_q, phi_k, cum = student_features(layer, x, cos, sin)
    if not layer.window:
        mask = torch.ones(s, s, dtype=torch.bool).tril()
        w = torch.einsum("bthf,bshf->bhts", phi_q, phi_k)
        if cum is not None:
            g = cum.transpose(1, 2)
            w = w * torch.exp((g[..., :, None] - g[..., None, :]).masked_fill(~mask, -torch.inf))
        return w.masked_fill(~mask, 0)
    q_w, k_w = student_window_qk(layer, x, cos, sin)
    return window_attention_weights(q_w, k_w, phi_q, phi_k, cum, window=layer.window,
                                    log_mix=layer.linear_mix, start=0, stop=s)


@pytest.mark.parametrize("kind,la", STUDENTS)
def test_student_weights_reproduce_the_layer(kind, la):
    student = _student(kind, la)
    layer = student.layers["0"].attention
    cos, sin = student.rope(torch.arange(13).expand(2, 13))
    x = torch.randn(2, 13, student.cfg.dim, dtype=torch.float64)
    w = _weights(layer, x, cos, sin)
    eps = 0.0 if layer.window else layer.la.eps
    v = layer.wv(x).view(2, 13, -1, layer.head_dim).repeat_interleave(5, 2)
    o = torch.einsum("bhts,bshd->bthd", w, v) / (w.sum(-1).transpose(1, 2)[..., None] + eps)
    torch.testing.assert_close(layer.wo(o.flatten(2)), layer(x, cos, sin), rtol=TOL64, atol=TOL64)


@pytest.mark.parametrize("kind,la", STUDENTS[1:])
@pytest.mark.parametrize("tile", [1, 5, 64])
def test_windowed_ce_equals_full_matrix(kind, la, tile):
    student = _student(kind, la)
    teacher = _teacher()
    ids = torch.randint(0, 37, (2, 13))
    cos, sin, inputs = teacher_layer_inputs(teacher, ids)
    x = inputs["1"]
    layer = student.layers["1"].attention
    q, k = teacher_qk(teacher.layers["1"].attention, x, cos, sin)
    phi_q, phi_k, cum = student_features(layer, x, cos, sin)
    q_w, k_w = student_window_qk(layer, x, cos, sin)
    got = attention_transfer_ce(q, k, phi_q, phi_k, cum, tile=tile, window=layer.window,
                                q_w=q_w, k_w=k_w, log_mix=layer.linear_mix)
    # full-matrix oracle: window e_ts / linear a_ts written out with seq × seq masks
    b, s, h, d = q.shape
    t_idx, s_idx = torch.arange(s).view(-1, 1), torch.arange(s).view(1, -1)
    causal = s_idx <= t_idx
    in_win, older = causal & (s_idx > t_idx - layer.window), s_idx <= t_idx - layer.window
    p = torch.softmax((torch.einsum("bthd,bshd->bhts", q, k) * d ** -0.5)
                      .masked_fill(~causal, -torch.inf), -1)
    sc = (torch.einsum("bthd,bshd->bhts", q_w, k_w) * d ** -0.5).masked_fill(~in_win, -torch.inf)
    e = torch.exp(sc - sc.amax(-1, keepdim=True)) * in_win
    a = torch.einsum("bthf,bshf->bhts", phi_q, phi_k)
    if cum is not None:
        g = cum.transpose(1, 2)
        a = a * torch.exp((g[..., :, None] - g[..., None, :]).masked_fill(~causal, -torch.inf))
    a = a * older * torch.exp(layer.linear_mix).view(1, h, 1, 1)
    wts = e + a
    att = wts / (wts.sum(-1, keepdim=True) + 1e-12)
    want = -(p * torch.log(att + 1e-12)).sum() / (b * h * s)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-6)


def test_mix_is_a_new_parameter_and_trains_in_transfer():
    teacher = _teacher(torch.float32)
    student = linearize(teacher, kind="hedgehog", rope=True, window=3)
    names = new_parameter_names(student)
    assert {"layers.0.attention.linear_mix", "layers.1.attention.linear_mix"} <= set(names)
    ids = torch.randint(0, 37, (2, 11))
    cos, sin, inputs = teacher_layer_inputs(teacher, ids)
    for p in student.parameters():
        p.requires_grad_(False)
    for n in names:
        student.get_parameter(n).requires_grad_(True)
    for loss in ("ce", "mse"):
        out = attention_transfer_loss(teacher.layers["0"], student.layers["0"], inputs["0"],
                                      cos, sin, loss=loss, tile=4)
        out["loss"].backward()
        grad = student.get_parameter("layers.0.attention.linear_mix").grad
        assert grad is not None and grad.abs().max() > 0, loss
        student.zero_grad()


@pytest.mark.parametrize("kind", ["hedgehog", "lawcat"])
def test_window_covering_the_sequence_is_the_teacher(kind):
    """A fresh student whose window covers the whole sequence is exactly the teacher."""
    teacher = _teacher()
    student = linearize(teacher, kind=kind, rope=True, window=16).to(torch.float64)
    ids = torch.randint(0, 37, (2, 15))
    torch.testing.assert_close(student(ids), teacher(ids), rtol=TOL64, atol=TOL64)
