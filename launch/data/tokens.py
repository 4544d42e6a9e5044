"""Pre-tokenized corpora (`data.kind: tokens`): flat token-id files -> packed sequences.

For corpora tokenized ahead of time (nanoGPT's `prepare.py`, a Megatron-style preprocessing
job, a Hugging Face `datasets.map` written out with numpy): no tokenizer runs here.

Files: `data.token_files`, each one flat array of token ids, either `.npy` (a 1-D integer
array; dtype from its header) or raw binary (any other suffix; `data.token_dtype`, default
uint16). Every document ends with `data.eos_id`; a file's trailing tokens after its last EOS
form one more document (documents never span files). Every id must be below
`data.token_vocab_size`, the vocabulary the model gets when `model.vocab_size` is 0.
`data.token_weights` (one per file) makes each file its own corpus, sampled in proportion
(Megatron-LM's weighted `--data-path`; `TokenFileSource`).

Index: one pass over the files, in chunks, finds the document offsets and the largest id
(checked against the vocabulary). It is cached as `tokens/<key>.index.npy` + `<key>.index.json`
under the cache folder (`data.cache_dir`), <key> hashing the files' (path, size, mtime), the
dtype and the EOS id; the metadata, written last, carries the offsets' checksum, and an entry
that does not match is rebuilt. The token files themselves are only read (memory-mapped).

Split and packing are the text corpora's (`text.py`): a fixed permutation of the documents puts
max(1, round(val_fraction · docs)) of them into "val"; each split's documents, each with its
EOS, are one stream cut into windows of seq_len + 1 tokens, visited in a per-epoch permutation.
The text pipeline's own token cache is such a file, so the two kinds give the same batches.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .cache import (
    atomic_write_bytes,
    check_files,
    file_identity,
    file_lock,
    key_of,
    resolve_cache_dir,
)
from .config import DataConfig
from .source import DataSource
from .text import TextSource, TokenCorpus, _sha_bytes, npy_bytes, npy_from_bytes

INDEX_FORMAT = 1
_CHUNK = 1 << 24  # tokens per pass of the index scan


def open_token_file(path: Path, dtype: str) -> np.ndarray:
    """The file's token ids, memory-mapped read-only, 1-D."""
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"data.token_files entry {str(path)!r} is not a readable .npy "
                             f"array ({e}); write it with numpy.save or use a raw .bin") from e
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"data.token_files entry {str(path)!r} holds a {arr.dtype} array "
                             f"of shape {arr.shape}; it must be 1-D integer token ids")
        return arr
    item = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % item:
        raise ValueError(
            f"data.token_files entry {str(path)!r} has {size} bytes, not a multiple of "
            f"{item} ({dtype}): it is truncated, or its ids are not {dtype} (set "
            "data.token_dtype to the dtype it was written with)")
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(size // item,))


class _ConcatenatedTokens:
    """Several token arrays read as one: `[a:b]` of a range inside one array (a document)."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.bases = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.bases[-1])

    def __getitem__(self, s: slice) -> np.ndarray:
        f = int(np.searchsorted(self.bases, s.start, side="right")) - 1
        base = int(self.bases[f])
        assert s.stop <= int(self.bases[f + 1]), "a document spans two token files"
        return self.arrays[f][s.start - base : s.stop - base]


def _scan(arrays, files, eos_id: int, vocab_size: int) -> tuple[np.ndarray, int]:
    """(document offsets over the concatenated files, the largest id); module docstring."""
    offsets, base, max_id = [np.zeros(1, dtype=np.int64)], 0, 0
    for arr, path in zip(arrays, files):
        for start in range(0, len(arr), _CHUNK):
            chunk = np.asarray(arr[start : start + _CHUNK])
            top, low = int(chunk.max()), int(chunk.min())
            max_id = max(max_id, top)
            if top >= vocab_size or low < 0:
                bad = top if top >= vocab_size else low
                raise ValueError(
                    f"data.token_files entry {str(path)!r} holds the id {bad} near token "
                    f"{start + int(np.argmax(chunk == bad))}, outside data.token_vocab_size="
                    f"{vocab_size}; set token_vocab_size to the tokenizer's vocabulary, or "
                    "data.token_dtype to the dtype the file was written with")
            offsets.append(np.flatnonzero(chunk == eos_id).astype(np.int64) + base + start + 1)
        if len(arr) and (offsets[-1].size == 0 or offsets[-1][-1] != base + len(arr)):
            offsets.append(np.array([base + len(arr)], dtype=np.int64))  # the file's tail
        base += len(arr)
    return np.concatenate(offsets), max_id


def load_or_build_index(files, arrays, cfg: DataConfig, cache_dir: Path) -> np.ndarray:
    """The document offsets of `files`, from the cache when the files are unchanged."""
    dtypes = [str(a.dtype) for a in arrays]
    key = key_of({"format": INDEX_FORMAT, "inputs": [file_identity(f) for f in files],
                  "dtypes": dtypes, "eos_id": cfg.eos_id})
    folder = cache_dir / "tokens"
    folder.mkdir(parents=True, exist_ok=True)
    npy, meta_path = folder / f"{key}.index.npy", folder / f"{key}.index.json"
    with file_lock(folder / f"{key}.index.lock"):
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
                raw = npy.read_bytes()
                if _sha_bytes(raw) != meta["offsets_sha256"]:
                    raise ValueError("offsets checksum mismatch")
                if meta["max_id"] >= cfg.token_vocab_size:
                    raise ValueError(f"the files hold the id {meta['max_id']}")  # rescan: names it
                return npy_from_bytes(raw)
            except (OSError, ValueError, KeyError, TypeError) as e:
                warnings.warn(f"token index {meta_path} is invalid or does not fit ({e}); "
                              "rebuilding it", stacklevel=2)
                meta_path.unlink(missing_ok=True)
        offsets, max_id = _scan(arrays, files, cfg.eos_id, cfg.token_vocab_size)
        raw = npy_bytes(offsets)
        atomic_write_bytes(npy, raw)  # meta.json, written last, marks the entry complete
        atomic_write_bytes(meta_path, json.dumps({
            "format": INDEX_FORMAT, "num_tokens": int(offsets[-1]), "max_id": max_id,
            "offsets_sha256": _sha_bytes(raw)}).encode())
        return offsets


BLEND_BLOCK = 4096  # samples per block of the weighted blend (exact proportions per block)


def blend_counts(weights: list[float], block: int = BLEND_BLOCK) -> np.ndarray:
    """Samples of each part in a block: the largest-remainder rounding of weights·block (each
    part with a positive weight gets at least one)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * block
    counts = np.maximum(np.floor(exact).astype(np.int64), 1)
    while counts.sum() > block:  # the minimum of one took samples from the largest parts
        counts[np.argmax(counts - exact)] -= 1
    for i in np.argsort(-(exact - counts), kind="stable")[: block - counts.sum()]:
        counts[i] += 1
    return counts


class TokenFileSource(TextSource):
    """Packed, epoch-shuffled windows of pre-tokenized files (module docstring). With
    `data.token_weights` every file is its own corpus (own documents, own split, own epochs)
    and the samples blend them in proportion: each block of BLEND_BLOCK global samples holds
    exactly `blend_counts` of each file, in an order drawn from (stream seed, block), so sample
    i is a pure function of i (sharding and resume as for one corpus)."""

    kind = "tokens"

    def __init__(self, cfg: DataConfig, *, cache_dir: str | None = None, **kwargs) -> None:
        DataSource.__init__(self, data_seed=cfg.seed, **kwargs)
        self.cfg = cfg
        self.seq_len = cfg.seq_len
        self.tokenizer = None  # the ids come tokenized: no text to make passkey rows from
        self.vocab_size = cfg.token_vocab_size
        files = check_files(cfg.token_files, "data.token_files")
        arrays = [open_token_file(f, cfg.token_dtype) for f in files]
        root = resolve_cache_dir(cache_dir, cfg.cache_dir)
        meta = {"eos_id": cfg.eos_id}
        if not cfg.token_weights:
            offsets = load_or_build_index(files, arrays, cfg, root)
            tokens = _ConcatenatedTokens(arrays) if len(arrays) > 1 else arrays[0]
            self._pack(TokenCorpus(tokens, offsets, meta, {}))
            self.parts = None
            return
        corpora = [TokenCorpus(a, load_or_build_index([f], [a], cfg, root), meta, {})
                   for f, a in zip(files, arrays)]
        # no `streams`: each file has its own (`parts`); `corpus` carries the EOS id that the
        # document masks read, the same for every file
        self.corpus, self.streams, self._perms = corpora[0], None, {}
        self.parts = [self._split(c, f" of {f.name}") for c, f in zip(corpora, files)]
        self.counts = blend_counts(cfg.token_weights)
        self._blocks: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, stream: str, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(part, index within the part's block share) of each sample of block b."""
        key = (stream, b)
        if key not in self._blocks:
            if len(self._blocks) >= 4:
                self._blocks.pop(next(iter(self._blocks)))
            rng = np.random.default_rng(self._stream_seed(stream) + [1 << 32, b])
            order = np.repeat(np.arange(len(self.counts)), self.counts)[rng.permutation(
                BLEND_BLOCK)]
            rank = np.empty(BLEND_BLOCK, dtype=np.int64)  # in order of appearance, so a part's
            for part, count in enumerate(self.counts):   # samples keep its epoch order
                rank[order == part] = np.arange(count)
            self._blocks[key] = (order, rank)
        return self._blocks[key]

    def _sample(self, stream: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.parts is None:
            return super()._sample(stream, index)
        b, j = divmod(int(index), BLEND_BLOCK)
        order, rank = self._block(stream, b)
        part = int(order[j])
        local = b * int(self.counts[part]) + int(rank[j])
        return self._window_of(stream, self.parts[part][stream], local, (part,))
