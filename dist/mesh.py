"""The device mesh: named axes `pp`, `dp_replicate`, `dp_shard`, `cp`, `tp` sized from config.

Rank layout (outermost first) is `pp × dp_replicate × dp_shard × cp × tp`: tensor-parallel ranks
are neighbours (fastest links), pipeline stages are furthest apart. Flattened views:
- `dp` = dp_replicate × dp_shard: ranks that see different data;
- `dp_shard_cp` = dp_shard × cp: the ranks FSDP shards parameters over (context-parallel ranks
  hold the same parameters, so they shard them too and their gradients are summed);
- `dp_cp` = dp_replicate × dp_shard × cp: the ranks whose losses and gradients are combined.

The flattened views are kept next to the mesh (`submesh(mesh, name)`), not sliced back out of
it: slicing a flattened name from the root mesh is deprecated since PyTorch 2.11 and warns on
every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def from_config(cls, par, world_size: int) -> ParallelDims:
        """Resolve `dp_shard=-1` and check that the axes multiply to the world size."""
        fixed = par.dp_replicate * par.tp * par.pp * par.cp
        dp_shard = par.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise ValueError(
                    f"world size {world_size} is not divisible by dp_replicate×tp×pp×cp = "
                    f"{par.dp_replicate}×{par.tp}×{par.pp}×{par.cp} = {fixed}; change the "
                    "parallel sizes or the number of processes"
                )
            dp_shard = world_size // fixed
        if fixed * dp_shard != world_size:
            raise ValueError(
                f"parallel sizes dp_replicate={par.dp_replicate} × dp_shard={dp_shard} × "
                f"tp={par.tp} × pp={par.pp} × cp={par.cp} = {fixed * dp_shard} do not match the "
                f"{world_size} processes launched; set parallel.dp_shard=-1 or launch "
                f"{fixed * dp_shard} processes"
            )
        return cls(par.dp_replicate, dp_shard, par.cp, par.tp, par.pp, world_size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def sizes(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)

    def build_mesh(self, device_type: str):
        """A DeviceMesh over all axes plus the flattened `dp`, `dp_shard_cp`, `dp_cp` views
        (None for a single process).

        Made once per layout and default process group, then reused: a job run again in the
        same process (a notebook, a sweep in one process, a test worker) would otherwise leave
        its groups behind (up to 8), each with three gloo threads and its sockets (the 4-rank
        test pool reached ~800 threads per process). Destroying them instead is not safe:
        DTensor's sharding caches compare meshes by layout and hand a later, equal mesh the old
        one."""
        if self.world_size == 1 or not dist.is_initialized():
            return None
        world, sizes = dist.group.WORLD, self.sizes()
        for key in [k for k in _MESHES if k[0] is not world]:
            _FLAT.pop(id(_MESHES.pop(key)), None)  # made under a since destroyed default group
        key = (world, device_type, sizes)
        if key not in _MESHES:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device_type, sizes, mesh_dim_names=AXES)
            _FLAT[id(mesh)] = {name: mesh[axes]._flatten(name) for name, axes in FLATTENED.items()}
            _MESHES[key] = mesh
        return _MESHES[key]


FLATTENED = {"dp": ("dp_replicate", "dp_shard"), "dp_shard_cp": ("dp_shard", "cp"),
             "dp_cp": ("dp_replicate", "dp_shard", "cp")}
_MESHES: dict[tuple, object] = {}  # (default group, device type, sizes) -> DeviceMesh
_FLAT: dict[int, dict[str, object]] = {}  # id(mesh in _MESHES) -> its flattened 1-D meshes


def submesh(mesh, *names: str):
    """The sub-mesh over `names` (axes of `AXES` or flattened views of `FLATTENED`, in rank-layout
    order) of a mesh from `build_mesh`; several names give a multi-dimensional mesh that shares
    the existing process groups (e.g. HSDP's `("dp_replicate", "dp_shard_cp")`)."""
    flat = _FLAT.get(id(mesh), {})
    for name in names:
        if name not in AXES and name not in flat:
            raise KeyError(f"unknown mesh axis {name!r}; axes: {AXES}, flattened: "
                           f"{tuple(FLATTENED)} (flattened views need a mesh from build_mesh)")
    parts = [flat[n] if n in flat else mesh[n] for n in names]
    if len(parts) == 1:
        return parts[0]
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh._concatenate(parts)


def axis_group(mesh, name: str):
    """Process group of one (possibly flattened) mesh axis, None without a mesh."""
    return None if mesh is None else submesh(mesh, name).get_group()


def axis_rank(mesh, name: str) -> int:
    return 0 if mesh is None else submesh(mesh, name).get_local_rank()


def axis_size(mesh, name: str) -> int:
    return 1 if mesh is None else submesh(mesh, name).size()
