"""Tensor parallelism: vocabulary-parallel cross-entropy and the sharded Transformer vs one
process, at tp=2 (gloo), float64 so the comparison is tight.

Oracle: the same global inputs and weights on every rank; the full-logits float64 reference
(full logits / the unsharded model) on one rank; the tp version's loss and
gradients (gathered from their shards) must agree to 1e-10 (float64, exact algorithm; only
summation order differs). Odd sizes: 37 tokens with ignored labels in chunks of 8, vocabulary 10 (5 per rank); the model
has 6 query / 2 kv heads (GQA; heads must split over tp), head_dim 4, 10 tokens.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist

from ctxscale.models.config import ModelConfig
from ctxscale.models.transformer import Transformer
from tests.harness import run_distributed

TOL = 1e-10


def _vocab_ce(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from ctxscale.dist.tensor_parallel import vocab_parallel_cross_entropy

    torch.manual_seed(0)
    n, d, v = 37, 12, 10
    hidden = torch.randn(n, d, dtype=torch.float64)
    weight = torch.randn(v, d, dtype=torch.float64)
    labels = torch.randint(0, v, (n,))
    labels[::7] = -100
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_h @ ref_w.t(), labels, reduction="sum")
    ref.backward()
    mesh = init_device_mesh("cpu", (world_size,))
    w = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
    h = hidden.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(h, w, labels, chunk_size=8)  # several chunks
    loss.backward()
    grad_h = h.grad.clone()
    dist.all_reduce(grad_h)  # the partial sums over tp ranks
    torch.testing.assert_close(loss, ref, rtol=0, atol=TOL)
    torch.testing.assert_close(grad_h, ref_h.grad, rtol=0, atol=TOL)
    torch.testing.assert_close(w.grad.full_tensor(), ref_w.grad, rtol=0, atol=TOL)
    mean = vocab_parallel_cross_entropy(hidden, w, labels, reduction="mean")
    torch.testing.assert_close(mean, ref / (labels != -100).sum(), rtol=0, atol=TOL)
    return True


def test_vocab_parallel_cross_entropy():
    assert all(run_distributed(_vocab_ce, 2))


def _cfg():
    return ModelConfig(dim=24, num_layers=2, num_heads=6, num_kv_heads=2, vocab_size=10,
                       max_seq_len=32)


def _shard_and_match_single(ref, model, world_size):
    """Load `ref`'s weights into `model`, shard it over tp, and check its summed loss, every
    parameter gradient (gathered from its shards) and its gathered logits against `ref`'s
    (float64: 1e-10) on 3 sequences of 10 tokens with some labels ignored."""
    from torch.distributed.device_mesh import init_device_mesh

    from ctxscale.dist.tensor_parallel import apply_tensor_parallel

    model.load_state_dict(ref.state_dict())
    apply_tensor_parallel(model, init_device_mesh("cpu", (world_size,)))
    ids = torch.randint(0, 10, (3, 10))
    labels = torch.randint(0, 10, (3, 10))
    labels[0, :4] = -100
    # float64 reference through full logits (the chunked kernel accumulates in float32)
    ref_loss = torch.nn.functional.cross_entropy(ref(ids).flatten(0, 1), labels.flatten(),
                                                 reduction="sum")
    ref_loss.backward()
    loss = model(ids, labels=labels, loss_reduction="sum")
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=TOL)
    grads = dict(ref.named_parameters())
    assert sorted(grads) == sorted(n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(g, grads[name].grad, rtol=0, atol=TOL, msg=name)
    with torch.no_grad():  # gathered logits for evaluation
        torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=TOL)


def _tp_model(rank, world_size):
    torch.manual_seed(0)
    model = Transformer(_cfg()).double()
    _shard_and_match_single(Transformer(_cfg()).double(), model, world_size)
    # heads really are split: each rank's wq holds 3 of the 6 query heads
    assert model.layers["0"].attention.wq.weight.to_local().shape[0] == 3 * 4
    return True


def test_tensor_parallel_transformer_matches_single():
    assert all(run_distributed(_tp_model, 2))


def test_tensor_parallel_validation_messages():
    from ctxscale.dist.tensor_parallel import check_tensor_parallel

    with pytest.raises(ValueError, match="num_heads=6.*divisible by parallel.tp=4"):
        check_tensor_parallel(Transformer(_cfg()), 4)
    cfg = _cfg()
    cfg.vocab_size = 11
    with pytest.raises(ValueError, match="vocab_size=11 divisible by parallel.tp=2"):
        check_tensor_parallel(Transformer(cfg), 2)


# linear-attention variants that touch every sharded per-head piece: conv taps, per-token gates
# and Hedgehog maps (lawcat); fixed per-head decays and the output norm (decay); a softmax
# window with its mix, RoPE and write gates on every head (hedgehog); all heads ungated with
# write gates (decay, ungated_heads = heads); ungated and decaying heads mixed, split unevenly
# over the ranks (lawcat with 4 of 6 heads ungated: rank 0 holds 3 ungated, rank 1 one ungated
# and two gated; decay with 2 ungated)
LINEAR_KINDS = {
    "lawcat": dict(kind="lawcat", feature_map="hedgehog", conv_width=3, gate_max_half_life=8.0),
    "decay": dict(kind="decay"),
    "hedgehog_window": dict(kind="hedgehog", window=4, write_gate=True, feature_dim=3),
    "decay_ungated": dict(kind="decay", ungated_heads=6, write_gate=True),
    "lawcat_mixed": dict(kind="lawcat", ungated_heads=4, write_gate=True, conv_width=2),
    "decay_mixed": dict(kind="decay", ungated_heads=2, write_gate=True),
}


def _recurrent_cfg(family, pattern="MAP", linear=None, **mamba):
    """A mamba / linear / hybrid model; the default hybrid has every sharded kind of layer but
    L: softmax attention (A), Mamba (M, with an MLP) and attention + Mamba side by side (P);
    biases on every projection."""
    from ctxscale.models.config import LinearAttentionConfig, MambaConfig

    return dataclasses.replace(
        _cfg(), family=family, num_layers=3, layer_pattern=pattern, attention_bias=True,
        mamba=MambaConfig(d_state=4, d_conv=3, bias=True, mlp=True, head_dim=6, n_groups=2,
                          **mamba),
        linear_attention=LinearAttentionConfig(**LINEAR_KINDS.get(linear, {})))


def _tp_recurrent(rank, world_size, family, pattern="MAP", linear=None, n_groups=2):
    from ctxscale.models import build_model

    torch.manual_seed(0)
    cfg = _recurrent_cfg(family, pattern, linear)
    cfg.mamba.n_groups = n_groups
    ref = build_model(cfg).double()
    with torch.no_grad():  # random per-channel / per-head parameters: a wrong pairing shows
        for name, p in ref.named_parameters():
            if any(k in name for k in ("A_log", ".D", "conv1d", "dt_proj", "in_proj", "_conv",
                                       "feature_map", "out_norm", "linear_mix", "wg.", "wb.",
                                       "dt_bias", "conv_", "norm_weight")):
                p.add_(0.3 * torch.randn_like(p))
    model = build_model(cfg).double()
    _shard_and_match_single(ref, model, world_size)
    for i, code in enumerate(cfg.layer_codes()):
        block = model.layers[str(i)]
        if code in "MP":  # the Mamba channels really are split: E = 48, 24 per rank
            mixer = block.mixer
            for p in (mixer.in_proj_x.weight, mixer.in_proj_z.bias, mixer.conv1d.weight,
                      mixer.A_log, mixer.D, mixer.dt_proj.weight, mixer.dt_proj.bias,
                      mixer.x_proj.weight.t()):
                assert p.to_local().shape[0] == 24, p.shape
        if code == "S":  # Mamba-2: 4 of 8 heads, 24 of 48 channels; 1 of 2 groups, or the
            mixer = block.mixer  # one group whole (B, C replicated: d_state 4 rows)
            assert (mixer.heads, mixer.groups, mixer.inner) == (4, 1, 24)
            assert (mixer.norm_group is not None) == (n_groups == 1)
            for p in (mixer.in_proj_x.weight, mixer.conv_x.weight, mixer.norm_weight):
                assert p.to_local().shape[0] == 24, p.shape
            for p in (mixer.in_proj_B.weight, mixer.conv_C.bias):
                assert p.to_local().shape[0] == 4, p.shape
        if code == "L":  # and the heads: 3 of 6 query heads, 1 of 2 kv heads per rank
            attn = block.attention
            assert (attn.num_heads, attn.kv_heads, attn.head_offset) == (3, 1, 3 * rank)
            sharded = [p for n, p in attn.named_parameters() if not n.startswith("w")]
            assert sharded and all(p.to_local().shape[0] * 2 == p.shape[0] for p in sharded)
            if cfg.linear_attention.ungated_heads == 4:  # lawcat_mixed: 3 + 1 ungated heads
                from torch.distributed.tensor import DTensor, Replicate

                x = DTensor.from_local(torch.randn(2, 5, cfg.dim, dtype=torch.float64),
                                       attn.wg.weight.device_mesh, [Replicate()])
                with torch.no_grad():
                    log_decay = attn._log_decay(x)  # as the block calls it (gathered input)
                assert log_decay.shape == (2, 5, 3)
                assert (log_decay == 0).all(dim=(0, 1)).sum() == [3, 1][rank]
    return True


@pytest.mark.parametrize("family,pattern,linear,n_groups", [(*case, 2) for case in [
    ("mamba", "M", None), ("hybrid", "MAP", None), ("hybrid", "LAM", "lawcat"),
    ("linear", "L", "decay"), ("hybrid", "PLL", "hedgehog_window"),
    ("linear", "L", "decay_ungated"), ("hybrid", "LLA", "lawcat_mixed"),
    ("linear", "L", "decay_mixed"), ("mamba2", "S", None), ("hybrid", "SAM", None)]]
    + [("mamba2", "S", None, 1)])
def test_tensor_parallel_recurrent_models_match_single(family, pattern, linear, n_groups):
    """mamba: every layer M (+ MLP); hybrid "MAP": M, A and P layers; linear-attention layers
    of each kind in `LINEAR_KINDS`; mamba2: every layer S (8 heads in 2 groups, or in one
    group: B and C replicated, the norm all-reduced), and S beside A and M. Loss, every parameter gradient and the gathered logits at
    tp=2 equal one process's (float64, 1e-10)."""
    assert all(run_distributed(_tp_recurrent, 2, args=(family, pattern, linear, n_groups)))


