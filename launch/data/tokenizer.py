"""Sentencepiece tokenizer: train deterministically or load an existing .model file.

Kudo & Richardson 2018, "SentencePiece: A simple and language independent subword tokenizer".
Training settings chosen for exact round trips on arbitrary text: identity normalization, no
whitespace collapsing, byte fallback (any UTF-8 byte is representable, so no <unk>), newline as
a user-defined piece (training sees lines; documents keep their line breaks), digits split one
per piece (so pass keys tokenize digit by digit). Training is single-threaded over the input
lines in file order without sampling or shuffling, so the same text gives the same model bytes.
Special ids: unk=0, bos=1, eos=2 (EOS separates documents in the packed stream), no pad.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

from .cache import atomic_write_bytes, sha256_file

# Training reads at most this many characters of input lines (in order), keeping tokenizer
# training fast on large corpora; a subword vocabulary of a few thousand pieces saturates
# long before that.
MAX_TRAIN_CHARS = 50_000_000


def _spm():
    try:
        import sentencepiece
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ImportError("text data needs sentencepiece: pip install sentencepiece") from e
    return sentencepiece


class Tokenizer:
    """A loaded sentencepiece model. ids are plain python ints."""

    def __init__(self, path: str | Path, *, eos_id: int = -1) -> None:
        """`eos_id` >= 0 replaces the model's own EOS id (data.eos_id, for a model without one)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {str(path)!r} does not exist; set data.tokenizer to an existing "
                "sentencepiece .model file, or to null to train one"
            )
        self.path = path.resolve()
        self.sp = _spm().SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{str(path)!r} is not a valid sentencepiece model: {e}") from e
        self.sha256 = sha256_file(self.path)
        self._eos = eos_id if eos_id >= 0 else int(self.sp.eos_id())

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], *, num_threads: int = -1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def _lines(docs: Iterable[str], max_chars: int):
    total = 0
    for doc in docs:
        for line in doc.split("\n"):
            if not line:
                continue
            total += len(line)
            if total > max_chars:
                return
            yield line


def train_tokenizer(
    docs: Iterable[str],
    output_path: str | Path,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    max_chars: int = MAX_TRAIN_CHARS,
) -> Tokenizer:
    """Train a sentencepiece model on `docs` (strings) and write it atomically to output_path."""
    spm = _spm()
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(docs, max_chars),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            user_defined_symbols=["\n"],
            split_digits=True,
            allow_whitespace_only_pieces=True,
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece could not train a {model_type} tokenizer with vocab_size={vocab_size}: "
            f"{e}. Byte fallback reserves 256 ids plus one per distinct character; adjust "
            "data.tokenizer_vocab_size or supply more text"
        ) from e
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output_path, buf.getvalue())
    return Tokenizer(output_path)
