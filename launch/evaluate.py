"""`ctxscale eval --config F`: compare models on held-out perplexity, passkey retrieval by context
length and depth, and MQAR; write a markdown table, results.json and a plot.

- perplexity: exp(mean token cross-entropy) over `eval_batches` fixed validation batches of the
  text corpus (`data:`), the same batches for every model; with `data.document_mask` the
  models get the batches' document ids and per-document positions, as in training;
- passkey (Mohtashami & Jaggi 2023, natural-language version `passkey_text_eval_set`): for each
  length L in `passkey_lengths` and depth d in `passkey_depths`, `passkey_samples` prompts whose
  filler is held-out text; a prompt counts only when every answer token is the argmax;
- loss by position: the perplexity batches' mean token loss in log2 buckets of context position
  (within the document with `data.document_mask`), a table under the main one and a plot;
- MQAR (Arora et al. 2023, "Zoology"): token accuracy at the query positions of `mqar_samples`
  fresh samples (`mqar_seq_len`, `mqar_num_kv_pairs`, keys/values drawn from the model's
  vocabulary); 0 samples skips it.

Models whose linear-attention layers have a LoLCATs window (`model.linear_attention.window` > 0)
are also evaluated with parts of every such layer switched off (`LinearAttention.hybrid_mode`),
as extra rows `<label>/linear_only`, `<label>/window_only` and `<label>/no_attention` (the layer's
attention output is zero) in the table, results.json and the plot.

Models are given by path (`launch.convert.load_model`: a convert model/ folder, a train run folder,
or a Hugging Face directory), one label each. Single process (evaluation of small models).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctxscale.launch.config_loader import load, run_config_command
from ctxscale.launch.data import DataConfig, build_data, mqar_sample, passkey_accuracy
from ctxscale.launch.data.cache import run_cache_dir
from ctxscale.launch.data.synthetic import passkey_text_eval_set

# (row suffix, LinearAttention.hybrid_mode) of the ablations of windowed (LoLCATs) models
ABLATIONS = (("linear_only", "linear_only"), ("window_only", "window_only"),
             ("no_attention", "none"))


def windowed_layers(model) -> list:
    """The model's linear-attention modules with a LoLCATs window (window > 0)."""
    return [m for m in model.modules() if getattr(m, "window", 0) and hasattr(m, "hybrid_mode")]


def model_variants(model, label: str):
    """Yield (row label, model) for the model as is, then, for a windowed model, each ablation
    (the layers' hybrid_mode switched in place; restored to "both" afterwards)."""
    yield label, model
    layers = windowed_layers(model)
    if not layers:
        return
    try:
        for suffix, mode in ABLATIONS:
            for layer in layers:
                layer.hybrid_mode = mode
            yield f"{label}/{suffix}", model
    finally:
        for layer in layers:
            layer.hybrid_mode = "both"


@dataclass
class EvalJob:
    # Model folders to evaluate, and their labels in the table (default: folder names).
    models: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    # The validation split for perplexity: text (also the passkey filler and tokenizer),
    # token files or a synthetic task (perplexity only).
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="text"))
    batch_size: int = 8
    eval_batches: int = 8
    passkey_lengths: list[int] = field(default_factory=list)
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_samples: int = 4
    mqar_samples: int = 0
    mqar_seq_len: int = 64
    mqar_num_kv_pairs: int = 4
    # Mean token loss by context position (log2 buckets) on the perplexity batches: a table in
    # results.md and loss_by_position.png (evaluate at a data.seq_len beyond the training
    # length to see extrapolation).
    loss_by_position: bool = True
    seed: int = 0
    output_dir: str = "runs/eval"

    def validate(self) -> None:
        self.data.validate()
        if not self.models:
            raise ValueError("eval: `models` is empty; list at least one model folder")
        if self.labels and len(self.labels) != len(self.models):
            raise ValueError("eval: `labels` must have one entry per model (or be empty)")
        if any(L < 2 for L in self.passkey_lengths):
            raise ValueError("eval: passkey_lengths must be >= 2")
        if self.passkey_lengths and self.data.kind != "text":
            raise ValueError(f"eval: passkey_lengths needs data.kind=text (passkey rows are "
                             f"written as text and tokenized), got data.kind={self.data.kind}; "
                             "set passkey_lengths: [] to evaluate perplexity only")


def batch_kwargs(batch: dict) -> dict:
    """Model keyword arguments a batch carries beyond its tokens: `document_ids` and the
    per-document `position_ids` of `data.document_mask`."""
    return {k: batch[k] for k in ("document_ids", "position_ids") if k in batch}


