"""Hugging Face checkpoints (Llama, Mistral, Qwen2) to a ctxscale `Transformer` and back.

A checkpoint is a local directory with `config.json` and safetensors weights, either one
`model.safetensors` or shards listed in `model.safetensors.index.json`. Weights are read only
through safetensors (never pickle). The three layouts are the same decoder with these names:

    model.embed_tokens.weight                       -> tok_embeddings.weight
    model.layers.{i}.input_layernorm.weight         -> layers.{i}.attention_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.*     -> layers.{i}.attention.{wq,wk,wv,wo}.*
    model.layers.{i}.post_attention_layernorm.weight-> layers.{i}.ffn_norm.weight
    model.layers.{i}.mlp.{gate,down,up}_proj.*      -> layers.{i}.feed_forward.{w1,w2,w3}.*
    model.norm.weight                               -> norm.weight
    lm_head.weight (absent when tied)               -> output.weight

No permutation is needed: ctxscale's RoPE uses the same rotate-half convention as HF Llama.
Differences between the families live in config.json: Qwen2 always has q/k/v biases (our
`attention_bias`), Llama's `attention_bias` also puts a bias on o_proj (accepted on load only
when it is zero), Mistral and Qwen2 may declare a sliding window (accepted only where it never
masks anything, i.e. null / disabled / >= max_position_embeddings). RoPE: `rope_theta` and
`rope_scaling` (HF 4.x) or `rope_parameters` (HF 5.x) with `rope_type` (or the older `type`)
default, linear, llama3 or yarn map to `RopeScaling`; `dynamic` NTK changes the frequencies with
the sequence length at inference and has no fixed-frequency equivalent: it is refused with a
message (override `rope_scaling` to load it with plain frequencies, exact up to
max_position_embeddings).

The loaded model remembers the source `config.json` in `model.hf_config`, so `save_hf` writes the
same family (and keeps fields such as token ids) unless told otherwise; a model built by ctxscale
is saved as `llama`.

Linear-attention and hybrid (A/L) models (`linear` / `hybrid` families, e.g. from `linearize`) are
written as a Llama directory plus a `ctxscale` block in config.json and extra tensors
(`model.layers.{i}.self_attn.feature_map_q.weight`, ...): see models/hf_linear.py. `load_hf`
reads them back exactly; transformers would load such a folder as a plain softmax Llama and
silently drop the extra tensors, so `load_hf` is the only supported reader.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from ctxscale.kernels.rotary import RopeScaling
from ctxscale.models.config import ModelConfig

SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# Defaults of the HF config classes for fields a config.json may leave out.
_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "mistral": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")

_LAYER_MAP = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
_TOP_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


# ----------------------------------------------------------------------------- names


def hf_to_ctxscale_name(name: str) -> str | None:
    """HF tensor name -> ctxscale state-dict name (None if it is not a decoder weight)."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m is None:
        return None
    layer, rest = m.groups()
    for hf, ours in _LAYER_MAP.items():
        if rest == hf:
            return f"layers.{layer}.{ours}"
        if rest.startswith(hf + "."):
            return f"layers.{layer}.{ours}{rest[len(hf):]}"
    return None


def ctxscale_to_hf_name(name: str) -> str:
    for hf, ours in _TOP_MAP.items():
        if name == ours:
            return hf
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is not None:
        layer, rest = m.groups()
        for hf, ours in _LAYER_MAP.items():
            if rest == ours or rest.startswith(ours + "."):
                return f"model.layers.{layer}.{hf}{rest[len(ours):]}"
    raise ValueError(f"ctxscale parameter {name!r} has no Hugging Face Llama equivalent")


# ----------------------------------------------------------------------------- config


