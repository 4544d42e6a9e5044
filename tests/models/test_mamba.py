"""Mamba-1: logits equal Hugging Face transformers' MambaForCausalLM (load and save round trip),
and the recurrent invariant (one pass = pieces with the state carried = token by token).

Tolerance vs transformers: both sides compute the same float32 math in different orders (their
sequential scan, our chunked log-space scan), so logits agree to float32 rounding: 1e-4 absolute
on logits of size ~1 (observed ~1e-6). Invariant checks run in float64: 1e-10.
"""

import json

import pytest
import torch

from ctxscale.models import build_model
from ctxscale.models.hf_mamba import load_mamba_hf, save_mamba_hf
from ctxscale.models.mamba import MambaMixer
from tests.models._recurrent_util import perturb, small_config

transformers = pytest.importorskip("transformers")


def _hf_model(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(
        vocab_size=53, hidden_size=38, num_hidden_layers=3, state_size=7, conv_kernel=3,
        expand=2, time_step_rank=5, tie_word_embeddings=tie, use_bias=not tie,
        layer_norm_epsilon=1e-5,
    )
    model = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():  # off the structured init, larger Δ: every term matters
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
            if name.endswith("dt_proj.bias"):
                p.add_(2.0)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_load_matches_transformers_logits(tmp_path, tie):
    hf = _hf_model(tie)
    hf.save_pretrained(tmp_path)
    model = load_mamba_hf(tmp_path).eval()
    assert model.cfg.family == "mamba" and model.cfg.tie_embeddings == tie
    ids = torch.randint(0, 53, (2, 29))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4


def test_save_round_trip_loads_in_transformers(tmp_path):
    hf = _hf_model(tie=False, seed=3)
    hf.save_pretrained(tmp_path / "a")
    model = load_mamba_hf(tmp_path / "a")
    save_mamba_hf(model, tmp_path / "b")
    again = load_mamba_hf(tmp_path / "b")
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == "mamba"
    hf2 = transformers.MambaForCausalLM.from_pretrained(tmp_path / "b").eval()
    ids = torch.randint(0, 53, (1, 17))
    with torch.no_grad():
        assert (hf2(ids).logits - hf(ids).logits).abs().max().item() <= 1e-6


def test_load_rejects_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="expected 'mamba'"):
        load_mamba_hf(tmp_path)


def _split_invariant(run, x, pieces):
    full, _ = run(x, None)
    outs, state = [], None
    for lo, hi in pieces:
        y, state = run(x[:, lo:hi], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    outs, state = [], None
    for t in range(x.shape[1]):
        y, state = run(x[:, t : t + 1], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    return full


def test_mixer_one_pass_equals_pieces_equals_token_by_token():
    cfg = small_config("mamba")
    torch.manual_seed(0)
    mixer = MambaMixer(cfg).double()
    perturb(mixer)
    x = torch.randn(2, 39, 30, dtype=torch.float64)
    full = _split_invariant(mixer.step, x, [(0, 1), (1, 2), (2, 20), (20, 39)])
    torch.testing.assert_close(mixer(x), full, rtol=1e-10, atol=1e-10)  # the training path


def test_model_one_pass_equals_pieces_equals_token_by_token():
    cfg = small_config("mamba", num_layers=2)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    perturb(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 31))
    full = _split_invariant(lambda x, s: model.forward_step(x, s), ids, [(0, 2), (2, 31)])
    torch.testing.assert_close(model(ids), full, rtol=1e-10, atol=1e-10)


def test_mamba_trains_one_step():
    cfg = small_config("mamba", num_layers=2)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    loss = model(ids, labels=ids, loss_reduction="mean")
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.flops_per_token(23) > 6 * model.num_params(exclude_embeddings=True) - 1
