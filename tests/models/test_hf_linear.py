"""`save_hf` / `load_hf` for linear-attention and hybrid (A/L) models (`models/hf_linear.py`).

Oracle: the model itself. save_hf copies every parameter bit for bit into safetensors and load_hf
builds the same `HybridLM` from the config.json block, so the reloaded model runs the identical
float32 computation: logits must agree to 1e-6 (in practice exactly). Every kind (hedgehog,
lawcat with and without gate, plain, decay) with the new parameters perturbed away from their
identity initialization (so a dropped or swapped tensor changes the logits by ~1e-2), a hybrid
"LA" pattern with GQA (5 query heads, 1 k/v head) and head_dim 24, sequence 29.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from ctxscale.models import ModelConfig, load_hf, save_hf
from ctxscale.models.linearize import linearize, new_parameter_names
from ctxscale.models.transformer import Transformer

ATOL = 1e-6
VOCAB = 97
KINDS = [("hedgehog", {"feature_dim": 12}), ("lawcat", {"conv_width": 3, "ungated_heads": 2}),
         ("lawcat", {"gate": False}), ("plain", {}), ("decay", {}),
         ("hedgehog", {"rope": True, "window": 7}), ("lawcat", {"rope": True, "window": 5}),
         ("lawcat", {"conv_width": 3, "ungated_heads": [2, 0], "write_gate": True,
                     "feature_map": "hedgehog", "feature_dim": 7}),
         ("lawcat", {"ungated_heads": [1, 0], "write_gate": True, "feature_map": "softmax",
                     "gate_max_half_life": 16.0})]
KIND_IDS = ["hedgehog", "lawcat-gate-2-ungated", "lawcat-nogate", "plain", "decay", "hedgehog-rope-window",
            "lawcat-rope-window", "lawcat-per-layer-ungated-write-gate-hedgehog-map",
            "lawcat-softmax-map-capped-gate"]


def _teacher(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, dim=40, num_layers=2, num_heads=5, num_kv_heads=1, head_dim=24,
               ffn_dim=56, max_seq_len=256)
    return Transformer(ModelConfig(**{**cfg, **kw}))


def _perturb(student):
    torch.manual_seed(1)
    with torch.no_grad():
        for n in new_parameter_names(student):
            p = student.get_parameter(n)
            p.add_(0.2 * torch.randn_like(p))
    return student


def _ids(batch=2, seq=29):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _logits(model, ids):
    return model.eval()(ids).float()


@pytest.mark.parametrize("kind,options", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("pattern", ["L", "LA"])
def test_roundtrip_same_logits(tmp_path, kind, options, pattern):
    student = _perturb(linearize(_teacher(), kind=kind, layer_pattern=pattern, **options))
    save_hf(student, tmp_path / "m")
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]
    assert hf["num_attention_heads"] == 5 and hf["num_key_value_heads"] == 1
    assert hf["head_dim"] == 24
    block = hf["ctxscale"]
    assert block["family"] == ("linear" if pattern == "L" else "hybrid")
    assert block["layer_codes"] == ("LL" if pattern == "L" else "LA")
    assert block["linear_attention"]["kind"] == kind
    back = load_hf(tmp_path / "m")
    assert back.codes == student.codes and back.cfg.linear_attention == student.cfg.linear_attention
    ids = _ids()
    torch.testing.assert_close(_logits(back, ids), _logits(student, ids), atol=ATOL, rtol=0)
    for name, t in student.state_dict().items():  # an exact copy, not just close logits
        assert torch.equal(back.state_dict()[name], t), name


def test_tensor_names_reuse_llama_names(tmp_path):
    from safetensors import safe_open

    from ctxscale.models.hf import ctxscale_to_hf_name

    student = _perturb(linearize(_teacher(), kind="lawcat", layer_pattern="LA"))
    save_hf(student, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    extras = {"model.layers.0.self_attn.q_conv", "model.layers.0.self_attn.k_conv",
              "model.layers.0.self_attn.wg.weight", "model.layers.0.self_attn.wg.bias"}
    llama = {ctxscale_to_hf_name(n) for n in student.state_dict() if n not in
             {f"layers.0.attention.{x}" for x in ("q_conv", "k_conv", "wg.weight", "wg.bias")}}
    assert names == llama | extras
    assert "model.layers.0.self_attn.q_proj.weight" in names  # linear layers keep q/k/v/o names


def test_hedgehog_extra_tensor_names(tmp_path):
    from safetensors import safe_open

    save_hf(linearize(_teacher(), kind="hedgehog"), tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.1.self_attn.feature_map_k.weight")
        names = set(f.keys())
    assert w.shape == (1, 24, 24)  # (kv heads, head_dim, feature_dim)
    assert "model.layers.0.self_attn.feature_map_q.bias" in names


def test_hybrid_model_built_from_config_with_tied_embeddings_and_bias(tmp_path):
    """A HybridLM built directly (pattern "LLA" over 3 layers), tied embeddings, q/k/v biases
    (Llama attention_bias writes a zero o_proj bias that load_hf drops)."""
    from ctxscale.models import build_model
    from ctxscale.models.config import LinearAttentionConfig

    cfg = ModelConfig(family="hybrid", layer_pattern="LLA", vocab_size=VOCAB, dim=36,
                      num_layers=3, num_heads=3, head_dim=12, ffn_dim=44, tie_embeddings=True,
                      attention_bias=True,
                      linear_attention=LinearAttentionConfig(kind="hedgehog", feature_dim=6))
    torch.manual_seed(0)
    model = _perturb(build_model(cfg))
    save_hf(model, tmp_path / "m")
    back = load_hf(tmp_path / "m")
    assert back.codes == "LLA" and back.output.weight is back.tok_embeddings.weight
    ids = _ids()
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), atol=ATOL, rtol=0)
    # sharded, and loaded in float64
    save_hf(model, tmp_path / "sharded", max_shard_size="20KB")
    assert len(set(json.loads((tmp_path / "sharded" / "model.safetensors.index.json")
                              .read_text())["weight_map"].values())) > 1
    wide = load_hf(tmp_path / "sharded", dtype=torch.float64)
    assert wide.layers["0"].attention.feature_map_q.weight.dtype == torch.float64
    # float64 vs the float32 reference: float32 rounding over 3 layers, logits O(1): 1e-5
    torch.testing.assert_close(_logits(wide, ids), _logits(model, ids), atol=1e-5, rtol=0)
    # loaded again, it saves again (the block in model.hf_config is replaced, not duplicated)
    save_hf(back, tmp_path / "again")
    assert (json.loads((tmp_path / "again" / "config.json").read_text())["ctxscale"]
            == json.loads((tmp_path / "m" / "config.json").read_text())["ctxscale"])


def test_folder_without_block_loads_as_softmax_llama(tmp_path):
    from ctxscale.models.transformer import Transformer as T

    teacher = _teacher()
    save_hf(teacher, tmp_path / "t")
    assert "ctxscale" not in json.loads((tmp_path / "t" / "config.json").read_text())
    back = load_hf(tmp_path / "t")
    assert type(back) is T
    ids = _ids()
    torch.testing.assert_close(_logits(back, ids), _logits(teacher, ids), atol=ATOL, rtol=0)


def test_linearized_transformers_llama(tmp_path):
    """A random transformers LlamaForCausalLM -> load_hf -> linearize -> save_hf -> load_hf: same
    logits; the Llama-named tensors are the source checkpoint's, so transformers itself reads
    the softmax parts (it drops the extra tensors: the folder is not a working HF model)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=56,
                                      num_attention_heads=5, num_key_value_heads=1, head_dim=24,
                                      num_hidden_layers=2, max_position_embeddings=128,
                                      rope_theta=5000.0)
    src_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in src_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    src_model.save_pretrained(tmp_path / "src", safe_serialization=True)
    teacher = load_hf(tmp_path / "src")
    student = _perturb(linearize(teacher, kind="hedgehog", layer_pattern="LA"))
    save_hf(student, tmp_path / "lin")
    back = load_hf(tmp_path / "lin")
    ids = _ids()
    torch.testing.assert_close(_logits(back, ids), _logits(student, ids), atol=ATOL, rtol=0)
    src, lin = load_file(tmp_path / "src" / "model.safetensors"), load_file(
        tmp_path / "lin" / "model.safetensors")
    for name, t in src.items():
        assert torch.equal(lin[name], t), name
    hf_back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lin").eval()
    assert isinstance(hf_back, transformers.LlamaForCausalLM)
    assert torch.equal(hf_back.model.layers[0].self_attn.q_proj.weight, src[
        "model.layers.0.self_attn.q_proj.weight"])


