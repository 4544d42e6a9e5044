"""Linear-attention and hybrid (A/L) models in a Hugging Face Llama checkpoint directory.

A `linear` or `hybrid` model whose layers are softmax attention (`A`) and linear attention (`L`),
e.g. a student made by `models/linearize.py` from a Llama teacher, is the teacher's decoder with
some attention layers computing φ(q)ᵀ Σ φ(k)vᵀ instead of softmax (models/linear_attention.py).
`save_hf` writes it as a Llama directory plus an extension:

config.json: every Llama field (`model_type: llama`, `LlamaForCausalLM`, sizes, RoPE, ...) as
`config_to_hf` writes it for a Transformer, plus one block that only ctxscale reads:

    "ctxscale": {"format": 1, "family": "linear" | "hybrid",
                 "layer_pattern": "LLLA",            # ModelConfig.layer_pattern
                 "layer_codes": "LLLALLLA",          # the letter of every layer (checked on load)
                 "linear_attention": {...}}          # dataclasses.asdict(LinearAttentionConfig)

model.safetensors: the Llama names of `models/hf.py` for every tensor that has one (embeddings,
norms, q/k/v/o of every layer, softmax or linear, MLP, lm_head), and the linear-attention
parameters under the same layer prefix (`layers.{i}.attention.X -> model.layers.{i}.self_attn.X`):

    model.layers.{i}.self_attn.feature_map_{q,k}.{weight,bias}   hedgehog map (heads, d, F), (heads, F)
    model.layers.{i}.self_attn.{q,k}_conv                        lawcat     (channels, conv_width)
    model.layers.{i}.self_attn.wg.{weight,bias}                  lawcat gate (heads, dim), (heads,)
    model.layers.{i}.self_attn.wb.{weight,bias}                  write gate (heads, dim), (heads,)
    model.layers.{i}.self_attn.out_norm                          rms output norm (heads · d,)

`load_hf` (models/hf.py) sees the block and rebuilds the same `HybridLM`: an exact copy (same
float32 logits). The supported reader is `load_hf` (or `load_model`, which calls it).
transformers reads only `model_type: llama`: `AutoModelForCausalLM.from_pretrained` on such a
folder builds a softmax Llama, silently drops the extra tensors (it only warns about unused
weights) and computes softmax attention in every layer; its logits are not this model's. The
Llama-named tensors are the real ones, so the softmax parts (embeddings, MLPs, q/k/v/o) stay
usable by any Llama tool. A `plain` model has no extra tensors at all, so only the block tells it
apart from a softmax Llama: keep config.json whole.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing

from ctxscale.models.config import LINEAR_ATTENTION_KINDS, LinearAttentionConfig, ModelConfig

EXTENSION_KEY = "ctxscale"
FORMAT_VERSION = 1
LINEAR_FAMILIES = ("linear", "hybrid")
_LINEAR_LAYER = re.compile(r"layers\.(\d+)\.attention\.(.+)")
_HF_LINEAR_LAYER = re.compile(r"model\.layers\.(\d+)\.self_attn\.(.+)")


# ----------------------------------------------------------------------------- names


def linear_to_hf_name(name: str) -> str:
    """ctxscale name -> HF name: the Llama name where one exists (`hf.ctxscale_to_hf_name`),
    else `layers.{i}.attention.X` -> `model.layers.{i}.self_attn.X`."""
    from ctxscale.models.hf import ctxscale_to_hf_name

    try:
        return ctxscale_to_hf_name(name)
    except ValueError:
        m = _LINEAR_LAYER.fullmatch(name)
        if m is None:
            raise
        return f"model.layers.{m.group(1)}.self_attn.{m.group(2)}"


def _extra_ctxscale_name(hf_name: str) -> str | None:
    m = _HF_LINEAR_LAYER.fullmatch(hf_name)
    return None if m is None else f"layers.{m.group(1)}.attention.{m.group(2)}"


def _is_extra(name: str) -> bool:
    """True for ctxscale names without a Llama equivalent (linear-attention parameters)."""
    from ctxscale.models.hf import ctxscale_to_hf_name

    try:
        ctxscale_to_hf_name(name)
    except ValueError:
        return True
    return False


# ----------------------------------------------------------------------------- config


def extension_block(cfg: ModelConfig) -> dict:
    """The `ctxscale` block of config.json for a linear / hybrid model (ValueError otherwise)."""
    from ctxscale.models.hybrid import layer_codes

    if cfg.family in ("mamba", "mamba2"):
        raise ValueError(f"save_hf writes Llama-family checkpoints; a {cfg.family} model is "
                         "written by ctxscale.models.hf_mamba.save_mamba_hf (Hugging Face "
                         "MambaForCausalLM / Mamba2ForCausalLM)")
    if cfg.family not in LINEAR_FAMILIES:
        raise ValueError(f"save_hf cannot write a {cfg.family!r} model (no Hugging Face "
                         "equivalent); save it with launch.convert.save_model and load it "
                         "with load_model")
    codes = layer_codes(cfg)
    if set(codes) - set("AL"):
        raise ValueError(f"save_hf writes hybrid models of softmax (A) and linear (L) layers only; "
                         f"this one has layers {codes!r} (M / P layers have no Llama form): save "
                         "it with launch.convert.save_model and load it with load_model")
    return {"format": FORMAT_VERSION, "family": cfg.family, "layer_pattern": cfg.layer_pattern,
            "layer_codes": codes,
            "linear_attention": dataclasses.asdict(cfg.linear_attention)}


def _corrupt(where: str, problem: str) -> ValueError:
    return ValueError(
        f"{where}: the `{EXTENSION_KEY}` block is invalid: {problem}. It is written by save_hf "
        "for linear / hybrid models; restore config.json from the save_hf output (or re-export "
        "the model with save_hf), or delete the block to load the folder as a softmax Llama "
        "(dropping the linear-attention layers)"
    )


def _check_literal(value, tp, key: str, where: str) -> None:
    """Refuse values outside a Literal (also inside `X | None`)."""
    args = [tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    if not literals or (value is None and type(None) in args):
        return
    allowed = [v for lit in literals for v in typing.get_args(lit)]
    if value not in allowed:
        raise _corrupt(where, f"linear_attention.{key}={value!r} is not one of {allowed}")


def _dataclass_from_dict(cls, data, where: str, path: str):
    """`cls(**data)` for a config dataclass, recursing into nested dataclass fields; unknown keys
    are refused (a block written by a newer ctxscale), missing keys take the defaults."""
    if not isinstance(data, dict):
        raise _corrupt(where, f"{path} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _corrupt(where, f"{path} has unknown field(s) {unknown} (written by a newer "
                              f"ctxscale? known: {sorted(fields)})")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            value = _dataclass_from_dict(tp, value, where, f"{path}.{key}")
        else:
            _check_literal(value, tp, key, where)
        kwargs[key] = value
    return cls(**kwargs)


def extension_overrides(hf: dict, where: str) -> dict:
    """ModelConfig fields (family, layer_pattern, linear_attention) from config.json's block."""
    block = hf[EXTENSION_KEY]
    if not isinstance(block, dict):
        raise _corrupt(where, f"it must be a JSON object, got {type(block).__name__}")
    missing = [k for k in ("format", "family", "layer_pattern", "linear_attention")
               if k not in block]
    if missing:
        raise _corrupt(where, f"it lacks {missing}")
    if block["format"] != FORMAT_VERSION:
        raise _corrupt(where, f"format {block['format']!r} is not {FORMAT_VERSION} (written by "
                              "another ctxscale version?)")
    if hf.get("model_type") != "llama":
        raise _corrupt(where, f"it needs model_type 'llama', config.json has "
                              f"{hf.get('model_type')!r}")
    family, pattern = block["family"], block["layer_pattern"]
    if family not in LINEAR_FAMILIES:
        raise _corrupt(where, f"family {family!r} is not one of {list(LINEAR_FAMILIES)}")
    if not isinstance(pattern, str) or not pattern or set(pattern) - set("AL"):
        raise _corrupt(where, f"layer_pattern {pattern!r} must be a non-empty string of A and L")
    la = _dataclass_from_dict(LinearAttentionConfig, block["linear_attention"], where,
                              "linear_attention")
    if la.kind not in LINEAR_ATTENTION_KINDS:
        raise _corrupt(where, f"linear_attention.kind {la.kind!r} is not one of "
                              f"{list(LINEAR_ATTENTION_KINDS)}")
    return {"family": family, "layer_pattern": pattern, "linear_attention": la}


