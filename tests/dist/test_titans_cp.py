"""Context-parallel Titans (memory state passed rank to rank, window halo) against one process.

Oracle pattern: every rank builds the same model and global tokens, runs the single-process
model on the full sequence (float64, and in the tested precision), then a copy on its contiguous
shard under a `ParallelContext` over the pool, and compares its local hidden states and the
parameter gradients (summed over the ranks, which is what data-parallel reduction over dp × cp
does). Tolerances, relative to each tensor's largest entry: against cp=1 in the same precision
<= 1e-5 in float32 (the same operations, rank by rank: only the gradient sums over ranks are
reassociated) and <= 1e-10 in float64; against the float64 oracle, max(1e-5, twice the
single-process float32 model's own error) — the memory's online learning amplifies rounding, so
float32 cp=1 itself sits near 1e-5 of float64 for some gradients.
Training: 5 steps of `train()` at cp=2 and cp=4 give the cp=1 losses within 1e-5 (float32, the
same batches, reductions in a different order).
"""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ctxscale.dist import comm
from ctxscale.dist.context import ParallelContext
from ctxscale.launch.config import load_job_config
from ctxscale.launch.train import train
from ctxscale.models.config import ModelConfig, TitansConfig
from ctxscale.models.titans import Titans
from tests.harness import run_distributed

N = 36  # 18 tokens per rank at cp=2, 9 at cp=4
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
ROOT = Path(__file__).resolve().parents[2]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _cfg(variant, **titans):
    t = dict(variant=variant, chunk_size=3, segment_len=9, persistent_tokens=2, window=6,
             memory_depth=2, memory_hidden=10, memory_heads=5, memory_head_dim=6)
    t.update(titans)
    return ModelConfig(family="titans", vocab_size=37, dim=48, num_layers=2, num_heads=6,
                       num_kv_heads=3, head_dim=8, titans=TitansConfig(**t))


def _context(world, rank):
    return ParallelContext(cp_group=dist.group.WORLD, cp_size=world, cp_rank=rank)


def _full_run(model, ids, w):
    h = model.hidden_states(ids)
    (h * w.to(h.dtype)).sum().backward()
    return h.detach(), {n: p.grad for n, p in model.named_parameters()}


def _cp_matches_single(rank, world, variant, dtype, checkpointing="none"):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref = Titans(_cfg(variant)).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 37, (2, N), generator=g)
    w = torch.randn(2, N, 48, generator=g, dtype=torch.float64)
    single = Titans(_cfg(variant))
    single.load_state_dict(ref.state_dict())
    single.to(dtype)
    h_ref, grads_ref = _full_run(ref, ids, w)  # float64 oracle
    h_one, grads_one = _full_run(single, ids, w)  # the same precision in one process (cp=1)

    cfg = _cfg(variant)
    cfg.activation_checkpointing = checkpointing
    model = Titans(cfg, _context(world, rank))
    model.load_state_dict(ref.state_dict())
    model.to(dtype)
    sl = N // world
    mine = slice(rank * sl, (rank + 1) * sl)
    with comm.counting():
        h_local = model.hidden_states(ids[:, mine])
        (h_local * w[:, mine].to(dtype)).sum().backward()
        stats = comm.comm_stats()
    vs_one = {"out": _rel(h_local, h_one[:, mine])}
    vs_ref = {"out": _rel(h_local, h_ref[:, mine])}
    floor = _rel(h_one, h_ref)
    for name, p in model.named_parameters():
        if grads_ref[name] is None:  # the output head is not on the hidden-state path
            assert p.grad is None, name
            continue
        grad = p.grad.double()
        dist.all_reduce(grad)
        vs_one[name] = _rel(grad, grads_one[name])
        vs_ref[name] = _rel(grad, grads_ref[name])
        floor = max(floor, _rel(grads_one[name], grads_ref[name]))
    bad = {k: e for k, e in vs_one.items() if not e <= TOL[dtype]}
    assert not bad, f"{variant} {dtype} cp={world} rank {rank} vs cp=1: {bad}"
    tol_ref = max(TOL[dtype], 2 * floor)
    bad = {k: e for k, e in vs_ref.items() if not e <= tol_ref}
    assert not bad, f"{variant} {dtype} cp={world} rank {rank} vs float64 (tol {tol_ref}): {bad}"
    return stats


