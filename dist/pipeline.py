"""Pipeline parallelism: split a Transformer's layers into stages, run them with a schedule.

Schedules (`torch.distributed.pipelining`): GPipe (all forwards, then all backwards; Huang et al.
2019), 1F1B (PipeDream-Flush; Narayanan et al. 2021: after a warm-up each rank alternates one
forward and one backward, so at most `pp` micro-batches are in flight), and interleaved 1F1B
(Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters"): each
rank holds `v` virtual stages, stage `s` lives on pp rank `s mod pp`, which shrinks the bubble
from (pp−1)/m to (pp−1)/(v·m) for m micro-batches.

Layout: `num_layers` blocks are split evenly over `pp · v` stages (earlier stages take the
remainder); stage 0 owns the embedding, the last stage owns the final norm, the output head and
the loss. A stage is the model itself with the parts it does not own removed, so parameter
names (and checkpoints) are those of the whole model. Between stages flows the hidden state
`(micro_batch, seq_local, dim)` (seq_local = seq / cp, divided again by tp under sequence
parallelism: each tp/cp/dp coordinate has its own pipeline).

Loss: the last stage returns the *summed* token loss of its micro-batch; the schedule's loss
function multiplies it by `scale = grad_reduce_size / global_token_count` (set per step), so the
gradient is exactly that of the token-weighted mean, as without pipelining. Gradients are not
rescaled by the number of micro-batches (`scale_grads=False`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def split_layers(num_layers: int, num_stages: int) -> list[list[int]]:
    """Layer indices of each stage: contiguous, as even as possible, earlier stages larger."""
    if num_layers < num_stages:
        raise ValueError(
            f"model.num_layers={num_layers} is fewer than the {num_stages} pipeline stages "
            "(parallel.pp x parallel.pp_virtual_stages); use fewer stages or more layers"
        )
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def stage_ids(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Stages held by `pp_rank` (loop placement: stage s on rank s mod pp)."""
    return [pp_rank + pp * v for v in range(virtual_stages)]


def carve_stage(model: nn.Module, stage: int, num_stages: int, layer_ids: list[int]) -> nn.Module:
    """A copy of `model` keeping only the blocks in `layer_ids` (+ embedding on the first stage,
    final norm and head on the last). Parameter names are unchanged."""
    if getattr(model.cfg, "tie_embeddings", False) and num_stages > 1:
        raise ValueError(
            "model.tie_embeddings=true cannot be pipelined: the embedding (first stage) and the "
            "output head (last stage) would live on different ranks; set "
            "model.tie_embeddings=false or parallel.pp=1"
        )
    keep = {str(i) for i in layer_ids}
    # the ParallelContext (process groups) is shared, not copied
    memo = {id(model.parallel): model.parallel}
    saved_layers = model.layers
    model.layers = nn.ModuleDict()  # do not deep-copy the blocks this stage drops
    try:
        part = copy.deepcopy(model, memo)
    finally:
        model.layers = saved_layers
    part.layers = nn.ModuleDict(
        {k: copy.deepcopy(v, memo) for k, v in saved_layers.items() if k in keep})
    if stage != 0:
        part.tok_embeddings = None
    if stage != num_stages - 1:
        part.norm = None
        part.output = None
    return part


class StageModule(nn.Module):
    """What a `PipelineStage` runs: `forward(x, position_ids, labels)`; x is token ids on the
    first stage and hidden states elsewhere; the last stage returns the summed loss."""

    def __init__(self, model: nn.Module, *, is_last: bool):
        super().__init__()
        self.model = model
        self.is_last = is_last
        self.eval_fn = None  # set during PipelineRunner.evaluate

    def forward(self, x, position_ids, labels, document_ids=None):
        extra = {} if document_ids is None else {"document_ids": document_ids}
        if self.is_last and self.eval_fn is not None:
            return self.eval_fn(self.model, x, position_ids, labels, **extra)
        if self.is_last:
            return self.model(x, labels=labels, position_ids=position_ids, loss_reduction="sum",
                              **extra)
        return self.model(x, position_ids=position_ids, **extra)


