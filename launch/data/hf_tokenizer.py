"""Hugging Face tokenizers for text data: `data.tokenizer` naming a `tokenizer.json` or a model
folder that holds one (a pretrained model's own tokenizer, needed to convert or fine-tune it).

Loaded with the `tokenizers` library from the local file only (no hub access). Documents are
encoded without special tokens (no BOS), each followed by the EOS id, as with sentencepiece.
The EOS id is `data.eos_id` when set (>= 0), else the folder's `eos_token` in
`tokenizer_config.json` (a string or `{"content": ...}`), else `eos_token_id` in
`generation_config.json` / `config.json` (the first, if a list); a tokenizer without one is an
error that names `data.eos_id`. `load_tokenizer` picks this or the sentencepiece `Tokenizer`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .cache import sha256_file
from .tokenizer import Tokenizer


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from e


class HFTokenizer:
    """A `tokenizer.json` (fast tokenizer) with the interface of `Tokenizer`."""

    def __init__(self, path: str | Path, *, eos_id: int = -1) -> None:
        path = Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"data.tokenizer {str(path)!r}: no {file.name} there; point it at a Hugging Face "
                "tokenizer.json (or the model folder holding one) or a sentencepiece .model")
        try:
            from tokenizers import Tokenizer as FastTokenizer
        except ImportError as e:  # pragma: no cover - installed with the [hf] extra
            raise ImportError("a Hugging Face tokenizer needs the `tokenizers` package: "
                              'pip install "ctxscale[hf]"') from e
        try:
            self.tok = FastTokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - the Rust library raises its own exception type
            raise ValueError(f"{str(file)!r} is not a valid Hugging Face tokenizer.json: {e}") from e
        self.path = file.resolve()
        self.sha256 = sha256_file(self.path)
        self._eos = eos_id if eos_id >= 0 else self._eos_from_folder(file.parent)

    def _eos_from_folder(self, folder: Path) -> int:
        token = _json(folder / "tokenizer_config.json").get("eos_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and self.tok.token_to_id(token) is not None:
            return int(self.tok.token_to_id(token))
        for name in ("generation_config.json", "config.json"):
            ids = _json(folder / name).get("eos_token_id")
            ids = ids[0] if isinstance(ids, list) and ids else ids
            if isinstance(ids, int) and ids >= 0:
                return ids
        return -1

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | Path, *, eos_id: int = -1):
    """`HFTokenizer` for a tokenizer.json or a folder holding one, else the sentencepiece
    `Tokenizer` (a .model file, or a folder with only a tokenizer.model)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return HFTokenizer(p, eos_id=eos_id)
        if (p / "tokenizer.model").is_file():
            p = p / "tokenizer.model"
        else:
            raise FileNotFoundError(
                f"data.tokenizer {str(path)!r} is a folder without tokenizer.json or "
                "tokenizer.model; point it at a tokenizer file or a model folder holding one")
    elif p.suffix == ".json":
        return HFTokenizer(p, eos_id=eos_id)
    return Tokenizer(p, eos_id=eos_id)


def check_teacher_tokenizer(teacher: str, data, data_vocab: int | None = None,
                            teacher_vocab: int | None = None) -> None:
    """ValueError when text would reach a pretrained teacher in ids it never learned: its
    folder has a tokenizer but `data.tokenizer` is null (one would be trained), or the data's
    vocabulary is larger than the teacher's embeddings (with both sizes given)."""
    own = [n for n in ("tokenizer.json", "tokenizer.model") if (Path(teacher) / n).is_file()]
    if own and data.kind == "text" and data.tokenizer is None:
        raise ValueError(
            f"the teacher {teacher} comes with its own tokenizer ({own[0]}), but data.tokenizer "
            "is null, so a new one would be trained and the text would reach the teacher in ids "
            f"it never learned; set data.tokenizer: {teacher}")
    if data_vocab is not None and teacher_vocab is not None and data_vocab > teacher_vocab:
        raise ValueError(
            f"the data has {data_vocab} token ids but the teacher {teacher} embeds "
            f"{teacher_vocab}; use the teacher's own tokenizer (data.tokenizer: {teacher})")
