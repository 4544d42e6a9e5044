"""Corpus files in the formats pretraining data ships in: Parquet (FineWeb, Hugging Face
datasets) read a row group at a time and zstd JSON lines (SlimPajama, the Pile) give the same
corpus as the plain files with the same documents; wrong columns, corrupt files and a missing
optional package are named with the fix."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa  # ctxscale[corpora], which `make test` installs
import pyarrow.parquet as pq
import pytest
import zstandard

from ctxscale.launch.data import build_data
from ctxscale.launch.data import text as text_mod
from tests.launch.test_data_text import _args, _eq, _take, corpus  # noqa: F401 (fixture)


def _same_corpus(a, b):
    assert np.array_equal(a.corpus.offsets, b.corpus.offsets)
    assert np.array_equal(np.asarray(a.corpus.tokens), np.asarray(b.corpus.tokens))
    assert _eq(_take(a, 5), _take(b, 5))


def test_parquet_and_zstd_json_lines_match_the_plain_corpus(corpus, tmp_path):  # noqa: F811
    cfg, docs = corpus
    plain = build_data(cfg, **_args(seed=2))
    # Parquet: 37 documents in row groups of 8, a null and an empty row (dropped, like an
    # empty document), an extra column
    rows = docs[:20] + [None, ""] + docs[20:37]
    table = pa.table({"id": list(range(len(rows))), "content": rows})
    a = tmp_path / "a.parquet"
    pq.write_table(table, a, row_group_size=8)
    assert pq.ParquetFile(a).num_row_groups == 5
    b = tmp_path / "b.jsonl.zst"
    with zstandard.open(b, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"content": d}) + "\n" for d in docs[37:]))
    mixed = replace(cfg, text_files=[str(a), str(b)], jsonl_field="content")
    _same_corpus(build_data(mixed, **_args(seed=2)), plain)
    got = list(text_mod.iter_documents(a, "\n\n", "content"))
    assert got == docs[:37]


def test_parquet_refusals_name_the_fix(corpus, tmp_path):  # noqa: F811
    cfg, docs = corpus
    a = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": docs[:4], "n": [1, 2, 3, 4]}), a)
    with pytest.raises(ValueError, match=r"has no column 'text' \(has \['body', 'n'\]\); set "
                                         r"data.jsonl_field"):
        list(text_mod.iter_documents(a, "", "text"))
    with pytest.raises(ValueError, match=r"column 'n' holds int64, not strings"):
        list(text_mod.iter_documents(a, "", "n"))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(a.read_bytes()[: a.stat().st_size // 2])
    with pytest.raises(ValueError, match="broken.parquet' is not a readable Parquet file"):
        build_data(replace(cfg, text_files=[str(broken)], jsonl_field="body"), **_args())


def test_a_missing_optional_package_is_named(tmp_path, monkeypatch):
    import importlib

    real = importlib.import_module

    def no_zstd(name, *args, **kwargs):
        if name == "zstandard":
            raise ImportError("no zstandard here")
        return real(name, *args, **kwargs)

    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(b"")
    monkeypatch.setattr(importlib, "import_module", no_zstd)
    with pytest.raises(ValueError, match=r"c.jsonl.zst \(zstd\) needs the zstandard package: "
                                         r"pip install ctxscale\[corpora\]"):
        list(text_mod.iter_documents(path, "", "text"))
