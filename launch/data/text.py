"""Text corpora: documents -> sentencepiece tokens in a memory-mapped cache -> packed sequences.

Pipeline (done once per corpus and tokenizer, then reused from cache_dir):
  1. each file in data.text_files is split into documents by data.doc_separator, or, for
     `.jsonl` / `.jsonl.gz` / `.jsonl.zst`, holds one per line (its data.jsonl_field string),
     or, for `.parquet`, one per row (the data.jsonl_field column); empty documents are
     dropped; documents are numbered globally in file order;
  2. the tokenizer is loaded (data.tokenizer: a sentencepiece .model, or a Hugging Face
     tokenizer.json / model folder, hf_tokenizer.py) or trained on the TRAINING documents;
  3. every document is encoded and written, followed by EOS, into one flat token file
     `tokens/<key>.bin` (uint16 when vocab_size <= 65536, else uint32) with `<key>.offsets.npy`
     (int64, num_docs + 1: document d is tokens[offsets[d]:offsets[d+1]], its EOS included) and
     `<key>.json` metadata written LAST. <key> hashes the input files' (path, size, mtime), the
     tokenizer file's sha256, the EOS id and the separator. On load the metadata, file sizes, offsets
     checksum and a probe checksum of the token file are verified; any mismatch (truncated or
     corrupt cache) rebuilds the entry. Writes go to temporary names and are renamed into place.

Split: a fixed permutation of the document ids (seed-independent) puts the first
max(1, round(val_fraction · num_docs)) documents into "val", the rest into "train".

Packing: a split's documents, each followed by its EOS, form one stream of T tokens. Window w
is stream[w·L : w·L + L + 1] (L = seq_len), giving input_ids = window[:-1] and
labels = window[1:]; there are (T - 1) // L windows. Every epoch visits all windows in a
permutation drawn from (stream seed, epoch): sample index i -> epoch i // W, position i % W.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .cache import (
    atomic_write_bytes,
    check_files,
    file_identity,
    file_lock,
    key_of,
    resolve_cache_dir,
    tmp_name,
)
from .config import DataConfig
from .source import DataSource
from .tokenizer import Tokenizer, train_tokenizer

CACHE_FORMAT = 1
SPLIT_SEED = 0x5EED5  # fixed: the train/val split never depends on a run or data seed
_PROBE = 1 << 16  # bytes hashed at the start, middle and end of the token file


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst"))


def is_parquet(path: Path) -> bool:
    return path.suffix == ".parquet"


def is_records(path: Path) -> bool:
    """A file of records (JSON lines or Parquet rows) whose `data.jsonl_field` is a document."""
    return is_jsonl(path) or is_parquet(path)


def _optional(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"reading {what} needs the {module.split('.')[0]} package: pip install "
                         "ctxscale[corpora] (or convert the files to .jsonl / .jsonl.gz)") from e


def _iter_jsonl(path: Path, field: str):
    """One document per line: the `field` string of each JSON object (blank lines skipped),
    read line by line."""
    import gzip

    if path.name.endswith(".zst"):
        opener = _optional("zstandard", f"{path.name} (zstd)").open
    else:
        opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"data.text_files entry {str(path)!r}, line {n}: not a JSON "
                                     f"object ({e}); one JSON object per line") from e
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise ValueError(f"data.text_files entry {str(path)!r}, line {n}: no string "
                                     f"field {field!r} (has {keys}); set data.jsonl_field")
                yield obj[field]
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise ValueError(f"data.text_files entry {str(path)!r} cannot be read as UTF-8 JSON "
                         f"lines: {e}") from e


def _iter_parquet(path: Path, field: str, batch_rows: int = 1024):
    """One document per row: the string column `field`, read a batch of rows at a time (null
    values are empty documents, dropped like every empty one)."""
    pq = _optional("pyarrow.parquet", f"{path.name} (Parquet)")
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"data.text_files entry {str(path)!r} is not a readable Parquet file "
                         f"({e})") from e
    if field not in schema.names:
        raise ValueError(f"data.text_files entry {str(path)!r} has no column {field!r} (has "
                         f"{schema.names}); set data.jsonl_field to the text column")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"data.text_files entry {str(path)!r}: column {field!r} holds {kind}, "
                         "not strings; set data.jsonl_field to the text column")
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[field]):
            for doc in batch.column(0).to_pylist():
                yield doc or ""
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"data.text_files entry {str(path)!r} cannot be read past a corrupt "
                         f"row group ({e})") from e


def _iter_split(path: Path, separator: str, chunk_chars: int):
    """`path.read_text().split(separator)`, read `chunk_chars` characters at a time: the piece
    after the last separator seen is carried into the next chunk, so a separator that straddles
    two chunks is still found (str.split's matches are leftmost and non-overlapping, so
    splitting from just after each match finds the same ones)."""
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines, as read_text
            carry: list[str] = []
            while chunk := f.read(chunk_chars):
                if not separator:
                    carry.append(chunk)
                    continue
                parts = ("".join(carry) + chunk).split(separator)
                carry = [parts.pop()]
                yield from parts
            yield "".join(carry)
    except UnicodeDecodeError as e:
        raise ValueError(f"data.text_files entry {str(path)!r} is not valid UTF-8 text: {e}") from e


def iter_documents(path: Path, separator: str, field: str = "text", *,
                   chunk_chars: int = 1 << 22):
    """The documents of one file, streamed (memory bounded by the largest document, not the
    file): `.jsonl` / `.jsonl.gz` / `.jsonl.zst` one per line (`field` of each object),
    `.parquet` one per row (column `field`, a row group at a time), any other file split by
    `separator`. Empty documents are dropped."""
    if is_parquet(path):
        docs = _iter_parquet(path, field)
    elif is_jsonl(path):
        docs = _iter_jsonl(path, field)
    else:
        docs = _iter_split(path, separator, chunk_chars)
    return (d for d in docs if d.strip())


def read_documents(path: Path, separator: str, field: str = "text") -> list[str]:
    """All documents of one file (`iter_documents`) as a list."""
    return list(iter_documents(path, separator, field))


def _reader_key(files: list[Path], separator: str, field: str) -> dict:
    """What the caches key on for how files become documents (the field only with record files,
    JSON lines or Parquet, so the keys of plain-text corpora stay what they were)."""
    return {"separator": separator, **({"jsonl_field": field} if any(map(is_records, files))
                                       else {})}


def val_doc_ids(num_docs: int, val_fraction: float) -> np.ndarray:
    """Sorted ids of the validation documents (see module docstring)."""
    if val_fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    num_val = max(1, int(round(val_fraction * num_docs)))
    if num_val >= num_docs:
        raise ValueError(
            f"data.val_fraction={val_fraction} leaves no training documents out of {num_docs}; "
            "lower val_fraction or add documents (more files; for text, a data.doc_separator "
            "that splits the files into documents; for token files, their eos_id)"
        )
    perm = np.random.default_rng(SPLIT_SEED).permutation(num_docs)
    return np.sort(perm[:num_val])


def iter_corpus(files: list[Path], separator: str, field: str):
    """Every document of `files`, in file order (their global numbering), streamed."""
    for f in files:
        yield from iter_documents(f, separator, field)


# ------------------------------------------------------------------------------ tokenizer


def load_or_train_tokenizer(cfg: DataConfig, files: list[Path], cache_dir: Path) -> Tokenizer:
    if cfg.tokenizer is not None:
        from .hf_tokenizer import load_tokenizer

        return load_tokenizer(cfg.tokenizer, eos_id=cfg.eos_id)
    key = key_of(
        {
            "format": CACHE_FORMAT,
            "inputs": [file_identity(f) for f in files],
            **_reader_key(files, cfg.doc_separator, cfg.jsonl_field),
            "val_fraction": cfg.val_fraction,
            "vocab_size": cfg.tokenizer_vocab_size,
            "type": cfg.tokenizer_type,
        }
    )
    folder = cache_dir / "tokenizers"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"spm-{cfg.tokenizer_type}{cfg.tokenizer_vocab_size}-{key}.model"
    with file_lock(folder / f"{path.name}.lock"):
        if path.exists():
            try:
                return Tokenizer(path)
            except ValueError as e:
                warnings.warn(f"rebuilding corrupt cached tokenizer {path}: {e}", stacklevel=2)
        # two streamed passes (count, then train) instead of holding the corpus in memory
        num_docs = sum(1 for _ in iter_corpus(files, cfg.doc_separator, cfg.jsonl_field))
        val = set(val_doc_ids(num_docs, cfg.val_fraction).tolist())
        train_docs = (d for i, d in enumerate(iter_corpus(files, cfg.doc_separator,
                                                          cfg.jsonl_field)) if i not in val)
        return train_tokenizer(
            train_docs, path, vocab_size=cfg.tokenizer_vocab_size, model_type=cfg.tokenizer_type
        )


# ------------------------------------------------------------------------------ token cache


class CorruptCacheError(Exception):
    """A cache entry exists but does not match its metadata."""


def _probe_sha(path: Path, size: int) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for start in sorted({0, max(0, size // 2 - _PROBE // 2), max(0, size - _PROBE)}):
            f.seek(start)
            h.update(f.read(_PROBE))
    return h.hexdigest()


def _sha_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def npy_bytes(arr: np.ndarray) -> bytes:
    """`arr` as the bytes of a .npy file (written and checksummed from memory, not read back)."""
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npy_from_bytes(raw: bytes) -> np.ndarray:
    """The array of .npy bytes already read (for their checksum): no second read of the file."""
    return np.load(io.BytesIO(raw), allow_pickle=False)


class TokenCorpus:
    """All documents of a corpus as one memory-mapped token array plus document offsets."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, meta: dict, paths: dict) -> None:
        self.tokens = tokens  # (num_tokens,) uint16/uint32 memmap
        self.offsets = offsets  # (num_docs + 1,) int64
        self.meta = meta
        self.paths = paths

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1


