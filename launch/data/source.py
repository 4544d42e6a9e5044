"""Deterministic, data-parallel-sharded, resumable batch sources.

Every source is a function `sample(stream, index) -> (input_ids (seq_len,), labels (seq_len,))`
of a GLOBAL sample index, wrapped in one sampler:

  rank r of P, local step k, row j of a batch of B  ->  global index  k·B·P + r·B + j

so the P ranks' batches at step k, concatenated in rank order, are exactly the batch of size B·P
that a single process would draw at step k; ranks never share a sample. The only state is the
global sample counter (identical on every rank), so a checkpoint resumes exactly, even with a
different dp_size as long as the global batch B·P divides the samples already consumed.

Streams: "train" is seeded by (data seed, run seed); "val" by the data seed only, so the
validation set is the same for every run seed. `eval_batches(n)` always returns the first n
(sharded) batches of the "val" stream, so it is the same fixed set on every call.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import DataConfig
from .synthetic import mqar_sample, passkey_sample

STATE_VERSION = 1
SPLITS = ("train", "val")
_STREAM_IDS = {"train": 0, "val": 1}


def _u64(x: int) -> int:
    return int(x) % (1 << 64)


class DataSource:
    """Base sampler. Subclasses set `vocab_size`, `seq_len` and implement `_sample`."""

    vocab_size: int
    seq_len: int
    kind: str

    def __init__(
        self,
        *,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        data_seed: int,
        run_seed: int,
        split: str,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}) with dp_size >= 1"
            )
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not supported; choose one of {SPLITS}")
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.data_seed = int(data_seed)
        self.run_seed = int(run_seed)
        self.split = split
        self.global_samples = 0  # samples consumed by all ranks together

    # -- seeding ----------------------------------------------------------------------------
    def _stream_seed(self, stream: str) -> list[int]:
        """SeedSequence entropy of a stream: train depends on the run seed, val does not."""
        if stream == "train":
            return [_u64(self.data_seed), _STREAM_IDS["train"], _u64(self.run_seed)]
        return [_u64(self.data_seed), _STREAM_IDS["val"]]

    def _sample(self, stream: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def has_validation(self) -> bool:
        """Whether `eval_batches` has samples to give (a corpus with val_fraction 0 has none)."""
        return True

    # -- batches ----------------------------------------------------------------------------
    def _batch_at(self, stream: str, step_start: int) -> dict:
        """Rows step_start + r·B + j, j < B, of `stream` for this rank."""
        first = step_start + self.dp_rank * self.batch_size
        rows = [self._sample(stream, first + j) for j in range(self.batch_size)]
        input_ids = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
        labels = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64))
        return {"input_ids": input_ids, "labels": labels}

    def next_batch(self) -> dict:
        """{"input_ids": (batch_size, seq_len) int64, "labels": (batch_size, seq_len) int64}."""
        batch = self._batch_at(self.split, self.global_samples)
        self.global_samples += self.batch_size * self.dp_size
        return batch

    def eval_batches(self, num_batches: int) -> list[dict]:
        """The fixed validation set: the first `num_batches` batches of the "val" stream
        (this rank's shard of them). Identical on every call; does not touch the train state."""
        step = self.batch_size * self.dp_size
        return [self._batch_at("val", i * step) for i in range(num_batches)]

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "kind": self.kind,
            "split": self.split,
            "seq_len": self.seq_len,
            "data_seed": self.data_seed,
            "run_seed": self.run_seed,
            "global_samples": self.global_samples,
            "global_batch_size": self.batch_size * self.dp_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} != {STATE_VERSION}")
        for key in ("kind", "split", "seq_len", "data_seed", "run_seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data state was saved with {key}={state[key]!r} but this source has "
                    f"{key}={getattr(self, key)!r}; resume with the same data config and seed"
                )
        consumed = int(state["global_samples"])
        global_batch = self.batch_size * self.dp_size
        if consumed % global_batch:
            raise ValueError(
                f"cannot resume: {consumed} samples consumed is not a multiple of the global batch "
                f"batch_size*dp_size={global_batch}; resume with a global batch dividing it"
            )
        self.global_samples = consumed


class SyntheticSource(DataSource):
    """MQAR or token-space passkey samples generated on the fly from (stream seed, index)."""

    def __init__(self, cfg: DataConfig, **kwargs) -> None:
        super().__init__(data_seed=cfg.seed, **kwargs)
        self.cfg = cfg
        self.kind = cfg.kind
        self.seq_len = cfg.seq_len
        self.vocab_size = cfg.vocab_size if cfg.kind == "mqar" else cfg.passkey_vocab_size
        self._entropy = {s: self._stream_seed(s) for s in SPLITS}

    def _sample(self, stream: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self._entropy[stream] + [int(index)])
        cfg = self.cfg
        if cfg.kind == "mqar":
            return mqar_sample(
                rng,
                seq_len=cfg.seq_len,
                vocab_size=cfg.vocab_size,
                num_kv_pairs=cfg.num_kv_pairs,
                power_a=cfg.mqar_power_a,
                random_non_queries=cfg.mqar_random_non_queries,
            )
        depth = float(rng.uniform(cfg.passkey_depth_min, cfg.passkey_depth_max))
        input_ids, labels, _ = passkey_sample(
            rng,
            seq_len=cfg.seq_len,
            num_digits=cfg.passkey_digits,
            depth=depth,
            vocab_size=cfg.passkey_vocab_size,
        )
        return input_ids, labels
