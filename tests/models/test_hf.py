"""Hugging Face import/export (`ctxscale.models.hf`) against transformers itself.

Oracle: a small random HF model (Llama / Mistral / Qwen2, odd sizes: hidden 72, 6 heads, 2 kv
heads, ffn 100, vocab 211, 2-3 layers, non-default rope_theta) saved with `save_pretrained`
(safetensors, also sharded); `load_hf` must give the same logits, and `save_hf` of that model must
load back in `transformers.AutoModelForCausalLM` with the same logits. Tolerance: both sides run
the same float32 math in a different operation order (sdpa vs our dispatcher, fused vs separate
projections); logits are O(1) here and float32 rounding through 3 layers stays below 1e-5, so
1e-4 absolute leaves an order of magnitude of margin without hiding a wrong weight (which moves
logits by ~1e-2 and more).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ctxscale.kernels.rotary import RopeScaling  # noqa: E402
from ctxscale.models import ModelConfig, build_model, load_hf, save_hf  # noqa: E402

ATOL = 1e-4
SEQ = 37  # odd, not a power of two
SIZES = dict(vocab_size=211, hidden_size=72, intermediate_size=100, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def _hf_model(kind="llama", *, layers=2, rope=None, tie=False, **extra):
    torch.manual_seed(0)
    rope_parameters = {"rope_type": "default", "rope_theta": 5000.0, **(rope or {})}
    common = dict(SIZES, num_hidden_layers=layers, tie_word_embeddings=tie,
                  rope_parameters=rope_parameters, **extra)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**{"sliding_window": None, **common})
        cls = transformers.MistralForCausalLM
    else:
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    model = cls._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # HF zero-initializes norms' offsets and biases: randomize everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _tokens(n=SEQ, vocab=211, batch=2):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _hf_logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def _our_logits(model, ids):
    return model.eval()(ids).float()


def _roundtrip(hf_model, tmp_path, *, shard=None):
    src = tmp_path / "src"
    kwargs = {"max_shard_size": shard} if shard else {}
    hf_model.save_pretrained(src, safe_serialization=True, **kwargs)
    ids = _tokens()
    expected = _hf_logits(hf_model, ids)
    ours = load_hf(src)
    torch.testing.assert_close(_our_logits(ours, ids), expected, atol=ATOL, rtol=0)
    out = tmp_path / "out"
    save_hf(ours, out, max_shard_size=shard or "5GB")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    assert type(back) is type(hf_model)
    torch.testing.assert_close(_hf_logits(back, ids), expected, atol=ATOL, rtol=0)
    return ours, src, out


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
], ids=["default", "linear", "llama3", "yarn"])
def test_llama_roundtrip(tmp_path, rope):
    ours, _, out = _roundtrip(_hf_model("llama", layers=3, rope=rope), tmp_path)
    assert ours.cfg.rope_base == 5000.0 and ours.cfg.num_kv_heads == 2
    assert ours.cfg.rope_scaling.type == (rope or {}).get("rope_type", "none")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_llama_sharded(tmp_path):
    _, src, out = _roundtrip(_hf_model("llama"), tmp_path, shard="40KB")
    for d in (src, out):
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert not (d / "model.safetensors").exists()


def test_tied_embeddings(tmp_path):
    ours, _, out = _roundtrip(_hf_model("llama", tie=True), tmp_path)
    assert ours.output.weight is ours.tok_embeddings.weight
    index_free = load_hf(out)
    assert index_free.output.weight is index_free.tok_embeddings.weight


def test_mistral_roundtrip(tmp_path):
    ours, _, out = _roundtrip(_hf_model("mistral", head_dim=16), tmp_path)
    assert ours.cfg.head_dim == 16  # head_dim given explicitly: 6 * 16 != 72
    assert json.loads((out / "config.json").read_text())["model_type"] == "mistral"


def test_qwen2_roundtrip_with_biases(tmp_path):
    hf = _hf_model("qwen2", tie=True)
    ours, _, out = _roundtrip(hf, tmp_path)
    assert ours.cfg.attention_bias and ours.layers["0"].attention.wq.bias is not None
    torch.testing.assert_close(ours.layers["1"].attention.wk.bias,
                               hf.model.layers[1].self_attn.k_proj.bias, atol=0, rtol=0)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"


def test_ctxscale_model_exports_as_llama(tmp_path):
    cfg = ModelConfig(vocab_size=97, dim=48, num_layers=2, num_heads=6, num_kv_heads=3,
                      ffn_dim=80, rope_base=20000.0,
                      rope_scaling=RopeScaling(type="ntk", factor=2.0), max_seq_len=128)
    torch.manual_seed(0)
    model = build_model(cfg)
    save_hf(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(hf, transformers.LlamaForCausalLM)
    ids = _tokens(vocab=97)
    torch.testing.assert_close(_hf_logits(hf, ids), _our_logits(model, ids), atol=ATOL, rtol=0)
    back = load_hf(tmp_path / "m", dtype=torch.float64)
    assert back.tok_embeddings.weight.dtype == torch.float64
    torch.testing.assert_close(back.eval()(ids), model.eval()(ids).double(), atol=ATOL, rtol=0)


def test_config_overrides_and_training_loss(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf(tmp_path, config_overrides={"max_seq_len": 4096,
                                               "activation_checkpointing": "full"})
    assert ours.cfg.max_seq_len == 4096
    ids = _tokens()
    # HF's loss shifts labels internally; ours takes next-token labels explicitly.
    expected = hf(input_ids=ids, labels=ids, use_cache=False).loss
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    ours.train()
    loss = ours(ids, labels=labels, loss_reduction="mean")
    torch.testing.assert_close(loss, expected.detach(), atol=1e-5, rtol=0)
    loss.backward()
    assert all(p.grad is not None for p in ours.parameters())


# ----------------------------------------------------------------------------- errors


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_hf(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_hf(tmp_path)


def _saved(tmp_path, kind="llama", **kw):
    _hf_model(kind, **kw).save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_model_type(tmp_path):
    _edit_config(_saved(tmp_path), model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="llama, mistral, qwen2"):
        load_hf(tmp_path)


def test_unsupported_architecture(tmp_path):
    _edit_config(_saved(tmp_path), architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        load_hf(tmp_path)


def test_sliding_window_refused(tmp_path):
    _edit_config(_saved(tmp_path, "mistral"), sliding_window=64)
    with pytest.raises(ValueError, match="sliding_window"):
        load_hf(tmp_path)
    _edit_config(tmp_path, sliding_window=4096)  # >= max_position_embeddings: never masks
    assert load_hf(tmp_path).cfg.num_layers == 2


def test_dynamic_rope_refused_then_overridden(tmp_path):
    _edit_config(_saved(tmp_path), rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                    "rope_theta": 5000.0})
    with pytest.raises(ValueError, match="dynamic"):
        load_hf(tmp_path)
    model = load_hf(tmp_path, config_overrides={"rope_scaling": RopeScaling()})
    assert model.cfg.rope_base == 5000.0 and model.cfg.rope_scaling.type == "none"


def test_legacy_rope_keys(tmp_path):
    """HF 4.x style: top-level rope_theta and rope_scaling with the old `type` key."""
    path = _saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (path / "config.json").write_text(json.dumps(cfg))
    model = load_hf(path)
    assert model.cfg.rope_base == 5000.0
    assert (model.cfg.rope_scaling.type, model.cfg.rope_scaling.factor) == ("linear", 2.0)


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight") as err:
        load_hf(path)
    assert "model.layers.0.extra.weight" in str(err.value)


def test_shape_mismatch(tmp_path):
    _edit_config(_saved(tmp_path), intermediate_size=101)
    with pytest.raises(ValueError, match="shape"):
        load_hf(tmp_path)


def test_corrupt_and_pickle_only(tmp_path):
    path = _saved(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_hf(path)
    weights.unlink()
    (path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="never reads"):
        load_hf(path)


def test_save_refuses_to_overwrite(tmp_path):
    path = _saved(tmp_path / "a")
    model = load_hf(path)
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="overwrite=True"):
        save_hf(model, path)
    assert (path / "model.safetensors").read_bytes() == before
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer.json").write_text("{}")  # unrelated files are fine
    save_hf(model, tmp_path / "b")
    save_hf(model, path, overwrite=True, max_shard_size="40KB")  # now sharded: no stale file
    assert not (path / "model.safetensors").exists()
    assert (tmp_path / "b" / "tokenizer.json").exists()
    ids = _tokens()
    torch.testing.assert_close(_our_logits(load_hf(path), ids), _our_logits(model, ids),
                               atol=0, rtol=0)