def _cache_paths(cache_dir: Path, key: str) -> dict:
    folder = cache_dir / "tokens"
    return {
        "bin": folder / f"{key}.bin",
        "offsets": folder / f"{key}.offsets.npy",
        "meta": folder / f"{key}.json",
        "lock": folder / f"{key}.lock",
    }


def _load_corpus(paths: dict) -> TokenCorpus:
    try:
        meta = json.loads(paths["meta"].read_text())
        dtype = np.dtype(meta["dtype"])
        num_tokens, num_docs = int(meta["num_tokens"]), int(meta["num_docs"])
        if meta.get("format") != CACHE_FORMAT:
            raise CorruptCacheError(f"format {meta.get('format')} != {CACHE_FORMAT}")
        size = paths["bin"].stat().st_size
        if size != num_tokens * dtype.itemsize:
            raise CorruptCacheError(
                f"token file has {size} bytes, expected {num_tokens * dtype.itemsize}"
            )
        raw_offsets = paths["offsets"].read_bytes()
        if _sha_bytes(raw_offsets) != meta["offsets_sha256"]:
            raise CorruptCacheError("offsets checksum mismatch")
        offsets = npy_from_bytes(raw_offsets)
        if offsets.shape != (num_docs + 1,) or offsets[0] != 0 or offsets[-1] != num_tokens:
            raise CorruptCacheError("offsets do not match the token count")
        if _probe_sha(paths["bin"], size) != meta["bin_probe_sha256"]:
            raise CorruptCacheError("token file checksum mismatch")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCacheError(f"{type(e).__name__}: {e}") from e
    tokens = np.memmap(paths["bin"], dtype=dtype, mode="r", shape=(num_tokens,))
    return TokenCorpus(tokens, offsets, meta, paths)


