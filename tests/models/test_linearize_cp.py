"""The attention-transfer CE under context parallelism (`attention_transfer_ce_cp`, reached through
`attention_transfer_loss` when the student's ParallelContext has cp > 1) equals the
single-process CE, value and gradients of every new parameter (feature maps, LAWCAT conv taps and
gate, the LoLCATs mix λ).

Oracle pattern: every rank builds the same float64 teacher/student and global input; the
reference is `attention_transfer_loss` on one device over the whole sequence (itself checked
against a full-matrix oracle in tests/models/test_linearize*.py); each rank then runs the same
layer with a cp ParallelContext on its contiguous shard, sums its rows (`reduction="sum"`), and
the sum over ranks, divided by b·h·N, must equal the reference. Gradients: each rank's local
gradient of its sum, all-reduced and divided by b·h·N (what `convert` does), must equal the
reference gradient. Both are the same float64 sums taken in another order (rows split across
ranks, the cp conv/halo), so they agree to ~1e-14 relative; we allow 1e-10.

Shapes: seq 20 (cp=2: 10 per rank; cp=4: 5), 5 heads, 1 kv head (GQA), head_dim 6, tile 3 (tiles
straddle nothing across ranks but do not divide the shard).
"""

import pytest
import torch
import torch.distributed as dist

from ctxscale.dist.context import ParallelContext
from ctxscale.dist.layout import shard_sequence
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
from tests.harness import run_distributed
from tests.models.test_linearize import _perturb, _teacher

TOL = 1e-10
SEQ = 20
STUDENTS = {
    "hedgehog_rope": ("hedgehog", {"rope": True}),
    "lawcat_gated_conv": ("lawcat", {"gate": True, "conv_width": 3, "ungated_heads": 1}),
    "lawcat_fixed_decay": ("lawcat", {"gate": False}),
    "hedgehog_window": ("hedgehog", {"rope": True, "window": 4}),
    "lawcat_window": ("lawcat", {"rope": True, "window": 3}),
    # the recipe of configs/convert_lawcat.yaml: per-layer ungated heads with a write gate, the
    # softmax feature map, capped gates
    "lawcat_recipe": ("lawcat", {"conv_width": 3, "ungated_heads": [0, 2], "write_gate": True,
                                 "feature_map": "softmax", "gate_max_half_life": 8.0}),
}


def _setup(name, par=None):
    teacher = _teacher()
    kind, la = STUDENTS[name]
    student = linearize(teacher, kind=kind, parallel=par or ParallelContext(), **la)
    student = student.to(torch.float64)
    _perturb(student)
    names = new_parameter_names(student)
    for p in student.parameters():
        p.requires_grad_(False)
    for n in names:
        student.get_parameter(n).requires_grad_(True)
    torch.manual_seed(5)
    ids = torch.randint(0, 37, (2, SEQ))
    return teacher, student, names, ids


def _reference(name, layer="1"):
    teacher, student, names, ids = _setup(name)
    cos, sin, inputs = teacher_layer_inputs(teacher, ids)
    out = attention_transfer_loss(teacher.layers[layer], student.layers[layer], inputs[layer],
                                  cos, sin, loss="ce", tile=3)
    out["ce"].backward()
    grads = {n: student.get_parameter(n).grad for n in names if n.startswith(f"layers.{layer}.")}
    return out["ce"].detach(), grads


def _cp_ce(rank, world_size, name, layer="1"):
    group = dist.new_group(list(range(world_size)))
    par = ParallelContext(cp_group=group, cp_size=world_size, cp_rank=rank, cp_layout="contiguous")
    ref, ref_grads = _reference(name, layer)
    teacher, student, names, ids = _setup(name, par)
    # the teacher's layer inputs on the whole sequence (single device), then this rank's shard
    cos, sin, inputs = teacher_layer_inputs(teacher, ids)
    shard = lambda t: shard_sequence(t, group=group, layout="contiguous")  # noqa: E731
    out = attention_transfer_loss(teacher.layers[layer], student.layers[layer],
                                  shard(inputs[layer]), shard(cos), shard(sin), loss="ce",
                                  tile=3, reduction="sum")
    out["ce"].backward()
    b, h = ids.shape[0], student.cfg.num_heads
    count = b * h * SEQ
    total = out["ce"].detach().clone()
    dist.all_reduce(total, group=group)
    errs = {"value": ((total / count - ref).abs() / ref.abs()).item()}
    for n, g_ref in ref_grads.items():
        g = student.get_parameter(n).grad
        assert g is not None, n
        g = g.clone()
        dist.all_reduce(g, group=group)
        g = g / count
        errs[n] = ((g - g_ref).abs().max() / g_ref.abs().max().clamp_min(1e-300)).item()
        assert g_ref.abs().max() > 0, n  # the gradient is not trivially zero
    return errs


@pytest.mark.parametrize("name,world", [(n, 2) for n in STUDENTS] + [
    ("hedgehog_rope", 4), ("lawcat_gated_conv", 4), ("hedgehog_window", 4)])
def test_cp_ce_equals_one_process(name, world):
    for rank, errs in enumerate(run_distributed(_cp_ce, world, args=(name,))):
        for what, err in errs.items():
            assert err <= TOL, (name, world, rank, what, err)
        assert len(errs) > 1  # value plus at least one gradient


def _wrong_layout(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    par = ParallelContext(cp_group=group, cp_size=world_size, cp_rank=rank, cp_layout="zigzag")
    teacher, student, _, ids = _setup("hedgehog_rope", par)
    cos, sin, inputs = teacher_layer_inputs(teacher, ids)
    with pytest.raises(ValueError, match="cp_layout=contiguous"):
        attention_transfer_loss(teacher.layers["0"], student.layers["0"], inputs["0"][:, :10],
                                cos[:, :10], sin[:, :10], loss="ce", tile=3, reduction="sum")
    return True


def test_cp_ce_refuses_other_layouts():
    assert run_distributed(_wrong_layout, 2) == [True, True]


def test_query_offset_matches_the_rows_of_the_full_ce():
    """Single process: the CE of rows [o, o + n) with q_offset = o is the full CE restricted to
    those rows (summing the row blocks gives the whole sum)."""
    teacher, student, _, ids = _setup("lawcat_window")
    cos, sin, inputs = teacher_layer_inputs(teacher, ids)
    x, layer = inputs["0"], student.layers["0"].attention
    q, k = teacher_qk(teacher.layers["0"].attention, x, cos, sin)
    pq, pk, cum = student_features(layer, x, cos, sin)
    qw, kw = student_window_qk(layer, x, cos, sin)
    win = dict(window=layer.window, k_w=kw, log_mix=layer.linear_mix)
    full = attention_transfer_ce(q, k, pq, pk, cum, tile=4, q_w=qw, reduction="sum", **win)
    parts = sum(attention_transfer_ce(q[:, a:c], k, pq[:, a:c], pk, cum, tile=4, q_w=qw[:, a:c],
                                      q_offset=a, reduction="sum", **win)
                for a, c in ((0, 7), (7, 8), (8, SEQ)))
    torch.testing.assert_close(parts, full, rtol=TOL, atol=0)
    with pytest.raises(ValueError, match="keys"):
        attention_transfer_ce(q[:, 8:], k[:, :SEQ - 1], pq[:, 8:], pk, None, q_offset=8)
