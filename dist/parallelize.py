"""Apply parallelism to a model, in one place and one order:

    tensor parallel → context parallel → activation checkpointing → pipeline split → compile
    → FSDP / ZeRO / DDP

- Tensor parallel shards the `nn.Linear`s of each block (see `dist/tensor_parallel.py`).
- Context parallel needs no weight changes: the model's `ParallelContext` (built by
  `parallel_context()`) routes attention through `context_parallel_attention` on the `cp` axis,
  and the data path shards tokens, labels and positions by the same layout.
- Activation checkpointing is a model setting (`model.activation_checkpointing`), applied by each
  block, so it already sits inside any wrapper applied below.
- Pipeline splitting happens in `dist/pipeline.py` (stages are built from this same model).
- `compile_blocks`: `torch.compile` each block in place (`train.compile`), inside FSDP's
  per-block wrapping so the all-gathers stay outside the compiled graphs.
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
from ctxscale.dist.mesh import ParallelDims, axis_group, axis_rank, submesh


def parallel_context(dims: ParallelDims, mesh, par_cfg) -> ParallelContext:
    if dims.cp == 1:
        return ParallelContext()
    return ParallelContext(
        cp_group=axis_group(mesh, "cp"), cp_size=dims.cp, cp_rank=axis_rank(mesh, "cp"),
        cp_method=par_cfg.cp_method, cp_layout=par_cfg.cp_layout,
        ulysses_degree=par_cfg.ulysses_degree, cp_state_method=par_cfg.cp_state_method,
    )


def grad_reduce_size(dims: ParallelDims) -> int:
    """Number of ranks over which gradients are averaged (dp × cp)."""
    return dims.dp * dims.cp


def _blocks(model: torch.nn.Module):
    """The `layers` ModuleDict of a model or of a pipeline stage wrapper (`.model.layers`)."""
    blocks = getattr(model, "layers", None)
    if blocks is None and hasattr(model, "model"):
        blocks = getattr(model.model, "layers", None)
    return blocks


def check_layout(dims: ParallelDims, par_cfg) -> None:
    """Reject engine/layout combinations this build does not run, naming the alternative."""
    if par_cfg.dp_engine == "deepspeed" and (dims.tp > 1 or dims.pp > 1):
        raise ValueError(
            "parallel.dp_engine=deepspeed runs ZeRO data parallelism (x cp) only; for tp or pp "
            "use parallel.dp_engine=fsdp (FSDP2 composes with both)"
        )
    if par_cfg.dp_engine == "ddp" and (dims.tp > 1 or dims.pp > 1) and dims.dp * dims.cp > 1:
        raise ValueError(
            "parallel.dp_engine=ddp does not compose with tp/pp here (DDP cannot reduce DTensor "
            "or pipeline-stage gradients); use parallel.dp_engine=fsdp"
        )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fsdp_dtypes(par_cfg, *, train_dtype: str, device_type: str) -> tuple[torch.dtype, torch.dtype]:
    """(param_dtype, reduce_dtype) of FSDP2's MixedPrecisionPolicy (ParallelConfig)."""
    param = par_cfg.fsdp_param_dtype
    if param == "auto":
        param = "bfloat16" if train_dtype == "bfloat16" and device_type == "cuda" else "float32"
    return _DTYPES[param], _DTYPES[par_cfg.fsdp_reduce_dtype]