def document_eos(tokenizer) -> int:
    """The id that ends every document: the tokenizer's EOS (or data.eos_id), checked."""
    eos = tokenizer.eos_id
    if eos < 0:
        raise ValueError(
            f"tokenizer {tokenizer.path} has no EOS piece, which separates documents; set "
            "data.eos_id to the id that should end each document, or let ctxscale train a "
            "tokenizer (data.tokenizer: null)"
        )
    if eos >= tokenizer.vocab_size:
        raise ValueError(f"data.eos_id={eos} is outside the tokenizer's {tokenizer.vocab_size} "
                         f"ids ({tokenizer.path}); set it to one of its ids")
    return eos


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _batches(docs, max_docs: int, max_chars: int):
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def write_tokens(docs, tokenizer, f, *, max_docs: int = 1024, max_chars: int = 1 << 22,
                 progress=None) -> np.ndarray:
    """Encode the documents `docs` (an iterable of strings) in batches and write each, followed
    by its EOS, to the open binary file `f` as `token_dtype(vocab)` ids. Returns the document
    offsets (int64, num_docs + 1, from 0). `progress(docs, tokens)` is called after each
    batch. Memory: one batch, plus 8 bytes per document for the offsets."""
    from array import array

    eos, dtype = document_eos(tokenizer), token_dtype(tokenizer.vocab_size)
    offsets = array("q", [0])
    for batch in _batches(docs, max_docs, max_chars):
        flat: list[int] = []
        base = offsets[-1]
        for ids in tokenizer.encode_batch(batch):
            flat.extend(ids)
            flat.append(eos)
            offsets.append(base + len(flat))
        np.asarray(flat, dtype=dtype).tofile(f)
        if progress is not None:
            progress(len(offsets) - 1, offsets[-1])
    return np.frombuffer(offsets, dtype=np.int64)


