"""Hugging Face `MambaForCausalLM` / `Mamba2ForCausalLM` checkpoints <-> ctxscale `mamba` /
`mamba2` models.

A checkpoint directory holds `config.json` (model_type "mamba" or "mamba2") and safetensors
weights (one `model.safetensors` or shards listed in `model.safetensors.index.json`). Names map as

    backbone.embeddings.weight          <-> tok_embeddings.weight   (older: backbone.embedding.)
    backbone.layers.{i}.norm.weight     <-> layers.{i}.mixer_norm.weight
    backbone.layers.{i}.mixer.{p}       <-> layers.{i}.mixer.{p}    (Mamba-1: conv1d, x_proj,
                                            dt_proj, A_log, D, out_proj; Mamba-2: dt_bias,
                                            A_log, D, out_proj)
    backbone.norm_f.weight              <-> norm.weight
    lm_head.weight                      <-> output.weight           (absent when tied)

and the fused tensors are split by rows (E = expand · hidden_size, GN = n_groups · state_size,
H = num_heads):

    Mamba-1  mixer.in_proj.*  [x; z] (E, E)           <-> mixer.in_proj_x.*, mixer.in_proj_z.*
    Mamba-2  mixer.in_proj.*  [z; x; B; C; dt]        <-> mixer.in_proj_{z,x,B,C,dt}.*
             mixer.conv1d.*   [x; B; C] (E, GN, GN)   <-> mixer.conv_{x,B,C}.*
             mixer.norm.weight (the gated RMSNorm)    <-> mixer.norm_weight

Config: hidden_size -> dim, num_hidden_layers -> num_layers, state_size -> d_state,
conv_kernel -> d_conv, expand, time_step_rank -> dt_rank (Mamba-1), head_dim / n_groups /
time_step_limit -> mamba.head_dim / n_groups / dt_limit_min, dt_limit_max (Mamba-2),
use_bias / use_conv_bias -> bias / conv_bias, layer_norm_epsilon -> norm_eps,
tie_word_embeddings -> tie_embeddings. The math is the same as Hugging Face's (RMSNorm in
float32, softplus Δ, silu conv and gate, Mamba-2's gated group RMSNorm), so logits agree to
float32 rounding (tested against transformers).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ctxscale.models.config import MambaConfig, ModelConfig

_PREFIXES = (("backbone.embeddings.", "tok_embeddings."), ("backbone.embedding.", "tok_embeddings."),
             ("backbone.norm_f.", "norm."), ("lm_head.", "output."))


def _json_float(v) -> float:
    """A float from config.json: a number, or transformers' {"__float__": "Infinity"}."""
    return float(v["__float__"] if isinstance(v, dict) else v)


def config_from_hf(hf: dict) -> ModelConfig:
    """ctxscale ModelConfig (family mamba or mamba2) from a Hugging Face Mamba / Mamba2
    config.json dict."""
    model_type = hf.get("model_type")
    if model_type not in ("mamba", "mamba2"):
        raise ValueError(f"config.json has model_type {model_type!r}; expected 'mamba' or "
                         "'mamba2'")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"Mamba hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    dim, expand = hf["hidden_size"], hf.get("expand", 2)
    common = dict(
        vocab_size=hf["vocab_size"], dim=dim, num_layers=hf["num_hidden_layers"],
        num_heads=1, head_dim=dim + dim % 2,  # unused by Mamba; keeps validate() happy
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )
    ssm = dict(d_conv=hf.get("conv_kernel", 4), expand=expand, bias=hf.get("use_bias", False),
               conv_bias=hf.get("use_conv_bias", True), dt_min=hf.get("time_step_min", 0.001),
               dt_max=hf.get("time_step_max", 0.1), dt_floor=hf.get("time_step_floor", 1e-4))
    if model_type == "mamba2":
        heads, head_dim = hf.get("num_heads", 128), hf.get("head_dim", 64)
        if heads * head_dim != expand * dim:
            raise ValueError(f"num_heads x head_dim = {heads} x {head_dim} is not expand x "
                             f"hidden_size = {expand} x {dim}: an inconsistent Mamba2 config")
        lo, hi = (_json_float(v) for v in hf.get("time_step_limit", (0.0, math.inf)))
        return ModelConfig(
            family="mamba2", **common, tie_embeddings=hf.get("tie_word_embeddings", False),
            mamba=MambaConfig(d_state=hf.get("state_size", 128), head_dim=head_dim,
                              n_groups=hf.get("n_groups", 8), dt_limit_min=lo,
                              dt_limit_max=hi, **ssm),
        )
    inner = hf.get("intermediate_size", expand * dim)
    if inner != expand * dim:
        raise ValueError(
            f"intermediate_size={inner} is not expand·hidden_size={expand * dim}; ctxscale's "
            "Mamba mixer uses expand·dim channels"
        )
    rank = hf.get("time_step_rank", "auto")
    rank = math.ceil(dim / 16) if rank == "auto" else int(rank)
    return ModelConfig(
        family="mamba", **common, tie_embeddings=hf.get("tie_word_embeddings", True),
        mamba=MambaConfig(d_state=hf.get("state_size", 16), dt_rank=rank, **ssm),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    m = cfg.mamba
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.num_layers,
        "state_size": m.d_state, "conv_kernel": m.d_conv, "expand": m.expand,
        "use_bias": m.bias, "use_conv_bias": m.conv_bias, "hidden_act": "silu",
        "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "residual_in_fp32": True, "time_step_min": m.dt_min, "time_step_max": m.dt_max,
        "time_step_floor": m.dt_floor, "initializer_range": cfg.init_std,
        "rescale_prenorm_residual": False, "use_cache": True,
        "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0,
    }
    if cfg.family == "mamba2":
        return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", **common,
                "num_heads": m.expand * cfg.dim // m.head_dim, "head_dim": m.head_dim,
                "n_groups": m.n_groups, "time_step_limit": [m.dt_limit_min, m.dt_limit_max],
                "time_step_rank": m.rank(cfg.dim), "chunk_size": 256}
    return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", **common,
            "intermediate_size": m.expand * cfg.dim, "time_step_rank": m.rank(cfg.dim),
            "time_step_scale": 1.0, "time_step_init_scheme": "random"}


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


