"""Mamba-2 (SSD): logits equal Hugging Face transformers' Mamba2ForCausalLM (load and save round
trip), the scan equals a token-by-token recurrence written from the paper, and the recurrent
invariant (one pass = pieces with the state carried = token by token).

Tolerance vs transformers: both sides compute the same float32 math in different orders (their
chunked SSD with chunk 256 in einsums, our chunked linear attention with chunk 64), so logits
agree to float32 rounding: 1e-4 absolute on logits of size ~1. Invariant and oracle checks run
in float64: 1e-10.
"""

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from ctxscale.models import build_model, load_hf
from ctxscale.models.config import MambaConfig
from ctxscale.models.hf_mamba import load_mamba_hf, save_mamba_hf
from ctxscale.models.mamba2 import Mamba2Mixer
from tests.models._recurrent_util import perturb, small_config
from tests.models.test_mamba import _split_invariant

transformers = pytest.importorskip("transformers")


def _hf_model(tie: bool, seed: int = 0, **over):
    torch.manual_seed(seed)
    kw = dict(vocab_size=53, hidden_size=24, num_hidden_layers=3, state_size=7, conv_kernel=3,
              expand=2, num_heads=8, head_dim=6, n_groups=2, tie_word_embeddings=tie,
              use_bias=not tie, layer_norm_epsilon=1e-5, chunk_size=8)
    kw.update(over)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kw)).eval()
    with torch.no_grad():  # off the structured init, larger Δ: every term matters
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
            if name.endswith("dt_bias"):
                p.add_(1.0)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_load_matches_transformers_logits(tmp_path, tie):
    """29 tokens: several of HF's chunks of 8 and a partial one; 2 groups of 4 heads."""
    hf = _hf_model(tie)
    hf.save_pretrained(tmp_path)
    model = load_mamba_hf(tmp_path).eval()
    assert model.cfg.family == "mamba2" and model.cfg.tie_embeddings == tie
    assert model.layers["0"].mixer.heads == 8 and model.layers["0"].mixer.groups == 2
    ids = torch.randint(0, 53, (2, 29))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4
    with torch.no_grad():  # the generic entry point dispatches on model_type
        assert torch.equal(load_hf(tmp_path).eval()(ids), out)


def test_time_step_limit_is_applied(tmp_path):
    hf = _hf_model(tie=False, seed=2, time_step_limit=(0.05, 0.3))
    hf.save_pretrained(tmp_path)
    model = load_mamba_hf(tmp_path).eval()
    assert (model.cfg.mamba.dt_limit_min, model.cfg.mamba.dt_limit_max) == (0.05, 0.3)
    ids = torch.randint(0, 53, (1, 21))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_save_round_trip_loads_in_transformers(tmp_path):
    hf = _hf_model(tie=False, seed=3)
    hf.save_pretrained(tmp_path / "a")
    model = load_mamba_hf(tmp_path / "a")
    save_mamba_hf(model, tmp_path / "b")
    again = load_mamba_hf(tmp_path / "b")
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == "mamba2"
    hf2 = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "b").eval()
    ids = torch.randint(0, 53, (1, 17))
    with torch.no_grad():
        assert (hf2(ids).logits - hf(ids).logits).abs().max().item() <= 1e-6


def _ssd_oracle(mixer: Mamba2Mixer, x):
    """The mixer written token by token from the paper's recurrence (float64)."""
    b, n, _ = x.shape
    H, P, G, N = mixer.heads, mixer.head_dim, mixer.groups, mixer.d_state
    w, bias = mixer._conv_args()
    xbc = torch.cat([mixer.in_proj_x(x), mixer.in_proj_B(x), mixer.in_proj_C(x)], -1)
    k = w.shape[1]
    padded = F.pad(xbc.transpose(1, 2), (k - 1, 0))
    conv = sum(w[:, j, None] * padded[:, :, j : j + n] for j in range(k)) + bias[:, None]
    u, B, C = F.silu(conv).transpose(1, 2).split([H * P, G * N, G * N], -1)
    dt = F.softplus(mixer.in_proj_dt(x) + mixer.dt_bias)
    A = -torch.exp(mixer.A_log)
    h = torch.zeros(b, H, P, N, dtype=x.dtype)
    ys = []
    for t in range(n):
        ut = u[:, t].view(b, H, P)
        Bt = B[:, t].view(b, G, N).repeat_interleave(H // G, 1)
        Ct = C[:, t].view(b, G, N).repeat_interleave(H // G, 1)
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * ut)[..., None] * Bt[:, :, None]
        ys.append((h @ Ct[..., None]).squeeze(-1) + mixer.D[:, None] * ut)
    y = torch.stack(ys, 1).reshape(b, n, H * P) * F.silu(mixer.in_proj_z(x))
    g = y.view(b, n, G, -1)
    y = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + mixer.cfg.norm_eps)).view(b, n, -1)
    return mixer.out_proj(mixer.norm_weight * y)


