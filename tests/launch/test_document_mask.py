"""`data.document_mask`: packed text batches carry each token's document and its position inside
it, the config refuses what cannot be masked, and training with the mask is the same under
context, tensor and pipeline parallelism as in one process.

Tolerance of the training comparison: 1e-5 absolute on losses ~6, as in
tests/launch/test_parallel_equivalence.py (same math, other float32 summation orders).
"""

from pathlib import Path

import pytest
import torch

from ctxscale.launch.config import load_job_config
from ctxscale.launch.data import build_data
from ctxscale.launch.data.config import DataConfig
from ctxscale.launch.data.text import document_layout
from ctxscale.launch.train import train
from tests.harness import run_distributed
from tests.launch.test_data_text import _make_corpus
from tests.launch.test_train import SMALL, TINY, _losses


def test_document_layout_starts_a_document_after_each_eos():
    eos = 2
    ids = torch.tensor([[5, 9, 2, 7, 2, 2, 8, 3], [1, 1, 1, 1, 1, 1, 1, 2]])
    docs, pos = document_layout(ids, eos)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0] * 8]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def _text_cfg(tmp_path, **kw):
    path = tmp_path / "docs.txt"
    if not path.exists():
        _make_corpus(path, 60, seed=3)
    return DataConfig(kind="text", seq_len=40, text_files=[str(path)], tokenizer_vocab_size=320,
                      val_fraction=0.1, cache_dir=str(tmp_path / "cache"), **kw)


def test_text_batches_carry_documents_and_positions(tmp_path):
    src = build_data(_text_cfg(tmp_path, document_mask=True), batch_size=3, dp_rank=0,
                     dp_size=1, seed=0)
    batch = src.next_batch()
    eos = src.corpus.meta["eos_id"]
    ids, docs, pos = batch["input_ids"], batch["document_ids"], batch["position_ids"]
    assert docs.dtype == torch.int32 and docs.shape == ids.shape == pos.shape
    assert (ids == eos).any()  # documents of a few dozen tokens: windows hold several
    for row in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            new = bool(ids[row, t - 1] == eos)
            assert docs[row, t] - docs[row, t - 1] == int(new)
            assert pos[row, t] == (0 if new else pos[row, t - 1] + 1)
    plain = build_data(_text_cfg(tmp_path, document_mask=True, document_positions=False),
                       batch_size=3, dp_rank=0, dp_size=1, seed=0).next_batch()
    assert "position_ids" not in plain and torch.equal(plain["document_ids"], docs)
    assert torch.equal(plain["input_ids"], ids)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="document_mask=true needs data.kind=text"):
        DataConfig(kind="mqar", document_mask=True).validate()
    data = _text_cfg(tmp_path)
    over = ["data.kind=text", f"data.text_files=[{data.text_files[0]}]",
            "data.document_mask=true", "data.seq_len=40"]
    windowed = load_job_config(TINY, over + ["model.family=linear",
                                             "model.linear_attention.kind=hedgehog",
                                             "model.linear_attention.window=8"])
    assert windowed.data.document_mask and windowed.model.linear_attention.window == 8
    for family in ("mamba", "mamba2", "linear", "hybrid", "titans"):
        assert load_job_config(TINY, over + [f"model.family={family}"]).data.document_mask


GLOBAL_BATCH = 4
LAYOUTS = {  # name -> (overrides, data-parallel size)
    "cp2_dp2_ring_zigzag": (["parallel.cp=2", "parallel.cp_layout=zigzag"], 2),
    "cp2_dp2_lightseq": (["parallel.cp=2", "parallel.cp_method=lightseq"], 2),
    "tp2_cp2_ulysses": (["parallel.tp=2", "parallel.cp=2", "parallel.cp_method=ulysses",
                         "parallel.cp_layout=stripe"], 1),
    "pp2_dp2_1f1b": (["parallel.pp=2", "parallel.pp_schedule=1f1b"], 2),
}