# ----------------------------------------------------------------------------- errors


def _saved(tmp_path, kind="hedgehog", pattern="LA"):
    save_hf(_perturb(linearize(_teacher(), kind=kind, layer_pattern=pattern)), tmp_path / "m")
    return tmp_path / "m"


def _edit_block(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    if changes.pop("_drop", False):
        cfg.pop("ctxscale")
    else:
        cfg["ctxscale"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change,match", [
    ({"family": "mamba"}, "family 'mamba'"),
    ({"layer_pattern": "LM"}, "layer_pattern"),
    ({"layer_codes": "AL"}, "layer_codes"),
    ({"format": 99}, "format 99"),
    ({"linear_attention": {"kind": "cosformer"}}, "cosformer"),
    ({"linear_attention": {"kind": "plain", "new_knob": 1}}, "new_knob"),
    ({"linear_attention": "hedgehog"}, "JSON object"),
], ids=["family", "pattern", "codes", "format", "kind", "unknown-field", "not-object"])
def test_corrupt_block(tmp_path, change, match):
    path = _saved(tmp_path)
    _edit_block(path, **change)
    with pytest.raises(ValueError, match=match) as err:
        load_hf(path)
    assert "ctxscale" in str(err.value) and "save_hf" in str(err.value)


def test_block_not_an_object_or_incomplete(tmp_path):
    path = _saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "ctxscale": [1]}))
    with pytest.raises(ValueError, match="JSON object"):
        load_hf(path)
    block = {k: v for k, v in cfg["ctxscale"].items() if k != "linear_attention"}
    (path / "config.json").write_text(json.dumps({**cfg, "ctxscale": block}))
    with pytest.raises(ValueError, match="lacks.*linear_attention"):
        load_hf(path)