class PipelineModel(nn.Module):
    """A view of this rank's stages with the whole model's parameter names
    (`tok_embeddings`, `layers.<i>`, `norm`, `output`): use it for the optimizer, gradient
    clipping and checkpoints; run training through `PipelineRunner`."""

    def __init__(self, stages: list[nn.Module], cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = stages[0].tok_embeddings
        self.layers = nn.ModuleDict({k: v for s in stages for k, v in s.layers.items()})
        self.norm = stages[-1].norm
        self.output = stages[-1].output

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.tok_embeddings is not None:
            n -= self.tok_embeddings.weight.numel()
        return n


def build_schedule(stages, *, schedule: str, microbatches: int, loss_fn):
    from torch.distributed.pipelining import (
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    if schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
    if len(stages) != 1:
        raise ValueError(
            f"parallel.pp_schedule={schedule!r} runs one stage per rank; set "
            "parallel.pp_virtual_stages=1 or parallel.pp_schedule=interleaved_1f1b"
        )
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    return cls(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)


class PipelineRunner:
    """Builds this rank's stages and runs one pipelined forward/backward per micro-batch group.

    `wrap(stage_model)` applies tp / data parallelism to each stage before it is registered
    (the order of `dist/parallelize.py`)."""

    def __init__(self, model: nn.Module, *, pp_mesh, schedule: str, microbatches: int,
                 virtual_stages: int, device, wrap):
        if schedule != "interleaved_1f1b" and virtual_stages != 1:
            raise ValueError(
                f"parallel.pp_virtual_stages={virtual_stages} needs "
                "parallel.pp_schedule=interleaved_1f1b"
            )
        if schedule == "interleaved_1f1b" and microbatches % pp_mesh.size():
            raise ValueError(
                f"interleaved 1F1B needs parallel.pp_microbatches ({microbatches}) to be a "
                f"multiple of parallel.pp ({pp_mesh.size()})"
            )
        from torch.distributed.pipelining import PipelineStage

        pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
        num_stages = pp * virtual_stages
        layers = split_layers(model.cfg.num_layers, num_stages)
        self.microbatches = microbatches
        self.scale = 1.0
        self.stage_models, self.stage_modules, self.stages = [], [], []
        for s in stage_ids(pp_rank, pp, virtual_stages):
            part = carve_stage(model, s, num_stages, layers[s])
            mod = wrap(StageModule(part, is_last=s == num_stages - 1))
            self.stage_models.append(part)
            self.stage_modules.append(mod)
            self.stages.append(PipelineStage(mod, s, num_stages, device,
                                             group=pp_mesh.get_group()))
        self.is_first = any(st.is_first for st in self.stages)
        self.is_last = any(st.is_last for st in self.stages)
        self.view = PipelineModel(self.stage_models, model.cfg)
        stages = self.stages if schedule == "interleaved_1f1b" else self.stages[:1]
        self.schedule = build_schedule(stages if schedule == "interleaved_1f1b" else stages,
                                       schedule=schedule, microbatches=microbatches,
                                       loss_fn=self._loss)

    def _loss(self, output, target):
        return output * self.scale

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.microbatches:
            raise ValueError(
                f"train.batch_size={batch_size} must be divisible by "
                f"parallel.pp_microbatches={self.microbatches}"
            )

    def step(self, ids, labels, pos, *, scale: float, extra: dict | None = None) -> torch.Tensor | None:
        """Forward + backward of one batch split into micro-batches; returns the summed loss on
        the last stage (None elsewhere). `extra`: more per-row model inputs (document_ids),
        split into the micro-batches like the positions and given to every stage."""
        self.scale = scale
        losses = [] if self.is_last else None
        kwargs = {"position_ids": pos, "labels": labels, **(extra or {})}
        # `target` is unused by the loss (the last stage already returns it) but the schedule
        # requires one on the last stage
        target = labels if self.is_last else None
        args = (ids,) if self.is_first else ()
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        if not self.is_last:
            return None
        return torch.stack([loss.detach() for loss in losses]).sum() / scale

    @torch.no_grad()
    def evaluate(self, ids, labels, pos, stats_fn, extra: dict | None = None) -> torch.Tensor:
        """Forward-only pass; `stats_fn(model, hidden, position_ids, labels)` runs on the last
        stage per micro-batch and returns a 1-D float64 tensor of sums; returns their total on
        the last stage (zeros elsewhere)."""
        last = [m for m, st in zip(self.stage_modules, self.stages) if st.is_last]
        for m in last:
            m.eval_fn = lambda model, x, p, y, **kw: stats_fn(model, x, p, y, **kw).reshape(1, -1)
        try:
            kwargs = {"position_ids": pos, "labels": labels, **(extra or {})}
            args = (ids,) if self.is_first else ()
            target = labels if self.is_last else None
            out = self.schedule.eval(*args, target=target, **kwargs)
        finally:
            for m in last:
                m.eval_fn = None
        if not self.is_last:
            return torch.zeros(4, dtype=torch.float64)
        return out.reshape(self.microbatches, -1).sum(0)


__all__ = ["PipelineModel", "PipelineRunner", "SCHEDULES", "StageModule", "carve_stage",
           "split_layers", "stage_ids"]
