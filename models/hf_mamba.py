"""Hugging Face `MambaForCausalLM` checkpoints <-> ctxscale `mamba` models.

A checkpoint directory holds `config.json` (model_type "mamba") and safetensors weights (one
`model.safetensors` or shards listed in `model.safetensors.index.json`). Names map as

    backbone.embeddings.weight          <-> tok_embeddings.weight   (older: backbone.embedding.)
    backbone.layers.{i}.norm.weight     <-> layers.{i}.mixer_norm.weight
    backbone.layers.{i}.mixer.{p}       <-> layers.{i}.mixer.{p}    (conv1d, x_proj, dt_proj,
                                                                      A_log, D, out_proj)
    backbone.layers.{i}.mixer.in_proj.* <-> layers.{i}.mixer.in_proj_x.* (rows :E) and
                                            layers.{i}.mixer.in_proj_z.* (rows E:)
    backbone.norm_f.weight              <-> norm.weight
    lm_head.weight                      <-> output.weight           (absent when tied)

and the config as hidden_size -> dim, num_hidden_layers -> num_layers, state_size -> d_state,
conv_kernel -> d_conv, expand, time_step_rank -> dt_rank, use_bias / use_conv_bias ->
bias / conv_bias, layer_norm_epsilon -> norm_eps, tie_word_embeddings -> tie_embeddings.
The math is the same as Hugging Face's (RMSNorm in float32, softplus Δ with the dt_proj bias,
silu conv and gate), so logits agree to float32 rounding (tested against transformers).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ctxscale.models.config import MambaConfig, ModelConfig

_PREFIXES = (("backbone.embeddings.", "tok_embeddings."), ("backbone.embedding.", "tok_embeddings."),
             ("backbone.norm_f.", "norm."), ("lm_head.", "output."))


def config_from_hf(hf: dict) -> ModelConfig:
    """ctxscale ModelConfig (family mamba) from a Hugging Face Mamba config.json dict."""
    if hf.get("model_type") != "mamba":
        raise ValueError(f"config.json has model_type {hf.get('model_type')!r}; expected 'mamba'")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"Mamba hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    dim, expand = hf["hidden_size"], hf.get("expand", 2)
    inner = hf.get("intermediate_size", expand * dim)
    if inner != expand * dim:
        raise ValueError(
            f"intermediate_size={inner} is not expand·hidden_size={expand * dim}; ctxscale's "
            "Mamba mixer uses expand·dim channels"
        )
    rank = hf.get("time_step_rank", "auto")
    rank = math.ceil(dim / 16) if rank == "auto" else int(rank)
    return ModelConfig(
        family="mamba", vocab_size=hf["vocab_size"], dim=dim, num_layers=hf["num_hidden_layers"],
        num_heads=1, head_dim=dim + dim % 2,  # unused by Mamba; keeps validate() happy
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        mamba=MambaConfig(
            d_state=hf.get("state_size", 16), d_conv=hf.get("conv_kernel", 4), expand=expand,
            dt_rank=rank, bias=hf.get("use_bias", False), conv_bias=hf.get("use_conv_bias", True),
            dt_min=hf.get("time_step_min", 0.001), dt_max=hf.get("time_step_max", 0.1),
            dt_floor=hf.get("time_step_floor", 1e-4),
        ),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    m = cfg.mamba
    return {
        "architectures": ["MambaForCausalLM"], "model_type": "mamba",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.num_layers,
        "state_size": m.d_state, "conv_kernel": m.d_conv, "expand": m.expand,
        "intermediate_size": m.expand * cfg.dim, "time_step_rank": m.rank(cfg.dim),
        "use_bias": m.bias, "use_conv_bias": m.conv_bias, "hidden_act": "silu",
        "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "residual_in_fp32": True, "time_step_min": m.dt_min, "time_step_max": m.dt_max,
        "time_step_floor": m.dt_floor, "time_step_scale": 1.0, "time_step_init_scheme": "random",
        "initializer_range": cfg.init_std, "rescale_prenorm_residual": False,
        "use_cache": True, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0,
    }


def hf_to_ctxscale_name(name: str) -> str:
    for src, dst in _PREFIXES:
        if name.startswith(src):
            return dst + name[len(src):]
    if name.startswith("backbone.layers."):
        rest = name[len("backbone.layers."):]
        i, sub = rest.split(".", 1)
        if sub.startswith("norm."):
            return f"layers.{i}.mixer_norm.{sub[len('norm.'):]}"
        return f"layers.{i}.{sub}"
    raise ValueError(f"unexpected Mamba checkpoint tensor {name!r}")


def ctxscale_to_hf_name(name: str) -> str:
    if name.startswith("tok_embeddings."):
        return "backbone.embeddings." + name[len("tok_embeddings."):]
    if name.startswith("norm."):
        return "backbone.norm_f." + name[len("norm."):]
    if name.startswith("output."):
        return "lm_head." + name[len("output."):]
    i, sub = name[len("layers."):].split(".", 1)
    if sub.startswith("mixer_norm."):
        return f"backbone.layers.{i}.norm.{sub[len('mixer_norm.'):]}"
    return f"backbone.layers.{i}.{sub}"


def split_in_proj(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face's fused `mixer.in_proj` (rows `[x; z]`) as our `in_proj_x` / `in_proj_z`."""
    out = {}
    for name, t in state.items():
        head, sep, leaf = name.rpartition(".in_proj.")
        if sep and head.endswith("mixer"):
            x, z = t.chunk(2, dim=0)
            out[f"{head}.in_proj_x.{leaf}"], out[f"{head}.in_proj_z.{leaf}"] = x, z
        else:
            out[name] = t
    return out


def join_in_proj(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `split_in_proj` (names otherwise unchanged)."""
    out = {}
    for name, t in state.items():
        head, sep, leaf = name.rpartition(".in_proj_x.")
        if sep:
            out[f"{head}.in_proj.{leaf}"] = torch.cat([t, state[f"{head}.in_proj_z.{leaf}"]])
        elif ".in_proj_z." not in name:
            out[name] = t
    return out


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path} has no model.safetensors(.index.json); save the model with "
                         "safe_serialization=True")
    out = {}
    for f in files:
        out.update(load_file(str(path / f)))
    return out


def load_mamba_hf(path, *, dtype: torch.dtype = torch.float32, parallel=None):
    """Build a ctxscale `mamba` model from a Hugging Face MambaForCausalLM directory."""
    from ctxscale.models.hybrid import HybridLM

    path = Path(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    model = HybridLM(cfg, parallel)
    state = split_in_proj({hf_to_ctxscale_name(k): v for k, v in _read_weights(path).items()})
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the Mamba model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.to(dtype)


def save_mamba_hf(model, path) -> None:
    """Write `model` (family mamba) as a Hugging Face MambaForCausalLM directory."""
    from safetensors.torch import save_file

    cfg = model.cfg
    if cfg.family != "mamba" or cfg.mamba.mlp:
        raise ValueError("save_mamba_hf needs a model of family mamba without MLP blocks")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in join_in_proj(model.state_dict()).items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        tensors[ctxscale_to_hf_name(name)] = t.detach().contiguous().cpu()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf = config_to_hf(cfg)
    hf["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


__all__ = ["config_from_hf", "config_to_hf", "load_mamba_hf", "save_mamba_hf"]
