"""Model definitions. `build_model(cfg, parallel)` builds the family named in `cfg.family`."""

from __future__ import annotations

from ctxscale.models.config import ModelConfig
from ctxscale.models.hf import load_hf, save_hf


def build_model(cfg: ModelConfig, parallel=None):
    if cfg.family == "transformer":
        from ctxscale.models.transformer import Transformer

        return Transformer(cfg, parallel)
    if cfg.family == "titans":
        from ctxscale.models.titans import Titans

        return Titans(cfg, parallel)
    if cfg.family in ("mamba", "mamba2", "linear", "hybrid"):
        from ctxscale.models.hybrid import HybridLM

        return HybridLM(cfg, parallel)
    raise ValueError(f"model.family {cfg.family!r} is not a known model family")


__all__ = ["ModelConfig", "build_model"]
__all__ += ["load_hf", "save_hf"]
