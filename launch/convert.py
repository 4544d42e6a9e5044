"""`ctxscale convert --config F`: turn a pretrained softmax Transformer into linear attention.

Two stages (LoLCATs recipe; Hedgehog / LAWCAT feature maps, see models/linearize.py):

1. attention transfer: the teacher is frozen; the student is the teacher with every `L` layer of
   `convert.student.layer_pattern` replaced by linear attention initialized from the teacher's
   q/k/v/o; only the new parameters (feature maps, conv taps, gates, the LoLCATs window mix λ
   with `convert.student.window` > 0) train, every layer against
   the teacher's attention on the teacher's own layer input (Hedgehog CE on attention weights,
   LoLCATs output MSE, or both). Per-layer losses go to metrics.jsonl / TensorBoard as
   `transfer/layer<i>` (stage "transfer").
2. fine-tune with the LM loss: LoRA (rank, alpha, target modules) or full fine-tuning; LoRA is
   merged at the end so the written model has plain weights.

The same loop trains a model from scratch (`convert.init: scratch`, `convert.transfer.steps: 0`,
`convert.finetune.method: full`): that is how a teacher is pretrained and how the from-scratch
baseline with the same token budget is trained. Training batches can mix natural-language passkey
examples (`convert.passkey_fraction`) into the text: the text row itself is the filler.

Parallelism: data and context parallel (`parallel.dp_*`, `parallel.cp`), gradients averaged over
every rank by all-reduce; cp shards tokens, labels and positions in `parallel.cp_layout` and the
model's `ParallelContext` does the rest; in stage 1 the attention-weight CE gathers the keys of
the whole sequence onto every cp rank and scores the rank's own queries against them
(`attention_transfer_ce_cp`, contiguous layout), so every transfer loss runs under cp and gives
the single-process value. Checkpoints: `launch/checkpoint.py` folders under
`<output>/checkpoints/{transfer,finetune}`, resumed automatically. The result is written to
`<output>/model/` (`config.yaml` with the `model:` section + DCP weights), loadable by
`load_model(path)`, and, with `convert.save_hf: true`, also by `save_hf` into `<output>/hf/`: a
Llama directory whose config.json carries a `ctxscale` block and whose safetensors hold the
linear-attention tensors beside the Llama ones (models/hf_linear.py). `load_model(<output>/hf)`
(and so `ctxscale eval`) gives the same model; transformers alone
would drop the linear-attention tensors.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import yaml

from ctxscale.dist.layout import shard_sequence
from ctxscale.dist.mesh import ParallelDims, axis_rank, axis_size
from ctxscale.dist.parallelize import parallel_context
from ctxscale.launch.checkpoint import Checkpointer, latest_checkpoint, load_model_dcp, save_dcp
from ctxscale.launch.config import (
    CheckpointConfig,
    KernelConfig,
    OptimConfig,
    ParallelConfig,
)
from ctxscale.launch.config_loader import dump, load, run_config_command, to_dict
from ctxscale.launch.data import DataConfig, build_data
from ctxscale.launch.data.cache import run_cache_dir
from ctxscale.launch.data.hf_tokenizer import check_teacher_tokenizer
from ctxscale.launch.data.passkey_mix import PasskeyMix
from ctxscale.launch.env import detect_env, init_distributed, pick_device
from ctxscale.launch.metrics import MetricsLogger
from ctxscale.launch.optim import build_optimizer, build_scheduler
from ctxscale.models import build_model
from ctxscale.models.config import DECAY_KINDS, LinearAttentionConfig, ModelConfig
from ctxscale.models.linearize import (
    attention_transfer_loss,
    freeze_all_but,
    linear_layers,
    linearize,
    new_parameter_names,
    teacher_layer_inputs,
)
from ctxscale.models.lora import apply_lora, lora_parameter_names, merge_lora

logger = logging.getLogger("ctxscale.convert")


@dataclass
class StudentConfig:
    # Linear attention of the converted layers (models/linear_attention.py).
    kind: Literal["hedgehog", "lawcat", "plain", "decay", "softmax"] = "hedgehog"
    # Per-layer letters repeated over the layers: L = linear, A = keep softmax (e.g. "LLLA").
    layer_pattern: str = "L"
    # Hedgehog feature width per half (None: head_dim); LAWCAT conv width and gate.
    feature_dim: int | None = None
    conv_width: int = 4
    gate: bool = True
    # LAWCAT: the first `ungated_heads` heads of each layer keep no decay (γ = 1), so a pass key
    # distilled at length L is still found far beyond L (model.linear_attention.ungated_heads).
    # A list gives one count per layer (model.num_layers entries; 0 for softmax layers).
    ungated_heads: int | list[int] = 0
    # Longest half-life of a gated head, in tokens (model.linear_attention.gate_max_half_life;
    # 0 = no cap).
    gate_max_half_life: float = 0.0
    # A per-token write gate on the keys of the heads without decay (the ungated heads of lawcat;
    # model.linear_attention.write_gate).
    write_gate: bool = False
    # Feature map of plain / decay / lawcat students (model.linear_attention.feature_map; None:
    # the kind's default; hedgehog: the trainable Hedgehog map, for lawcat after the conv).
    feature_map: Literal["elu1", "relu", "identity", "softmax", "hedgehog"] | None = None
    # RoPE on q/k before the feature map (Hedgehog on a RoPE teacher); None: on for hedgehog,
    # off for the other kinds.
    rope: bool | None = None
    # LoLCATs sliding window: the last `window` keys keep the teacher's softmax attention, older
    # ones go through the linear attention, mixed by a trainable per-head λ (0 = off).
    window: int = 0


@dataclass
class TransferConfig:
    # Stage 1 optimizer steps (0 skips attention transfer).
    steps: int = 100
    # Hedgehog attention-weight cross-entropy ("ce"), LoLCATs output MSE ("mse") or their sum.
    loss: Literal["ce", "mse", "both"] = "both"
    # Query rows per tile of the CE (memory O(batch · heads · tile · seq)).
    tile: int = 64
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, weight_decay=0.0,
                                                                   warmup_steps=5))


@dataclass
class FinetuneConfig:
    # Stage 2 optimizer steps with the LM loss (0 skips it).
    steps: int = 100
    # lora: adapters on `lora_targets` (merged at the end); full: every weight; the new
    # linear-attention parameters train too when `train_new_params`.
    method: Literal["lora", "full"] = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    train_new_params: bool = True
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0,
                                                                   warmup_steps=5))


@dataclass
class ConvertSection:
    # The teacher: a ctxscale run folder (config.yaml + checkpoints/), a `convert` output's
    # model/ folder, or a Hugging Face directory (config.json + safetensors). Empty with
    # init=scratch: build `model:` from random weights.
    teacher: str = ""
    # teacher: start from the teacher's weights; scratch: random init (baselines, pretraining).
    init: Literal["teacher", "scratch"] = "teacher"
    student: StudentConfig = field(default_factory=StudentConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Fraction of training rows replaced by natural-language passkey examples (the row's own
    # text is the filler; depth uniform in [0, 1]).
    passkey_fraction: float = 0.0
    # Extra weight on the answer tokens of those passkey rows in the fine-tune / pretraining loss:
    # loss = Σ LM CE + w · Σ answer CE, over the same labelled-token count. The answer is ~2% of
    # a passkey row's tokens, so with w = 0 a small model sees almost no retrieval signal and
    # never forms the copying (induction) heads; w ≈ 20 makes a teacher that retrieves.
    passkey_answer_weight: float = 0.0
    # Also write <output>/hf with save_hf (Llama names + a `ctxscale` block for linear / hybrid
    # students; read it with load_model / load_hf, not transformers).
    save_hf: bool = False


@dataclass
class RunConfig:
    output_dir: str = "runs/convert"
    # Sequences per data-parallel rank per step.
    batch_size: int = 8
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 1
    eval_batches: int = 4
    tensorboard: bool = True
    progress: bool = False


@dataclass
class ConvertJob:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    convert: ConvertSection = field(default_factory=ConvertSection)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)

    def validate(self) -> None:
        self.data.validate()
        self.parallel.validate()
        self.checkpoint.validate()
        self.kernels.validate()
        c = self.convert
        if self.data.document_mask:
            raise ValueError(
                "data.document_mask=true is a training option of the transformer family; "
                "conversion distils linear-attention students, whose state crosses documents; "
                "set data.document_mask=false for ctxscale convert"
            )
        if c.init == "teacher" and not c.teacher:
            raise ValueError("convert.teacher is empty; give a teacher folder or set convert.init=scratch")
        if c.passkey_answer_weight < 0:
            raise ValueError(f"convert.passkey_answer_weight={c.passkey_answer_weight} must be >= 0")
        if c.passkey_answer_weight > 0 and c.passkey_fraction == 0:
            raise ValueError("convert.passkey_answer_weight > 0 weighs passkey answers, but "
                             "convert.passkey_fraction is 0 (no passkey rows); raise the fraction")
        if not 0.0 <= c.passkey_fraction <= 1.0:
            raise ValueError(f"convert.passkey_fraction={c.passkey_fraction} must be in [0, 1]")
        if c.passkey_fraction > 0 and self.data.kind != "text":
            raise ValueError("convert.passkey_fraction > 0 needs data.kind=text (a tokenizer)")
        if c.teacher:
            check_teacher_tokenizer(c.teacher, self.data)
        if self.run.eval_batches < 1 or (self.data.kind in ("text", "tokens")
                                         and self.data.val_fraction == 0):
            raise ValueError("convert reports the student's (and the teacher's) loss on the "
                             "validation split at the end: set data.val_fraction > 0 and "
                             "run.eval_batches >= 1")
        if self.parallel.tp > 1 or self.parallel.pp > 1:
            raise ValueError("convert runs data and context parallel only; set parallel.tp=1, pp=1")
        if (self.parallel.cp > 1 and c.transfer.steps and c.transfer.loss != "mse"
                and self.parallel.cp_layout != "contiguous"):
            raise ValueError("the attention-transfer CE under parallel.cp > 1 needs "
                             f"parallel.cp_layout=contiguous (got {self.parallel.cp_layout!r}); "
                             "set it, or convert.transfer.loss=mse")
        self.parallel.check_seq_len(self.data.seq_len)
        counted = LinearAttentionConfig(ungated_heads=c.student.ungated_heads).ungated_counts()
        if any(counted) and c.student.kind not in DECAY_KINDS:
            raise ValueError(f"convert.student.ungated_heads={c.student.ungated_heads} switches off "
                             f"the decay of heads, but student kind {c.student.kind!r} has none; "
                             "use kind lawcat (or decay), or set ungated_heads: 0")
        if c.student.window < 0:
            raise ValueError(f"convert.student.window={c.student.window} must be >= 0 (0 = off)")
        if c.transfer.steps < 0 or c.finetune.steps < 0 or c.transfer.tile < 1:
            raise ValueError("convert.transfer.steps / finetune.steps must be >= 0, tile >= 1")


def load_convert_config(path=None, overrides=None) -> ConvertJob:
    return load(ConvertJob, path, overrides)


# ------------------------------------------------------------------------------ model I/O


def load_model(path, *, parallel=None, device="cpu"):
    """A ctxscale model from `path`: a `convert` model/ folder, a `train` run folder (newest
    checkpoint) or a Hugging Face directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        from ctxscale.models.hf import load_hf

        return load_hf(path, device=device, parallel=parallel)
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise ValueError(f"{path} holds neither config.yaml (ctxscale) nor config.json (Hugging "
                         "Face); pass a run folder, a convert model/ folder or an HF directory")
    tree = yaml.safe_load(cfg_file.read_text())
    from ctxscale.launch.config_loader import _build

    mcfg = _build(ModelConfig, tree["model"], "model", str(cfg_file))
    model = build_model(mcfg, parallel).to(device)
    weights = path if (path / ".metadata").is_file() else latest_checkpoint(path / "checkpoints")
    if weights is None:
        raise ValueError(f"{path} has no weights (no .metadata and no checkpoints/step_*)")
    load_model_dcp(model, weights)
    return model


