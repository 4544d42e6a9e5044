"""Pre-tokenized data (`data.kind: tokens`): what the one indexing pass costs, what reopening
from the cached index costs, and how fast batches come out, against reading the same windows
straight from the memory-mapped file (the baseline: no sampler, no index, no shuffle).

    python benchmarks/token_files.py                        # 200M tokens; writes the results
    python benchmarks/token_files.py --tokens 20000000 --no-write

The file is written here: uint16 ids with an EOS every 1-4000 tokens (documents of 2000 tokens
on average), as nanoGPT's prepare.py leaves a corpus. Batches: 8 windows of 8192 tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_name  # benchmarks/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "token_files_cpu.md"
EOS, VOCAB = 50256, 50257


def _write(path: Path, n: int) -> int:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, EOS, n, dtype=np.uint16)
    ends = np.cumsum(rng.integers(1, 4000, n // 1000))
    ends = ends[ends < n]
    ids[ends] = EOS
    ids.tofile(path)
    return len(ends)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=200_000_000)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    from ctxscale.launch.data import DataConfig, build_data

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "train.bin"
        docs = _write(f, a.tokens)
        cfg = DataConfig(kind="tokens", token_files=[str(f)], eos_id=EOS, token_vocab_size=VOCAB,
                         seq_len=a.seq_len, val_fraction=0.01, cache_dir=f"{tmp}/cache")
        args = dict(batch_size=a.batch, dp_rank=0, dp_size=1, seed=0)
        t0 = time.perf_counter()
        src = build_data(cfg, **args)  # indexes the file
        index_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        src = build_data(cfg, **args)  # from the cached index
        reopen_s = time.perf_counter() - t0
        src.next_batch()
        t0 = time.perf_counter()
        for _ in range(a.batches):
            src.next_batch()
        source_s = (time.perf_counter() - t0) / a.batches
        raw = np.memmap(f, dtype=np.uint16, mode="r")
        rng = np.random.default_rng(1)
        starts = rng.integers(0, a.tokens - a.seq_len - 1, (a.batches, a.batch))
        t0 = time.perf_counter()
        for row in starts:  # the baseline: contiguous windows, no sampler or index
            np.stack([raw[s : s + a.seq_len + 1] for s in row]).astype(np.int64)
        raw_s = (time.perf_counter() - t0) / a.batches
    tok_per_batch = a.batch * a.seq_len
    lines = [
        f"# Token files (`data.kind: tokens`), {cpu_name()}",
        "",
        f"`python benchmarks/token_files.py --tokens {a.tokens}` (the file just written, so in "
        f"the page cache: the index pass reads memory, not disk): a uint16 file of {a.tokens:,} "
        f"tokens in {docs:,} documents; batches of {a.batch} x {a.seq_len} tokens.",
        "",
        "| what | time | rate |",
        "|---|---|---|",
        f"| index pass (first open) | {index_s:.2f} s | {a.tokens / index_s / 1e6:.0f}M tokens/s |",
        f"| reopen from the cached index | {reopen_s:.3f} s | |",
        f"| TokenFileSource.next_batch | {source_s * 1e3:.2f} ms | "
        f"{tok_per_batch / source_s / 1e6:.1f}M tokens/s |",
        f"| raw memmap windows (baseline) | {raw_s * 1e3:.2f} ms | "
        f"{tok_per_batch / raw_s / 1e6:.1f}M tokens/s |",
        "",
        f"The sampler costs {source_s / raw_s:.2f}x the raw read of the same amount of tokens "
        "(document lookup, per-epoch permutation, tensors).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_write:
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
