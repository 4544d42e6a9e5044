"""Packed documents (document_ids): a Transformer on a packed sequence with per-document
positions computes, for every document, exactly what it computes on that document alone; the
loss and its gradients are the sums of the per-document ones; families with recurrent state
refuse document ids.

Tolerance: float64, 1e-10 for logits (the same math; masked-out terms are exact zeros); the
loss and gradients go through the chunked cross-entropy, which sums in float32 (measured 1.1e-8
relative), so they get 1e-6.
"""

import pytest
import torch

from ctxscale.models import build_model
from ctxscale.models.config import ModelConfig
from tests.models._recurrent_util import small_config

LENGTHS = [[5, 1, 12, 7], [25]]


def _packed():
    docs = torch.stack([torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
                        for lens in LENGTHS])
    pos = torch.stack([torch.cat([torch.arange(n) for n in lens]) for lens in LENGTHS])
    return docs, pos


@pytest.mark.parametrize("checkpointing", ["none", "full", "selective"])
def test_packed_documents_equal_separate_runs(checkpointing):
    cfg = ModelConfig(family="transformer", dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      vocab_size=50, activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = build_model(cfg).double().train()
    ids = torch.randint(0, 50, (2, 25))
    labels = torch.randint(0, 50, (2, 25))
    docs, pos = _packed()
    logits = model(ids, position_ids=pos, document_ids=docs)
    loss = model(ids, labels=labels, position_ids=pos, document_ids=docs, loss_reduction="sum")
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_loss, ref_grads = 0.0, [torch.zeros_like(g) for g in grads]
    for b, lens in enumerate(LENGTHS):
        start = 0
        for n in lens:
            sl = slice(start, start + n)
            alone = model(ids[b:b + 1, sl])
            assert (logits[b:b + 1, sl] - alone).abs().max() <= 1e-10
            doc_loss = model(ids[b:b + 1, sl], labels=labels[b:b + 1, sl], loss_reduction="sum")
            for acc, g in zip(ref_grads, torch.autograd.grad(doc_loss, list(model.parameters()))):
                acc += g
            ref_loss = ref_loss + doc_loss.item()
            start += n
    assert abs(loss.item() - ref_loss) <= 1e-6 * abs(ref_loss)
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 1e-6 * r.abs().max().clamp_min(1e-30)


def test_document_ids_change_the_result():
    """Without the mask the later documents see the earlier ones (the test above is not
    vacuous)."""
    cfg = ModelConfig(family="transformer", dim=32, num_layers=1, num_heads=4, vocab_size=50)
    model = build_model(cfg).double()
    ids = torch.randint(0, 50, (2, 25))
    docs, pos = _packed()
    assert (model(ids, position_ids=pos) - model(ids, position_ids=pos, document_ids=docs)
            ).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["hybrid", "titans"])
def test_recurrent_families_refuse_document_ids(family):
    model = build_model(small_config(family))
    ids = torch.randint(0, model.cfg.vocab_size, (1, 8))
    with pytest.raises(ValueError, match="transformer family only"):
        model(ids, document_ids=torch.zeros(1, 8, dtype=torch.long))
