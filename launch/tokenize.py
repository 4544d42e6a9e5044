"""`ctxscale tokenize`: a text corpus (`data.kind: text`) -> one token file for `data.kind: tokens`.

    ctxscale tokenize --config configs/shakespeare.yaml --out data/shakespeare.bin [key=value ...]

The preprocessing step of Megatron-LM (`preprocess_data.py`) or nanoGPT (`prepare.py`), done
once for a corpus so that training jobs read memory-mapped ids and run no tokenizer. The
documents of `data.text_files` (split by `data.doc_separator`, or one per JSON line,
`data.jsonl_field`) are streamed, encoded in batches by the config's tokenizer and written,
each followed by its EOS, to `--out` as raw uint16 ids (vocabulary <= 65536) or uint32. Memory
is bounded by one batch of documents, not by the corpus.

The tokenizer is the one `ctxscale train` would use with this config: `data.tokenizer`, or the
sentencepiece model it trains on the training documents and caches (`data.cache_dir`, else
`train.output_dir/cache`, the same cache the trainer reads). A trained model is also copied to
`<out>.tokenizer.model`, so the token file can still be decoded after the cache is cleared.

`<out>.json` records how the file was made (inputs, tokenizer and its sha256, EOS, dtype,
counts) and the `data` settings that read it; they are printed at the end. With the config's
seq_len, val_fraction and seed, `data.kind: tokens` on the file gives exactly the batches
`data.kind: text` gives on the corpus (same documents, split and packing).

An existing output is never overwritten without `--force`; with it, the new file is written
under a temporary name and replaces the old one only once complete. One process: run it
before launching the job, not under torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path


def _refuse(message: str) -> int:
    print(f"ctxscale tokenize: {message}", file=sys.stderr)
    return 2


def outputs_of(out: Path) -> dict[str, Path]:
    return {"bin": out, "meta": out.with_name(out.name + ".json"),
            "tokenizer": out.with_name(out.name + ".tokenizer.model")}


def tokenize(cfg, out: Path, *, force: bool = False, log=print) -> dict:
    """Write the token file of `cfg.data`'s text corpus to `out` (module docstring); returns
    its metadata. Raises ValueError / FileExistsError naming the fix."""
    from ctxscale.launch.data.cache import (
        atomic_write_bytes,
        check_files,
        file_identity,
        resolve_cache_dir,
        run_cache_dir,
        tmp_name,
    )
    from ctxscale.launch.data.text import (
        document_eos,
        iter_corpus,
        load_or_train_tokenizer,
        token_dtype,
        write_tokens,
    )

    data = cfg.data
    if data.kind != "text":
        raise ValueError(f"ctxscale tokenize reads a text corpus, but the config has "
                         f"data.kind={data.kind!r}; set data.kind=text and data.text_files")
    if out.suffix == ".npy":
        raise ValueError(f"--out {str(out)!r}: the token file holds raw ids, which data.kind="
                         "tokens reads by any suffix but .npy (a numpy header); name it .bin")
    paths = outputs_of(out)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise FileExistsError(f"--out {str(out)!r}: {', '.join(existing)} already exist(s); "
                              "pass --force to replace them, or choose another --out")
    files = check_files(data.text_files, "data.text_files")
    cache = resolve_cache_dir(str(run_cache_dir(cfg.train.output_dir, data.cache_dir)), None)
    tokenizer = load_or_train_tokenizer(data, files, cache)
    eos, dtype = document_eos(tokenizer), token_dtype(tokenizer.vocab_size)
    trained = data.tokenizer is None
    log(f"tokenize: {len(files)} file(s) -> {out} | tokenizer {tokenizer.path} "
        f"({tokenizer.vocab_size} ids, eos {eos}{', trained' if trained else ''}) | {dtype.name}")

    out.parent.mkdir(parents=True, exist_ok=True)
    start, last = time.perf_counter(), [time.perf_counter()]

    def progress(docs, tokens):
        now = time.perf_counter()
        if now - last[0] >= 10:
            last[0] = now
            log(f"tokenize: {docs} documents, {tokens} tokens "
                f"({tokens / (now - start):,.0f} tokens/s)")

    tmp = tmp_name(out)
    try:
        with open(tmp, "wb") as f:
            offsets = write_tokens(iter_corpus(files, data.doc_separator, data.jsonl_field),
                                   tokenizer, f, progress=progress)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    num_docs, num_tokens = len(offsets) - 1, int(offsets[-1])
    if num_docs == 0:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"data.text_files {data.text_files} hold no non-empty documents; "
                         "nothing was written")
    reader = {"kind": "tokens", "token_files": [str(out)], "token_dtype": dtype.name,
              "eos_id": eos, "token_vocab_size": tokenizer.vocab_size}
    meta = {
        "num_docs": num_docs, "num_tokens": num_tokens, "dtype": dtype.name, "eos_id": eos,
        "vocab_size": tokenizer.vocab_size, "tokenizer": str(tokenizer.path),
        "tokenizer_sha256": tokenizer.sha256, "tokenizer_trained": trained,
        "doc_separator": data.doc_separator, "jsonl_field": data.jsonl_field,
        "inputs": [file_identity(p) for p in files], "seconds": round(seconds, 3),
        "data": reader,
    }
    if trained:
        copy = tmp_name(paths["tokenizer"])
        shutil.copyfile(tokenizer.path, copy)
        os.replace(copy, paths["tokenizer"])
        meta["tokenizer_copy"] = str(paths["tokenizer"])
    os.replace(tmp, out)
    atomic_write_bytes(paths["meta"], json.dumps(meta, indent=1).encode())
    log(f"tokenize: {num_docs} documents, {num_tokens} tokens in {seconds:.1f} s "
        f"({num_tokens / max(seconds, 1e-9):,.0f} tokens/s) -> {out}, {paths['meta'].name}")
    return meta


def reader_overrides(meta: dict) -> list[str]:
    """The `data.*` overrides that train on the token file instead of the text corpus."""
    d = meta["data"]
    return [f"data.kind={d['kind']}", f"data.token_files=[{','.join(d['token_files'])}]",
            f"data.token_dtype={d['token_dtype']}", f"data.eos_id={d['eos_id']}",
            f"data.token_vocab_size={d['token_vocab_size']}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctxscale tokenize", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "-c", default=None,
                   help="YAML job config whose data section (kind: text) names the corpus")
    p.add_argument("--out", "-o", required=True, help="the token file to write (e.g. data.bin)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("overrides", nargs="*", help="key.path=value, e.g. data.text_files=[a.txt]")
    args = p.parse_args(argv)
    from ctxscale.launch.config import ConfigError, load_job_config

    try:
        cfg = load_job_config(args.config, args.overrides)
        meta = tokenize(cfg, Path(args.out), force=args.force)
    except (ConfigError, ValueError, FileExistsError, FileNotFoundError) as e:
        return _refuse(str(e))
    print("train on it with the same config and:\n  " + " ".join(reader_overrides(meta)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
