"""Hybrid stacks from a layer pattern: block layout, recurrent invariant with KV cache, the
Transformer equivalence of an all-"A" pattern, and config errors.

Invariant checks run in float64 (exact algorithms): 1e-10.
"""

import pytest
import torch

from ctxscale.launch.config import ConfigError, load_job_config
from ctxscale.models import build_model
from ctxscale.models.hybrid import HybridLM, layer_codes
from ctxscale.models.transformer import Transformer
from tests.models._recurrent_util import perturb, small_config


def test_pattern_repeats_over_layers():
    assert layer_codes(small_config("hybrid", pattern="LLLA", num_layers=6)) == "LLLALL"
    assert layer_codes(small_config("mamba", pattern="LLLA", num_layers=3)) == "MMM"
    assert layer_codes(small_config("linear", pattern="A", num_layers=2)) == "LL"
    model = build_model(small_config("hybrid", pattern="MAPL", num_layers=4))
    blocks = list(model.layers.values())
    assert [b.code for b in blocks] == list("MAPL")
    assert blocks[0].attention is None and blocks[0].feed_forward is None  # Mamba-1 block
    assert blocks[2].attention is not None and blocks[2].mixer is not None  # parallel block


@pytest.mark.parametrize("pattern", ["LMPA", "MMMA"])
def test_one_pass_equals_pieces_equals_token_by_token(pattern):
    cfg = small_config("hybrid", pattern=pattern, num_layers=4)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    perturb(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 27))
    full = model(ids)
    outs, state = [], None
    for lo, hi in [(0, 1), (1, 13), (13, 27)]:
        y, state = model.forward_step(ids[:, lo:hi], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    outs, state = [], None
    for t in range(27):
        y, state = model.forward_step(ids[:, t : t + 1], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert state["pos"] == 27


def test_all_attention_pattern_is_the_transformer():
    """Pattern "A" reuses the Transformer's Attention and FeedForward under the same names, so a
    Transformer state dict loads strictly and gives identical logits."""
    cfg = small_config("hybrid", pattern="A", num_layers=2)
    torch.manual_seed(0)
    tcfg = small_config("transformer", num_layers=2)
    ref = Transformer(tcfg).double()
    model = HybridLM(cfg).double()
    model.load_state_dict(ref.state_dict(), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)
    labels = ids.clone()
    labels[:, :5] = -100
    torch.testing.assert_close(model(ids, labels=labels), ref(ids, labels=labels))


def test_activation_checkpointing_gives_same_gradients():
    cfg = small_config("hybrid", pattern="LMPA", num_layers=4)
    torch.manual_seed(0)
    a = build_model(cfg).double()
    perturb(a)
    cfg_ck = small_config("hybrid", pattern="LMPA", num_layers=4, activation_checkpointing="full")
    b = build_model(cfg_ck).double()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    for m in (a, b):
        m(ids, labels=ids, loss_reduction="sum").backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_bad_pattern_is_a_config_error():
    with pytest.raises(ConfigError, match="layer_pattern"):
        load_job_config(None, ["model.family=hybrid", "model.layer_pattern=LXA"])
