"""`ctxscale train` / `python -m ctxscale.launch.train`: config -> mesh -> model -> train loop.

One optimizer step, end to end:
1. every data-parallel rank draws `grad_accum` micro-batches (context-parallel ranks of the same
   data-parallel rank draw the same ones);
2. the global number of labelled tokens in the step is all-reduced first, so each rank's summed
   loss can be divided by it: the loss is the exact token-weighted mean over all ranks, whatever
   the layout;
3. each micro-batch is sharded along the sequence for context parallelism (tokens, labels and
   global positions by the same layout) and run forward/backward;
4. gradients are reduced by FSDP / DDP over dp × cp, clipped, and AdamW steps; the scheduler
   follows;
5. rank 0 logs `metrics.jsonl` / TensorBoard / the progress bar; periodic evaluation and
   checkpoints follow.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ctxscale.dist.layout import shard_sequence
from ctxscale.dist.mesh import ParallelDims, axis_group, axis_rank, axis_size
from ctxscale.dist.parallelize import (
    clip_grad_norm,
    fsdp_dtypes,
    grad_reduce_size,
    parallel_context,
    parallelize,
    parallelize_pipeline,
)
from ctxscale.kernels.dispatch import chosen_paths, set_kernel_mode
from ctxscale.launch.checkpoint import Checkpointer, latest_checkpoint
from ctxscale.launch.config import ConfigError, JobConfig, dump, load_job_config
from ctxscale.launch.config_loader import run_config_command, to_dict
from ctxscale.launch.data import build_data, token_accuracy
from ctxscale.launch.data.cache import run_cache_dir
from ctxscale.launch.env import detect_env, init_distributed, pick_device
from ctxscale.launch.metrics import (
    MetricsLogger,
    device_peak_flops,
    peak_memory_bytes,
    throughput,
)
from ctxscale.launch.optim import build_optimizer, build_scheduler
from ctxscale.launch.profiling import StepProfiler
from ctxscale.models import build_model

logger = logging.getLogger("ctxscale.train")


class NonFiniteLoss(RuntimeError):
    pass


class TrainState:
    """Everything the loop needs, built once from the config."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.env = detect_env()
        self.device = pick_device(cfg.train.device, self.env)
        init_distributed(self.env, self.device.type)
        self.rank = self.env.rank
        self.dims = ParallelDims.from_config(cfg.parallel, self.env.world_size)
        self.mesh = self.dims.build_mesh(self.device.type)
        self.dp_rank, self.dp_size = axis_rank(self.mesh, "dp"), axis_size(self.mesh, "dp")
        self.dp_cp_group = axis_group(self.mesh, "dp_cp")
        set_kernel_mode(cfg.kernels.mode, **cfg.kernels.per_op())
        torch.manual_seed(cfg.train.seed)
        out = Path(cfg.train.output_dir)
        self.output_dir = out
        cache = str(run_cache_dir(out, cfg.data.cache_dir))
        self.data = build_data(cfg.data, batch_size=cfg.train.batch_size, dp_rank=self.dp_rank,
                               dp_size=self.dp_size, seed=cfg.train.seed, split="train",
                               cache_dir=cache)
        self.val_data = build_data(cfg.data, batch_size=cfg.train.batch_size,
                                   dp_rank=self.dp_rank, dp_size=self.dp_size,
                                   seed=cfg.train.seed, split="val", cache_dir=cache)
        # no validation split (data.val_fraction=0) or no batches asked for: no evaluation
        self.can_eval = cfg.train.eval_batches > 0 and self.val_data.has_validation
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = self.data.vocab_size
        elif cfg.model.vocab_size < self.data.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
                f"({self.data.vocab_size}); set model.vocab_size=0 to take it from the data"
            )
        self.parallel = parallel_context(self.dims, self.mesh, cfg.parallel)
        self.tp_rank = axis_rank(self.mesh, "tp")
        self.pp_group = axis_group(self.mesh, "pp") if self.dims.pp > 1 else None
        model = build_model(cfg.model, self.parallel).to(self.device)
        # of the whole model, before tp shards it or pp splits it
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        self.peak_flops = device_peak_flops(self.device, cfg.train.dtype)
        self.pipeline = self.engine = None
        par = cfg.parallel
        if grad_reduce_size(self.dims) == 1 and "bfloat16" in (par.fsdp_param_dtype,
                                                               par.fsdp_reduce_dtype):
            raise ConfigError(
                "parallel.fsdp_param_dtype / fsdp_reduce_dtype=bfloat16 need FSDP, which this job "
                "does not apply (one data-parallel rank: dp x cp = 1); leave them auto / float32 "
                "(train.dtype=bfloat16 autocasts on CUDA)")
        wrap = dict(compile_blocks=cfg.train.compile,
                    mixed_precision=fsdp_dtypes(cfg.parallel, train_dtype=cfg.train.dtype,
                                                device_type=self.device.type))
        if self.dims.pp > 1:
            self.pipeline = parallelize_pipeline(model, self.dims, self.mesh, cfg.parallel,
                                                 self.device, **wrap)
            self.pipeline.check_batch(cfg.train.batch_size)
            self.model = self.raw_model = self.pipeline.view
        else:
            self.raw_model = model
            self.model = parallelize(model, self.dims, self.mesh, cfg.parallel, **wrap)
        ckpt_dir = cfg.checkpoint.folder or str(out / "checkpoints")
        resume = cfg.checkpoint.resume
        path = latest_checkpoint(ckpt_dir) if resume == "auto" else (
            None if resume == "none" else Path(resume))
        self.initialized_from = None
        if path is None and cfg.checkpoint.init_from:
            from ctxscale.launch.initial_weights import load_initial_weights

            self.initialized_from = load_initial_weights(self.model, cfg.checkpoint.init_from,
                                                         partial=self.pipeline is not None)
        # the rank that reports each (dp, cp) shard's loss: last pipeline stage, tp rank 0
        self.is_loss_rank = self.tp_rank == 0 and (self.pipeline is None or self.pipeline.is_last)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        if cfg.parallel.dp_engine == "deepspeed":
            from ctxscale.launch.deepspeed_engine import DeepSpeedEngine

            self.engine = DeepSpeedEngine(self.model, self.optimizer, zero_stage=cfg.parallel.zero_stage,
                                          micro_batch_size=cfg.train.batch_size,
                                          grad_accum=cfg.train.grad_accum,
                                          max_grad_norm=cfg.optim.max_grad_norm)
        self.checkpointer = Checkpointer(ckpt_dir, keep_last=cfg.checkpoint.keep_last,
                                         async_save=cfg.checkpoint.async_save)
        self.step = 0
        self.resumed_from = None
        if path is not None:
            meta = self.checkpointer.load(path, self.model, self.optimizer, self.scheduler,
                                          engine=self.engine)
            self.step = meta["step"]
            self.data.load_state_dict(meta["data"])
            self.resumed_from = str(path)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda" and cfg.train.dtype == "bfloat16"
            else contextlib.nullcontext()
        )

    # --------------------------------------------------------------- helpers
    def shard(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """This rank's (input_ids, labels, position_ids) for context parallelism, and the model
        keyword arguments of the batch: {"document_ids": the GLOBAL ids} with document masking
        (every cp rank keeps the whole sequence's ids: its attention needs the keys' too)."""
        ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        b, s = ids.shape
        pos = batch.get("position_ids")
        if pos is None:
            pos = torch.arange(s, device=self.device).unsqueeze(0).expand(b, s)
        pos = pos.to(self.device)
        if self.dims.cp > 1:
            group, layout = self.parallel.cp_group, self.parallel.cp_layout
            ids, labels, pos = (shard_sequence(t, group=group, layout=layout) for t in (ids, labels, pos))
        extra = {}
        if "document_ids" in batch:
            extra["document_ids"] = batch["document_ids"].to(self.device)
        return ids, labels, pos, extra

    def global_sum(self, value: torch.Tensor, group=None) -> torch.Tensor:
        if dist.is_initialized():
            dist.all_reduce(value, group=group)
        return value

    def reported_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the whole job of what each (dp, cp) shard's loss rank holds (tp ranks
        hold copies, non-last pipeline stages hold nothing)."""
        if not self.is_loss_rank:
            value = torch.zeros_like(value)
        return self.global_sum(value)

    def forward_backward(self, ids, labels, pos, extra: dict, scale: float) -> torch.Tensor:
        """Summed token loss of one micro-batch on this rank (0 where no loss is computed);
        gradients of `loss * scale` accumulate into the parameters."""
        if self.pipeline is not None:
            loss = self.pipeline.step(ids, labels, pos, scale=scale, extra=extra)
            return torch.zeros((), device=self.device) if loss is None else loss
        with self.autocast:
            model = self.engine.module if self.engine is not None else self.model
            loss = model(ids, labels=labels, position_ids=pos, loss_reduction="sum", **extra)
        if self.engine is not None:
            self.engine.backward(loss * scale)
        else:
            (loss * scale).backward()
        return loss.detach().float()

    @contextlib.contextmanager
    def gradient_sync(self, *, last: bool):
        """Around one micro-batch's backward: DDP reduces only at the last micro-batch, and so
        does FSDP with parallel.fsdp_reduce_every_microbatch=false (pipelines and DeepSpeed
        handle their own micro-batches)."""
        model = self.model
        if last or self.pipeline is not None or self.engine is not None:
            yield
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            with model.no_sync():
                yield
        elif (hasattr(model, "set_requires_gradient_sync")
              and not self.cfg.parallel.fsdp_reduce_every_microbatch):
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            yield

    # --------------------------------------------------------------- one step
    def train_step(self) -> dict:
        cfg = self.cfg
        self.model.train()
        batches = [self.data.next_batch() for _ in range(cfg.train.grad_accum)]
        # exact token-weighted mean: count labelled tokens over every dp rank and micro-batch
        # (cp ranks share their dp rank's batches, so count over the dp group only)
        n_local = sum(int((b["labels"] != -100).sum()) for b in batches)
        n_tokens = self.global_sum(torch.tensor(float(n_local)), axis_group(self.mesh, "dp"))
        n_tokens = max(n_tokens.item(), 1.0)
        scale = grad_reduce_size(self.dims) / n_tokens
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            ids, labels, pos, extra = self.shard(batch)
            with self.gradient_sync(last=i == len(batches) - 1):
                loss_sum += self.forward_backward(ids, labels, pos, extra, scale)
        lr = self.scheduler.get_last_lr()[0]
        if self.engine is not None:
            grad_norm = self.engine.step()  # clips (gradient_clipping) and zeroes gradients
        else:
            grad_norm = clip_grad_norm(self.model.parameters(), cfg.optim.max_grad_norm,
                                       pp_group=self.pp_group)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        loss_total = self.reported_sum(loss_sum)
        return {"loss": loss_total.item() / n_tokens, "lr": lr, "grad_norm": float(grad_norm),
                "tokens": sum(b["input_ids"].numel() for b in batches) * self.dp_size}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # loss_sum, tokens, correct, answered
        for batch in self.val_data.eval_batches(self.cfg.train.eval_batches):
            ids, labels, pos, extra = self.shard(batch)
            if self.pipeline is not None:
                totals += self.pipeline.evaluate(ids, labels, pos, eval_stats, extra=extra)
                continue
            model = self.engine.module if self.engine is not None else self.model
            with self.autocast:
                totals += eval_stats(model, ids, pos, labels, **extra)
        totals = self.reported_sum(totals)
        out = {"eval_loss": (totals[0] / totals[1].clamp(min=1)).item()}
        if totals[3] > 0:
            out["eval_accuracy"] = (totals[2] / totals[3]).item()
        return out

    def save(self):
        self.checkpointer.save(self.step, self.model, self.optimizer, self.scheduler,
                               self.data.state_dict(), engine=self.engine)


def eval_stats(model, ids, pos, labels, **extra) -> torch.Tensor:
    """(loss_sum, labelled tokens, correct, answered) of one evaluation batch, float64;
    `extra`: model keyword arguments of the batch (document_ids)."""
    logits = model(ids, labels=labels, position_ids=pos, labelled_logits=True, **extra).float()
    target = labels[labels != -100]
    loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
    correct, total = token_accuracy(logits.unsqueeze(0), target.unsqueeze(0))
    return torch.tensor([loss, target.numel(), correct, total], dtype=torch.float64)


def train(cfg: JobConfig) -> dict:
    """Run the job described by `cfg`; returns the end-of-run summary (on every rank)."""
    st = TrainState(cfg)
    tcfg = cfg.train
    is_logger = st.rank == 0
    wandb = None
    if tcfg.wandb:
        wandb = {"project": tcfg.wandb_project,
                 "name": tcfg.wandb_run_name or st.output_dir.resolve().name,
                 "config": to_dict(cfg)}
    metrics = MetricsLogger(st.output_dir, enabled=is_logger, tensorboard=tcfg.tensorboard,
                            progress_total=tcfg.steps, progress=tcfg.progress, initial=st.step,
                            wandb=wandb)
    if is_logger:
        st.output_dir.mkdir(parents=True, exist_ok=True)
        (st.output_dir / "config.yaml").write_text(dump(cfg))
        n_params = st.raw_model.num_params()
        metrics.write(
            f"ctxscale: {cfg.model.family} {n_params / 1e6:.2f}M params | world {st.env.world_size}"
            f" ({st.env.launcher}) dp={st.dims.dp} cp={st.dims.cp} tp={st.dims.tp} pp={st.dims.pp}"
            f" | {cfg.data.kind} seq_len={cfg.data.seq_len} | device {st.device}"
            + (f" | resumed from {st.resumed_from}" if st.resumed_from else "")
            + (f" | weights from {st.initialized_from}" if st.initialized_from else "")
        )
    profiler = StepProfiler(cfg.profile, output_dir=st.output_dir, rank=st.rank,
                            device=st.device, first_step=st.step + 1, log=metrics.write)
    first_eval = last_eval = None
    losses = []
    t_start = time.perf_counter()
    tokens_seen = 0
    try:
        if tcfg.eval_every and st.can_eval and st.step == 0:
            first_eval = st.evaluate()
            metrics.log({"step": 0, **first_eval})
        while st.step < tcfg.steps:
            t0 = time.perf_counter()
            with profiler.step(st.step + 1):
                out = st.train_step()
            st.step += 1
            dt = time.perf_counter() - t0
            tokens_seen += out["tokens"]
            if not math.isfinite(out["loss"]) and tcfg.stop_on_nan:
                raise NonFiniteLoss(f"loss became {out['loss']} at step {st.step}; lower optim.lr")
            losses.append(out["loss"])
            record = {"step": st.step, "loss": out["loss"], "lr": out["lr"],
                      "grad_norm": out["grad_norm"], "tokens_per_s": out["tokens"] / dt,
                      **throughput(st.flops_per_token, out["tokens"] / dt, st.env.world_size,
                                   st.peak_flops),
                      "step_time_s": dt, "memory_bytes": peak_memory_bytes(st.device)}
            if (tcfg.eval_every and st.can_eval and st.step % tcfg.eval_every == 0
                    and st.step < tcfg.steps):
                last_eval = st.evaluate()
                record.update(last_eval)
                first_eval = first_eval or last_eval
            if st.step % tcfg.log_every == 0 or st.step == tcfg.steps:
                metrics.log(record)
            metrics.progress(1, loss=f"{out['loss']:.4f}")
            if cfg.checkpoint.every and st.step % cfg.checkpoint.every == 0:
                st.save()
        if st.can_eval:
            last_eval = st.evaluate()
            metrics.log({"step": st.step, **last_eval})
        if cfg.checkpoint.at_end and not (cfg.checkpoint.every and st.step % cfg.checkpoint.every == 0):
            st.save()
        st.checkpointer.wait()
    finally:
        profiler.finish()
        metrics.close()
        st.checkpointer.close()
    elapsed = time.perf_counter() - t_start
    summary = {
        "steps": st.step, "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else 0.0,
        **throughput(st.flops_per_token, tokens_seen / elapsed if elapsed > 0 else 0.0,
                     st.env.world_size, st.peak_flops),
        "elapsed_s": elapsed, "peak_memory_bytes": peak_memory_bytes(st.device),
        "kernels": chosen_paths(), **{f"final_{k}": v for k, v in (last_eval or {}).items()},
    }
    if first_eval:
        summary.update({f"initial_{k}": v for k, v in first_eval.items()})
    if is_logger:
        metrics.write(format_summary(summary, st.output_dir))
    return summary


def format_summary(s: dict, output_dir: Path) -> str:
    lines = ["", "=== ctxscale run summary ==="]
    lines.append(f"steps            {s['steps']}  ({s['elapsed_s']:.1f} s, {s['tokens_per_s']:.0f} tokens/s)")
    if "tflops" in s:
        mfu = f", {s['mfu']:.1f}% MFU" if "mfu" in s else ""
        lines.append(f"throughput       {s['tflops']:.3g} TFLOP/s per device{mfu} "
                     "(model FLOPs, whole run)")
    if s.get("first_loss") is not None:
        lines.append(f"train loss       {s['first_loss']:.4f} -> {s['final_loss']:.4f}")
    for name, key, digits in (("eval loss", "eval_loss", 4), ("eval accuracy", "eval_accuracy", 3)):
        if f"final_{key}" not in s:
            continue
        final = f"{s[f'final_{key}']:.{digits}f}"
        first = s.get(f"initial_{key}")  # none without train.eval_every (no step-0 evaluation)
        lines.append(f"{name:<17}{final} (end of run)" if first is None
                     else f"{name:<17}{first:.{digits}f} -> {final}")
    if "final_eval_loss" not in s:
        lines.append("eval             none (data.val_fraction=0 or train.eval_batches=0)")
    lines.append(f"peak memory      {s['peak_memory_bytes'] / 2**20:.0f} MiB")
    lines.append(f"kernels          {s['kernels']}")
    lines.append(f"outputs          {output_dir}/metrics.jsonl, tensorboard/, checkpoints/")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_config_command(argv, prog="ctxscale train",
                              description="Train a model from a YAML config.",
                              load_config=load_job_config, run=train)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["train", "main"]