def _base(tmp_path):
    data = _text_cfg(tmp_path)
    return SMALL + [
        "model.num_layers=4", "train.steps=4", "data.kind=text",
        f"data.text_files=[{data.text_files[0]}]", "data.tokenizer_vocab_size=320",
        "data.seq_len=40", f"data.cache_dir={data.cache_dir}", "data.document_mask=true",
        "train.eval_every=2", "model.activation_checkpointing=selective",
    ]


def _run(rank, world, root, base, layouts):
    for name, (extra, dp) in layouts.items():
        train(load_job_config(TINY, base + extra + [
            f"train.batch_size={GLOBAL_BATCH // dp}", f"train.output_dir={root}/{name}"]))


def _check_layouts(tmp_path, base, layouts):
    root = Path(tmp_path)
    for name, extra in (("single", []), ("unmasked", ["data.document_mask=false"])):
        train(load_job_config(TINY, base + extra + [f"train.batch_size={GLOBAL_BATCH}",
                                                     f"train.output_dir={root / name}"]))
    ref, unmasked = _losses(root / "single"), _losses(root / "unmasked")
    assert sorted(ref) == [1, 2, 3, 4]
    # the mask is in effect: 10x the layouts' tolerance at least (measured 7.5e-4 for the
    # recurrent stack at step 2, where softmax attention is 1 layer of 4)
    assert max(abs(ref[s] - unmasked[s]) for s in ref) > 1e-4
    run_distributed(_run, 4, timeout=600, args=(str(root), base, layouts))
    for name in layouts:
        got = _losses(root / name)
        assert sorted(got) == [1, 2, 3, 4], name
        bad = [(s, ref[s], got[s]) for s in got if abs(got[s] - ref[s]) > 1e-5]
        assert not bad, (name, bad)


def test_training_with_document_mask_matches_one_process(tmp_path):
    _check_layouts(tmp_path, _base(tmp_path), LAYOUTS)


# Every recurrent block kind (L: LAWCAT linear attention with its q/k convs, S: Mamba-2, M:
# Mamba-1) beside softmax attention: the states and convs restart at each document, under
# context parallelism (state passing and the conv halo), tensor and pipeline parallelism
RECURRENT = ["model.family=hybrid", "model.layer_pattern=LSMA", "model.mamba.d_state=8",
             "model.mamba.head_dim=16", "model.mamba.n_groups=2",
             "model.linear_attention.kind=lawcat"]
RECURRENT_LAYOUTS = {
    "cp2_dp2_allgather": (["parallel.cp=2", "parallel.cp_layout=contiguous"], 2),
    "tp2_cp2": (["parallel.tp=2", "parallel.cp=2", "parallel.cp_layout=contiguous"], 1),
    "pp2_dp2_1f1b": (["parallel.pp=2", "parallel.pp_schedule=1f1b"], 2),
}


def test_recurrent_training_with_document_mask_matches_one_process(tmp_path):
    _check_layouts(tmp_path, _base(tmp_path) + RECURRENT, RECURRENT_LAYOUTS)


# Titans memory-as-context: the memory restarts and its segments are cut at each document; under
# context parallelism with tensor parallelism (segments straddling the shards are recomputed from
# a halo of replicated activations) and the 1F1B pipeline
TITANS = ["model.family=titans", "model.titans.variant=mac", "model.titans.segment_len=10",
          "model.titans.chunk_size=5", "model.titans.persistent_tokens=2",
          "model.titans.memory_heads=4", "model.num_layers=2"]
TITANS_LAYOUTS = {
    "tp2_cp2": (["parallel.tp=2", "parallel.cp=2", "parallel.cp_layout=contiguous"], 1),
    "pp2_dp2_1f1b": (["parallel.pp=2", "parallel.pp_schedule=1f1b"], 2),
}


def test_titans_training_with_document_mask_matches_one_process(tmp_path):
    _check_layouts(tmp_path, _base(tmp_path) + TITANS, TITANS_LAYOUTS)