def test_tensor_parallel_mamba_validation_messages():
    from ctxscale.dist.tensor_parallel import check_tensor_parallel
    from ctxscale.models import build_model

    cfg = dataclasses.replace(_recurrent_cfg("mamba", expand=1), vocab_size=16)  # E = 24
    model = build_model(cfg)
    check_tensor_parallel(model, 4)  # no attention layers: 6 heads need not divide by 4
    with pytest.raises(ValueError, match=r"1 x 24 = 24 must be divisible by parallel.tp=16"):
        check_tensor_parallel(model, 16)
    with pytest.raises(ValueError, match=r"num_heads=6.*divisible by parallel.tp=4"):
        check_tensor_parallel(build_model(_recurrent_cfg("hybrid")), 4)  # A and P layers
    mamba2 = dataclasses.replace(_recurrent_cfg("mamba2", "S"), vocab_size=16)  # 8 heads, 2 groups
    check_tensor_parallel(build_model(mamba2), 2)
    with pytest.raises(ValueError, match=r"n_groups=2 must be divisible by parallel.tp=4"):
        check_tensor_parallel(build_model(mamba2), 4)
    mamba2.mamba.n_groups = 1  # B and C replicated
    check_tensor_parallel(build_model(mamba2), 4)


def _tp_titans(rank, world_size, variant, checkpointing):
    from ctxscale.models import build_model
    from ctxscale.models.config import TitansConfig

    torch.manual_seed(0)
    cfg = dataclasses.replace(_cfg(), family="titans", attention_bias=True, titans=TitansConfig(
        variant=variant, chunk_size=3, segment_len=6, window=4, persistent_tokens=2,
        memory_depth=2))
    ref = build_model(cfg).double()
    cfg.activation_checkpointing = checkpointing
    with torch.no_grad():  # random gates and initial memories, so a wrong head pairing shows
        for name, p in ref.named_parameters():
            if "w_gates" in name or "init_memory" in name:
                p.add_(0.3 * torch.randn_like(p))
    model = build_model(cfg).double()
    _shard_and_match_single(ref, model, world_size)
    memory = model.layers["0"].memory
    assert (memory.local_heads, memory.head_offset) == (3, 3 * rank)
    assert memory.init_memory[0].to_local().shape[0] == 3
    return True


