"""Text data: sentencepiece tokenizer (train/load/round trip), memory-mapped token cache (reuse,
corrupt-cache rebuild), document split, packing, and the sharded resumable sampler."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ctxscale.launch.data import DataConfig, build_data, passkey_text_sample
from ctxscale.launch.data import text as text_mod
from ctxscale.launch.data.tokenizer import Tokenizer, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO_ROOT.parent / "shared/data/tinyshakespeare.txt"
WORDS = "the of and to in is was he for it with as his on be at by had are but from or".split()


def _make_corpus(path: Path, num_docs: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        lines = []
        for _ in range(int(rng.integers(1, 4))):
            words = rng.choice(WORDS, size=int(rng.integers(3, 15)))
            lines.append(" ".join(words).capitalize() + ".")
        docs.append("\n".join(lines))
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return docs


@pytest.fixture()
def corpus(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    docs = _make_corpus(a, 37, seed=1) + _make_corpus(b, 24, seed=2)
    cfg = DataConfig(
        kind="text",
        seq_len=23,
        text_files=[str(a), str(b)],
        tokenizer_vocab_size=320,
        val_fraction=0.1,
        cache_dir=str(tmp_path / "cache"),
        seed=4,
    )
    return cfg, docs


def _take(src, n):
    return [src.next_batch() for _ in range(n)]


def _eq(a, b):
    return all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        for x, y in zip(a, b, strict=True)
    )


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def shakespeare_docs():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"tinyshakespeare not found at {SHAKESPEARE} (shared data folder absent)")
    text = SHAKESPEARE.read_text(encoding="utf-8")[:120_000]  # a slice keeps the test fast
    return [d for d in text.split("\n\n") if d.strip()]


def test_tokenizer_train_load_round_trip(shakespeare_docs, tmp_path):
    train, held_out = shakespeare_docs[:-50], shakespeare_docs[-50:]
    tok = train_tokenizer(train, tmp_path / "a.model", vocab_size=600, model_type="bpe")
    again = train_tokenizer(train, tmp_path / "b.model", vocab_size=600, model_type="bpe")
    # deterministic: identical model bytes from identical text
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert again.sha256 == tok.sha256
    assert tok.vocab_size == 600 and tok.eos_id == 2
    loaded = Tokenizer(tmp_path / "a.model")
    for doc in held_out + ["Ünïcödé 🎭 and  two  spaces\n\nand\ttabs"]:
        ids = tok.encode(doc)
        assert loaded.encode(doc) == ids
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert loaded.decode(ids) == doc  # exact round trip, byte fallback for unseen chars
    # subwords compress: fewer tokens than characters on held-out text
    text = "\n\n".join(held_out)
    assert len(tok.encode(text)) < 0.6 * len(text)
    uni = train_tokenizer(train, tmp_path / "u.model", vocab_size=600, model_type="unigram")
    assert uni.decode(uni.encode(held_out[0])) == held_out[0]
    uni2 = train_tokenizer(train, tmp_path / "u2.model", vocab_size=600, model_type="unigram")
    assert uni2.sha256 == uni.sha256


def test_text_source_on_shakespeare_with_given_tokenizer(shakespeare_docs, tmp_path):
    path = tmp_path / "slice.txt"
    path.write_text("\n\n".join(shakespeare_docs[:300]), encoding="utf-8")
    tok = train_tokenizer(shakespeare_docs[:300], tmp_path / "t.model", vocab_size=500)
    cfg = DataConfig(
        kind="text",
        seq_len=64,
        text_files=[str(path)],
        tokenizer=str(tmp_path / "t.model"),
        cache_dir=str(tmp_path / "cache"),
    )
    src = build_data(cfg, batch_size=2, dp_rank=0, dp_size=1, seed=0)
    assert src.vocab_size == 500
    batch = src.next_batch()
    assert batch["input_ids"].shape == (2, 64)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    decoded = tok.decode(batch["input_ids"][0].tolist())
    assert len(decoded) > 64  # real subwords, not bytes
    out = passkey_text_sample(
        src.tokenizer, shakespeare_docs[5], 300, 0.5, np.random.default_rng(1)
    )
    answer = src.tokenizer.encode(out["passkey"])
    assert out["labels"][out["labels"] != -100].tolist() == answer
    assert tok.decode(out["input_ids"].tolist()).count(out["passkey"]) == 2  # needle twice


def test_missing_files_and_tokenizer_errors(corpus, tmp_path):
    cfg, _ = corpus
    missing = str(tmp_path / "nope" / "missing.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_data(replace(cfg, text_files=[*cfg.text_files, missing]), **_args())
    with pytest.raises(FileNotFoundError, match="no_such.model"):
        build_data(replace(cfg, tokenizer=str(tmp_path / "no_such.model")), **_args())
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="sentencepiece"):
        build_data(replace(cfg, tokenizer=str(bad)), **_args())
    with pytest.raises(ValueError, match="seq_len"):
        build_data(replace(cfg, seq_len=5000), **_args())
    with pytest.raises(ValueError, match="val_fraction"):
        # one file without a separator is one document: nothing left to train on
        build_data(replace(cfg, doc_separator="", text_files=cfg.text_files[:1]), **_args())


def _args(**kw):
    return dict(batch_size=2, dp_rank=0, dp_size=1, seed=0) | kw


# ---------------------------------------------------------------- split and packing


def test_split_and_packing_reproduce_documents(corpus):
    cfg, docs = corpus
    src = build_data(cfg, **_args())
    tok = src.tokenizer
    assert src.corpus.num_docs == len(docs) == 61
    val = text_mod.val_doc_ids(len(docs), cfg.val_fraction)
    assert len(val) == round(0.1 * 61)
    np.testing.assert_array_equal(val, text_mod.val_doc_ids(61, 0.1))  # seed-independent
    for name, ids in (("train", np.setdiff1d(np.arange(61), val)), ("val", val)):
        expected = np.concatenate([tok.encode(docs[d]) + [tok.eos_id] for d in ids])
        stream = src.streams[name]
        assert stream.num_tokens == len(expected)
        L = cfg.seq_len
        assert stream.num_windows == (len(expected) - 1) // L
        for w in range(stream.num_windows):  # windows overlap by one token
            np.testing.assert_array_equal(stream.window(w), expected[w * L : w * L + L + 1])
    # the val stream holds exactly the val documents, none of the train ones
    val_text = tok.decode(src.streams["val"].window(0).tolist())
    assert any(docs[d][:20] in val_text for d in val)


def test_epoch_visits_every_window_once_then_reshuffles(corpus):
    cfg, _ = corpus
    src = build_data(cfg, batch_size=1, dp_rank=0, dp_size=1, seed=3)
    stream = src.streams["train"]
    n = stream.num_windows
    rows = [src.next_batch()["input_ids"][0] for _ in range(2 * n)]
    expected = sorted(tuple(stream.window(w)[:-1].tolist()) for w in range(n))
    epoch0 = [tuple(r.tolist()) for r in rows[:n]]
    epoch1 = [tuple(r.tolist()) for r in rows[n:]]
    assert sorted(epoch0) == expected and sorted(epoch1) == expected
    assert epoch0 != epoch1  # a new permutation each epoch


# ---------------------------------------------------------------- sampler


def test_text_determinism_sharding_resume_eval(corpus):
    cfg, _ = corpus
    build = lambda **kw: build_data(cfg, **_args(**kw))  # noqa: E731
    a = _take(build(seed=5), 4)
    assert _eq(a, _take(build(seed=5), 4))
    assert not torch.equal(a[0]["input_ids"], build(seed=6).next_batch()["input_ids"])
    # dp sharding: ranks' batches concatenated = single-process batch of batch_size * dp_size
    n_win = build().streams["train"].num_windows
    steps = n_win // 6 + 2  # crosses an epoch boundary
    single = _take(build(batch_size=6, seed=5), steps)
    ranks = [_take(build(batch_size=2, dp_rank=r, dp_size=3, seed=5), steps) for r in range(3)]
    for k in range(steps):
        joined = torch.cat([ranks[r][k]["input_ids"] for r in range(3)])
        assert torch.equal(joined, single[k]["input_ids"])
    first_epoch = torch.cat([s["input_ids"] for s in single]).reshape(-1, cfg.seq_len)[:n_win]
    assert len({tuple(r.tolist()) for r in first_epoch}) == n_win  # disjoint within an epoch
    # exact resume, across the epoch boundary
    src = build(batch_size=2, dp_rank=2, dp_size=3, seed=5)
    _take(src, steps - 2)
    state = json.loads(json.dumps(src.state_dict()))
    resumed = build(batch_size=2, dp_rank=2, dp_size=3, seed=5)
    resumed.load_state_dict(state)
    assert _eq(_take(resumed, 2), ranks[2][steps - 2 :])
    # fixed eval set, independent of run seed and training progress
    ev = src.eval_batches(2)
    assert _eq(ev, src.eval_batches(2))
    assert _eq(ev, build(batch_size=2, dp_rank=2, dp_size=3, seed=11).eval_batches(2))
    assert ev[0]["input_ids"].shape == (2, cfg.seq_len)


def test_no_val_data_when_val_fraction_zero(corpus):
    cfg, _ = corpus
    src = build_data(replace(cfg, val_fraction=0.0), **_args())
    assert src.streams["val"].num_windows == 0
    with pytest.raises(ValueError, match="val_fraction"):
        src.eval_batches(1)


# ---------------------------------------------------------------- cache


def _token_files(cfg):
    folder = Path(cfg.cache_dir) / "tokens"
    return sorted(folder.glob("*.bin")), sorted(folder.glob("*.json"))


def test_cache_reused_and_corrupt_cache_rebuilt(corpus, monkeypatch):
    cfg, _ = corpus
    reference = _take(build_data(cfg, **_args()), 3)
    (bin_path,), (meta_path,) = _token_files(cfg)
    calls = []
    real_build = text_mod._build_corpus
    monkeypatch.setattr(text_mod, "_build_corpus", lambda *a: calls.append(1) or real_build(*a))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reuse must not warn or rebuild
        assert _eq(_take(build_data(cfg, **_args()), 3), reference)
    assert calls == []

    def corrupt_and_check(damage):
        damage()
        with pytest.warns(UserWarning, match="rebuilding"):
            src = build_data(cfg, **_args())
        assert _eq(_take(src, 3), reference)

    data = bin_path.read_bytes()
    corrupt_and_check(lambda: bin_path.write_bytes(data[: len(data) // 2]))  # truncated
    corrupt_and_check(lambda: bin_path.write_bytes(data[:-2] + b"\xff\xff"))  # last token flipped
    corrupt_and_check(lambda: bin_path.write_bytes(b"\x00\x00" + data[2:]))  # first token
    offsets = meta_path.with_name(meta_path.stem + ".offsets.npy")
    corrupt_and_check(lambda: offsets.write_bytes(offsets.read_bytes()[:-8]))
    corrupt_and_check(lambda: meta_path.write_text("{not json"))
    assert len(calls) == 5
    # a rebuilt entry replaced the old one in place; no temporary files left behind
    assert [p.name for p in (Path(cfg.cache_dir) / "tokens").iterdir() if ".tmp" in p.name] == []


def test_cache_keyed_by_file_and_tokenizer(corpus, tmp_path):
    cfg, _ = corpus
    build_data(cfg, **_args())
    build_data(replace(cfg, tokenizer_vocab_size=330), **_args())  # other tokenizer
    assert len(_token_files(cfg)[0]) == 2
    with open(cfg.text_files[0], "a", encoding="utf-8") as f:
        f.write("\n\nA new document at the end.")
    build_data(cfg, **_args())  # edited file -> new entry
    assert len(_token_files(cfg)[0]) == 3


def test_uint32_tokens_for_large_vocab(tmp_path):
    class BigVocab:  # a stand-in tokenizer whose ids exceed uint16
        path, sha256, vocab_size, eos_id = tmp_path / "big.model", "0" * 64, 70_000, 69_999

        def encode_batch(self, texts):
            return [[65_536 + len(t), 3] for t in texts]

    src = tmp_path / "t.txt"
    src.write_text("a\n\nbb\n\nccc", encoding="utf-8")
    corpus = text_mod.load_or_build_tokens([src], BigVocab(), "\n\n", tmp_path)
    assert corpus.tokens.dtype == np.uint32
    assert corpus.tokens.tolist() == [65_537, 3, 69_999, 65_538, 3, 69_999, 65_539, 3, 69_999]
    np.testing.assert_array_equal(corpus.offsets, [0, 3, 6, 9])


def _rank_builds(rank, world, cfg_dict):
    import torch.distributed as dist

    cfg = DataConfig(**cfg_dict)
    dist.barrier()  # all ranks hit the empty cache together: one trains/tokenizes, others wait
    src = build_data(cfg, batch_size=2, dp_rank=rank, dp_size=world, seed=8)
    return src.tokenizer.sha256, [src.next_batch()["input_ids"] for _ in range(3)]


def test_concurrent_ranks_build_one_shared_cache(corpus):
    from dataclasses import asdict

    from tests.harness import run_distributed

    cfg, _ = corpus
    results = run_distributed(_rank_builds, world_size=2, args=(asdict(cfg),))
    assert len({sha for sha, _ in results}) == 1
    single = _take(build_data(cfg, **_args(batch_size=4, seed=8)), 3)
    for k in range(3):
        joined = torch.cat([batches[k] for _, batches in results])
        assert torch.equal(joined, single[k]["input_ids"])
    bins, metas = _token_files(cfg)
    assert len(bins) == len(metas) == 1
    assert len(list((Path(cfg.cache_dir) / "tokenizers").glob("*.model"))) == 1
    leftovers = [p for p in Path(cfg.cache_dir).rglob("*") if ".tmp" in p.name]
    assert leftovers == []


# ---------------------------------------------------------------- JSON lines


def test_jsonl_files_hold_one_document_per_line(corpus, tmp_path):
    """`.jsonl` and `.jsonl.gz` text files give the same corpus as the plain files with the
    same documents (same tokenizer, split, windows); a field name, a broken line and a missing
    field are named."""
    import gzip

    cfg, docs = corpus
    plain = build_data(cfg, **_args(seed=2))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    rows = [json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)]
    a.write_text("\n".join(rows[:37]) + "\n\n", encoding="utf-8")  # a blank line is skipped
    with gzip.open(b, "wt", encoding="utf-8") as f:
        f.write("\n".join(rows[37:]))
    jcfg = replace(cfg, text_files=[str(a), str(b)], jsonl_field="body")
    lines = build_data(jcfg, **_args(seed=2))
    assert np.array_equal(lines.corpus.offsets, plain.corpus.offsets)
    assert np.array_equal(np.asarray(lines.corpus.tokens), np.asarray(plain.corpus.tokens))
    assert _eq(_take(lines, 5), _take(plain, 5))
    with pytest.raises(ValueError, match=r"a.jsonl', line 1: no string field 'text' \(has "
                                         r"\['body', 'id'\]\); set data.jsonl_field"):
        build_data(replace(jcfg, jsonl_field="text"), **_args())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="broken.jsonl', line 2: not a JSON object"):
        build_data(replace(cfg, text_files=[str(broken)]), **_args())
