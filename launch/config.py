"""The job config: every section a training run reads, with each field documented here.

    ctxscale train --config configs/tiny.yaml train.steps=20 parallel.cp=2 --print-config
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ctxscale.dist.layout import required_multiple
from ctxscale.dist.tensor_parallel import check_tensor_parallel_config
from ctxscale.kernels.dispatch import OP_PATHS, check_op_path
from ctxscale.launch.config_loader import ConfigError, dump, load
from ctxscale.launch.data import DataConfig
from ctxscale.models.config import ModelConfig

CP_METHODS = ("rsa", "ring", "lightseq", "ulysses", "usp")


@dataclass
class ParallelConfig:
    # Data parallel: replicas (plain all-reduce) and sharded ranks (FSDP2 / ZeRO).
    # -1 for dp_shard means "whatever is left of the world size".
    dp_replicate: int = 1
    dp_shard: int = -1
    # Tensor parallel degree (Megatron-style column/row sharding, sequence parallel norms).
    tp: int = 1
    # Pipeline stages, the schedule, micro-batches per step and virtual stages per rank.
    pp: int = 1
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    pp_microbatches: int = 2
    pp_virtual_stages: int = 1
    # Context parallel degree: the sequence is sharded over `cp` ranks.
    cp: int = 1
    # Context-parallel attention method and sequence layout (see ctxscale.dist).
    cp_method: Literal["rsa", "ring", "lightseq", "ulysses", "usp"] = "ring"
    cp_layout: Literal["contiguous", "zigzag", "stripe"] = "contiguous"
    # For usp: ranks of the Ulysses (all-to-all) dimension; the rest form rings.
    ulysses_degree: int | None = None
    # How recurrent layers (Mamba, linear attention, hybrids) pass their states between cp
    # shards: one all-gather of every shard's (state, decay) (one step, cp x state bytes per
    # rank), or a ring of cp - 1 sends (one state per step, latency cp - 1 hops).
    cp_state_method: Literal["allgather", "ring"] = "allgather"
    # Data-parallel engine: FSDP2 (fully_shard), DDP-style replication, or DeepSpeed ZeRO.
    dp_engine: Literal["fsdp", "ddp", "deepspeed"] = "fsdp"
    # FSDP2 mixed precision (torchtitan's mixed_precision_param / _reduce): the dtype the
    # sharded float32 parameters are all-gathered and computed in, and the dtype gradients are
    # reduce-scattered in. "auto": bfloat16 where train.dtype=bfloat16 runs on CUDA (half the
    # all-gather bytes, matmuls in bf16 without autocast's casts), else float32. The optimizer
    # always updates the float32 shards.
    # With train.grad_accum > 1: FSDP reduce-scatters every micro-batch's gradients (true: the
    # least memory) or keeps unsharded gradients until the last micro-batch and reduces once
    # (false: 1/grad_accum of the gradient traffic for a full unsharded gradient held per
    # rank). DDP always reduces once, at the last micro-batch (no_sync before it).
    fsdp_reduce_every_microbatch: bool = True
    fsdp_param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    fsdp_reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    # ZeRO stage when dp_engine is deepspeed.
    zero_stage: int = 2

    def validate(self) -> None:
        for name in ("dp_replicate", "tp", "pp", "cp", "pp_microbatches", "pp_virtual_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"parallel.dp_shard must be >= 1 or -1 (auto), got {self.dp_shard}")
        if self.cp_method == "lightseq" and self.cp_layout != "contiguous":
            raise ValueError(
                "parallel.cp_method=lightseq works on the contiguous layout only; set "
                "parallel.cp_layout=contiguous"
            )
        if self.cp_method == "usp":
            if self.ulysses_degree is None or self.cp % self.ulysses_degree:
                raise ValueError(
                    f"parallel.cp_method=usp needs parallel.ulysses_degree dividing "
                    f"parallel.cp={self.cp}; got {self.ulysses_degree}"
                )
        if self.dp_engine != "fsdp" and (self.fsdp_param_dtype == "bfloat16"
                                         or self.fsdp_reduce_dtype == "bfloat16"):
            raise ValueError(
                f"parallel.fsdp_param_dtype / fsdp_reduce_dtype set bfloat16, which FSDP applies, "
                f"but parallel.dp_engine={self.dp_engine}; use dp_engine=fsdp, or leave them "
                "auto / float32 (train.dtype=bfloat16 autocasts on CUDA with any engine)")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"parallel.zero_stage must be 1, 2 or 3, got {self.zero_stage}")

    def check_seq_len(self, seq_len: int) -> None:
        """ValueError unless `seq_len` tokens split over `cp` ranks in `cp_layout`."""
        multiple = required_multiple(self.cp, self.cp_layout)
        if seq_len % multiple:
            raise ValueError(
                f"data.seq_len={seq_len} cannot be split over parallel.cp={self.cp} "
                f"ranks with layout {self.cp_layout!r}: it must be a multiple of {multiple}"
            )


@dataclass
class OptimConfig:
    # AdamW peak learning rate, betas, epsilon and decoupled weight decay.
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Linear warmup steps, then `schedule` down to lr * min_lr_ratio at the last step; wsd
    # (warmup-stable-decay) holds the peak and decays linearly over the last decay_fraction
    # of the steps after warmup.
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    # Clip the global gradient norm to this (0 disables clipping).
    max_grad_norm: float = 1.0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction={self.decay_fraction} must be in (0, 1] "
                             "(the share of the steps after warmup that wsd decays over)")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.max_grad_norm < 0:
            raise ValueError(
                "optim.warmup_steps must be >= 0, optim.min_lr_ratio in [0, 1] and "
                "optim.max_grad_norm >= 0"
            )


@dataclass
class TrainConfig:
    # Optimizer steps to run.
    steps: int = 100
    # Sequences per data-parallel rank per micro-batch, and micro-batches per optimizer step.
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    # Where metrics.jsonl, TensorBoard events and checkpoints go.
    output_dir: str = "runs/default"
    # Mixed precision: bfloat16 autocast applies on CUDA only; CPU runs stay float32.
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Log every N steps; evaluate every N steps on `eval_batches` fixed validation batches
    # (0 disables periodic evaluation; a final evaluation always runs).
    log_every: int = 1
    eval_every: int = 50
    eval_batches: int = 4
    # Show a progress bar on the logging rank.
    progress: bool = True
    # Write TensorBoard events next to metrics.jsonl.
    tensorboard: bool = True
    # Log the same records to Weights & Biases (`pip install ctxscale[wandb]`; WANDB_MODE=
    # offline works without a network). A resumed run continues the same W&B run (its id is
    # kept in <output_dir>/wandb_run_id). Name: wandb_run_name, else the output folder's name.
    wandb: bool = False
    wandb_project: str = "ctxscale"
    wandb_run_name: str | None = None
    # Fail fast instead of continuing when the loss becomes NaN/inf.
    stop_on_nan: bool = True
    # torch.compile every block (before FSDP's per-block wrap, as torchtitan): the norms, RoPE
    # and MLP fuse; the kernels and context-parallel exchanges stay eager (graph breaks). The
    # first step pays the compile (one per distinct block kind, shared by equal blocks). Runs
    # with dp, cp, pp, tp and ZeRO (not Titans mac with tp > 1).
    compile: bool = False

    def validate(self) -> None:
        if self.wandb:
            import importlib.util
            import sys

            if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
                raise ValueError("train.wandb=true needs the wandb package: pip install wandb "
                                 "(or ctxscale[wandb]), or set train.wandb=false")
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.eval_batches < 0:
            raise ValueError("train.eval_every and train.eval_batches must be >= 0")


@dataclass
class CheckpointConfig:
    # Save every N steps (0: only at the end if `at_end`).
    every: int = 0
    at_end: bool = True
    # Keep the newest K complete checkpoints (older ones are deleted after a successful save).
    keep_last: int = 2
    # Resume: "auto" = from the newest complete checkpoint in the folder if any, "none", or a
    # path to a checkpoint folder.
    resume: str = "auto"
    # Folder (default: <train.output_dir>/checkpoints).
    folder: str | None = None
    # Start from another model's weights only (step 0, fresh optimizer, schedule and data):
    # a checkpoint folder (step_*) or run folder, a Hugging Face folder or a .safetensors file,
    # resharded to this run's layout (launch/initial_weights.py). Ignored once this run has a
    # checkpoint of its own to resume from.
    init_from: str | None = None
    # Write checkpoints in a background thread (torch.distributed.checkpoint.async_save).
    async_save: bool = False

    def validate(self) -> None:
        if self.every < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")


@dataclass
class KernelConfig:
    # Kernel family: auto (Triton on CUDA, PyTorch on CPU), torch, or triton.
    mode: Literal["auto", "torch", "triton"] = "auto"
    # Force one path of one op (null: the family rule). The paths of each op are listed in
    # ctxscale.kernels.dispatch.OP_PATHS; these win over CTXSCALE_KERNELS_<OP>.
    # attention: reference | blockwise | sdpa | flash_attn | triton | torch
    attention: str | None = None
    # linear_attention: recurrent | chunked | triton | torch
    linear_attention: str | None = None
    # selective_scan: reference | chunked | triton | mamba_ssm | torch
    selective_scan: str | None = None
    # conv1d: reference | torch | causal_conv1d
    conv1d: str | None = None
    # rms_norm, cross_entropy: torch | triton
    rms_norm: str | None = None
    cross_entropy: str | None = None

    def per_op(self) -> dict[str, str | None]:
        """The per-op paths, keyword arguments of `set_kernel_mode`."""
        return {op: getattr(self, op) for op in OP_PATHS}

    def validate(self) -> None:
        for op, path in self.per_op().items():
            if path is not None:
                check_op_path(op, path, f"kernels.{op}")


@dataclass
class ProfileConfig:
    # torch.profiler trace of a window of training steps, on every rank (launch/profiling.py):
    # <folder>/rank<r>_steps<a>-<b>.json (Chrome trace, open in Perfetto or chrome://tracing)
    # and rank<r>_ops.txt (the operators by self time).
    enabled: bool = False
    # First profiled step (1-based global step; the default leaves two steps of warm-up:
    # allocator, compile, autotuning) and how many steps the window holds.
    start_step: int = 3
    steps: int = 2
    # Record input shapes / Python stacks of the operators (bigger traces).
    record_shapes: bool = False
    with_stack: bool = False
    # Allocations in the trace; on CUDA also a snapshot of the window's allocator history,
    # rank<r>_memory.pickle (open at https://pytorch.org/memory_viz).
    memory: bool = False
    # Folder of the traces (default: <train.output_dir>/profile).
    folder: str | None = None

    def validate(self) -> None:
        if self.start_step < 1 or self.steps < 1:
            raise ValueError(f"profile.start_step={self.start_step} and profile.steps="
                             f"{self.steps} must both be >= 1 (steps count from 1)")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.parallel.validate()
        self.train.validate()
        self.optim.validate()
        self.checkpoint.validate()
        self.kernels.validate()
        self.profile.validate()
        if self.profile.enabled and self.profile.start_step > self.train.steps:
            raise ValueError(
                f"profile.start_step={self.profile.start_step} is past train.steps="
                f"{self.train.steps}: nothing would be profiled; lower profile.start_step")
        par, model = self.parallel, self.model
        par.check_seq_len(self.data.seq_len)
        if self.data.seq_len > model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={model.max_seq_len}"
            )
        if par.tp > 1 and (self.data.seq_len // par.cp) % par.tp:
            raise ValueError(
                f"sequence parallelism splits each rank's {self.data.seq_len // par.cp} tokens "
                f"(data.seq_len / parallel.cp) over parallel.tp={par.tp} ranks: make data.seq_len "
                f"a multiple of cp x tp = {par.cp * par.tp}"
            )
        if par.pp > 1 and self.train.batch_size % par.pp_microbatches:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} must be divisible by "
                f"parallel.pp_microbatches={par.pp_microbatches} (the pipeline splits each "
                "batch into micro-batches)"
            )
        if par.pp_virtual_stages > 1 and par.pp_schedule != "interleaved_1f1b":
            raise ValueError(
                f"parallel.pp_virtual_stages={par.pp_virtual_stages} needs "
                "parallel.pp_schedule=interleaved_1f1b"
            )
        if par.pp > 1 and par.pp_schedule == "interleaved_1f1b" and par.pp_microbatches % par.pp:
            raise ValueError(
                f"interleaved 1F1B needs parallel.pp_microbatches={par.pp_microbatches} to be a "
                f"multiple of parallel.pp={par.pp}"
            )
        if par.dp_engine == "deepspeed" and (par.tp > 1 or par.pp > 1):
            raise ValueError(
                "parallel.dp_engine=deepspeed runs ZeRO data parallelism (x cp) only; for tp or "
                "pp use parallel.dp_engine=fsdp"
            )
        if (self.train.compile and par.tp > 1 and model.family == "titans"
                and model.titans.variant == "mac"):
            raise ValueError(
                "train.compile=true does not run Titans mac with parallel.tp > 1 (Inductor fails "
                "on the block's replicated DTensor outputs); set train.compile=false, "
                "parallel.tp=1, or model.titans.variant=mag / mal (they compile under tp)"
            )
        if par.pp > 1 and model.tie_embeddings:
            raise ValueError(
                "model.tie_embeddings=true cannot be pipelined (embedding and head live on "
                "different stages); set model.tie_embeddings=false or parallel.pp=1"
            )
        check_tensor_parallel_config(model, par.tp)
        if par.pp > 1 and model.num_layers < par.pp * par.pp_virtual_stages:
            raise ValueError(
                f"model.num_layers={model.num_layers} is fewer than the "
                f"{par.pp * par.pp_virtual_stages} pipeline stages (pp x pp_virtual_stages); use "
                "fewer stages or more layers"
            )

    def world_size_needed(self, dp_shard: int | None = None) -> int:
        par = self.parallel
        shard = par.dp_shard if dp_shard is None else dp_shard
        return par.dp_replicate * max(shard, 1) * par.tp * par.pp * par.cp


def load_job_config(path=None, overrides=None) -> JobConfig:
    return load(JobConfig, path, overrides)


__all__ = ["ConfigError", "JobConfig", "dump", "load_job_config"]