@torch.no_grad()
def perplexity(model, batches) -> float:
    model.eval()
    loss, count = 0.0, 0
    for batch in batches:
        labels = batch["labels"]
        loss += float(model(batch["input_ids"], labels=labels, loss_reduction="sum",
                            **batch_kwargs(batch)))
        count += int((labels != -100).sum())
    mean = loss / max(count, 1)
    return math.exp(mean) if mean < 700 else float("inf")  # an ablation may be that bad


def position_bucket(positions: torch.Tensor) -> torch.Tensor:
    """Bucket k of 0-based positions: 1-based position t = pos + 1 in [2^k, 2^(k+1))."""
    return torch.floor(torch.log2(positions.double() + 1)).long()


def _token_losses(model, batch, chunk: int = 1024) -> torch.Tensor:
    """Per-token cross-entropy `(batch, seq)` in float32 (0 where unlabelled): from the final
    hidden states through the output head `chunk` positions at a time when the model has
    them (no full-sequence logits), else from its logits."""
    ids, labels, kw = batch["input_ids"], batch["labels"], batch_kwargs(batch)
    b, s = ids.shape
    if hasattr(model, "hidden_states") and getattr(model, "output", None) is not None:
        h = model.hidden_states(ids, kw.get("position_ids"), kw.get("document_ids"))
        logits_of = lambda a, e: model.output(h[:, a:e])  # noqa: E731
    else:
        logits = model(ids, **kw)
        logits_of = lambda a, e: logits[:, a:e]  # noqa: E731
    parts = []
    for a in range(0, s, chunk):
        e = min(a + chunk, s)
        ce = torch.nn.functional.cross_entropy(logits_of(a, e).float().flatten(0, 1),
                                               labels[:, a:e].flatten(), reduction="none",
                                               ignore_index=-100)
        parts.append(ce.view(b, e - a))
    return torch.cat(parts, 1)


@torch.no_grad()
def loss_by_position(model, batches) -> dict:
    """Mean token loss by how much context a token has: 1-based position t within the window
    (within its document, from the batch's per-document `position_ids`, with
    data.document_mask), in buckets t in [2^k, 2^(k+1)). A model that uses its context keeps
    lowering the loss along the buckets; past the training length a model that does not
    extrapolate turns up. Returns {"start", "end", "loss", "tokens"}, one entry per bucket."""
    model.eval()
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for batch in batches:
        labels = batch["labels"]
        b, s = labels.shape
        pos = batch.get("position_ids")
        pos = torch.arange(s).expand(b, s) if pos is None else pos.expand(b, s)
        losses = _token_losses(model, batch)
        keep = labels != -100
        buckets = position_bucket(pos)[keep]
        values = losses[keep].double()
        for k in buckets.unique().tolist():
            sel = buckets == k
            sums[k] = sums.get(k, 0.0) + float(values[sel].sum())
            counts[k] = counts.get(k, 0) + int(sel.sum())
    ks = sorted(sums)
    return {"start": [2**k for k in ks], "end": [2 ** (k + 1) - 1 for k in ks],
            "loss": [sums[k] / counts[k] for k in ks], "tokens": [counts[k] for k in ks]}


def position_table(results: dict) -> str:
    """Mean loss by context position (`loss_by_position`), one row per model."""
    rows = {name: r["loss_by_position"] for name, r in results.items() if "loss_by_position" in r}
    if not rows:
        return ""
    spans = sorted({(a, e) for r in rows.values() for a, e in zip(r["start"], r["end"])})
    head = ["model"] + [f"{a}" if a == e else f"{a}-{e}" for a, e in spans]
    lines = ["loss by position (tokens of context)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        by = {(a, e): v for a, e, v in zip(r["start"], r["end"], r["loss"])}
        lines.append("| " + " | ".join([name] + [f"{by[sp]:.3f}" if sp in by else ""
                                                 for sp in spans]) + " |")
    return "\n".join(lines)


def plot_loss_by_position(results: dict, path: Path, *, train_len: int | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {name: r["loss_by_position"] for name, r in results.items() if "loss_by_position" in r}
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8.5, 4))
    for name, r in rows.items():
        mids = [(a * e) ** 0.5 for a, e in zip(r["start"], r["end"])]  # geometric middles
        ax.plot(mids, r["loss"], marker="o", label=name)
    if train_len:
        ax.axvline(train_len, color="gray", ls="--", lw=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in context (tokens)")
    ax.set_ylabel("mean token loss")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def passkey_curve(model, tokenizer, filler, *, lengths, depths, samples, seed=0) -> dict:
    """{L: {"accuracy": fraction of prompts right, "by_depth": {depth: fraction}}}."""
    model.eval()
    out = {}
    for L in lengths:
        sets = passkey_text_eval_set(tokenizer, filler, seq_len=L, depths=list(depths),
                                     samples_per_depth=samples, seed=seed)
        by_depth, right, total = {}, 0, 0
        for s in sets:
            acc = passkey_accuracy(model(s["input_ids"]), s["labels"])
            by_depth[s["depth"]] = acc["correct"] / max(acc["total"], 1)
            right += acc["correct"]
            total += acc["total"]
        out[int(L)] = {"accuracy": right / max(total, 1), "by_depth": by_depth}
    return out


@torch.no_grad()
def mqar_eval(model, *, vocab_size: int, seq_len: int, num_kv_pairs: int, samples: int,
              seed: int = 0) -> float:
    model.eval()
    rows = [mqar_sample(np.random.default_rng([seed, i]), seq_len=seq_len, vocab_size=vocab_size,
                        num_kv_pairs=num_kv_pairs) for i in range(samples)]
    ids = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
    labels = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64))
    pred = model(ids).argmax(-1)
    mask = labels != -100
    return float((pred[mask] == labels[mask]).float().mean())


