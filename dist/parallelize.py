"""Apply parallelism to a model, in one place and one order:

    tensor parallel → context parallel → activation checkpointing → pipeline split → FSDP / ZeRO / DDP

- Tensor parallel shards the `nn.Linear`s of each block (see `dist/tensor_parallel.py`).
- Context parallel needs no weight changes: the model's `ParallelContext` (built by
  `parallel_context()`) routes attention through `context_parallel_attention` on the `cp` axis,
  and the data path shards tokens, labels and positions by the same layout.
- Activation checkpointing is a model setting (`model.activation_checkpointing`), applied by each
  block, so it already sits inside any wrapper applied below.
- Pipeline splitting happens in `dist/pipeline.py` (stages are built from this same model).
- Data parallel: FSDP2 `fully_shard` over `dp_shard × cp` (HSDP when `dp_replicate > 1`), or
  DDP over `dp × cp`. Context-parallel ranks hold the same weights on different tokens, so their
  gradients are reduced together with the data-parallel ones.

Loss scaling contract: the training loop divides the summed token loss by the *global* number of
labelled tokens and multiplies by the size of the gradient-averaging group, so the averaged
gradient is exactly the gradient of the token-weighted mean loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ctxscale.dist.context import ParallelContext
from ctxscale.dist.mesh import ParallelDims, axis_group, axis_rank


def parallel_context(dims: ParallelDims, mesh, par_cfg) -> ParallelContext:
    if dims.cp == 1:
        return ParallelContext()
    return ParallelContext(
        cp_group=axis_group(mesh, "cp"), cp_size=dims.cp, cp_rank=axis_rank(mesh, "cp"),
        cp_method=par_cfg.cp_method, cp_layout=par_cfg.cp_layout,
        ulysses_degree=par_cfg.ulysses_degree,
    )


def grad_reduce_size(dims: ParallelDims) -> int:
    """Number of ranks over which gradients are averaged (dp × cp)."""
    return dims.dp * dims.cp


def apply_data_parallel(model: torch.nn.Module, dims: ParallelDims, mesh, engine: str):
    if grad_reduce_size(dims) == 1 or mesh is None:
        return model
    if engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
        blocks = getattr(model, "layers", None)
        if blocks is not None:
            for block in blocks.values():
                fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        return model
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, process_group=axis_group(mesh, "dp_cp"))
    raise ValueError(
        f"parallel.dp_engine={engine!r} is not handled by apply_data_parallel; deepspeed runs "
        "through launch/deepspeed_engine.py"
    )


def parallelize(model: torch.nn.Module, dims: ParallelDims, mesh, par_cfg) -> torch.nn.Module:
    """Apply every parallelism to `model` in the documented order and return the wrapped model."""
    if dims.tp > 1:
        from ctxscale.dist.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"])
    # context parallelism: carried by model.parallel (set at construction), nothing to wrap
    # activation checkpointing: per block, from the model config
    return apply_data_parallel(model, dims, mesh, par_cfg.dp_engine)


def all_reduce_scalar(value: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.is_initialized():
        dist.all_reduce(value, group=group)
    return value