def test_mixer_matches_the_recurrence_and_pieces():
    cfg = small_config("mamba2")
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg).double()
    perturb(mixer)
    x = torch.randn(2, 39, 30, dtype=torch.float64)
    ref = _ssd_oracle(mixer, x)
    torch.testing.assert_close(mixer(x), ref, rtol=1e-10, atol=1e-10)
    full = _split_invariant(mixer.step, x, [(0, 1), (1, 2), (2, 20), (20, 39)])
    torch.testing.assert_close(full, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_reads_B_and_C_once_per_group_in_the_projection_dtype(monkeypatch, dtype):
    """The scan gets C and B per group (2 groups for 10 heads: grouped q/k, no per-head copies)
    and q, k, v in the projections' dtype (bfloat16 here stands for autocast's on CUDA), with a
    float32 decay; the bfloat16 mixer stays within bfloat16 rounding of the float32 one (inputs
    rounded to 2^-8 relative through two projections and the scan: we allow 3e-2 of the largest
    output; measured 9.0e-3)."""
    # the module (the package attribute of that name is the function)
    la = importlib.import_module("ctxscale.kernels.linear_attention")
    seen, original = [], la.linear_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, kw["log_decay"].dtype))
        return original(q, k, v, **kw)

    monkeypatch.setattr(la, "linear_attention", spy)
    cfg = small_config("mamba2")
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg)
    perturb(mixer)
    x = torch.randn(2, 19, 30)
    ref = mixer(x)
    out = mixer.to(dtype)(x.to(dtype))
    H, G, N = mixer.heads, mixer.groups, mixer.d_state
    assert (H, G) == (10, 2)
    assert seen[-1] == ((2, 19, G, N), (2, 19, G, N), (2, 19, H, 6), dtype, dtype, dtype,
                        torch.float32)
    assert out.dtype == dtype
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() <= (
        1e-6 if dtype == torch.float32 else 3e-2)


def test_model_one_pass_equals_pieces_equals_token_by_token():
    cfg = small_config("mamba2", num_layers=2)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    perturb(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 31))
    full = _split_invariant(lambda x, s: model.forward_step(x, s), ids, [(0, 2), (2, 31)])
    torch.testing.assert_close(model(ids), full, rtol=1e-10, atol=1e-10)


def test_hybrid_with_mamba2_layers_trains_one_step():
    cfg = small_config("hybrid", pattern="SA", num_layers=4,
                       mamba=MambaConfig(d_state=5, d_conv=3, head_dim=6, n_groups=5, mlp=True))
    model = build_model(cfg)
    assert [b.code for b in model.layers.values()] == list("SASA")
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    loss = model(ids, labels=ids, loss_reduction="mean")
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.flops_per_token(23) > 6 * model.num_params(exclude_embeddings=True)


def test_config_errors():
    with pytest.raises(ValueError, match=r"head_dim=7: it must divide 60"):
        small_config("mamba2", mamba=MambaConfig(head_dim=7)).validate()
    with pytest.raises(ValueError, match=r"10 heads .* divisible by model.mamba.n_groups=3"):
        small_config("mamba2", mamba=MambaConfig(head_dim=6, n_groups=3)).validate()
    with pytest.raises(ValueError, match="S Mamba-2"):
        small_config("hybrid", pattern="SX").validate()