def save_model(model, folder: Path, *, rank: int) -> None:
    """config.yaml (the `model:` section) + DCP weights, loadable by `load_model`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(model.cfg)}, sort_keys=False))
    if dist.is_initialized():
        dist.barrier()
    save_dcp({"model": get_model_state_dict(model)}, folder)


# ------------------------------------------------------------------------------ the job


class Converter:
    def __init__(self, cfg: ConvertJob):
        self.cfg = cfg
        self.env = detect_env()
        self.device = pick_device(cfg.run.device, self.env)
        init_distributed(self.env, self.device.type)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.dims = ParallelDims.from_config(cfg.parallel, world)
        self.mesh = self.dims.build_mesh(self.device.type)
        self.dp_rank, self.dp_size = axis_rank(self.mesh, "dp"), axis_size(self.mesh, "dp")
        self.parallel = parallel_context(self.dims, self.mesh, cfg.parallel)
        from ctxscale.kernels.dispatch import set_kernel_mode

        set_kernel_mode(cfg.kernels.mode, **cfg.kernels.per_op())
        torch.manual_seed(cfg.run.seed)
        self.out = Path(cfg.run.output_dir)
        cache = str(run_cache_dir(self.out, cfg.data.cache_dir))
        common = dict(batch_size=cfg.run.batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size,
                      seed=cfg.run.seed, cache_dir=cache)
        self.data = PasskeyMix(build_data(cfg.data, split="train", **common),
                               fraction=cfg.convert.passkey_fraction, seed=cfg.run.seed)
        self.val_data = build_data(cfg.data, split="val", **common)
        self.teacher = self._teacher()
        self.student = self._student()
        self.metrics = MetricsLogger(self.out, enabled=self.rank == 0,
                                     tensorboard=cfg.run.tensorboard)

    def _teacher(self):
        c = self.cfg.convert
        if not c.teacher:
            return None
        teacher = load_model(c.teacher, parallel=self.parallel, device=self.device)
        check_teacher_tokenizer(c.teacher, self.cfg.data, self.data.vocab_size, teacher.cfg.vocab_size)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def _student(self):
        c, s = self.cfg.convert, self.cfg.convert.student
        rope = s.kind == "hedgehog" if s.rope is None else s.rope
        la = dict(feature_dim=s.feature_dim, conv_width=s.conv_width, gate=s.gate,
                  ungated_heads=s.ungated_heads, write_gate=s.write_gate,
                  gate_max_half_life=s.gate_max_half_life,
                  feature_map=s.feature_map, rope=rope,
                  window=s.window)
        if c.init == "teacher":
            if s.kind == "softmax":
                return load_model(c.teacher, parallel=self.parallel, device=self.device)
            student = linearize(self.teacher, kind=s.kind, layer_pattern=s.layer_pattern,
                                parallel=self.parallel, **la)
            # an HF teacher's config.json (token ids, ...) goes on into <output>/hf
            student.hf_config = getattr(self.teacher, "hf_config", None)
            return student
        mcfg = self.cfg.model if self.teacher is None else self.teacher.cfg
        if mcfg.vocab_size == 0:
            mcfg.vocab_size = self.data.vocab_size
        if s.kind != "softmax":
            from ctxscale.models.linearize import student_config

            mcfg = student_config(mcfg, kind=s.kind, layer_pattern=s.layer_pattern, **la)
        return build_model(mcfg, self.parallel).to(self.device)

    # ---------------------------------------------------------------- helpers
    def shard(self, batch, *extra: str):
        """(input_ids, labels, positions, *batch[extra]) on the device, sharded over cp."""
        ids = batch["input_ids"].to(self.device)
        b, s = ids.shape
        pos = torch.arange(s, device=self.device).expand(b, s)
        out = [ids, batch["labels"].to(self.device), pos] + [batch[k].to(self.device) for k in extra]
        if self.dims.cp > 1:
            g, lay = self.parallel.cp_group, self.parallel.cp_layout
            out = [shard_sequence(t, group=g, layout=lay) for t in out]
        return tuple(out)

    def lm_loss(self, model, batch):
        """Summed LM loss of this rank's shard, plus `passkey_answer_weight` × the summed
        cross-entropy of the passkey answers (both over one forward pass); returns (loss, ids)."""
        w = self.cfg.convert.passkey_answer_weight
        if w == 0 or "answer_labels" not in batch:
            ids, labels, pos = self.shard(batch)
            return model(ids, labels=labels, position_ids=pos, loss_reduction="sum"), ids
        ids, labels, pos, answers = self.shard(batch, "answer_labels")
        h = model.hidden_states(ids, pos)
        ce = model.parallel.cross_entropy
        loss = ce(h, model.output.weight, labels) + w * ce(h, model.output.weight, answers)
        return loss, ids

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized():
            dist.all_reduce(t)
        return t

    def average_grads(self, params, scale: float) -> None:
        """grads ← Σ_ranks grads · scale (scale = 1 / global normalizer)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.all_sum(flat) * scale
        i = 0
        for g in grads:
            g.copy_(flat[i:i + g.numel()].view_as(g))
            i += g.numel()

    def _start_stage(self, stage: str, model, optim_cfg, steps: int):
        """Optimizer, scheduler and checkpointer of `stage` (checkpoints/<stage>), resumed from
        its newest checkpoint per `checkpoint.resume`; returns (opt, sched, ckpt, first step)."""
        opt = build_optimizer(model, optim_cfg)
        sched = build_scheduler(opt, optim_cfg, steps)
        folder = self.out / "checkpoints" / stage
        ckpt = Checkpointer(folder, keep_last=self.cfg.checkpoint.keep_last)
        resume = self.cfg.checkpoint.resume
        path = latest_checkpoint(folder) if resume == "auto" else (
            None if resume == "none" else Path(resume))
        if path is None or not (path.parent == folder):
            return opt, sched, ckpt, 0
        meta = ckpt.load(path, model, opt, sched)
        self.data.load_state_dict(meta["data"])
        return opt, sched, ckpt, meta["step"]

    # ---------------------------------------------------------------- stage 1
    def transfer(self) -> list[dict]:
        tc = self.cfg.convert.transfer
        if tc.steps == 0 or self.teacher is None or self.cfg.convert.student.kind == "softmax":
            return []
        student = self.student
        params = freeze_all_but(student, new_parameter_names(student))
        layers = linear_layers(student)
        opt, sched, ckpt, step = self._start_stage("transfer", student, tc.optim, tc.steps)
        records = []
        while step < tc.steps:
            t0 = time.perf_counter()
            batch = self.data.next_batch()
            ids, _, pos = self.shard(batch)
            cos, sin, inputs = teacher_layer_inputs(self.teacher, ids, pos)
            cp = self.dims.cp > 1
            if cp:  # sums over this shard, each divided by its global count (over dp and cp)
                rows = ids.shape[0] * ids.shape[1] * self.dims.cp * self.dims.dp
                count = {"ce": float(rows * student.cfg.num_heads),
                         "mse": float(rows * student.cfg.dim)}
            per_layer, total = {}, 0.0
            for name in layers:
                out = attention_transfer_loss(self.teacher.layers[name], student.layers[name],
                                              inputs[name], cos, sin, loss=tc.loss, tile=tc.tile,
                                              reduction="sum" if cp else "mean")
                loss = sum(out[k] / count[k] for k in ("ce", "mse") if k in out) if cp else out["loss"]
                total = total + loss
                per_layer[name] = loss.detach()
            total.backward()
            if cp:  # each rank holds its share of the global mean: sum over ranks
                scale, div = 1.0, 1.0
            else:
                scale, div = 1.0 / self.dims.dp, float(self.dims.dp)
            self.average_grads(params, scale)
            vals = self.all_sum(torch.stack(list(per_layer.values())).float()) / div
            gn = torch.nn.utils.clip_grad_norm_(params, tc.optim.max_grad_norm or float("inf"))
            lr = sched.get_last_lr()[0]
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            rec = {"step": step, "stage": "transfer", "loss": float(vals.sum()), "lr": lr,
                   "grad_norm": float(gn), "tokens_per_s": ids.numel() * self.dims.dp / (time.perf_counter() - t0)}
            rec.update({f"transfer/layer{n}": float(v) for n, v in zip(per_layer, vals)})
            records.append(rec)
            if step % self.cfg.run.log_every == 0 or step == tc.steps:
                self.metrics.log(rec)
            if self._save_now(step, tc.steps):
                ckpt.save(step, student, opt, sched, self.data.state_dict())
        return records

    def _save_now(self, step, total):
        ck = self.cfg.checkpoint
        return (ck.every and step % ck.every == 0) or (ck.at_end and step == total)

    # ---------------------------------------------------------------- stage 2
    def finetune(self) -> list[dict]:
        fc = self.cfg.convert.finetune
        if fc.steps == 0:
            return []
        student = self.student
        if fc.method == "lora":
            for p in student.parameters():
                p.requires_grad_(False)
            apply_lora(student, rank=fc.lora_rank, alpha=fc.lora_alpha, targets=tuple(fc.lora_targets))
            names = lora_parameter_names(student)
            if fc.train_new_params:
                names += new_parameter_names(student)
            params = freeze_all_but(student, names)
        else:
            params = freeze_all_but(student, [n for n, _ in student.named_parameters()])
        opt, sched, ckpt, step = self._start_stage("finetune", student, fc.optim, fc.steps)
        records = []
        student.train()
        while step < fc.steps:
            t0 = time.perf_counter()
            batch = self.data.next_batch()
            n_tok = self.all_sum(torch.tensor(float((batch["labels"] != -100).sum())))
            n_tok = n_tok.item() / self.dims.cp  # cp ranks share their dp rank's batch
            loss, ids = self.lm_loss(student, batch)
            loss.backward()
            self.average_grads(params, 1.0 / n_tok)
            gn = torch.nn.utils.clip_grad_norm_(params, fc.optim.max_grad_norm or float("inf"))
            lr = sched.get_last_lr()[0]
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            total = self.all_sum(loss.detach().float()).item() / n_tok
            rec = {"step": step, "stage": "finetune", "loss": total, "lr": lr, "grad_norm": float(gn),
                   "tokens_per_s": ids.numel() * self.dims.dp / (time.perf_counter() - t0)}
            if not math.isfinite(total):
                raise ValueError(f"fine-tune loss became {total} at step {step}; lower the lr")
            records.append(rec)
            if step % self.cfg.run.log_every == 0 or step == fc.steps:
                self.metrics.log(rec)
            if self._save_now(step, fc.steps):
                ckpt.save(step, student, opt, sched, self.data.state_dict())
        if fc.method == "lora":
            merge_lora(student)
        return records

    # ---------------------------------------------------------------- eval
    @torch.no_grad()
    def eval_loss(self, model) -> float:
        model.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        for batch in self.val_data.eval_batches(self.cfg.run.eval_batches):
            ids, labels, pos = self.shard(batch)
            tot[0] += float(model(ids, labels=labels, position_ids=pos, loss_reduction="sum"))
            tot[1] += float((labels != -100).sum())
        tot = self.all_sum(tot)
        return (tot[0] / tot[1]).item()