@pytest.mark.parametrize("variant,checkpointing", [
    ("mac", "none"), ("mag", "none"), ("mal", "none"), ("mac", "full"), ("mag", "full")])
def test_tensor_parallel_titans_matches_single(variant, checkpointing):
    """Titans memory-as-context (segments of 6: one whole, one partial), memory-as-gate and
    memory-as-layer blocks (window attention, 2 persistent tokens, a depth-2 memory in chunks of
    3 over 10 tokens) at tp=2: loss, every gradient and the logits equal one process's
    (float64, 1e-10); also with activation checkpointing (the regions recompute DTensor ops)."""
    assert all(run_distributed(_tp_titans, 2, args=(variant, checkpointing)))


def test_tensor_parallel_titans_memory_heads_must_divide():
    from ctxscale.dist.tensor_parallel import check_tensor_parallel
    from ctxscale.models import build_model
    from ctxscale.models.config import TitansConfig

    cfg = dataclasses.replace(_cfg(), family="titans", titans=TitansConfig(memory_heads=3))
    check_tensor_parallel(build_model(cfg), 1)  # tp=1 is no split: nothing to refuse
    with pytest.raises(ValueError, match=r"memory_heads=3 must be divisible by parallel.tp=2"):
        check_tensor_parallel(build_model(cfg), 2)