def check_layer_codes(hf: dict, cfg: ModelConfig, where: str) -> None:
    from ctxscale.models.hybrid import layer_codes

    stored = hf[EXTENSION_KEY].get("layer_codes")
    if stored is not None and stored != layer_codes(cfg):
        raise _corrupt(where, f"layer_codes {stored!r} disagree with layer_pattern "
                              f"{cfg.layer_pattern!r} over {cfg.num_layers} layers "
                              f"({layer_codes(cfg)!r})")


# ----------------------------------------------------------------------------- tensors


def split_state_dict(tensors: dict, expected: dict, where: str) -> tuple[dict, dict, dict]:
    """Split HF tensors into (Llama-named tensors, linear-attention tensors by ctxscale name) and
    the expected dict into its Llama part. ValueError naming any missing or misshapen extra."""
    extra_expected = {k: v for k, v in expected.items() if _is_extra(k)}
    llama_expected = {k: v for k, v in expected.items() if k not in extra_expected}
    llama, extras = {}, {}
    for name, t in tensors.items():
        ours = _extra_ctxscale_name(name)
        if ours is not None and ours in extra_expected:
            extras[ours] = t
        else:
            llama[name] = t  # unexpected names are reported by hf._convert_state_dict
    missing = sorted(linear_to_hf_name(k) for k in extra_expected.keys() - extras.keys())
    if missing:
        few = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(
            f"{where}: missing linear-attention tensor(s) {few} that config.json's "
            f"`{EXTENSION_KEY}` block requires. The weights do not belong to this config.json "
            "(or were written by a tool that drops them, e.g. transformers' save_pretrained); "
            "re-export the model with ctxscale's save_hf"
        )
    for name, t in extras.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{where}: tensor {linear_to_hf_name(name)} has shape "
                             f"{tuple(t.shape)}, config.json implies {tuple(expected[name].shape)}")
    return llama, extras, llama_expected


__all__ = ["EXTENSION_KEY", "FORMAT_VERSION", "check_layer_codes", "extension_block",
           "extension_overrides", "linear_to_hf_name", "split_state_dict"]