def convert(cfg: ConvertJob) -> dict:
    """Run both stages; returns {"transfer": records, "finetune": records, "eval_loss": ...,
    "teacher_eval_loss": ..., "model_dir": ...} on every rank."""
    job = Converter(cfg)
    out = job.out
    try:
        if job.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(dump(cfg))
        transfer = job.transfer()
        finetune = job.finetune()
        job.student.eval()
        summary = {"transfer": transfer, "finetune": finetune,
                   "eval_loss": job.eval_loss(job.student),
                   "teacher_eval_loss": job.eval_loss(job.teacher) if job.teacher is not None else None,
                   "tokens": (len(transfer) + len(finetune)) * cfg.run.batch_size * job.dp_size
                   * cfg.data.seq_len}
        job.metrics.log({"step": len(transfer) + len(finetune), "stage": "final",
                         "eval_loss": summary["eval_loss"],
                         "teacher_eval_loss": summary["teacher_eval_loss"]})
        model_dir = out / "model"
        save_model(job.student, model_dir, rank=job.rank)
        if cfg.convert.save_hf and job.rank == 0:
            from ctxscale.models.hf import save_hf

            save_hf(job.student, out / "hf", overwrite=True)
        summary["model_dir"] = str(model_dir)
    finally:
        job.metrics.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    def run(cfg):
        s = convert(cfg)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"eval loss {s['eval_loss']:.4f} (teacher {s['teacher_eval_loss']}); "
                  f"model in {s['model_dir']}")

    return run_config_command(argv, prog="ctxscale convert",
                              description="Distill a softmax Transformer into linear attention.",
                              load_config=load_convert_config, run=run)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ConvertJob", "PasskeyMix", "convert", "load_convert_config", "load_model", "main",
           "save_model"]