def markdown_table(results: dict) -> str:
    """One row per model: perplexity, MQAR, passkey accuracy per length."""
    lengths = sorted({L for r in results.values() for L in r.get("passkey", {})})
    head = ["model", "perplexity"] + (["MQAR"] if any("mqar" in r for r in results.values()) else [])
    head += [f"passkey@{L}" for L in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name, f"{r['perplexity']:.2f}"]
        if "MQAR" in head:
            cells.append(f"{r['mqar']:.3f}" if "mqar" in r else "")
        cells += [f"{r['passkey'][L]['accuracy']:.2f}" if L in r.get("passkey", {}) else ""
                  for L in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_passkey(results: dict, path: Path, *, train_len: int | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4))
    plotted = False
    for name, r in results.items():
        curve = r.get("passkey")
        if curve:
            xs = sorted(curve)
            ax.plot(xs, [curve[x]["accuracy"] for x in xs], marker="o", label=name)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    if train_len:
        ax.axvline(train_len, color="gray", ls="--", lw=1, label="distillation length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.02, 1.02)
    # beside the axes: with many rows an inner legend hides the curves at accuracy 1
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _evaluate_one(cfg: EvalJob, model, batches, tokenizer, filler) -> dict:
    r = {"perplexity": perplexity(model, batches)}
    if cfg.loss_by_position:
        r["loss_by_position"] = loss_by_position(model, batches)
    if cfg.passkey_lengths:
        r["passkey"] = passkey_curve(model, tokenizer, filler, lengths=cfg.passkey_lengths,
                                     depths=cfg.passkey_depths, samples=cfg.passkey_samples,
                                     seed=cfg.seed)
    if cfg.mqar_samples:
        r["mqar"] = mqar_eval(model, vocab_size=model.cfg.vocab_size, seq_len=cfg.mqar_seq_len,
                              num_kv_pairs=cfg.mqar_num_kv_pairs, samples=cfg.mqar_samples,
                              seed=cfg.seed)
    return r


def evaluate_models(cfg: EvalJob) -> dict:
    """{label: {"perplexity", "passkey": {L: {...}}, "mqar"?}}; also writes the outputs."""
    from ctxscale.launch.convert import load_model

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = str(run_cache_dir(out, cfg.data.cache_dir))
    val = build_data(cfg.data, batch_size=cfg.batch_size, dp_rank=0, dp_size=1, seed=cfg.seed,
                     split="val", cache_dir=cache)
    batches = val.eval_batches(cfg.eval_batches)
    filler = torch.cat([b["input_ids"].flatten() for b in batches]).tolist()
    labels = cfg.labels or [Path(m).name for m in cfg.models]
    results = {}
    for label, path in zip(labels, cfg.models):
        for row, model in model_variants(load_model(path), label):
            results[row] = _evaluate_one(cfg, model, batches, getattr(val, "tokenizer", None), filler)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    positions = position_table(results)
    (out / "results.md").write_text(markdown_table(results) + "\n"
                                    + (f"\n{positions}\n" if positions else ""))
    plot_passkey(results, out / "passkey.png", train_len=cfg.data.seq_len)
    plot_loss_by_position(results, out / "loss_by_position.png")
    return results


def main(argv: list[str] | None = None) -> int:
    return run_config_command(
        argv, prog="ctxscale eval", description="Evaluate converted models.",
        load_config=lambda path, overrides: load(EvalJob, path, overrides),
        run=lambda cfg: print(markdown_table(evaluate_models(cfg))),
    )


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ABLATIONS", "EvalJob", "batch_kwargs", "evaluate_models", "loss_by_position",
           "model_variants", "windowed_layers", "markdown_table", "mqar_eval", "passkey_curve",
           "perplexity", "plot_loss_by_position", "plot_passkey", "position_table"]
