"""Context-parallel Titans on packed documents = one process (float64, 1e-10).

Documents cross the shard boundaries mid-unit (mac segments of 9, mag / mal chunks of 3), start
exactly at a boundary, and span a whole shard, so a rank recomputes the unit it shares with its
predecessor from the halo and the handed-over state (or from M_0, where that unit begins a
document).
Each rank compares its local hidden states and the parameter gradients summed over the ranks
with the single-process model on the whole packed sequence; once without and once with full
activation checkpointing.
"""

import pytest
import torch
import torch.distributed as dist

from ctxscale.dist.context import ParallelContext
from ctxscale.models.config import ModelConfig, TitansConfig
from ctxscale.models.titans import Titans
from tests.harness import run_distributed
from tests.models._recurrent_util import packed

N = 36  # 18 tokens per rank at cp=2, 9 at cp=4
# Boundaries at 18 (cp=2) and 9, 18, 27 (cp=4). Row 0: a document spans 4..23, so the units
# straddling 9 (mag / mal) and 18 (all) continue it: the state is handed over. Row 1: one
# document spans 7..35, a whole shard at cp=4, straddling 18 and 27 mid-document; at 9 the
# straddling unit begins it (a restart on the later rank). Row 2: documents start exactly at
# 9 and 18.
LENGTHS = [[4, 20, 12], [2, 5, 29], [9, 9, 11, 7]]


def _cfg(variant, checkpointing):
    t = TitansConfig(variant=variant, chunk_size=3, segment_len=9, persistent_tokens=2,
                     window=6, memory_depth=2, memory_hidden=10, memory_heads=5,
                     memory_head_dim=6, max_lr=0.5)
    return ModelConfig(family="titans", vocab_size=37, dim=48, num_layers=2, num_heads=6,
                       num_kv_heads=3, head_dim=8, titans=t,
                       activation_checkpointing=checkpointing)


def _run(model, ids, pos, docs, w):
    h = model.hidden_states(ids, pos, docs)
    (h * w).sum().backward()
    return h.detach(), {n: p.grad for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _cp_documents(rank, world):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 37, (3, N), generator=g)
    w = torch.randn(3, N, 48, generator=g, dtype=torch.float64)
    docs, pos = packed(LENGTHS)
    sl = N // world
    mine = slice(rank * sl, (rank + 1) * sl)
    context = ParallelContext(cp_group=dist.group.WORLD, cp_size=world, cp_rank=rank)
    errors = {}
    for variant in ("mac", "mag", "mal"):
        for checkpointing in ("none", "full"):
            torch.manual_seed(0)
            ref = Titans(_cfg(variant, checkpointing)).double().train()
            with torch.no_grad():
                for block in ref.layers.values():
                    block.memory.w_gates.bias.copy_(torch.randn(block.memory.w_gates.bias.shape))
            h_ref, grads_ref = _run(ref, ids, pos, docs, w)
            model = Titans(_cfg(variant, checkpointing), context).double().train()
            model.load_state_dict(ref.state_dict())
            h, _ = _run(model, ids[:, mine], pos[:, mine], docs, w[:, mine])
            errs = {"out": _rel(h, h_ref[:, mine])}
            for name, p in model.named_parameters():
                if grads_ref[name] is None:  # the output head is not on this path
                    continue
                grad = p.grad.clone()
                dist.all_reduce(grad)
                errs[name] = _rel(grad, grads_ref[name])
            errors[(variant, checkpointing)] = max(errs.values())
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_cp_documents_match_single_process(world):
    for rank, errors in enumerate(run_distributed(_cp_documents, world, timeout=300)):
        bad = {k: e for k, e in errors.items() if not e <= 1e-10}
        assert not bad, f"cp={world} rank {rank}: {bad}"


def _refusals(rank, world):
    zigzag = ParallelContext(cp_group=dist.group.WORLD, cp_size=world, cp_rank=rank,
                             cp_layout="zigzag")
    docs = torch.zeros(1, 36, dtype=torch.long)
    with pytest.raises(ValueError, match="contiguous"):
        Titans(_cfg("mag", "none"), zigzag).hidden_states(torch.zeros(1, 18, dtype=torch.long),
                                                           None, docs)
    contiguous = ParallelContext(cp_group=dist.group.WORLD, cp_size=world, cp_rank=rank)
    with pytest.raises(ValueError, match="whole sequence"):  # local ids instead of global
        Titans(_cfg("mag", "none"), contiguous).hidden_states(
            torch.zeros(1, 18, dtype=torch.long), None, docs[:, :18])
    return True


def test_cp_document_errors():
    assert run_distributed(_refusals, 2) == [True, True]
