"""dist/mesh.py: the named and flattened axes hold the ranks the rank layout says, and reading
them never goes through PyTorch's deprecated slicing of flattened names from the root mesh."""

import warnings

import pytest
import torch.distributed as dist

from ctxscale.dist.mesh import ParallelDims, axis_group, axis_rank, axis_size, submesh
from tests.harness import run_distributed


def _expected_groups(rank, sizes):
    """For each axis name, the global ranks that share every other coordinate with `rank`
    (rank layout pp × dp_replicate × dp_shard × cp × tp, outermost first)."""
    names = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
    flat = {"dp": ("dp_replicate", "dp_shard"), "dp_shard_cp": ("dp_shard", "cp"),
            "dp_cp": ("dp_replicate", "dp_shard", "cp")}

    def coords(r):
        out = []
        for size in reversed(sizes):
            out.append(r % size)
            r //= size
        return dict(zip(names, reversed(out)))

    world = 1
    for s in sizes:
        world *= s
    mine = coords(rank)
    groups = {}
    for name, axes in {**{n: (n,) for n in names}, **flat}.items():
        groups[name] = [r for r in range(world)
                        if all(coords(r)[a] == mine[a] for a in names if a not in axes)]
    return groups


def _check_axes(rank, world_size):
    seen = []
    for dp_replicate, dp_shard, cp, tp, pp in [(2, 1, 2, 1, 1), (1, 2, 2, 1, 1), (2, 2, 1, 1, 1),
                                               (1, 1, 2, 2, 1), (1, 2, 1, 1, 2)]:
        dims = ParallelDims(dp_replicate, dp_shard, cp, tp, pp, world_size)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the PyTorch 2.11 deprecation would raise here
            mesh = dims.build_mesh("cpu")
            expected = _expected_groups(rank, dims.sizes())
            for name, ranks in expected.items():
                group = axis_group(mesh, name)
                assert dist.get_process_group_ranks(group) == ranks, (dims, name)
                assert axis_size(mesh, name) == len(ranks), (dims, name)
                assert axis_rank(mesh, name) == ranks.index(rank), (dims, name)
            hsdp = submesh(mesh, "dp_replicate", "dp_shard_cp")
            assert hsdp.shape == (dp_replicate, dp_shard * cp)
            assert dist.get_process_group_ranks(hsdp.get_group(0)) == expected["dp_replicate"]
            assert dist.get_process_group_ranks(hsdp.get_group(1)) == expected["dp_shard_cp"]
        assert dims.build_mesh("cpu") is mesh  # reused, flattened views included
        seen.append(mesh)
    with pytest.raises(KeyError, match="unknown mesh axis 'dpcp'"):
        submesh(seen[0], "dpcp")
    return True


def test_flattened_axes_hold_the_layout_ranks_without_deprecated_slicing():
    assert all(run_distributed(_check_axes, 4))
