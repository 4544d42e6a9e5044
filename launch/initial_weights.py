"""`checkpoint.init_from`: start a run from another model's weights (model only: step 0, a fresh
optimizer, schedule and data order), as torchtitan's `checkpoint.initial_load_path` with
`initial_load_model_only`, or Megatron-LM's `--finetune`.

The usual cases: extending the context of a pretrained run (same model, a longer `data.seq_len`
and a `model.rope_scaling`), fine-tuning, or a different parallel layout than the source was
trained with. The source is one of

- a checkpoint folder of a ctxscale run (`.../checkpoints/step_00000120`), or the run folder
  itself (its newest complete checkpoint), or a `ctxscale convert` model/ folder: DCP shards,
  read back resharded to this run's layout (every rank reads only its own pieces);
- a Hugging Face model folder (config.json + safetensors, `models.hf.load_hf`);
- a `.safetensors` file of ctxscale names (`python -m ctxscale.launch.export --out`).

The weights must be this model's: the same tensor names and global shapes, else the run stops
before training, naming the missing, extra and reshaped tensors. A run that finds its own
checkpoint resumes from it instead (`checkpoint.resume`), so a restarted job continues where it
stopped rather than starting over from `init_from`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def resolve_source(spec: str) -> tuple[str, Path]:
    """(kind, path) of `checkpoint.init_from`: kind is "dcp", "hf" or "safetensors"."""
    from ctxscale.launch.checkpoint import latest_checkpoint

    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint.init_from={spec!r} does not exist; pass a checkpoint "
                                "folder (step_*), a run folder, a Hugging Face folder or a "
                                ".safetensors file")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"checkpoint.init_from={spec!r} is a file but not .safetensors; "
                             "pickled weights are never loaded (export them with "
                             "`python -m ctxscale.launch.export --out model.safetensors`)")
        return "safetensors", path
    if (path / "config.json").is_file():
        return "hf", path
    if (path / "meta.json").is_file():
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") == "deepspeed":
            raise ValueError(f"checkpoint.init_from={spec!r} is a DeepSpeed checkpoint; convert "
                             "it with DeepSpeed's zero_to_fp32.py to a .safetensors file first")
        return "dcp", path
    if (path / ".metadata").is_file():  # convert's model/ folder
        return "dcp", path
    latest = latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise ValueError(f"checkpoint.init_from={spec!r} holds no weights: no complete "
                         "checkpoints/step_* (a run folder), meta.json or .metadata (a "
                         "checkpoint), config.json (Hugging Face)")
    return resolve_source(str(latest))


def _check_names(source: str, have: dict, want: dict) -> None:
    """ValueError naming the differences between the source's tensors and this model's."""
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    reshaped = sorted(f"{k} (source {tuple(have[k].shape)}, model {tuple(want[k].shape)})"
                      for k in set(want) & set(have)
                      if tuple(have[k].shape) != tuple(want[k].shape))
    if not (missing or extra or reshaped):
        return
    from ctxscale.launch.checkpoint import model_differences

    parts = model_differences(missing, extra, reshaped)
    raise ValueError(f"checkpoint.init_from={source!r} holds a different model: "
                     f"{'; '.join(parts)}. Set the model section to the source's settings (its "
                     "config.yaml or config.json); nothing was loaded")


def _full_tensors(kind: str, path: Path) -> dict[str, torch.Tensor]:
    if kind == "hf":
        from ctxscale.models.hf import load_hf

        return load_hf(path).state_dict()
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"checkpoint.init_from={str(path)!r} is not a readable safetensors file "
                         f"(corrupt or truncated?): {e}") from e


def load_initial_weights(model: torch.nn.Module, spec: str, *, partial: bool = False) -> str:
    """Copy the weights of `spec` into `model` (sharded or not, FSDP / TP / a pipeline stage),
    in place; returns a description of the source. `partial`: `model` holds some of the
    layers (a pipeline stage): only its own tensors must be found in the source. Collective
    when a process group is up (every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    from ctxscale.launch.checkpoint import check_model_matches, load_model_dcp

    kind, path = resolve_source(spec)
    mine = get_model_state_dict(model)
    if kind == "dcp":
        check_model_matches(path, mine)
        load_model_dcp(model, path)
        return f"{path} (DCP, resharded)"
    full = _full_tensors(kind, path)
    have = {k: v for k, v in full.items() if k in mine} if partial else full
    _check_names(spec, have, mine)
    set_model_state_dict(model, {k: full[k] for k in mine},
                         options=StateDictOptions(full_state_dict=True, strict=True))
    return f"{path} ({'Hugging Face' if kind == 'hf' else 'safetensors'})"
