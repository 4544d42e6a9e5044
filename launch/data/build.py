"""`build_data`: a DataConfig plus this rank's place in data parallelism -> a DataSource."""

from __future__ import annotations

from .config import DataConfig
from .source import DataSource, SyntheticSource


def build_data(
    cfg: DataConfig,
    *,
    batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    split: str = "train",
    cache_dir: str | None = None,
) -> DataSource:
    """Build this rank's data source.

    batch_size: per-rank batch; dp_rank / dp_size: this rank's index among the data-parallel
    ranks (ranks that see different samples; context/tensor-parallel peers pass the same
    dp_rank); seed: the run seed (mixed with cfg.seed for the training stream only); split:
    which stream `next_batch` draws from ("train" or "val"); cache_dir: overrides cfg.cache_dir
    for text and token-file data. The returned source has `vocab_size`, `next_batch()`, `eval_batches(n)`,
    `state_dict()` and `load_state_dict(d)`.
    """
    cfg.validate()
    common = dict(
        batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size, run_seed=seed, split=split
    )
    if cfg.kind in ("mqar", "passkey"):
        return SyntheticSource(cfg, **common)
    if cfg.kind == "tokens":
        from .tokens import TokenFileSource

        return TokenFileSource(cfg, cache_dir=cache_dir, **common)
    from .text import TextSource  # sentencepiece is only needed for text data

    return TextSource(cfg, cache_dir=cache_dir, **common)
