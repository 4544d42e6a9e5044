"""`ctxscale tokenize` and the streamed document reader it shares with the text pipeline: the
same documents as a whole-file split at any chunk size, bounded memory, a token file that gives
the text pipeline's batches, and refusals that leave existing outputs untouched."""

from __future__ import annotations

import gzip
import json
import tracemalloc

import numpy as np
import pytest
import torch

from ctxscale.launch.cli import main as cli_main
from ctxscale.launch.config import load_job_config
from ctxscale.launch.data import DataConfig, build_data
from ctxscale.launch.data import text as text_mod
from ctxscale.launch.data.cache import sha256_file
from ctxscale.launch.tokenize import outputs_of, reader_overrides, tokenize
from tests.launch.test_data_text import _args, _eq, _make_corpus, _take


@pytest.mark.parametrize("separator", ["\n\n", "\n", "<|doc|>", "aa", ""])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_streamed_documents_equal_a_whole_file_split(separator, chunk, tmp_path):
    """Separators that straddle chunks, runs of separators ("\\n\\n\\n" with "\\n\\n"), CRLF
    line ends and multi-byte characters: the streamed documents are read_text().split's."""
    rng = np.random.default_rng(len(separator) * 31 + chunk)
    pieces = ["x", "aaa", "é", "\n", "\r\n", "\n\n", "\n\n\n", " ", "<|doc|>", "ab", "ツ"]
    text = "".join(rng.choice(pieces, size=400))
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    whole = path.read_text(encoding="utf-8")
    expected = [d for d in (whole.split(separator) if separator else [whole]) if d.strip()]
    got = list(text_mod.iter_documents(path, separator, chunk_chars=chunk))
    assert got == expected and len(got) >= 1


