"""RMSNorm (Zhang & Sennrich, 2019): y = x / sqrt(mean(x²) + eps) · weight.

Numerics match Hugging Face Llama: the normalization runs in float32, the normalized x is cast
back to the input dtype, then multiplied by the weight. x: `(..., dim)`, weight: `(dim,)`.
Paths: `rms_norm_reference` (PyTorch) and the fused Triton kernel `kernels/rms_norm_triton.py`.
"""

from __future__ import annotations

import torch

from ctxscale.kernels.dispatch import forced_path, log_choice, want_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    if torch.compiler.is_compiling():  # train.compile: Inductor fuses the reference
        return rms_norm_reference(x, weight, eps)
    forced = forced_path("rms_norm")
    if forced == "triton" or (forced is None and want_triton(x.device)):
        try:
            from ctxscale.kernels import rms_norm_triton
        except ImportError:
            rms_norm_triton = None
        if rms_norm_triton is not None:
            log_choice("rms_norm", "triton")
            return rms_norm_triton.rms_norm(x, weight, eps)
        log_choice("rms_norm", "torch", "Triton RMSNorm kernel not available")
    else:
        log_choice("rms_norm", "torch")
    return rms_norm_reference(x, weight, eps)


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