def _build_corpus(
    files: list[Path], tokenizer: Tokenizer, separator: str, paths: dict, inputs: list,
    field: str = "text",
) -> None:
    eos, dtype = document_eos(tokenizer), token_dtype(tokenizer.vocab_size)
    tmp_bin = tmp_name(paths["bin"])
    with open(tmp_bin, "wb") as f:
        offsets = write_tokens(iter_corpus(files, separator, field), tokenizer, f)
        f.flush()
        os.fsync(f.fileno())
    num_tokens = int(offsets[-1])
    raw_offsets = npy_bytes(offsets)
    tmp_name(paths["offsets"]).write_bytes(raw_offsets)
    meta = {
        "format": CACHE_FORMAT,
        "dtype": dtype.name,
        "num_tokens": num_tokens,
        "num_docs": len(offsets) - 1,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": eos,
        "tokenizer": str(tokenizer.path),
        "tokenizer_sha256": tokenizer.sha256,
        "separator": separator,
        "inputs": inputs,
        "offsets_sha256": _sha_bytes(raw_offsets),
        "bin_probe_sha256": _probe_sha(tmp_bin, num_tokens * dtype.itemsize),
    }
    os.replace(tmp_bin, paths["bin"])
    os.replace(tmp_name(paths["offsets"]), paths["offsets"])
    atomic_write_bytes(paths["meta"], json.dumps(meta, indent=1).encode())  # last: marks complete


def load_or_build_tokens(
    files: list[Path], tokenizer: Tokenizer, separator: str, cache_dir: Path,
    field: str = "text",
) -> TokenCorpus:
    """Tokenize `files` once; later calls with unchanged files and tokenizer reuse the cache."""
    inputs = [file_identity(f) for f in files]
    key = key_of(
        {
            "format": CACHE_FORMAT,
            "inputs": inputs,
            "tokenizer_sha256": tokenizer.sha256,
            **_reader_key(files, separator, field),
            "eos_id": tokenizer.eos_id,
        }
    )
    paths = _cache_paths(cache_dir, key)
    paths["bin"].parent.mkdir(parents=True, exist_ok=True)
    with file_lock(paths["lock"]):
        if paths["meta"].exists():
            try:
                return _load_corpus(paths)
            except CorruptCacheError as e:
                warnings.warn(
                    f"token cache {paths['meta']} is invalid ({e}); rebuilding it", stacklevel=2
                )
                paths["meta"].unlink(missing_ok=True)
        _build_corpus(files, tokenizer, separator, paths, inputs, field)
        return _load_corpus(paths)


# ------------------------------------------------------------------------------ packing


