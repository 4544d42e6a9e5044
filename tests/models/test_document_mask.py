"""Packed documents (document_ids): a model on a packed sequence with per-document positions
computes, for every document, exactly what it computes on that document alone, and the loss and
its gradients are the sums of the per-document ones; for the Transformer (softmax attention
inside each document) and for the recurrent families (Mamba-1, Mamba-2, every linear-attention
kind, hybrid stacks: the conv and the state restart at each document; LoLCATs sliding window +
linear attention: the window and the delayed keys stay inside the document). Titans:
tests/models/test_titans_documents.py.

Tolerance: float64, 1e-10 for logits (the same math; masked-out terms are exact zeros); the
loss and gradients go through the chunked cross-entropy, which sums in float32 (measured 1.1e-8
relative), so they get 1e-6.
"""

import pytest
import torch

from ctxscale.models import build_model
from ctxscale.models.config import LinearAttentionConfig, ModelConfig
from tests.models._recurrent_util import assert_packed_equals_alone, packed, perturb, small_config

LENGTHS = [[5, 1, 12, 7], [25]]


def _transformer(checkpointing):
    return ModelConfig(family="transformer", dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       vocab_size=50, activation_checkpointing=checkpointing)


WINDOW_MODES = (("hedgehog", "both"), ("lawcat", "both"), ("hedgehog", "linear_only"),
                ("hedgehog", "window_only"))
CASES = {
    **{f"transformer-{c}": (lambda c=c: _transformer(c)) for c in ("none", "full", "selective")},
    "mamba": lambda: small_config("mamba"),
    "mamba2": lambda: small_config("mamba2"),
    **{f"linear-{k}": (lambda k=k: small_config("linear", kind=k)) for k in
       ("plain", "decay", "hedgehog", "lawcat")},
    "linear-lawcat-gated-writegate": lambda: small_config(
        "linear", linear_attention=LinearAttentionConfig(
            kind="lawcat", conv_width=3, feature_dim=7, ungated_heads=2, write_gate=True)),
    # LoLCATs sliding window + linear attention: the window (4, longer and shorter than the
    # documents) and the delayed keys stay inside each document
    **{f"linear-window-{k}-{m}": (lambda k=k: small_config(
        "linear", linear_attention=LinearAttentionConfig(
            kind=k, conv_width=3, feature_dim=7, window=4, rope=True)))
       for k, m in WINDOW_MODES},
    # every block kind, recomputed in the backward
    "hybrid-LSMAP-full": lambda: small_config("hybrid", kind="decay", pattern="LSMAP",
                                              num_layers=5, activation_checkpointing="full"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_documents_equal_separate_runs(case):
    cfg = CASES[case]()
    torch.manual_seed(0)
    model = build_model(cfg).double().train()
    perturb(model)
    for m in model.modules():
        if getattr(m, "window", 0):  # several query blocks of the window softmax, the last partial
            m.window_block = 8
            m.hybrid_mode = case.rsplit("-", 1)[1]
    V = cfg.vocab_size
    ids = torch.randint(0, V, (2, 25))
    labels = torch.randint(0, V, (2, 25))
    assert_packed_equals_alone(model, ids, labels, LENGTHS)


def test_document_ids_change_the_result():
    """Without the mask the later documents see the earlier ones (the test above is not
    vacuous)."""
    cfg = ModelConfig(family="transformer", dim=32, num_layers=1, num_heads=4, vocab_size=50)
    model = build_model(cfg).double()
    ids = torch.randint(0, 50, (2, 25))
    docs, pos = packed(LENGTHS)
    assert (model(ids, position_ids=pos) - model(ids, position_ids=pos, document_ids=docs)
            ).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["transformer", "mamba", "mamba2", "linear", "hybrid"])
def test_document_ids_change_the_result_of_every_family(family):
    """Without the resets a later document's logits depend on the earlier ones."""
    cfg = _transformer("none") if family == "transformer" else small_config(
        family, kind="decay", pattern="LSMAP", num_layers=5)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    perturb(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 25))
    docs, pos = packed(LENGTHS)
    diff = model(ids, position_ids=pos) - model(ids, position_ids=pos, document_ids=docs)
    assert diff[:, :5].abs().max() == 0  # the first document has nothing before it
    assert diff.abs().max() > 1e-3


def test_windowed_layer_checks_document_ids():
    cfg = small_config("linear", linear_attention=LinearAttentionConfig(
        kind="hedgehog", feature_dim=7, window=4, rope=True))
    model = build_model(cfg)
    ids = torch.randint(0, 37, (1, 8))
    with pytest.raises(ValueError, match=r"windowed linear attention: document_ids .*\(1, 8\)"):
        model(ids, document_ids=torch.zeros(1, 6, dtype=torch.long))
