"""Pre-tokenized data (`data.kind: tokens`): the same batches as the text pipeline on the same
ids, several files and .npy, the cached document index, document masks, resume, every refusal,
and a training run."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ctxscale.launch.data import DataConfig, build_data
from ctxscale.launch.data import tokens as tokens_mod
from tests.launch.test_data_text import _args, _eq, _take, corpus  # noqa: F401 (fixture)

EOS = 1


def _tokens_cfg(tmp_path, files, **kw):
    return DataConfig(kind="tokens", seq_len=11, token_files=[str(f) for f in files],
                      token_vocab_size=50, eos_id=EOS, val_fraction=0.2, seed=3,
                      cache_dir=str(tmp_path / "cache"), **kw)


def _documents(seed, n):
    """n documents of ids in [2, 50), each ending with EOS."""
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(2, 50, int(rng.integers(3, 17))), EOS) for _ in range(n)]


def test_same_batches_as_the_text_pipeline_on_its_own_tokens(corpus):  # noqa: F811
    """The text pipeline's token cache is a raw uint16 token file: read as kind=tokens it gives
    the same documents, split, windows, epochs, document ids and positions."""
    cfg, _ = corpus
    cfg = replace(cfg, document_mask=True)
    text = build_data(cfg, **_args(seed=5))
    meta = text.corpus.meta
    tok_cfg = DataConfig(kind="tokens", seq_len=cfg.seq_len, seed=cfg.seed,
                         token_files=[str(text.corpus.paths["bin"])], token_dtype=meta["dtype"],
                         eos_id=meta["eos_id"], token_vocab_size=meta["vocab_size"],
                         val_fraction=cfg.val_fraction, cache_dir=cfg.cache_dir,
                         document_mask=True)
    tokens = build_data(tok_cfg, **_args(seed=5))
    assert tokens.vocab_size == text.vocab_size
    assert np.array_equal(tokens.corpus.offsets, text.corpus.offsets)
    steps = text.streams["train"].num_windows // 2 + 2  # across an epoch boundary
    a, b = _take(text, steps), _take(tokens, steps)
    assert _eq(a, b)
    for x, y in zip(a, b):
        assert torch.equal(x["document_ids"], y["document_ids"])
        assert torch.equal(x["position_ids"], y["position_ids"])
    assert _eq(text.eval_batches(3), tokens.eval_batches(3))


def test_files_and_npy_documents_never_span_files(tmp_path):
    docs_a, docs_b = _documents(0, 9), _documents(1, 7)
    a = tmp_path / "a.bin"
    np.concatenate(docs_a).astype(np.uint16).tofile(a)
    b = tmp_path / "b.npy"  # no EOS at its end: the tail is one more document
    np.save(b, np.concatenate(docs_b)[:-1].astype(np.int32))
    src = build_data(_tokens_cfg(tmp_path, [a, b]), **_args())
    off = src.corpus.offsets
    assert src.corpus.num_docs == 16
    lens = np.diff(off)
    assert lens.tolist() == [len(d) for d in docs_a] + [len(d) for d in docs_b[:-1]] + [
        len(docs_b[-1]) - 1]
    assert off[9] == sum(len(d) for d in docs_a)  # the file boundary is a document boundary
    every = np.concatenate(docs_a + docs_b)[:-1]
    for d in range(16):
        got = np.concatenate([src.corpus.tokens[int(off[d]) : int(off[d + 1])]])
        assert np.array_equal(got, every[off[d] : off[d + 1]])
    # every window of both splits is a piece of the split's documents, in order
    for name in ("train", "val"):
        stream = src.streams[name]
        joined = np.concatenate([src.corpus.tokens[int(s) : int(s + n)]
                                 for s, n in zip(stream.starts, stream.lens)])
        for w in range(stream.num_windows):
            assert np.array_equal(stream.window(w), joined[w * 11 : w * 11 + 12])
    batch = src.next_batch()
    assert batch["input_ids"].shape == (2, 11) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


def test_index_is_cached_and_rebuilt_when_corrupt_or_stale(tmp_path, monkeypatch):
    f = tmp_path / "t.bin"
    np.concatenate(_documents(2, 30)).astype(np.uint16).tofile(f)
    cfg = _tokens_cfg(tmp_path, [f])
    first = build_data(cfg, **_args()).corpus.offsets
    index = sorted((tmp_path / "cache/tokens").glob("*.index.npy"))
    assert len(index) == 1
    real = tokens_mod._scan
    monkeypatch.setattr(tokens_mod, "_scan", lambda *a: pytest.fail("rescanned"))
    assert np.array_equal(build_data(cfg, **_args()).corpus.offsets, first)  # from the cache
    monkeypatch.setattr(tokens_mod, "_scan", real)
    index[0].write_bytes(index[0].read_bytes()[:-8])  # truncated
    with pytest.warns(UserWarning, match="invalid or does not fit.*rebuilding"):
        again = build_data(cfg, **_args()).corpus.offsets
    assert np.array_equal(again, first)
    # a file that changed is another entry (size and mtime are in the key)
    np.concatenate(_documents(3, 30)).astype(np.uint16).tofile(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        changed = build_data(cfg, **_args()).corpus.offsets
    assert not np.array_equal(changed, first)
    assert len(list((tmp_path / "cache/tokens").glob("*.index.npy"))) == 2


def test_resume_and_data_parallel_shards(tmp_path):
    f = tmp_path / "t.npy"
    np.save(f, np.concatenate(_documents(4, 60)).astype(np.uint16))
    cfg = _tokens_cfg(tmp_path, [f])
    single = _take(build_data(cfg, **_args(batch_size=4)), 5)
    ranks = [_take(build_data(cfg, **_args(dp_rank=r, dp_size=2)), 5) for r in range(2)]
    for k in range(5):
        assert torch.equal(torch.cat([ranks[0][k]["input_ids"], ranks[1][k]["input_ids"]]),
                           single[k]["input_ids"])
    src = build_data(cfg, **_args(dp_rank=1, dp_size=2))
    _take(src, 3)
    resumed = build_data(cfg, **_args(dp_rank=1, dp_size=2))
    resumed.load_state_dict(src.state_dict())
    assert _eq(_take(resumed, 2), ranks[1][3:])
    text_state = src.state_dict() | {"kind": "text"}
    with pytest.raises(ValueError, match="saved with kind='text'"):
        resumed.load_state_dict(text_state)


@pytest.mark.parametrize("change, message", [
    (dict(token_files=[]), "data.token_files is empty"),
    (dict(eos_id=-1), r"data.eos_id=-1 must be the id that ends each document"),
    (dict(eos_id=50), r"data.eos_id=50 must be .* \[0, token_vocab_size=50\)"),
    (dict(token_vocab_size=0), "data.token_vocab_size=0: set it to the vocabulary"),
    (dict(token_vocab_size=70000), "does not fit data.token_dtype=uint16"),
    (dict(val_fraction=1.0), r"data.val_fraction=1.0 must be in \[0, 1\)"),
])
def test_config_refusals(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        replace(_tokens_cfg(tmp_path, ["x.bin"]), **change).validate()


def test_file_refusals_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="'missing.bin' does not exist"):
        build_data(_tokens_cfg(tmp_path, ["missing.bin"]), **_args())
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="3 bytes, not a multiple of 2 .*data.token_dtype"):
        build_data(_tokens_cfg(tmp_path, [odd]), **_args())
    big = tmp_path / "big.bin"
    ids = np.concatenate(_documents(5, 20)).astype(np.uint16)
    ids[37] = 60
    ids.tofile(big)
    with pytest.raises(ValueError, match="holds the id 60 near token 37, outside "
                                         "data.token_vocab_size=50"):
        build_data(_tokens_cfg(tmp_path, [big]), **_args())
    flat = tmp_path / "floats.npy"
    np.save(flat, np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"float32 array of shape \(4, 3\); it must be 1-D"):
        build_data(_tokens_cfg(tmp_path, [flat]), **_args())
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match="is not a readable .npy array"):
        build_data(_tokens_cfg(tmp_path, [bad]), **_args())
    short = tmp_path / "short.bin"
    np.array([5, 6, EOS, 7, EOS], dtype=np.uint16).tofile(short)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        build_data(_tokens_cfg(tmp_path, [short]), **_args())
    one = tmp_path / "one.bin"
    np.arange(2, 40, dtype=np.uint16).tofile(one)  # no EOS: a single document
    with pytest.raises(ValueError, match="leaves no training documents out of 1.*eos_id"):
        build_data(_tokens_cfg(tmp_path, [one]), **_args())


def test_training_on_token_files(tmp_path):
    """A run on kind=tokens with document masks: the model takes its vocabulary from the data
    and the loss falls."""
    from ctxscale.launch.config import load_job_config
    from ctxscale.launch.train import train
    from tests.launch.test_train import SMALL, TINY, _losses

    f = tmp_path / "train.bin"
    rng = np.random.default_rng(6)  # documents count up from a random id: a bigram to learn
    docs = [np.append(np.arange(s, 50), EOS) for s in rng.integers(2, 40, 300)]
    np.concatenate(docs).astype(np.uint16).tofile(f)
    out = tmp_path / "run"
    cfg = load_job_config(TINY, SMALL + [
        "data.kind=tokens", f"data.token_files=[{f}]", f"data.eos_id={EOS}",
        "data.token_vocab_size=50", "data.seq_len=32", "data.document_mask=true",
        f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=0", "train.steps=30",
        "optim.lr=3e-3", "optim.warmup_steps=2", f"train.output_dir={out}"])
    train(cfg)
    losses = _losses(out)
    assert Path(out / "metrics.jsonl").is_file()
    assert losses[30] < 0.7 * losses[1], losses  # measured: 3.92 -> 2.29


def test_eval_on_token_files_refuses_passkey_by_name(tmp_path):
    from ctxscale.launch.evaluate import EvalJob

    f = tmp_path / "t.bin"
    np.concatenate(_documents(7, 40)).astype(np.uint16).tofile(f)
    job = EvalJob(models=["m"], data=_tokens_cfg(tmp_path, [f]), passkey_lengths=[64])
    with pytest.raises(ValueError, match="passkey_lengths needs data.kind=text.*passkey_lengths: "
                                         r"\[\] to evaluate perplexity only"):
        job.validate()
    replace(job, passkey_lengths=[]).validate()


# ---------------------------------------------------------------- weighted files


def test_blend_counts_are_exact_per_block():
    from ctxscale.launch.data.tokens import BLEND_BLOCK, blend_counts

    assert blend_counts([3, 1]).tolist() == [3072, 1024]
    assert blend_counts([1, 1, 1]).tolist() == [1366, 1365, 1365]
    tiny = blend_counts([1.0, 1e-9, 0.5])
    assert tiny.sum() == BLEND_BLOCK and tiny[1] == 1  # a positive weight is never starved
    assert blend_counts([0.7, 0.2, 0.1], block=10).tolist() == [7, 2, 1]


def _two_files(tmp_path):
    """File a: documents of ids in [2, 26); file b: ids in [26, 50) (a window's file shows)."""
    rng = np.random.default_rng(8)
    a, b = tmp_path / "a.bin", tmp_path / "b.npy"
    np.concatenate([np.append(rng.integers(2, 26, int(rng.integers(5, 30))), EOS)
                    for _ in range(80)]).astype(np.uint16).tofile(a)
    np.save(b, np.concatenate([np.append(rng.integers(26, 50, int(rng.integers(5, 30))), EOS)
                               for _ in range(40)]).astype(np.uint16))
    return a, b


def test_weighted_files_are_sampled_in_proportion(tmp_path):
    from ctxscale.launch.data.tokens import BLEND_BLOCK

    a, b = _two_files(tmp_path)
    cfg = _tokens_cfg(tmp_path, [a, b], token_weights=[3.0, 1.0])
    src = build_data(cfg, **_args(batch_size=64))
    rows = torch.cat([src.next_batch()["input_ids"] for _ in range(2 * BLEND_BLOCK // 64)])
    real = rows.masked_fill(rows == EOS, 0)
    from_b = (real >= 26).any(1)
    assert not ((real >= 2) & (real < 26)).any(1)[from_b].any()  # a window is one file's
    per_block = from_b.view(2, BLEND_BLOCK).sum(1).tolist()
    assert per_block == [1024, 1024]  # exactly a quarter from b in every block
    # each file runs its own epochs: its first num_windows samples are all its windows once
    part_b = src.parts[1]["train"]
    seen = {tuple(r.tolist()) for r in rows[from_b][: part_b.num_windows]}
    assert len(seen) == part_b.num_windows
    # the blend is a function of the sample index: dp shards and resume as for one corpus
    ranks = [build_data(cfg, **_args(batch_size=32, dp_rank=r, dp_size=2)) for r in range(2)]
    first = torch.cat([ranks[0].next_batch()["input_ids"], ranks[1].next_batch()["input_ids"]])
    assert torch.equal(first, rows[:64])
    resumed = build_data(cfg, **_args(batch_size=64))
    resumed.load_state_dict(src.state_dict())
    assert torch.equal(resumed.next_batch()["input_ids"], src.next_batch()["input_ids"])
    # validation blends the files' validation splits the same way, fixed across calls
    ev = src.eval_batches(2)
    assert _eq(ev, build_data(cfg, **_args(batch_size=64, seed=9)).eval_batches(2))
    ev_ids = torch.cat([e["input_ids"] for e in ev]).masked_fill_(
        torch.cat([e["input_ids"] for e in ev]) == EOS, 0)
    assert (ev_ids >= 26).any(1).any() and ((ev_ids >= 2) & (ev_ids < 26)).any(1).any()


def test_weighted_files_refusals(tmp_path):
    a, b = _two_files(tmp_path)
    with pytest.raises(ValueError, match="token_weights has 1 entries for 2 data.token_files"):
        _tokens_cfg(tmp_path, [a, b], token_weights=[1.0]).validate()
    with pytest.raises(ValueError, match=r"token_weights=\[1.0, 0.0\] must all be > 0"):
        _tokens_cfg(tmp_path, [a, b], token_weights=[1.0, 0.0]).validate()
    small = tmp_path / "small.bin"
    np.array([3, 4, EOS, 5, 6, 7, EOS, 8, EOS], dtype=np.uint16).tofile(small)
    with pytest.raises(ValueError, match="the train split of small.bin has .* fewer than one"):
        build_data(_tokens_cfg(tmp_path, [a, small], token_weights=[1, 1]), **_args())


@pytest.mark.parametrize("no_eval", ["data.val_fraction=0", "train.eval_batches=0"])
def test_training_without_a_validation_split(no_eval, tmp_path):
    """No validation split (val_fraction 0) or no evaluation batches: the run trains and logs
    no evaluation (it used to stop at the first evaluation, or log an eval_loss of 0)."""
    import json

    from ctxscale.launch.config import load_job_config
    from ctxscale.launch.train import format_summary, train
    from tests.launch.test_train import SMALL, TINY

    f = tmp_path / "t.bin"
    np.concatenate(_documents(9, 200)).astype(np.uint16).tofile(f)
    out = tmp_path / "run"
    summary = train(load_job_config(TINY, SMALL + [
        "data.kind=tokens", f"data.token_files=[{f}]", f"data.eos_id={EOS}",
        "data.token_vocab_size=50", "data.seq_len=16", "model.vocab_size=0", "train.steps=3",
        "train.eval_every=1", f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={out}",
        no_eval]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert not any("eval_loss" in r for r in records)
    assert "eval             none" in format_summary(summary, out)


def test_convert_refuses_to_run_without_a_validation_split():
    from ctxscale.launch.convert import load_convert_config

    for override in ("data.val_fraction=0", "run.eval_batches=0"):
        with pytest.raises(ValueError, match="set data.val_fraction > 0 and run.eval_batches"):
            load_convert_config("configs/convert_pretrain_teacher.yaml", [override])
