"""Whole models on the Triton paths: each family's loss and parameter gradients with every op on
its Triton kernel (`set_kernel_mode("triton")`: the interpreter on CPU, compiled kernels on a
GPU) against the same model and batch on the PyTorch paths.

The kernel tests check each kernel alone; this checks what the models hand them (layouts, GQA,
padded head dims, decays and states, the loss). Tolerances: float32 throughout and both sides
exact algorithms, so the loss agrees to ~1e-6 relative; we assert 1e-5, and 1e-4 relative to each
parameter's largest gradient entry (a backward pass chains several reductions).
"""

import pytest
import torch

from ctxscale.kernels.dispatch import chosen_paths, set_kernel_mode
from ctxscale.models import build_model
from tests.models._recurrent_util import perturb, small_config

CASES = {  # family, model options, the ops that must have run on Triton
    "transformer": ("transformer", {}, {"attention", "rms_norm", "cross_entropy"}),
    "linear-lawcat": ("linear", {"kind": "lawcat"}, {"linear_attention", "rms_norm"}),
    "mamba": ("mamba", {"num_layers": 2}, {"selective_scan", "rms_norm"}),
    "hybrid-decay": ("hybrid", {"kind": "decay", "pattern": "LMA"},
                     {"attention", "linear_attention", "selective_scan"}),
}


def _loss_and_grads(model, ids, mode):
    set_kernel_mode(mode)
    try:
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids)
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                               if p.grad is not None}, chosen_paths()
    finally:
        set_kernel_mode(None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_on_triton_paths_matches_torch_paths(case, device):
    family, options, triton_ops = CASES[case]
    torch.manual_seed(0)
    model = build_model(small_config(family, **options)).to(device)
    perturb(model)
    # 23 tokens: two chunks of the interpreter's 16-token tiles, the second ragged
    ids = torch.randint(0, model.cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(3))
    ids = ids.to(device)
    loss_ref, grads_ref, _ = _loss_and_grads(model, ids, "torch")
    loss, grads, paths = _loss_and_grads(model, ids, "triton")
    ran = {op for op, path in paths.items() if path == "triton"}
    assert triton_ops <= ran, f"expected {sorted(triton_ops)} on Triton, got {paths}"
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert grads.keys() == grads_ref.keys()
    for name, g_ref in grads_ref.items():
        err = (grads[name] - g_ref).abs().max().item()
        scale = g_ref.abs().max().item()
        assert err <= 1e-4 * max(scale, 1e-12), f"{name}: max error {err:.2e} vs scale {scale:.2e}"
