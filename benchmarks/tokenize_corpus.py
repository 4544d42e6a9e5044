"""`ctxscale tokenize` / the text pipeline's token cache: throughput and peak memory of the
streamed writer (`text.iter_corpus` + `text.write_tokens`) against the whole-file way it
replaced (the baseline: read each file, split it, encode 1024 documents at a time, write each
document with its own small array), both in the same run on the same corpus and tokenizer.

    python benchmarks/tokenize_corpus.py                    # 160 copies of tinyshakespeare
    python benchmarks/tokenize_corpus.py --copies 4 --no-write

Corpus: one file of `--copies` copies of tinyshakespeare (1.1 MB, 7222 documents split at
blank lines, each), tokenized by a 2048-piece sentencepiece BPE trained on one copy; one large
file is where the whole-file way holds the most (a multi-GB .jsonl is the usual case). Each way runs in a fresh
process, whose peak resident memory (VmHWM) is read at its end, so neither inherits the
other's heap (nor this parent's); both must write identical bytes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results" / "tokenize_corpus_cpu.md"


def _whole_file(files, tokenizer, f):
    """The old `_build_corpus` loop: a file's text and its documents all in memory."""
    import numpy as np

    eos, n = tokenizer.eos_id, 0
    for path in files:
        text = Path(path).read_text(encoding="utf-8")
        docs = [d for d in text.split("\n\n") if d.strip()]
        for start in range(0, len(docs), 1024):
            for ids in tokenizer.encode_batch(docs[start : start + 1024]):
                arr = np.asarray(ids + [eos], dtype=np.uint16)
                arr.tofile(f)
                n += len(arr)
    return n


def child(way: str, files: list[str], model: str, out: str) -> None:
    sys.path.insert(0, str(ROOT.parent))
    from ctxscale.launch.data import text
    from ctxscale.launch.data.tokenizer import Tokenizer

    tok = Tokenizer(model)
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        if way == "imports":  # the floor: interpreter, imports and the tokenizer only
            n = 0
        elif way == "streamed":
            n = int(text.write_tokens(text.iter_corpus([Path(p) for p in files], "\n\n", "text"),
                                      tok, f)[-1])
        else:
            n = _whole_file(files, tok, f)
    seconds = time.perf_counter() - t0
    print(json.dumps({"tokens": n, "seconds": seconds, "peak_mib": _peak_mib()}))


def _peak_mib() -> float:
    """This process's peak resident memory: VmHWM, which starts afresh at exec (ru_maxrss
    keeps the parent's high-water mark from before the exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--copies", type=int, default=160)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--child", nargs=4, metavar=("WAY", "FILES", "MODEL", "OUT"))
    args = p.parse_args()
    if args.child:
        way, files, model, out = args.child
        child(way, files.split(","), model, out)
        return
    sys.path.insert(0, str(ROOT.parent))
    from ctxscale.launch.data.text import read_documents
    from ctxscale.launch.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = SHAKESPEARE.read_text(encoding="utf-8")
        files = [tmp / "corpus.txt"]
        files[0].write_text("\n\n".join([text] * args.copies), encoding="utf-8")
        model = tmp / "bpe.model"
        train_tokenizer(read_documents(SHAKESPEARE, "\n\n"), model, vocab_size=2048)
        res = {}
        for way in ("imports", "whole_file", "streamed"):
            out = tmp / f"{way}.bin"
            cmd = [sys.executable, __file__, "--child", way, ",".join(map(str, files)),
                   str(model), str(out)]
            run = subprocess.run(cmd, check=True, capture_output=True, text=True)
            res[way] = json.loads(run.stdout.strip().splitlines()[-1])
        assert (tmp / "whole_file.bin").read_bytes() == (tmp / "streamed.bin").read_bytes()
        mb = sum(f.stat().st_size for f in files) / 2**20
    base, new = res["whole_file"], res["streamed"]
    rows = [
        f"# Tokenizing a text corpus ({cpu_name()}, one file of {args.copies} x tinyshakespeare = "
        f"{mb:.0f} MiB, {new['tokens']:,} tokens, sentencepiece BPE 2048)",
        "",
        "Command: `python benchmarks/tokenize_corpus.py"
        + (f" --copies {args.copies}`" if args.copies != 160 else "`"),
        "",
        "| way | seconds | tokens/s | peak RSS (MiB) |",
        "|---|---|---|---|",
    ]
    for name, r in (("whole file (baseline)", base), ("streamed (write_tokens)", new)):
        rows.append(f"| {name} | {r['seconds']:.2f} | {r['tokens'] / r['seconds']:,.0f} | "
                    f"{r['peak_mib']:.0f} |")
    rows += ["", f"streamed / whole file: {base['seconds'] / new['seconds']:.2f}x throughput, "
             f"{new['peak_mib'] / base['peak_mib']:.2f}x peak memory; identical bytes.",
             f"Peak RSS includes the interpreter, the imports and the tokenizer: "
             f"{res['imports']['peak_mib']:.0f} MiB in a process that loads them and stops."]
    print("\n".join(rows))
    if not args.no_write:
        RESULTS.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
