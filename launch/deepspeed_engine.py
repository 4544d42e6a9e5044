"""DeepSpeed ZeRO data parallelism (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models") behind `parallel.dp_engine: deepspeed`.

ZeRO-1 partitions the optimizer state over the data-parallel ranks, ZeRO-2 also the gradients
(reduce-scatter instead of all-reduce), ZeRO-3 also the parameters (gathered per module for
forward and backward). The rest of the job config is unchanged: the same model, the same AdamW
(built by `launch/optim.py` and handed to DeepSpeed as a client optimizer), the same learning
rate schedule (stepped by the train loop on that optimizer's param groups) and the same loss
scaling contract as FSDP: the loop backpropagates `summed_loss * world / global_tokens`,
DeepSpeed averages gradients over its ranks, so the result is the gradient of the exact
token-weighted mean. DeepSpeed's own 1/grad_accum loss scaling is disabled for that reason.

On CPU DeepSpeed runs on the gloo process group that is already initialized
(`DS_ACCELERATOR=cpu`). The data-parallel group is the whole world (dp × cp ranks).
"""

from __future__ import annotations

import os
import warnings

import torch


class DeepSpeedEngine:
    """Thin adapter: `backward(loss)`, `step() -> grad_norm`, `module`, checkpoint save/load."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 zero_stage: int, micro_batch_size: int, grad_accum: int, max_grad_norm: float):
        if zero_stage not in (1, 2, 3):
            raise ValueError(f"parallel.zero_stage must be 1, 2 or 3, got {zero_stage}")
        device = next(model.parameters()).device
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if device.type == "cpu" and os.environ.get("CTXSCALE_DEEPSPEED_SHM") != "1":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce on first use
            # (minutes on a small machine, a file lock that a killed job leaves behind) and then
            # bypasses the process groups; keep every collective on gloo instead.
            import importlib

            # (by module name: the attribute deepspeed.comm.torch is the torch package)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        # DeepSpeed binds the single-tensor collectives by their pre-2.13 names, which PyTorch
        # 2.13 deprecated: one FutureWarning per rank per job that says nothing about the run
        # (ctxscale's own calls, dist/comm.py, use the new names)
        warnings.filterwarnings(
            "ignore", category=FutureWarning,
            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
        self.grad_accum = grad_accum
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": float(max_grad_norm),
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False,
        )
        self.module = self.engine.module
        self.zero_stage = zero_stage

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Optimizer step at the accumulation boundary (every `grad_accum` backward calls);
        returns the global gradient norm before clipping."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, folder: str) -> None:
        self.engine.save_checkpoint(folder, tag="deepspeed", save_latest=False)

    def load_checkpoint(self, folder: str) -> None:
        path, _ = self.engine.load_checkpoint(folder, tag="deepspeed",
                                              load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(
                f"{folder} holds no DeepSpeed state (was it saved with dp_engine=deepspeed?); "
                "resume with the engine it was saved with, or set checkpoint.resume=none"
            )


__all__ = ["DeepSpeedEngine"]
