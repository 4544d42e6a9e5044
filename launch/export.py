"""Export a trained model: one safetensors file, or a Hugging Face checkpoint directory.

    python -m ctxscale.launch.export --run runs/tiny --out model.safetensors
    python -m ctxscale.launch.export --run runs/tiny --hf out_dir/ [--checkpoint step_00000300]

A DCP checkpoint written under any parallel layout (dp, tp, pp, cp; FSDP or DDP) holds each
parameter under the whole model's name (pipeline stages keep the full model's names, tensor- and
FSDP-sharded parameters are DTensors that DCP stitches back together), so export loads it into
one unsharded model in one process: no process group is needed. From a live job,
`export_from_model` gathers the full state dict (all ranks call it) and rank 0 writes the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _full_model(run_dir: Path, checkpoint: str | None = None):
    """The run's model (from its saved config.yaml) with the checkpoint's weights loaded."""
    from ctxscale.launch.checkpoint import latest_checkpoint, load_dcp
    from ctxscale.launch.config import load_job_config
    from ctxscale.models import build_model

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ValueError(f"{run_dir} has no config.yaml; pass the train.output_dir of a run")
    cfg = load_job_config(cfg_file, [])
    if checkpoint is None:
        ckpt = latest_checkpoint(cfg.checkpoint.folder or run_dir / "checkpoints")
    else:
        ckpt = Path(checkpoint)
        if not ckpt.is_absolute() and not ckpt.exists():
            ckpt = run_dir / "checkpoints" / checkpoint
    if ckpt is None or not (ckpt / "meta.json").is_file():
        raise ValueError(f"no complete checkpoint found for {run_dir} (looked for {ckpt})")
    if (ckpt / "deepspeed").is_dir():
        raise ValueError(
            f"{ckpt} is a DeepSpeed checkpoint; convert it with DeepSpeed's zero_to_fp32.py "
            "first (export reads DCP checkpoints)"
        )
    model = build_model(cfg.model)
    state = {"model": model.state_dict()}
    load_dcp(state, ckpt, one_process=True)
    model.load_state_dict(state["model"])
    return model


def save_safetensors(state_dict: dict, path: str | Path) -> Path:
    """Write a {name: tensor} dict as one safetensors file (tied tensors stored once each)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen, out = {}, {}
    for name, t in state_dict.items():
        key = (t.data_ptr(), t.shape)
        if key in seen:  # tied weights: safetensors refuses shared storage
            t = t.clone()
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    save_file(out, str(path), metadata={"format": "pt", "producer": "ctxscale"})
    return path


def export_checkpoint(run_dir, *, safetensors_path=None, hf_dir=None, checkpoint=None) -> dict:
    """Export the newest (or the given) checkpoint of a run; returns the written paths."""
    if safetensors_path is None and hf_dir is None:
        raise ValueError("pass a safetensors file path and/or a Hugging Face output directory")
    model = _full_model(Path(run_dir), checkpoint)
    written = {}
    if safetensors_path is not None:
        written["safetensors"] = save_safetensors(model.state_dict(), safetensors_path)
    if hf_dir is not None:
        from ctxscale.models.hf import save_hf

        written["hf"] = save_hf(model, hf_dir, overwrite=True)
    return written


def export_from_model(model: torch.nn.Module, path: str | Path) -> Path | None:
    """From a live (sharded) job: gather the full state dict on every rank, rank 0 writes it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return save_safetensors(sd, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctxscale export", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="train.output_dir of the run")
    p.add_argument("--checkpoint", default=None, help="step_XXXXXXXX folder (default: newest)")
    p.add_argument("--out", default=None, help="single safetensors file to write")
    p.add_argument("--hf", default=None, help="Hugging Face directory to write")
    args = p.parse_args(argv)
    try:
        written = export_checkpoint(args.run, safetensors_path=args.out, hf_dir=args.hf,
                                    checkpoint=args.checkpoint)
    except ValueError as e:
        print(f"ctxscale export: error: {e}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["export_checkpoint", "export_from_model", "save_safetensors"]
