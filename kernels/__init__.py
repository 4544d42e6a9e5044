"""Single-device math with a plain PyTorch reference beside each fast path.

Every op has one dispatcher that honours `CTXSCALE_KERNELS=torch|triton|auto` (see
`ctxscale.kernels.dispatch`).
"""

from ctxscale.kernels import _source_tree

_source_tree.install()  # run from a checkout: `import kernels` must not find this folder

from ctxscale.kernels.attention import (  # noqa: E402
    attention,
    attention_backward,
    attention_backward_into,
    attention_blockwise,
    attention_forward,
    attention_forward_merge,
    attention_reference,
    merge_attention,
)
from ctxscale.kernels.dispatch import chosen_paths, set_kernel_mode  # noqa: E402

__all__ = [
    "attention",
    "attention_backward",
    "attention_backward_into",
    "attention_blockwise",
    "attention_forward",
    "attention_forward_merge",
    "attention_reference",
    "merge_attention",
    "chosen_paths",
    "set_kernel_mode",
]
from ctxscale.kernels.linear_attention import (  # noqa: E402
    linear_attention,
    linear_attention_chunked,
    linear_attention_recurrent,
)

__all__ += ["linear_attention", "linear_attention_chunked", "linear_attention_recurrent"]
from ctxscale.kernels.conv1d import causal_conv1d, causal_conv1d_reference  # noqa: E402
from ctxscale.kernels.selective_scan import (  # noqa: E402
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)

__all__ += [
    "causal_conv1d",
    "causal_conv1d_reference",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
]
from ctxscale.kernels.sliding_window import (  # noqa: E402
    sliding_window_attention,
    sliding_window_attention_reference,
)

__all__ += ["sliding_window_attention", "sliding_window_attention_reference"]