def apply_data_parallel(model: torch.nn.Module, dims: ParallelDims, mesh, engine: str, *,
                        mixed_precision: tuple[torch.dtype, torch.dtype] | None = None):
    """FSDP2 per block and at the root (with `mixed_precision` = (param_dtype, reduce_dtype)),
    or DDP; nothing with one data-parallel rank."""
    if grad_reduce_size(dims) == 1 or mesh is None:
        return model
    if engine == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        axes = ("dp_replicate", "dp_shard_cp") if dims.dp_replicate > 1 else ("dp_shard_cp",)
        dp_mesh = submesh(mesh, *axes)
        param_dtype, reduce_dtype = mixed_precision or (torch.float32, torch.float32)
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        blocks = _blocks(model)
        if blocks is not None:
            for block in blocks.values():
                fully_shard(block, mesh=dp_mesh, mp_policy=policy)
        fully_shard(model, mesh=dp_mesh, mp_policy=policy)
        return model
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, process_group=axis_group(mesh, "dp_cp"))
    raise ValueError(
        f"parallel.dp_engine={engine!r} is not handled by apply_data_parallel; deepspeed runs "
        "through launch/deepspeed_engine.py"
    )


def parallelize(model: torch.nn.Module, dims: ParallelDims, mesh, par_cfg, *,
                compile_blocks: bool = False, mixed_precision=None) -> torch.nn.Module:
    """Apply every parallelism but the pipeline split to `model` in the documented order and
    return the wrapped model (with pp > 1 use `parallelize_pipeline`). `mixed_precision`:
    FSDP's (param_dtype, reduce_dtype), from `fsdp_dtypes`."""
    check_layout(dims, par_cfg)
    if dims.tp > 1:
        from ctxscale.dist.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model.model if hasattr(model, "model") else model, mesh["tp"])
    if compile_blocks:
        compile_each_block(model)
    # context parallelism: carried by model.parallel (set at construction), nothing to wrap
    # activation checkpointing: per block, from the model config
    if par_cfg.dp_engine == "deepspeed":
        return model  # launch/deepspeed_engine.py wraps it with the optimizer
    return apply_data_parallel(model, dims, mesh, par_cfg.dp_engine,
                               mixed_precision=mixed_precision)


def compile_each_block(model: torch.nn.Module) -> int:
    """`torch.compile` every block of `model` in place; returns how many. Equal blocks share
    one compiled graph (their parameters are graph inputs, not constants)."""
    blocks = _blocks(model)
    if blocks is None:
        raise ValueError(f"train.compile: {type(model).__name__} has no `layers` of blocks to "
                         "compile; set train.compile=false")
    for block in blocks.values():
        block.compile()
    from ctxscale.kernels.dispatch import log_choice

    # the norms inside the blocks take the PyTorch reference there, for Inductor to fuse
    log_choice("rms_norm_in_blocks", "torch (compiled)")
    return len(blocks)


def parallelize_pipeline(model: torch.nn.Module, dims: ParallelDims, mesh, par_cfg, device, *,
                         compile_blocks: bool = False, mixed_precision=None):
    """Split `model` into this rank's pipeline stages, apply tp / cp / FSDP to each stage
    (same order as `parallelize`), and return the `PipelineRunner`."""
    from ctxscale.dist.pipeline import PipelineRunner

    check_layout(dims, par_cfg)
    return PipelineRunner(
        model, pp_mesh=mesh["pp"], schedule=par_cfg.pp_schedule,
        microbatches=par_cfg.pp_microbatches, virtual_stages=par_cfg.pp_virtual_stages,
        device=device,
        wrap=lambda stage: parallelize(stage, dims, mesh, par_cfg, compile_blocks=compile_blocks,
                                       mixed_precision=mixed_precision),
    )


def clip_grad_norm(parameters, max_norm: float, *, pp_group=None) -> torch.Tensor:
    """Global gradient norm over every rank's parameters (DTensor shards of FSDP/TP included,
    summed over pipeline stages), clipped to `max_norm` when it is > 0. Returns the norm."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if grads:
        norm = torch.nn.utils.get_total_norm(grads, foreach=False)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
    else:
        norm = torch.zeros(())
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        sq = norm.detach().float() ** 2
        dist.all_reduce(sq, group=pp_group)
        norm = sq.sqrt()
    if max_norm > 0 and params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=False)
    return norm


def all_reduce_scalar(value: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.is_initialized():
        dist.all_reduce(value, group=group)
    return value