def _fused(cfg: ModelConfig) -> list[tuple[str, str, tuple[str, ...], list[int]]]:
    """Hugging Face's fused mixer tensors of `cfg`'s family: (fused name, our name prefix,
    parts, rows per part), rows in the order they are stacked (module docstring)."""
    m = cfg.mamba
    inner = m.expand * cfg.dim
    if cfg.family != "mamba2":
        return [("in_proj", "in_proj_", ("x", "z"), [inner, inner])]
    gn = m.n_groups * m.d_state
    return [("in_proj", "in_proj_", ("z", "x", "B", "C", "dt"),
             [inner, inner, gn, gn, inner // m.head_dim]),
            ("conv1d", "conv_", ("x", "B", "C"), [inner, gn, gn])]


# Mamba-2's gated RMSNorm: Hugging Face's mixer.norm module is our mixer.norm_weight
_NORM_HF, _NORM_OURS = "mixer.norm.weight", "mixer.norm_weight"


def split_in_proj(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face's fused tensors as ours: Mamba-1's `mixer.in_proj` (rows `[x; z]`) as
    `in_proj_x` / `in_proj_z`; Mamba-2's `in_proj` [z; x; B; C; dt], `conv1d` [x; B; C] and
    the gated norm's `norm.weight` (module docstring)."""
    fused = _fused(cfg)
    out = {}
    for name, t in state.items():
        for hf_name, prefix, parts, rows in fused:
            head, sep, leaf = name.rpartition(f".{hf_name}.")
            if sep and head.endswith("mixer"):
                for part, piece in zip(parts, t.split(rows)):
                    out[f"{head}.{prefix}{part}.{leaf}"] = piece
                break
        else:
            if cfg.family == "mamba2" and name.endswith(_NORM_HF):
                name = name[: -len(_NORM_HF)] + _NORM_OURS
            out[name] = t
    return out


def join_in_proj(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `split_in_proj` (names otherwise unchanged)."""
    fused = _fused(cfg)
    out = {}
    for name, t in state.items():
        for hf_name, prefix, parts, _ in fused:
            head, sep, rest = name.rpartition(f".{prefix}")
            part, _, leaf = rest.partition(".")
            if sep and head.endswith("mixer") and part in parts:
                if part == parts[0]:
                    out[f"{head}.{hf_name}.{leaf}"] = torch.cat(
                        [state[f"{head}.{prefix}{p}.{leaf}"] for p in parts])
                break
        else:
            if cfg.family == "mamba2" and name.endswith(_NORM_OURS):
                name = name[: -len(_NORM_OURS)] + _NORM_HF
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
    """Build a ctxscale `mamba` / `mamba2` model from a Hugging Face MambaForCausalLM /
    Mamba2ForCausalLM directory."""
    from ctxscale.models.hybrid import HybridLM

    path = Path(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    model = HybridLM(cfg, parallel)
    state = split_in_proj({hf_to_ctxscale_name(k): v for k, v in _read_weights(path).items()},
                          cfg)
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the {cfg.family} model: missing "
                         f"{missing}, unexpected {unexpected}")
    return model.to(dtype)


def save_mamba_hf(model, path) -> None:
    """Write `model` (family mamba or mamba2) as a Hugging Face MambaForCausalLM /
    Mamba2ForCausalLM directory."""
    from safetensors.torch import save_file

    cfg = model.cfg
    if cfg.family not in ("mamba", "mamba2") or cfg.mamba.mlp:
        raise ValueError("save_mamba_hf needs a model of family mamba or mamba2 without MLP "
                         "blocks")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in join_in_proj(model.state_dict(), cfg).items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        tensors[ctxscale_to_hf_name(name)] = t.detach().contiguous().cpu()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf = config_to_hf(cfg)
    hf["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


__all__ = ["config_from_hf", "config_to_hf", "load_mamba_hf", "save_mamba_hf"]