def _assert_exchanged_once(stats, variant, world):
    """The memory state and (mag / mal) the window halo went forward from ranks < P-1 and
    back from ranks > 0, once per layer (bytes counted by `comm`)."""
    mem = _cfg(variant).titans
    dims = [mem.memory_head_dim, mem.memory_hidden, mem.memory_head_dim]
    state_bytes = 2 * 2 * mem.memory_heads * sum(a * b for a, b in zip(dims, dims[1:])) * 4
    layers = 2
    for r, s in enumerate(stats):
        sent = s["titans_state"]["bytes_sent"]
        assert sent == layers * state_bytes * ((r < world - 1) + (r > 0))
        assert ("titans_halo" in s) == (variant != "mac")
        if variant != "mac":  # k and v, (batch 2, window − 1, kv heads 3, head dim 8) each
            halo_bytes = 2 * 2 * (mem.window - 1) * 3 * 8 * 4
            assert s["titans_halo"]["bytes_sent"] == layers * halo_bytes * ((r < world - 1) + (r > 0))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_cp_outputs_and_gradients_match_single_process(variant, world):
    stats = run_distributed(_cp_matches_single, world, args=(variant, torch.float32))
    _assert_exchanged_once(stats, variant, world)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_cp_with_activation_checkpointing(variant):
    """Activation checkpointing under cp=2: the same outputs and gradients as one process
    without it, and the recomputed regions never repeat an exchange (the same bytes as
    without checkpointing)."""
    stats = run_distributed(_cp_matches_single, 2, args=(variant, torch.float32, "full"))
    _assert_exchanged_once(stats, variant, 2)


def test_cp_float64_is_exact():
    run_distributed(_cp_matches_single, 2, args=("mal", torch.float64))


def _misaligned(rank, world):
    model = Titans(_cfg("mac", segment_len=6, chunk_size=3), _context(world, rank))
    ids = torch.zeros(1, 9, dtype=torch.long)  # 9 tokens per rank, segments of 6
    with pytest.raises(ValueError, match="segment_len"):
        model.hidden_states(ids)
    window = Titans(_cfg("mag", window=12), _context(world, rank))
    with pytest.raises(ValueError, match="window"):
        window.hidden_states(ids)  # needs the previous 11 keys, ranks hold 9
    zigzag = ParallelContext(cp_group=dist.group.WORLD, cp_size=world, cp_rank=rank,
                             cp_layout="zigzag")
    for variant in ("mac", "mag"):
        with pytest.raises(ValueError, match="contiguous"):
            Titans(_cfg(variant), zigzag).hidden_states(torch.zeros(1, 18, dtype=torch.long))
    return True


def test_cp_misaligned_segments_and_wrong_layout_raise():
    assert run_distributed(_misaligned, 2) == [True, True]


SMALL = [
    "model.dim=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.titans.segment_len=12", "model.titans.chunk_size=4", "model.titans.window=8",
    "model.titans.memory_hidden=16", "data.seq_len=48", "data.vocab_size=64",
    "data.num_kv_pairs=4", "train.batch_size=2", "train.steps=5", "train.progress=false",
    "train.tensorboard=false", "train.eval_every=0", "train.eval_batches=1",
    "optim.warmup_steps=2", "checkpoint.at_end=false", "checkpoint.resume=none",
]


def _losses(out_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _cp_train(rank, world, out_dir, variant):
    torch.set_num_threads(1)
    cfg = load_job_config(ROOT / "configs" / "titans_tiny.yaml",
                          SMALL + [f"model.titans.variant={variant}", f"parallel.cp={world}",
                                   f"train.output_dir={out_dir}"])
    return train(cfg)["final_loss"]


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_training_cp2_and_cp4_match_cp1(tmp_path, variant):
    # seq_len 48: 24 tokens per rank at cp=2, 12 at cp=4 (one mac segment of 12, three memory
    # chunks of 4, and more than window - 1 = 7 tokens for the mag / mal halo)
    single = tmp_path / "cp1"
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_job_config(ROOT / "configs" / "titans_tiny.yaml",
                              SMALL + [f"model.titans.variant={variant}",
                                       f"train.output_dir={single}"]))
    finally:
        torch.set_num_threads(torch_threads)
    a = _losses(single)
    assert sorted(a) == [1, 2, 3, 4, 5]
    for world in (2, 4):
        run_distributed(_cp_train, world, args=(str(tmp_path / f"cp{world}"), variant))
        b = _losses(tmp_path / f"cp{world}")
        assert sorted(b) == sorted(a), world
        for s in a:
            assert abs(a[s] - b[s]) <= 1e-5 * max(1.0, abs(a[s])), (world, s, a[s], b[s])