def test_missing_extra_tensor_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path, kind="lawcat")
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.0.self_attn.q_conv")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_conv.*re-export"):
        load_hf(path)


def test_extra_tensor_shape_and_leftover_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path, kind="lawcat")
    _edit_block(path, linear_attention={"kind": "lawcat", "conv_width": 5})
    with pytest.raises(ValueError, match=r"_conv has shape \(\d+, 4\).*\(\d+, 5\)"):
        load_hf(path)
    # block removed: loads as softmax Llama would, but the leftover linear tensors are named
    _edit_block(path, _drop=True)
    with pytest.raises(ValueError, match=r"unexpected tensors: .*self_attn\.k_conv.*no `ctxscale` "
                                         r"block"):
        load_hf(path)
    # a missing Llama tensor is still reported by the Llama path
    path2 = _saved(tmp_path / "b", kind="lawcat")
    tensors = load_file(path2 / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, path2 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(path2)


def test_save_refuses_to_overwrite_and_unsupported(tmp_path):
    student = linearize(_teacher(), kind="plain")
    path = _saved(tmp_path)
    before = (path / "config.json").read_text()
    with pytest.raises(ValueError, match="overwrite=True"):
        save_hf(student, path)
    assert (path / "config.json").read_text() == before
    save_hf(student, path, overwrite=True)
    assert json.loads((path / "config.json").read_text())["ctxscale"]["family"] == "linear"
    with pytest.raises(ValueError, match="model_type 'llama'"):
        save_hf(student, tmp_path / "q", model_type="qwen2")
    from ctxscale.models import build_model

    mamba = build_model(ModelConfig(family="hybrid", layer_pattern="MA", vocab_size=VOCAB, dim=32,
                                    num_layers=2, num_heads=2))
    with pytest.raises(ValueError, match="M / P layers"):
        save_hf(mamba, tmp_path / "mamba")
    assert not (tmp_path / "mamba").exists()
