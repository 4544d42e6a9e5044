"""Data configuration: which task or corpus feeds the model, and how it is cut into sequences.

One flat dataclass so that the generic YAML loader (which checks types from the annotations) can
fill it from the `data:` section of a job config. Only the fields of the chosen `kind` matter;
the others keep their defaults and are ignored.

Seeds: the training sample stream is a function of (`DataConfig.seed`, the run seed passed to
`build_data`), so two runs with different run seeds see different orders of the same task. The
validation set depends on `DataConfig.seed` only, so runs that differ in their run seed are still
evaluated on exactly the same samples.
"""

from dataclasses import dataclass, field
from typing import Literal

KINDS = ("mqar", "passkey", "text", "tokens")
TOKEN_DTYPES = ("uint16", "uint32", "int32")
TOKENIZER_TYPES = ("bpe", "unigram")
# Token ids of the token-space passkey task (see synthetic.py); filler ids follow them.
PASSKEY_NUM_SPECIAL = 13  # 10 digits + KEY_OPEN, KEY_CLOSE, QUERY


@dataclass
class DataConfig:
    # Which data: "mqar" (multi-query associative recall, Zoology), "passkey" (token-space
    # passkey retrieval), "text" (sentencepiece-tokenized text files, packed) or "tokens"
    # (files of token ids tokenized ahead of time, packed; tokens.py).
    kind: Literal["mqar", "passkey", "text", "tokens"] = "mqar"
    # Tokens per training sequence (length of input_ids and labels). Any value >= 2 for text;
    # the synthetic tasks need room for their structure (see validate()).
    seq_len: int = 256
    # Data seed: fixes the validation set and, mixed with the run seed, the training stream.
    seed: int = 0

    # --- mqar (Arora et al. 2023, "Zoology") ---
    # Total vocabulary: keys are drawn from [1, vocab_size // 2), values from
    # [vocab_size // 2, vocab_size). The model must use this vocabulary size.
    vocab_size: int = 8192
    # Key-value pairs written at the start of each sequence; each key is queried once later.
    # Needs 4 * num_kv_pairs <= seq_len.
    num_kv_pairs: int = 8
    # Power-law exponent of the query gap distribution p(g) ~ g^(a-1); 1.0 = uniform gaps.
    mqar_power_a: float = 0.01
    # Replace the unused (zero) positions by uniformly random tokens, as Zoology does by default.
    mqar_random_non_queries: bool = True

    # --- passkey (token space) ---
    # Vocabulary of the token-space passkey task: 10 digits + 3 markers + filler tokens, so at
    # least 14. The model must use this vocabulary size when kind == "passkey".
    passkey_vocab_size: int = 32
    # Number of digits of the hidden key (also the number of labelled answer tokens).
    passkey_digits: int = 5
    # Depth of the hidden key as a fraction of the filler (0 = start, 1 = just before the
    # question), drawn uniformly in [passkey_depth_min, passkey_depth_max] per sample. Set both
    # to the same value for a fixed depth.
    passkey_depth_min: float = 0.0
    passkey_depth_max: float = 1.0

    # --- text ---
    # UTF-8 text files forming the corpus: plain text (split into documents by doc_separator),
    # JSON lines, `.jsonl` / `.jsonl.gz` / `.jsonl.zst` (one document per line, its jsonl_field
    # string), or Parquet, `.parquet` (one document per row, its jsonl_field column; FineWeb,
    # a Hugging Face dataset's files). zstd and Parquet need `pip install ctxscale[corpora]`.
    text_files: list[str] = field(default_factory=list)
    # The field of each JSON-lines object (the column of each Parquet row) holding the text.
    jsonl_field: str = "text"
    # An existing tokenizer: a sentencepiece .model file, or a Hugging Face tokenizer.json or
    # model folder holding one (a pretrained model's own, to convert or fine-tune it; needs
    # the [hf] extra). None trains a sentencepiece model on the training documents
    # (deterministically) and caches it under cache_dir.
    tokenizer: str | None = None
    # Vocabulary size of the tokenizer trained when `tokenizer` is None (>= 300: byte fallback
    # takes 256 ids, plus specials and the corpus' characters).
    tokenizer_vocab_size: int = 1024
    # Sentencepiece model type of the trained tokenizer: "bpe" or "unigram".
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    # String separating documents inside a file ("" = each file is one document). An EOS token
    # is placed after every document in the packed token stream.
    doc_separator: str = "\n\n"
    # Fraction of documents held out for validation (chosen by a fixed permutation that does not
    # depend on any seed); at least one document is held out when > 0.
    val_fraction: float = 0.05
    # Folder for the trained tokenizer and the memory-mapped token cache. None means
    # $CTXSCALE_CACHE_DIR or ~/.cache/ctxscale/data. build_data(cache_dir=...) overrides it.
    cache_dir: str | None = None
    # --- tokens (pre-tokenized; also uses val_fraction, cache_dir, document_mask) ---
    # Flat token-id files: .npy (a 1-D integer array) or raw binary in token_dtype (nanoGPT's
    # train.bin: uint16). Documents are numbered in file order and never span files.
    token_files: list[str] = field(default_factory=list)
    # One weight per file (> 0, any scale): each file is then its own corpus (own documents,
    # validation split and epochs) and samples are drawn from them in these proportions, as
    # Megatron-LM's weighted --data-path. Empty: the files are one corpus.
    token_weights: list[float] = field(default_factory=list)
    # dtype of the raw (non-.npy) files: "uint16" (vocabularies up to 65536), "uint32", "int32".
    token_dtype: Literal["uint16", "uint32", "int32"] = "uint16"
    # The id that ends every document (GPT-2 / nanoGPT: 50256, Llama 2: 2). Required for
    # tokens; for text with a given tokenizer, -1 takes the tokenizer's own EOS.
    eos_id: int = -1
    # Vocabulary of the tokenizer that wrote the files (the model's when model.vocab_size is
    # 0; a larger, padded model vocabulary is fine); every id must be below it. Required.
    token_vocab_size: int = 0

    # Packed documents (text, tokens): keep attention inside each document of a packed window
    # (the token after an EOS starts the next one; Megatron-LM's reset_attention_mask,
    # torchtitan's block-causal mask), and with `document_positions` restart the RoPE positions
    # at 0 in each document (reset_position_ids); recurrent layers (Mamba, linear attention)
    # restart their state at each document, and so does the Titans memory. Batches then carry
    # "document_ids" and "position_ids".
    document_mask: bool = False
    document_positions: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the field and the allowed values for an impossible config."""
        if self.kind not in KINDS:
            raise ValueError(f"data.kind={self.kind!r} is not supported; choose one of {KINDS}")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be >= 2")
        if self.document_mask and self.kind not in ("text", "tokens"):
            raise ValueError(
                f"data.document_mask=true needs data.kind=text or tokens (packed documents); the "
                f"{self.kind} task has one sample per sequence: set data.document_mask=false"
            )
        if self.kind in ("text", "tokens") and not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.kind == "mqar":
            self._validate_mqar()
        elif self.kind == "passkey":
            self._validate_passkey()
        elif self.kind == "tokens":
            self._validate_tokens()
        else:
            self._validate_text()

    def _validate_mqar(self) -> None:
        if self.vocab_size < 4:
            raise ValueError(f"data.vocab_size={self.vocab_size} must be >= 4 for mqar")
        if self.num_kv_pairs < 1:
            raise ValueError(f"data.num_kv_pairs={self.num_kv_pairs} must be >= 1")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(
                f"data.num_kv_pairs={self.num_kv_pairs} needs data.seq_len >= "
                f"{4 * self.num_kv_pairs} (4 tokens per pair: key, value, query, answer); got "
                f"seq_len={self.seq_len}. Lower num_kv_pairs or raise seq_len."
            )
        num_keys = self.vocab_size // 2 - 1
        num_values = self.vocab_size - self.vocab_size // 2
        if self.num_kv_pairs > min(num_keys, num_values):
            raise ValueError(
                f"data.num_kv_pairs={self.num_kv_pairs} exceeds the {num_keys} distinct keys of "
                f"data.vocab_size={self.vocab_size}; raise vocab_size to at least "
                f"{2 * self.num_kv_pairs + 2}"
            )
        if not self.mqar_power_a > 0:
            raise ValueError(f"data.mqar_power_a={self.mqar_power_a} must be > 0 (1.0 = uniform)")

    def _validate_passkey(self) -> None:
        if self.passkey_vocab_size < PASSKEY_NUM_SPECIAL + 1:
            raise ValueError(
                f"data.passkey_vocab_size={self.passkey_vocab_size} must be >= "
                f"{PASSKEY_NUM_SPECIAL + 1} (10 digits, 3 markers, at least one filler token)"
            )
        if self.passkey_digits < 1:
            raise ValueError(f"data.passkey_digits={self.passkey_digits} must be >= 1")
        need = 2 * self.passkey_digits + 2
        if self.seq_len < need:
            raise ValueError(
                f"data.seq_len={self.seq_len} is too short for passkey_digits="
                f"{self.passkey_digits}: need seq_len >= {need}"
            )
        for name in ("passkey_depth_min", "passkey_depth_max"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.{name}={value} must be in [0, 1]")
        if self.passkey_depth_min > self.passkey_depth_max:
            raise ValueError(
                f"data.passkey_depth_min={self.passkey_depth_min} must be <= "
                f"data.passkey_depth_max={self.passkey_depth_max}"
            )

    def _validate_tokens(self) -> None:
        if not self.token_files:
            raise ValueError("data.token_files is empty; list at least one token-id file "
                             "(.npy or raw token_dtype) for kind=tokens")
        if self.token_weights and len(self.token_weights) != len(self.token_files):
            raise ValueError(f"data.token_weights has {len(self.token_weights)} entries for "
                             f"{len(self.token_files)} data.token_files; give one weight per "
                             "file, or none (the files form one corpus)")
        if any(not w > 0 for w in self.token_weights):
            raise ValueError(f"data.token_weights={self.token_weights} must all be > 0 (drop a "
                             "file to leave it out)")
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"data.token_dtype={self.token_dtype!r} is not supported; choose "
                             f"one of {TOKEN_DTYPES}")
        if self.token_vocab_size < 2:
            raise ValueError(f"data.token_vocab_size={self.token_vocab_size}: set it to the "
                             "vocabulary of the tokenizer that wrote data.token_files")
        if not 0 <= self.eos_id < self.token_vocab_size:
            raise ValueError(f"data.eos_id={self.eos_id} must be the id that ends each "
                             f"document, in [0, token_vocab_size={self.token_vocab_size})")
        raw = [f for f in self.token_files if not str(f).endswith(".npy")]
        if raw and self.token_dtype == "uint16" and self.token_vocab_size > 1 << 16:
            raise ValueError(f"data.token_vocab_size={self.token_vocab_size} does not fit "
                             f"data.token_dtype=uint16 (raw file {raw[0]!r}); set token_dtype "
                             "to the dtype the files were written with (uint32 or int32)")

    def _validate_text(self) -> None:
        if not self.text_files:
            raise ValueError(
                "data.text_files is empty; list at least one UTF-8 text file for kind=text"
            )
        if self.tokenizer is None and self.eos_id != -1:
            raise ValueError(f"data.eos_id={self.eos_id} applies to a given data.tokenizer; the "
                             "tokenizer ctxscale trains has its own EOS (id 2): set eos_id: -1")
        if self.eos_id < -1:
            raise ValueError(f"data.eos_id={self.eos_id} must be an id >= 0, or -1 for the "
                             "tokenizer's own EOS")
        if self.tokenizer is None and not 300 <= self.tokenizer_vocab_size <= 1_000_000:
            raise ValueError(
                f"data.tokenizer_vocab_size={self.tokenizer_vocab_size} must be in [300, 1000000] "
                "(byte fallback alone takes 256 ids)"
            )
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(
                f"data.tokenizer_type={self.tokenizer_type!r} is not supported; choose one of "
                f"{TOKENIZER_TYPES}"
            )