class PackedStream:
    """Documents `doc_ids` of a corpus concatenated (each with its EOS), cut into windows of
    seq_len + 1 tokens that overlap by one token."""

    def __init__(self, corpus: TokenCorpus, doc_ids: np.ndarray, seq_len: int) -> None:
        self.tokens = corpus.tokens
        self.seq_len = seq_len
        self.starts = corpus.offsets[doc_ids]
        self.lens = corpus.offsets[doc_ids + 1] - self.starts
        self.cum = np.concatenate([[0], np.cumsum(self.lens)]).astype(np.int64)
        self.num_tokens = int(self.cum[-1])
        self.num_windows = max(0, (self.num_tokens - 1) // seq_len)

    def window(self, w: int) -> np.ndarray:
        """stream[w·L : w·L + L + 1] as int64, (seq_len + 1,)."""
        assert 0 <= w < self.num_windows
        pos, stop = w * self.seq_len, w * self.seq_len + self.seq_len + 1
        i = int(np.searchsorted(self.cum, pos, side="right")) - 1
        pieces = []
        while pos < stop:
            off = pos - int(self.cum[i])
            take = min(stop - pos, int(self.lens[i]) - off)
            begin = int(self.starts[i]) + off
            pieces.append(self.tokens[begin : begin + take])
            pos += take
            i += 1
        return np.concatenate(pieces).astype(np.int64)


def document_layout(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents of packed windows `(batch, seq)`: each EOS ends its document, so the token after
    it starts the next. Returns (document_ids int32, 0 for the window's first document and +1 at
    each start; position_ids int64, counting from 0 at each document start; a window that begins
    inside a document counts from its first token, as Megatron-LM's reset_position_ids)."""
    b, n = input_ids.shape
    starts = torch.zeros(b, n, dtype=torch.bool, device=input_ids.device)
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    document_ids = starts.cumsum(1, dtype=torch.int32)
    index = torch.arange(n, device=input_ids.device).expand(b, n)
    start_of = torch.where(starts, index, 0).cummax(1).values
    return document_ids, index - start_of


class TextSource(DataSource):
    """Packed, epoch-shuffled windows of a tokenized text corpus (see module docstring)."""

    kind = "text"

    def __init__(self, cfg: DataConfig, *, cache_dir: str | None = None, **kwargs) -> None:
        super().__init__(data_seed=cfg.seed, **kwargs)
        self.cfg = cfg
        self.seq_len = cfg.seq_len
        files = check_files(cfg.text_files, "data.text_files")
        root = resolve_cache_dir(cache_dir, cfg.cache_dir)
        self.tokenizer = load_or_train_tokenizer(cfg, files, root)
        self.vocab_size = self.tokenizer.vocab_size
        self._pack(load_or_build_tokens(files, self.tokenizer, cfg.doc_separator, root,
                                        cfg.jsonl_field))

    def _pack(self, corpus: TokenCorpus) -> None:
        """Split the corpus' documents into train / val and pack each split into windows."""
        self.corpus = corpus
        self.streams = self._split(corpus)
        self._perms: dict[tuple, np.ndarray] = {}

    def _split(self, corpus: TokenCorpus, what: str = "") -> dict[str, PackedStream]:
        """{"train", "val"}: the corpus' documents split and each split packed into windows."""
        val = val_doc_ids(corpus.num_docs, self.cfg.val_fraction)
        train = np.setdiff1d(np.arange(corpus.num_docs), val)
        streams = {
            "train": PackedStream(corpus, train, self.seq_len),
            "val": PackedStream(corpus, val, self.seq_len),
        }
        for name, stream in streams.items():
            if stream.num_windows == 0 and (name == "train" or len(val)):
                raise ValueError(
                    f"the {name} split{what} has {stream.num_tokens} tokens, fewer than one "
                    f"sequence of data.seq_len+1={self.seq_len + 1}; lower seq_len, add data, or "
                    "change data.val_fraction"
                )
        return streams

    @property
    def has_validation(self) -> bool:
        return self.cfg.val_fraction > 0  # then every split has windows (checked in _split)

    def _batch_at(self, stream: str, step_start: int) -> dict:
        batch = super()._batch_at(stream, step_start)
        if self.cfg.document_mask:
            docs, pos = document_layout(batch["input_ids"], self.corpus.meta["eos_id"])
            batch["document_ids"] = docs
            if self.cfg.document_positions:
                batch["position_ids"] = pos
        return batch

    def _perm(self, stream: str, epoch: int, packed: PackedStream | None = None,
              part: tuple = ()) -> np.ndarray:
        """The epoch's window order of `packed` (default: the stream's); `part` keeps the
        orders of several packed streams of one split apart (their seeds too)."""
        key = (stream, *part, epoch)
        if key not in self._perms:
            if len(self._perms) >= 8:
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.default_rng(self._stream_seed(stream) + [*part, epoch])
            packed = self.streams[stream] if packed is None else packed
            self._perms[key] = rng.permutation(packed.num_windows)
        return self._perms[key]

    def _sample(self, stream: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._window_of(stream, self.streams[stream], int(index))

    def _window_of(self, stream: str, packed: PackedStream, index: int, part: tuple = ()):
        """(input_ids, labels) of sample `index` of `packed`: epoch index // windows, in the
        epoch's permutation."""
        if packed.num_windows == 0:
            raise ValueError("no validation data: data.val_fraction is 0; set it > 0 to evaluate")
        epoch, pos = divmod(index, packed.num_windows)
        seq = packed.window(int(self._perm(stream, epoch, packed, part)[pos]))
        return seq[:-1], seq[1:]