def test_streamed_documents_hold_a_chunk_not_the_file(tmp_path):
    """A 6 MB file read 64K characters at a time: the reader's peak Python allocation stays
    near one chunk (it was the whole file, plus its list of documents, before)."""
    path = tmp_path / "big.txt"
    doc = ("word " * 200).strip()
    path.write_text("\n\n".join(f"{i} {doc}" for i in range(6000)), encoding="utf-8")
    assert path.stat().st_size > 6e6
    tracemalloc.start()
    try:
        n = sum(1 for _ in text_mod.iter_documents(path, "\n\n", chunk_chars=1 << 16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 6000
    assert peak < 1.5e6, f"peak {peak / 1e6:.1f} MB while streaming a 6 MB file"


def _corpus_overrides(tmp_path, files, **extra):
    over = {"data.kind": "text", "data.text_files": "[" + ",".join(map(str, files)) + "]",
            "data.tokenizer_vocab_size": 320, "data.seq_len": 23, "data.val_fraction": 0.1,
            "data.seed": 4, "train.output_dir": str(tmp_path / "run")} | extra
    return [f"{k}={v}" for k, v in over.items()]


@pytest.fixture()
def two_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl.gz"
    _make_corpus(a, 37, seed=1)
    docs = _make_corpus(tmp_path / "tmp.txt", 24, seed=2)
    with gzip.open(b, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return a, b


def test_token_file_gives_the_text_pipelines_batches(two_files, tmp_path):
    """Documents, offsets, split, windows across an epoch, document ids and eval batches are
    the text pipeline's on the same config; the trained tokenizer is the trainer's cached one
    (same cache) and is copied beside the file."""
    cfg = load_job_config(None, _corpus_overrides(tmp_path, two_files,
                                                  **{"data.document_mask": "true"}))
    out = tmp_path / "out" / "corpus.bin"
    meta = tokenize(cfg, out, log=lambda *_: None)
    text = build_data(cfg.data, **_args(seed=5), cache_dir=str(tmp_path / "run" / "cache"))
    assert meta["num_docs"] == text.corpus.num_docs == 61
    assert meta["num_tokens"] == int(text.corpus.offsets[-1])
    assert meta["tokenizer_sha256"] == text.tokenizer.sha256
    assert sha256_file(outputs_of(out)["tokenizer"]) == text.tokenizer.sha256
    assert out.read_bytes() == text.corpus.paths["bin"].read_bytes()
    d = meta["data"]
    tok_cfg = DataConfig(kind="tokens", seq_len=23, seed=4, token_files=d["token_files"],
                         token_dtype=d["token_dtype"], eos_id=d["eos_id"],
                         token_vocab_size=d["token_vocab_size"], val_fraction=0.1,
                         cache_dir=str(tmp_path / "tokcache"), document_mask=True)
    tokens = build_data(tok_cfg, **_args(seed=5))
    assert np.array_equal(tokens.corpus.offsets, text.corpus.offsets)
    steps = text.streams["train"].num_windows // 2 + 2
    a, b = _take(text, steps), _take(tokens, steps)
    assert _eq(a, b)
    assert all(torch.equal(x["document_ids"], y["document_ids"]) for x, y in zip(a, b))
    assert _eq(text.eval_batches(3), tokens.eval_batches(3))


def test_refusals_leave_existing_outputs_untouched(two_files, tmp_path, monkeypatch):
    overrides = _corpus_overrides(tmp_path, two_files)
    out = tmp_path / "c.bin"
    out.write_bytes(b"precious")
    cfg = load_job_config(None, overrides)
    with pytest.raises(FileExistsError, match="c.bin.*already exist.*--force"):
        tokenize(cfg, out, log=lambda *_: None)
    assert out.read_bytes() == b"precious"
    with pytest.raises(ValueError, match=r"raw ids.*name it .bin"):
        tokenize(cfg, tmp_path / "c.npy", log=lambda *_: None)
    with pytest.raises(ValueError, match="data.kind='mqar'.*set data.kind=text"):
        tokenize(load_job_config(None, [f"train.output_dir={tmp_path}/r"]), tmp_path / "m.bin")
    missing = load_job_config(None, _corpus_overrides(tmp_path, [tmp_path / "nope.txt"]))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        tokenize(missing, tmp_path / "n.bin", log=lambda *_: None)
    assert not (tmp_path / "n.bin").exists()

    def fail(docs, tok, f, **kw):  # a failure while writing (disk full, interrupt)
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(text_mod, "write_tokens", fail)
    with pytest.raises(KeyboardInterrupt):
        tokenize(cfg, out, force=True, log=lambda *_: None)
    monkeypatch.undo()
    assert out.read_bytes() == b"precious"  # the old file stays, no temporary is left
    assert sorted(p.name for p in tmp_path.glob(".*")) == []
    meta = tokenize(cfg, out, force=True, log=lambda *_: None)  # --force replaces
    assert out.stat().st_size == meta["num_tokens"] * 2


def test_cli_writes_the_file_and_the_overrides_train_on_it(two_files, tmp_path, capsys):
    overrides = _corpus_overrides(tmp_path, two_files)
    out = tmp_path / "c.bin"
    assert cli_main(["tokenize", "--out", str(out), *overrides]) == 0
    printed = capsys.readouterr().out
    meta = json.loads(outputs_of(out)["meta"].read_text())
    assert " ".join(reader_overrides(meta)) in printed
    assert cli_main(["tokenize", "--out", str(out), *overrides]) == 2
    assert "--force" in capsys.readouterr().err
    from ctxscale.launch.train import train

    small = ["model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
             "model.vocab_size=0", "train.batch_size=2", "train.steps=2", "train.progress=false",
             "train.tensorboard=false", "train.eval_every=0", "train.eval_batches=1",
             "checkpoint.every=0", "checkpoint.at_end=false", "checkpoint.resume=none"]
    train(load_job_config(None, overrides + small + reader_overrides(meta)
                          + [f"train.output_dir={tmp_path}/train"]))
    rows = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().split("\n")
            if x]
    assert [r["step"] for r in rows if "loss" in r][-1] == 2