def _rope_dict(hf: dict) -> tuple[float, dict]:
    """(rope_theta, scaling dict or {}) from either HF config style."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, dict) and params:
        if any(isinstance(v, dict) for v in params.values()):
            raise ValueError("config.json has per-layer-type `rope_parameters`; ctxscale supports "
                             "one RoPE setting for all layers")
        theta = params.get("rope_theta", theta)
        if scaling is None:
            scaling = params
    return float(theta if theta is not None else 10000.0), dict(scaling or {})


def rope_scaling_from_hf(hf: dict, head_dim: int) -> tuple[float, RopeScaling]:
    """HF `rope_theta` + `rope_scaling` / `rope_parameters` -> (base, RopeScaling)."""
    theta, sc = _rope_dict(hf)
    kind = sc.get("rope_type", sc.get("type", "default")) or "default"
    if sc.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) not in (1, 1.0, None):
        raise ValueError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    max_pos = hf.get("max_position_embeddings")
    orig = sc.get("original_max_position_embeddings") or hf.get(
        "original_max_position_embeddings") or max_pos or 8192
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling(type="linear", factor=float(sc["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            type="llama3", factor=float(sc["factor"]),
            low_freq_factor=float(sc.get("low_freq_factor", 1.0)),
            high_freq_factor=float(sc.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(orig),
        )
    if kind == "yarn":
        factor = sc.get("factor")
        if factor is None:
            factor = max_pos / orig
        scaling = RopeScaling(
            type="yarn", factor=float(factor), original_max_position_embeddings=int(orig),
            beta_fast=float(sc.get("beta_fast") or 32.0), beta_slow=float(sc.get("beta_slow") or 1.0),
        )
        if sc.get("truncate", True) is False:
            raise ValueError("yarn rope_scaling with truncate=false is not supported")
        ours = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        theirs = sc.get("attention_factor")
        if theirs is None and sc.get("mscale") and sc.get("mscale_all_dim"):
            raise ValueError("yarn rope_scaling with mscale/mscale_all_dim (DeepSeek style) is not "
                             "supported; only the default attention factor 0.1·ln(factor)+1")
        if theirs is not None and abs(float(theirs) - ours) > 1e-6:
            raise ValueError(f"yarn attention_factor={theirs} differs from the default {ours:.6f} "
                             "that ctxscale applies; not supported")
        return theta, scaling
    if kind == "dynamic":
        raise ValueError(
            "rope_scaling type 'dynamic' (dynamic NTK) recomputes RoPE frequencies from the current "
            "sequence length at inference; ctxscale trains with fixed frequencies and has no exact "
            "equivalent. Pass config_overrides={'rope_scaling': RopeScaling()} to load it with plain "
            "frequencies (identical to HF up to max_position_embeddings), or RopeScaling(type='ntk', "
            "factor=...) for static NTK-aware scaling"
        )
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: default, linear, "
                     "llama3, yarn (and dynamic via config_overrides)")


def _check_sliding_window(hf: dict, model_type: str, max_pos: int) -> None:
    window = hf.get("sliding_window")
    if model_type == "qwen2":
        if not hf.get("use_sliding_window", False):
            return
        layer_types = hf.get("layer_types")
        if layer_types is not None and "sliding_attention" not in layer_types:
            return
        if layer_types is None and hf.get("max_window_layers", 28) >= hf["num_hidden_layers"]:
            return
    if window is None or window >= max_pos:
        return
    raise ValueError(
        f"config.json sets sliding_window={window} < max_position_embeddings={max_pos}: ctxscale's "
        "attention has no sliding window yet, so the model would attend further than it was trained "
        "to. Use a checkpoint without a sliding window (sliding_window: null)"
    )


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A HF config.json dict -> `ModelConfig` (overrides: ModelConfig fields set afterwards)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(SUPPORTED)} ({', '.join(SUPPORTED.values())})")
    archs = hf.get("architectures") or []
    if archs and not any(a in SUPPORTED.values() for a in archs):
        raise ValueError(f"architectures {archs} are not supported; supported: "
                         f"{', '.join(SUPPORTED.values())} (a causal-LM head is required)")
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks required field(s) {missing}")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={act!r} is not supported (ctxscale's MLP is SwiGLU, silu)")
    hf = {**_DEFAULTS[model_type], **hf}
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    max_pos = int(hf["max_position_embeddings"])
    _check_sliding_window(hf, model_type, max_pos)
    if "rope_scaling" in overrides:
        theta, scaling = _rope_dict(hf)[0], overrides.pop("rope_scaling")
    else:
        theta, scaling = rope_scaling_from_hf(hf, head_dim)
    cfg = ModelConfig(
        vocab_size=int(hf["vocab_size"]), dim=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(head_dim),
        ffn_dim=int(hf["intermediate_size"]), norm_eps=float(hf["rms_norm_eps"]),
        rope_base=theta, rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), max_seq_len=max_pos,
    )
    if overrides:
        unknown = [k for k in overrides if not hasattr(cfg, k)]
        if unknown:
            raise ValueError(f"config_overrides {unknown} are not ModelConfig fields")
        cfg = replace(cfg, **overrides)
    cfg.validate()
    return cfg


def config_to_hf(cfg: ModelConfig, model_type: str = "llama", base: dict | None = None) -> dict:
    """`ModelConfig` -> HF config.json dict of `model_type` (fields of `base` kept)."""
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type {model_type!r} is not supported; use one of {list(SUPPORTED)}")
    if model_type in ("mistral", "qwen2") and cfg.mlp_bias:
        raise ValueError(f"{model_type} has no MLP biases; save this model as model_type='llama'")
    if model_type == "mistral" and cfg.attention_bias:
        raise ValueError("mistral has no attention biases; save as model_type='qwen2' or 'llama'")
    hf = {k: v for k, v in (base or {}).items()
          if k not in ("rope_scaling", "rope_parameters", "rope_theta", "torch_dtype", "dtype",
                       "transformers_version", "_name_or_path", "ctxscale")}
    sc = cfg.rope_scaling
    theta = float(cfg.rope_base)
    hd = cfg.per_head_dim
    scaling = None
    if sc.type == "ntk":  # static NTK-aware scaling is a plain RoPE with a larger base
        theta = theta * sc.factor ** (hd / (hd - 2))
    elif sc.type == "linear":
        scaling = {"rope_type": "linear", "factor": sc.factor}
    elif sc.type == "llama3":
        scaling = {"rope_type": "llama3", "factor": sc.factor, "low_freq_factor": sc.low_freq_factor,
                   "high_freq_factor": sc.high_freq_factor,
                   "original_max_position_embeddings": sc.original_max_position_embeddings}
    elif sc.type == "yarn":
        scaling = {"rope_type": "yarn", "factor": sc.factor, "beta_fast": sc.beta_fast,
                   "beta_slow": sc.beta_slow,
                   "original_max_position_embeddings": sc.original_max_position_embeddings}
    hf.update(
        model_type=model_type, architectures=[SUPPORTED[model_type]], vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads, head_dim=hd,
        hidden_act="silu", rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, rope_theta=theta,
        # HF 4.x reads rope_theta + rope_scaling, HF 5.x rope_parameters: write both.
        rope_scaling=scaling,
        rope_parameters={**(scaling or {"rope_type": "default"}), "rope_theta": theta},
    )
    if model_type == "llama":
        hf.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    elif model_type == "mistral":
        hf["sliding_window"] = None
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    hf.setdefault("use_cache", True)
    return hf


# ----------------------------------------------------------------------------- reading


def _read_tensors(path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    index_path, single = path / INDEX_FILE, path / SINGLE_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path} is not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        files = [SINGLE_FILE]
    else:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
        hint = (f" It holds {pickled[:3]} (pickle), which load_hf never reads: convert it with "
                "transformers' save_pretrained(..., safe_serialization=True).") if pickled else ""
        raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}.{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise ValueError(f"{INDEX_FILE} lists shard {name!r} but {file} does not exist")
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"cannot read {file}: it is not a valid safetensors file (corrupt or "
                             f"truncated?): {e}") from e
    return tensors


def _few(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def _convert_state_dict(tensors: dict, cfg: ModelConfig, expected: dict, dtype) -> dict:
    out, unexpected = {}, []
    for name, t in tensors.items():
        if _IGNORED_TENSORS.fullmatch(name):
            continue
        if re.fullmatch(r"model\.layers\.\d+\.self_attn\.o_proj\.bias", name):
            if torch.count_nonzero(t):  # Llama attention_bias=True: o_proj bias must be zero
                raise ValueError(f"{name} is non-zero; ctxscale's attention has no output bias")
            continue
        ours = hf_to_ctxscale_name(name)
        if ours is None or ours not in expected:
            unexpected.append(name)
            continue
        out[ours] = t
    if cfg.tie_embeddings:
        out.pop("output.weight", None)  # some checkpoints store the tied copy too
    want = {k for k in expected if not (cfg.tie_embeddings and k == "output.weight")}
    missing = want - out.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors (HF names): "
                         f"{_few(ctxscale_to_hf_name(n) for n in missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_few(unexpected)}")
            if cfg.family == "transformer" and any(
                    re.fullmatch(r"model\.layers\.\d+\.self_attn\.(feature_map_[qk]\..+|[qk]_conv|"
                                 r"w[gb]\..+|out_norm)", n) for n in unexpected):
                parts.append("these are linear-attention tensors written by ctxscale's save_hf, "
                             "but config.json has no `ctxscale` block: restore config.json "
                             "from the save_hf output")
        raise ValueError("checkpoint does not match its config.json: " + "; ".join(parts))
    for name, t in out.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"tensor {ctxscale_to_hf_name(name)} has shape {tuple(t.shape)}, "
                             f"config.json implies {tuple(expected[name].shape)}")
        out[name] = t.to(dtype)
    return out


def load_hf(path, *, dtype: torch.dtype = torch.float32, device="cpu", parallel=None,
            config_overrides: dict | None = None):
    """Load a local HF Llama / Mistral / Qwen2 checkpoint directory into a ctxscale Transformer
    (a Mamba directory, `model_type: mamba` or `mamba2`, goes to `models/hf_mamba.load_mamba_hf`; a folder
    whose config.json has a `ctxscale` block, written by `save_hf` for a linear / hybrid model,
    gives that `HybridLM`: models/hf_linear.py).

    `dtype`: parameter dtype; `config_overrides`: ModelConfig fields to change (for example
    `max_seq_len`, `activation_checkpointing`, or `rope_scaling` for context extension).
    The returned model carries the source config.json as `model.hf_config`."""
    from ctxscale.kernels.rotary import rope_inv_freq
    from ctxscale.models import build_model

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory; load_hf takes a local Hugging Face checkpoint "
                         "folder (download it first, e.g. `huggingface-cli download <repo> "
                         "--local-dir DIR`)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    if hf.get("model_type") in ("mamba", "mamba2"):
        from ctxscale.models.hf_mamba import load_mamba_hf

        return load_mamba_hf(path, dtype=dtype, parallel=parallel)
    overrides = dict(config_overrides or {})
    if "ctxscale" in hf:  # a linear / hybrid model written by save_hf
        from ctxscale.models.hf_linear import extension_overrides

        overrides = {**extension_overrides(hf, str(config_file)), **overrides}
    cfg = config_from_hf(hf, **overrides)
    linear = cfg.family in ("linear", "hybrid")
    if linear:
        from ctxscale.models.hf_linear import check_layer_codes

        check_layer_codes(hf, cfg, str(config_file))
    with torch.device("meta"):
        model = build_model(cfg, parallel)
    expected = model.state_dict()
    tensors, extras = _read_tensors(path, device), {}
    if linear:
        from ctxscale.models.hf_linear import split_state_dict

        tensors, extras, expected = split_state_dict(tensors, expected, str(path))
    state = _convert_state_dict(tensors, cfg, expected, dtype)
    state.update({k: t.to(dtype) for k, t in extras.items()})
    model.load_state_dict(state, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    inv_freq, _ = rope_inv_freq(cfg.per_head_dim, cfg.rope_base, cfg.rope_scaling)
    model.rope_inv_freq = inv_freq.to(device)
    model.hf_config = hf
    return model


# ----------------------------------------------------------------------------- writing


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if m is None:
        raise ValueError(f"max_shard_size {size!r}: use bytes (int) or a string like '5GB', '200MB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _our_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir()
                  if p.name == "config.json" or re.fullmatch(r"model.*\.safetensors(\.index\.json)?",
                                                            p.name))


def save_hf(model, path, *, model_type: str | None = None, max_shard_size="5GB",
            dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write `model` as a HF checkpoint directory: config.json + safetensors (sharded with
    `model.safetensors.index.json` when larger than `max_shard_size`).

    `model_type`: llama / mistral / qwen2 (default: the family it was loaded from, else llama).
    A `linear` / `hybrid` model (softmax A and linear L layers) is written as llama plus the
    `ctxscale` config block and extra tensors of models/hf_linear.py; read it back with `load_hf`
    (transformers would drop the extra tensors and run softmax attention everywhere).
    Refuses to replace an existing config.json or weights unless `overwrite=True` (then the old
    weight files are removed so no stale shard remains). Returns the directory."""
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)
    cfg: ModelConfig = model.cfg
    base = getattr(model, "hf_config", None)
    extension, hf_name = None, ctxscale_to_hf_name
    if cfg.family != "transformer":
        from ctxscale.models.hf_linear import extension_block, linear_to_hf_name

        extension, hf_name = extension_block(cfg), linear_to_hf_name
        if model_type not in (None, "llama"):
            raise ValueError(f"a {cfg.family} model is saved as model_type 'llama' (plus the "
                             f"ctxscale block), not {model_type!r}; drop model_type")
        model_type = "llama"
    model_type = model_type or (base or {}).get("model_type") or "llama"
    if base and base.get("model_type") != model_type:
        base = None
    hf = config_to_hf(cfg, model_type, base)
    if extension is not None:
        hf["ctxscale"] = extension
    if any(getattr(model, part, None) is None for part in ("tok_embeddings", "norm", "output")):
        raise ValueError("save_hf needs the whole model; this looks like a pipeline stage")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    if path.is_dir() and _our_files(path) and not overwrite:
        raise ValueError(f"{path} already holds {[p.name for p in _our_files(path)]}; pass "
                         "overwrite=True to replace them or choose a new directory")

    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        t = t.detach().to("cpu", dtype or t.dtype).contiguous().clone()
        tensors[hf_name(name)] = t
    if model_type == "llama" and cfg.attention_bias:  # Llama's attention_bias includes o_proj
        for i in range(cfg.num_layers):
            tensors[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(
                cfg.dim, dtype=tensors["model.embed_tokens.weight"].dtype)
    if model_type == "qwen2" and not cfg.attention_bias:  # Qwen2 always has q/k/v biases
        for i in range(cfg.num_layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                w = tensors[f"model.layers.{i}.self_attn.{proj}.weight"]
                tensors[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(w.shape[0],
                                                                                   dtype=w.dtype)
    dtypes = {t.dtype for t in tensors.values()}
    hf["torch_dtype"] = str(next(iter(dtypes)) if len(dtypes) == 1 else torch.float32)[6:]

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors, key=_tensor_order):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        written = []
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
            written.append(SINGLE_FILE)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in shard})
                written.append(fname)
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
            written.append(INDEX_FILE)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        written.append("config.json")
        path.mkdir(parents=True, exist_ok=True)
        for old in _our_files(path):  # only reached when overwrite=True (checked above)
            old.unlink()
        for name in written:
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _tensor_order(name: str):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else (0 if "embed" in name else 2, 0, name)


__all__ = ["load_hf", "save_hf", "config_from_hf", "config_to_hf", "hf_to_ctxscale_name",
           "ctxscale_to_hf_name"]
