import pytest
import torch
from ctxscale.dist import gather_sequence, global_positions, shard_sequence
from ctxscale.dist.layout import check_divisible

from tests.harness import run_distributed


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_positions_partition_the_sequence(layout, world):
    n = 2 * world * 7
    allpos = torch.cat([global_positions(n, r, world, layout) for r in range(world)])
    assert sorted(allpos.tolist()) == list(range(n))


def test_zigzag_chunks():
    assert global_positions(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert global_positions(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    assert global_positions(6, 1, 3, "stripe").tolist() == [1, 4]


def test_indivisible_length_names_the_multiple():
    with pytest.raises(ValueError, match="multiple of 8"):
        check_divisible(30, 4, "zigzag")
    with pytest.raises(ValueError, match="unknown sequence layout"):
        check_divisible(30, 4, "diagonal")


def _roundtrip(rank, world, layout):
    torch.manual_seed(0)
    x = torch.randn(2, 6 * world, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6 * world, 3, dtype=torch.float64)
    local = shard_sequence(x, layout=layout).detach().requires_grad_()
    full = gather_sequence(local, layout=layout)
    assert torch.equal(full, x.detach())
    (full * w).sum().backward()
    # every rank contributed the same loss, so the gradient is world * w on our shard
    assert torch.allclose(local.grad, world * shard_sequence(w, layout=layout))
    return True


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
def test_shard_gather_roundtrip(layout):
    assert all(run_distributed(_roundtrip, 4, args=(layout,)))


def test_shard_segments_made_once_per_ids_tensor(monkeypatch):
    """Every ring attention layer of a step gets the same ids tensor: their shards and id ranges
    (a host sync) are made once, again after an in-place write, and per world size / layout."""
    import gc

    from ctxscale.dist import layout as layout_mod
    from ctxscale.dist.layout import ShardSegments

    made = []
    real = ShardSegments.__init__
    monkeypatch.setattr(ShardSegments, "__init__",
                        lambda self, *a: (made.append(a[1:]), real(self, *a))[1])
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 2]])
    first = ShardSegments.of(ids, 2, "zigzag")
    assert all(ShardSegments.of(ids, 2, "zigzag") is first for _ in range(3))
    assert first.ranges == [(0, 2), (0, 2)] and not first.disjoint(0, 1)
    assert torch.equal(first.shard(1), ids[:, 2:6])
    assert ShardSegments.of(ids, 2, "contiguous") is not first
    assert ShardSegments.of(ids.clone(), 2, "zigzag") is not first  # another tensor
    ids[:, :4] = 0  # in place, e.g. a reused ids buffer
    ids[:, 4:] = 5
    again = ShardSegments.of(ids, 2, "contiguous")
    assert again.ranges == [(0, 0), (5, 5)] and again.disjoint(0, 1)
    assert made == [(2, "zigzag"), (2, "contiguous"), (2, "zigzag"), (2, "contiguous")]
    with torch.inference_mode():  # no version counter to trust: made every time, still right
        frozen = torch.tensor([[0, 1, 2, 3]])
        assert ShardSegments.of(frozen, 2, "contiguous").ranges == [(0, 1), (2, 3)]
    del ids, first, again
    gc.collect()
    assert len(layout_mod._SHARDS) == 0  # entries go with their tensors
