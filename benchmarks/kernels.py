"""Kernel benchmark: every op's paths side by side over sequence lengths, forward and
forward+backward time, achieved throughput and peak memory, written as markdown.

    python benchmarks/kernels.py                         # CPU: small default subset, minutes
    python benchmarks/kernels.py --seq 1024 4096 16384 65536 --ops attention linear_attention
    python benchmarks/kernels.py --device cuda           # GPU default: 1K .. 64K

Paths compared (a path that cannot run here is listed once under "not run" with the reason):
- attention: ours Triton FlashAttention-2 (CUDA), PyTorch SDPA (always; the baseline),
  flash-attn `flash_attn_func` (when installed), the blockwise PyTorch FA-2 path, and the
  full-score reference (while its seq² scores fit in memory).
- ring_step: one ring / LightSeq step on a key block of the same length (non-causal): forward =
  the block merged into a running (o, lse); "fwd+bwd" = that plus the block's backward added into
  running float32 (dq, dk, dv) sums. Baseline: the block kernel (on CPU the fused CPU kernel, on
  CUDA ours Triton) then the PyTorch log-sum-exp merge and additions; against ours Triton with
  the merge and the additions inside the kernels, in place (CUDA). Both clone the running
  (o, lse) first, so each call starts from the same state (the lse of the backward is the
  previous one: same work, it only has to be finite).
- linear_attention: ours Triton chunked kernel (CUDA), the PyTorch chunked (Lightning-2) path
  (baseline), flash-linear-attention `chunk_simple_gla` (when installed), the token-by-token
  recurrence (short sequences only).
- selective_scan: ours Triton (CUDA), the PyTorch chunked path (baseline), mamba-ssm
  `selective_scan_fn` (when installed), the token-by-token reference (short sequences only).
- rms_norm, cross_entropy (fused linear + CE over tokens = batch · seq): ours Triton (CUDA) and
  the PyTorch paths (baseline: the reference / torch chunked path).

Throughput: attention counts 4·b·h·sq·sk·d forward FLOPs (halved for causal), backward 2.5x that;
linear attention 2·C·(dk+dv) + 4·dk·dv FLOPs per token and head forward (chunk C = 64), backward
2x; cross-entropy 2·N·V·D for the logits and 4·N·V·D more for the gradients. rms_norm and
selective_scan are memory bound: we report GB/s of their compulsory traffic instead. Peak memory
is `torch.cuda.max_memory_allocated` on CUDA, and on CPU the peak resident-set growth during the
call sampled every millisecond, with glibc told to mmap (and unmap on free) every allocation of
64 KiB or more (an approximation that misses peaks shorter than the sampling period). Times are medians of `--repeats` runs after a
warm-up. Ratios ("x base") are baseline time / path time in the same run. Every path's forward
output is also compared with the baseline's on the same inputs ("diff vs base"), so a fast but
wrong kernel shows in the same table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/ is sys.path[0] when run as a script

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OPS = ("attention", "document_attention", "ring_step", "linear_attention", "selective_scan",
       "rms_norm", "cross_entropy")


# ---------------------------------------------------------------- measurement
def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    model = cpu_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads; "
            f"1-min load average {load:.1f} at start (a load above the core count means other jobs "
            "share the cores and times are inflated and noisy; compare ratios within a row group)")


def _large_allocations_to_os() -> None:
    """glibc: serve every allocation >= 64 KiB by mmap and return it on free, so the resident set
    follows live tensors and its growth during a call approximates the call's peak memory."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixing it also stops dynamic raising)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class _RssPeak:
    """Peak resident-set growth (bytes) while the context is open (CPU memory approximation)."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def grown(self) -> int:
        return self.peak - self.base


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn, device, repeats: int):
    """(median seconds, peak extra bytes) of fn(). On CPU the warm-up call is the memory probe."""
    if device.type == "cuda":
        fn()  # warm-up (and Triton autotuning / compilation)
        _sync(device)
    else:
        with _RssPeak() as rss:
            fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = rss.grown
    return statistics.median(times), peak


def _fwd_bwd(fn, inputs):
    """A closure running forward + backward of fn(*inputs) with a fixed random cotangent."""

    def run():
        for t in inputs:
            t.grad = None
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out) if out.dim() else None)

    return run


def _optional(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 -- any import failure means "peer not available"
        return None


@dataclass
class Row:
    op: str
    seq: int
    path: str
    fwd_s: float | None = None
    fwd_bwd_s: float | None = None
    rate: str = "-"
    peak_bytes: int | None = None
    note: str = ""
    diff: str = "-"


@dataclass
class Case:
    """One path of one op at one length: forward and forward+backward closures."""

    path: str
    fwd: object
    fwd_bwd: object | None
    flops_fwd: float | None = None  # FLOPs of the forward pass (None: memory bound)
    flops_fwd_bwd: float | None = None
    bytes_fwd_bwd: float | None = None  # compulsory traffic, for memory-bound ops
    baseline: bool = False
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- ops
def _triton_ok(device) -> str | None:
    if device.type != "cuda":
        return "Triton kernels need CUDA (the CPU interpreter is for tests, not speed)"
    if _optional("triton") is None:
        return "triton not installed"
    return None


def _attention_inputs(seq, args, device, dtype):
    b, h, hk, d = args.batch, args.heads, args.kv_heads, args.head_dim
    return tuple(torch.randn(b, seq, n, d, device=device, dtype=dtype, requires_grad=True)
                 for n in (h, hk, hk))


def _sdpa(q, k, v, *, gqa=False, **kw):
    """PyTorch SDPA in (b, s, h, d) layout; GQA by repeating k/v unless `gqa` (enable_gqa)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    h, hk = qt.shape[1], kt.shape[1]
    if hk != h and not gqa:
        kt, vt = kt.repeat_interleave(h // hk, 1), vt.repeat_interleave(h // hk, 1)
    if gqa:
        kw["enable_gqa"] = True
    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, **kw).transpose(1, 2)


def attention_cases(seq, args, device, dtype):
    att = importlib.import_module("ctxscale.kernels.attention")

    b, h, hk, d = args.batch, args.heads, args.kv_heads, args.head_dim
    q, k, v = ins = _attention_inputs(seq, args, device, dtype)
    fl = att.attention_flops(b, seq, seq, h, d, causal=True)
    cases, skipped = [], []

    def add(path, fn, baseline=False):
        cases.append(Case(path, lambda: _nograd(fn), _fwd_bwd(fn, ins), fl, 3.5 * fl,
                          baseline=baseline))

    def sdpa(gqa):
        return _sdpa(q, k, v, gqa=gqa, is_causal=True)

    # the baseline repeats k/v for GQA (ctxscale's SDPA path does so on CUDA); SDPA's own
    # enable_gqa (ctxscale's choice on CPU) may be faster, or fall back to a slower backend:
    # both rows, read the faster against the target
    add("sdpa", lambda: sdpa(False), baseline=True)
    if hk != h:
        add("sdpa enable_gqa", lambda: sdpa(True))
    why = _triton_ok(device)
    if why is None:
        fat = importlib.import_module("ctxscale.kernels.flash_attention_triton")
        add("triton (ours)", lambda: fat.flash_attention(q, k, v, causal=True)[0])
    else:
        skipped.append(("triton (ours)", why))
    fa = _optional("flash_attn") if device.type == "cuda" else None
    if fa is not None and dtype in (torch.float16, torch.bfloat16):
        add("flash-attn", lambda: fa.flash_attn_func(q, k, v, causal=True))
    else:
        skipped.append(("flash-attn", "not installed" if fa is None else "needs fp16/bf16 on CUDA"))
    add("blockwise (PyTorch FA-2)", lambda: att.attention_blockwise(q, k, v, causal=True)[0])
    score_bytes = 3 * b * h * seq * seq * 4
    if score_bytes < args.reference_budget:
        add("reference (full scores)", lambda: att.attention_reference(q, k, v, causal=True)[0])
    else:
        skipped.append(("reference (full scores)", f"seq² scores need {score_bytes / 2**30:.1f} GiB"))
    return cases, skipped


def document_attention_cases(seq, args, device, dtype):
    """Packed documents of `--doc-len` tokens (the last one shorter): causal attention inside
    each document. Baseline: SDPA over the whole sequence WITHOUT the mask, i.e. what attention
    costs when documents are not separated ('x base' > 1: what masking saves); its outputs differ
    by design, so every row's 'diff' is against each document's own causal attention (SDPA per
    document, the exact result of document masking)."""
    att = importlib.import_module("ctxscale.kernels.attention")

    b, h, d = args.batch, args.heads, args.head_dim
    q, k, v = ins = _attention_inputs(seq, args, device, dtype)
    docs = (torch.arange(seq, device=device) // args.doc_len).expand(b, seq).contiguous()
    lens = [min(args.doc_len, seq - s) for s in range(0, seq, args.doc_len)]
    fl = sum(att.attention_flops(b, n, n, h, d, causal=True) for n in lens)
    cases, skipped = [], []
    with torch.no_grad():  # each document alone: what every masked path must return
        expected = torch.cat([att.attention(q[:, s:s + n], k[:, s:s + n], v[:, s:s + n])
                              for s, n in zip(range(0, seq, args.doc_len), lens)], 1).float()

    def add(path, fn, baseline=False, flops=fl):
        cases.append(Case(path, lambda: _nograd(fn), _fwd_bwd(fn, ins), flops, 3.5 * flops,
                          baseline=baseline, extra={"expected": expected}))

    def sdpa(mask=None):
        return _sdpa(q, k, v, **({"attn_mask": mask} if mask is not None else {"is_causal": True}))

    add("sdpa causal, no mask", sdpa, baseline=True,
        flops=att.attention_flops(b, seq, seq, h, d, causal=True))
    seg = {"q_segments": docs, "k_segments": docs}
    why = _triton_ok(device)
    if why is None:
        fat = importlib.import_module("ctxscale.kernels.flash_attention_triton")
        add("triton + documents (ours)", lambda: fat.flash_attention(q, k, v, causal=True, **seg)[0])
    else:
        skipped.append(("triton + documents (ours)", why))
    add("blockwise + documents (ours)",
        lambda: att.attention_blockwise(q, k, v, causal=True, **seg)[0])
    mask_bytes = b * seq * seq  # bool
    if 4 * mask_bytes < args.reference_budget:
        dense = (docs[:, :, None] == docs[:, None, :]) & torch.ones(
            seq, seq, dtype=torch.bool, device=device).tril()
        add("sdpa + dense document mask", lambda: sdpa(dense[:, None]))
    else:
        skipped.append(("sdpa + dense document mask", f"the seq² mask needs {mask_bytes / 2**30:.1f} GiB"))
    return cases, skipped


def ring_step_cases(seq, args, device, dtype):
    att = importlib.import_module("ctxscale.kernels.attention")

    b, h, hk, d = args.batch, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(b, seq, h, d, device=device, dtype=dtype)
    k = torch.randn(b, 2 * seq, hk, d, device=device, dtype=dtype)
    v = torch.randn(b, 2 * seq, hk, d, device=device, dtype=dtype)
    # the running result over the first key block (an earlier ring step), kept in float32
    o_prev, lse_prev = att.attention_forward(q, k[:, :seq], v[:, :seq], causal=False)
    o_prev, lse_prev = o_prev.float(), lse_prev.float()
    kb, vb = k[:, seq:], v[:, seq:]
    do = torch.randn_like(q)
    # the backward step: this block's gradients added into running float32 sums
    sums = [torch.zeros(t.shape, device=device) for t in (q, kb, vb)]
    fl = att.attention_flops(b, seq, seq, h, d, causal=False)
    cases, skipped = [], []

    def separate():
        out, lse = o_prev.clone(), lse_prev.clone()
        o_b, lse_b = att.attention_forward(q, kb, vb, causal=False)
        att.merge_attention(out, lse, o_b, lse_b)
        return out

    def separate_step():
        out = separate()
        for acc, g in zip(sums, att.attention_backward(do, q, kb, vb, out, lse_prev,
                                                        causal=False)):
            acc.add_(g)
        return out

    cases.append(Case("block kernel + PyTorch merge / add", separate, separate_step, fl, 3.5 * fl,
                      baseline=True))
    why = _triton_ok(device)
    if why is None:
        fat = importlib.import_module("ctxscale.kernels.flash_attention_triton")

        def in_kernel():
            out, lse = o_prev.clone(), lse_prev.clone()
            fat.flash_attention_forward(q, kb, vb, causal=False, o_prev=out, lse_prev=lse,
                                        inplace=True)
            return out

        def in_kernel_step():
            out = in_kernel()
            fat.flash_attention_backward(do, q, kb, vb, out, lse_prev, causal=False,
                                         accumulate_into=tuple(sums))
            return out

        cases.append(Case("triton (ours), merge / add in kernel", in_kernel, in_kernel_step, fl,
                          3.5 * fl))
    else:
        skipped.append(("triton (ours), merge / add in kernel", why))
    return cases, skipped


def linear_attention_cases(seq, args, device, dtype):
    la = importlib.import_module("ctxscale.kernels.linear_attention")

    b, h, dk, dv = args.batch, args.heads, args.head_dim, args.head_dim
    q = torch.randn(b, seq, h, dk, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, seq, h, dk, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, seq, h, dv, device=device, dtype=dtype, requires_grad=True)
    g = (-torch.rand(b, seq, h, device=device) * 0.1).requires_grad_()
    ins = (q, k, v, g)
    C = 64
    fl = b * h * seq * (2.0 * C * (dk + dv) + 4.0 * dk * dv)
    cases, skipped = [], []

    def add(path, fn, baseline=False):
        cases.append(Case(path, lambda: _nograd(fn), _fwd_bwd(fn, ins), fl, 3.0 * fl,
                          baseline=baseline))

    add("chunked (PyTorch Lightning-2)", lambda: la.linear_attention_chunked(q, k, v, log_decay=g),
        baseline=True)
    why = _triton_ok(device)
    if why is None:
        lat = importlib.import_module("ctxscale.kernels.linear_attention_triton")
        add("triton (ours)", lambda: lat.linear_attention(q, k, v, log_decay=g))
    else:
        skipped.append(("triton (ours)", why))
    fla = _optional("fla.ops.simple_gla") if device.type == "cuda" else None
    if fla is not None:
        add("fla chunk_simple_gla", lambda: fla.chunk_simple_gla(q, k, v, g, scale=dk ** -0.5)[0])
    else:
        skipped.append(("fla chunk_simple_gla", "flash-linear-attention not installed or no CUDA"))
    if seq <= args.recurrent_max_seq:
        add("recurrent (token by token)", lambda: la.linear_attention_recurrent(q, k, v, log_decay=g))
    else:
        skipped.append(("recurrent (token by token)", f"only up to seq {args.recurrent_max_seq}"))
    return cases, skipped


def selective_scan_cases(seq, args, device, dtype):
    ss = importlib.import_module("ctxscale.kernels.selective_scan")

    b, d, n = args.batch, args.ssm_dim, args.ssm_state
    u = torch.randn(b, d, seq, device=device, dtype=dtype, requires_grad=True)
    delta = (torch.rand(b, d, seq, device=device, dtype=dtype) - 0.5).requires_grad_()
    A = (-torch.rand(d, n, device=device) * 4).requires_grad_()
    B = torch.randn(b, n, seq, device=device, dtype=dtype, requires_grad=True)
    C = torch.randn(b, n, seq, device=device, dtype=dtype, requires_grad=True)
    D = torch.randn(d, device=device, requires_grad=True)
    z = torch.randn(b, d, seq, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(d, device=device, requires_grad=True)
    ins = (u, delta, A, B, C, D, z, bias)
    args_ = (u, delta, A, B, C, D, z, bias, True)
    el = torch.tensor([], dtype=dtype).element_size()
    traffic = (4 * b * d * seq + 2 * b * n * seq) * el * 3.0  # read fwd, read again + write grads
    cases, skipped = [], []

    def add(path, fn, baseline=False):
        cases.append(Case(path, lambda: _nograd(fn), _fwd_bwd(fn, ins), bytes_fwd_bwd=traffic,
                          baseline=baseline))

    add("chunked (PyTorch)", lambda: ss.selective_scan_chunked(*args_), baseline=True)
    why = _triton_ok(device)
    if why is None:
        sst = importlib.import_module("ctxscale.kernels.selective_scan_triton")
        add("triton (ours)", lambda: sst.selective_scan(*args_))
    else:
        skipped.append(("triton (ours)", why))
    mamba = _optional("mamba_ssm.ops.selective_scan_interface") if device.type == "cuda" else None
    if mamba is not None:
        add("mamba-ssm", lambda: mamba.selective_scan_fn(*args_))
    else:
        skipped.append(("mamba-ssm", "not installed or no CUDA"))
    if seq <= args.recurrent_max_seq:
        add("reference (token by token)", lambda: ss.selective_scan_reference(*args_))
    else:
        skipped.append(("reference (token by token)", f"only up to seq {args.recurrent_max_seq}"))
    return cases, skipped


def rms_norm_cases(seq, args, device, dtype):
    norm = importlib.import_module("ctxscale.kernels.norm")

    x = torch.randn(args.batch, seq, args.hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(args.hidden, device=device, requires_grad=True)
    traffic = 5.0 * x.numel() * x.element_size()  # fwd: x in, y out; bwd: x, dy in, dx out
    cases, skipped = [], []
    cases.append(Case("reference (PyTorch)", lambda: _nograd(lambda: norm.rms_norm_reference(x, w)),
                      _fwd_bwd(lambda: norm.rms_norm_reference(x, w), (x, w)),
                      bytes_fwd_bwd=traffic, baseline=True))
    why = _triton_ok(device)
    if why is None:
        rt = importlib.import_module("ctxscale.kernels.rms_norm_triton")
        cases.append(Case("triton (ours)", lambda: _nograd(lambda: rt.rms_norm(x, w, 1e-6)),
                          _fwd_bwd(lambda: rt.rms_norm(x, w, 1e-6), (x, w)), bytes_fwd_bwd=traffic))
    else:
        skipped.append(("triton (ours)", why))
    return cases, skipped


def cross_entropy_cases(seq, args, device, dtype):
    ce = importlib.import_module("ctxscale.kernels.cross_entropy")

    N, D, V = args.batch * seq, args.hidden, args.vocab
    h = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, D, device=device, dtype=dtype) * D ** -0.5).requires_grad_()
    y = torch.randint(0, V, (N,), device=device)
    fl = 2.0 * N * V * D
    cases, skipped = [], []

    def add(path, fn, baseline=False):
        cases.append(Case(path, lambda: _nograd(fn), _fwd_bwd(fn, (h, w)), fl, 3.0 * fl,
                          baseline=baseline))

    add("full logits (PyTorch)", lambda: ce.cross_entropy_reference(h, w, y), baseline=True)
    add("chunked (PyTorch)", lambda: _torch_chunked_ce(ce, h, w, y))
    why = _triton_ok(device)
    if why is None:
        cet = importlib.import_module("ctxscale.kernels.cross_entropy_triton")
        add("triton (ours)", lambda: cet.chunked_cross_entropy(h, w, y))
    else:
        skipped.append(("triton (ours)", why))
    return cases, skipped


def _torch_chunked_ce(ce, h, w, y):
    from ctxscale.kernels.dispatch import set_kernel_mode

    set_kernel_mode("torch")
    try:
        return ce.chunked_cross_entropy(h, w, y)
    finally:
        set_kernel_mode(None)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _rel_diff(out: torch.Tensor, base: torch.Tensor) -> str:
    """max |out − base| / max |base| of the forward outputs: a path that is fast but wrong shows."""
    if out.shape != base.shape:
        return f"shape {tuple(out.shape)}"
    scale = base.abs().max().clamp_min(1e-30)
    return f"{((out - base).abs().max() / scale).item():.1e}"


def _nograd(fn):
    with torch.no_grad():
        return fn()


BUILDERS = {
    "attention": attention_cases,
    "document_attention": document_attention_cases,
    "ring_step": ring_step_cases,
    "linear_attention": linear_attention_cases,
    "selective_scan": selective_scan_cases,
    "rms_norm": rms_norm_cases,
    "cross_entropy": cross_entropy_cases,
}


# ---------------------------------------------------------------- report
def _fmt_s(s):
    return "-" if s is None else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def _fmt_rate(value, unit):
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale or prefix == "M":
            return f"{value / scale:.3g} {prefix}{unit}"


def _fmt_b(b):
    return "-" if b is None else f"{max(b, 0) / 2**20:.1f} MiB"


def run(args, flush=None) -> str:
    """The markdown report. `flush(text)` (optional) receives the report so far after every row
    group, so a run cut short by a time limit still leaves its finished rows."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        _large_allocations_to_os()
    lines = [
        f"# Kernel benchmark ({device.type})",
        "",
        f"- machine: {_machine(device)}",
        f"- torch {torch.__version__}, dtype {args.dtype}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `python benchmarks/kernels.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- shapes: batch {args.batch}; attention heads {args.heads} (kv {args.kv_heads}), head_dim "
        f"{args.head_dim}, causal; linear attention heads {args.heads}, dk = dv = {args.head_dim}, "
        f"per-token decay; selective scan dim {args.ssm_dim}, dstate {args.ssm_state}, with D, z, "
        f"softplus; rms_norm hidden {args.hidden}; cross-entropy tokens = batch·seq, hidden "
        f"{args.hidden}, vocab {args.vocab}",
        f"- median of {args.repeats} runs after a warm-up; 'x base' = baseline time / path time "
        "(forward+backward); throughput of the forward+backward pass; peak mem = extra memory "
        "of one forward+backward; diff vs base = max |out − baseline out| / max |baseline out| "
        "of the forward outputs (same inputs; bf16 paths differ by rounding, ~1e-2)",
        "",
    ]
    for op in args.ops:
        lines += [f"## {op}", "",
                  "| seq | path | fwd | fwd+bwd | x base | throughput | peak mem | diff vs base |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        not_run: dict[str, str] = {}
        for seq in args.seq:
            torch.manual_seed(0)
            try:
                cases, skipped = BUILDERS[op](seq, args, device, dtype)
            except torch.OutOfMemoryError:
                lines.append(f"| {seq} | (inputs) | out of memory | | | | |")
                continue
            not_run.update(dict(skipped))
            skip = lambda c: bool(args.skip) and c.path.startswith(tuple(args.skip)) and not c.baseline
            not_run.update({c.path: "skipped by --skip" for c in cases if skip(c)})
            cases = [c for c in cases if not skip(c)]
            rows = []
            base_out = None
            for case in cases:
                row = Row(op, seq, case.path)
                try:
                    row.fwd_s, row.peak_bytes = _measure(case.fwd, device, args.repeats)
                    if case.fwd_bwd is not None:  # forward-only ops keep the forward's peak
                        row.fwd_bwd_s, row.peak_bytes = _measure(case.fwd_bwd, device,
                                                                 args.repeats)
                    out = _first(case.fwd()).detach().float()
                    if case.baseline:
                        base_out = out
                    if "expected" in case.extra:  # compared with the op's own reference
                        row.diff = _rel_diff(out, case.extra["expected"])
                    elif base_out is not None and not case.baseline:
                        row.diff = _rel_diff(out, base_out)
                    del out
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    row.note = f"failed: {str(e).splitlines()[0][:80]}"
                if row.fwd_bwd_s:
                    if case.flops_fwd_bwd:
                        row.rate = _fmt_rate(case.flops_fwd_bwd / row.fwd_bwd_s, "FLOP/s")
                    elif case.bytes_fwd_bwd:
                        row.rate = _fmt_rate(case.bytes_fwd_bwd / row.fwd_bwd_s, "B/s")
                elif case.fwd_bwd is None and row.fwd_s and case.flops_fwd:
                    row.rate = _fmt_rate(case.flops_fwd / row.fwd_s, "FLOP/s") + " (fwd)"
                rows.append((row, case.baseline))
                print(f"{op:17s} seq {seq:6d} {case.path:32s} fwd {_fmt_s(row.fwd_s):>10s} "
                      f"fwd+bwd {_fmt_s(row.fwd_bwd_s):>10s} {row.rate} {row.note}", flush=True)
            timed = lambda r: r.fwd_bwd_s if r.fwd_bwd_s is not None else r.fwd_s  # fwd-only ops
            base = next((timed(r) for r, is_base in rows if is_base), None)
            for row, is_base in rows:
                ratio = f"{base / timed(row):.2f}" if base and timed(row) else "-"
                path = f"{row.path} (baseline)" if is_base else row.path
                lines.append(f"| {seq} | {path} | {_fmt_s(row.fwd_s)} | {_fmt_s(row.fwd_bwd_s)} | "
                             f"{ratio} | {row.rate} | {_fmt_b(row.peak_bytes)} {row.note} | "
                             f"{row.diff} |")
            del cases, base_out
            if flush is not None:
                flush("\n".join(lines + ["", f"(partial report: the run was still going, after "
                                              f"{op} at seq {seq})"]))
        if not_run:
            lines += ["", "Not run: " + "; ".join(f"{p} ({why})" for p, why in not_run.items())]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--seq", nargs="+", type=int, default=None,
                   help="sequence lengths (default: 1K..64K on CUDA, 512, 1K, 2K on CPU)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="default 16 on CUDA, 4 on CPU")
    p.add_argument("--kv-heads", type=int, default=None, help="default heads / 2 (GQA)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 on CUDA, 64 on CPU")
    p.add_argument("--ssm-dim", type=int, default=None, help="default 2048 on CUDA, 64 on CPU")
    p.add_argument("--ssm-state", type=int, default=16)
    p.add_argument("--doc-len", type=int, default=None,
                   help="document length of document_attention (default 2048 on CUDA, 1024 on CPU)")
    p.add_argument("--hidden", type=int, default=None, help="default 4096 on CUDA, 512 on CPU")
    p.add_argument("--vocab", type=int, default=None, help="default 128256 on CUDA, 8000 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 3 on CPU")
    p.add_argument("--recurrent-max-seq", type=int, default=None,
                   help="longest seq for the token-by-token references (default 2048 CUDA, 512 CPU)")
    p.add_argument("--reference-budget", type=float, default=None,
                   help="bytes the full-score reference may use (default 8 GiB CUDA, 1 GiB CPU)")
    p.add_argument("--skip", nargs="+", default=[], metavar="PATH",
                   help="paths (name prefixes, e.g. blockwise reference) not to run; baselines always run")
    p.add_argument("--out", default=None, help="markdown file (default benchmarks/results/kernels_<device>.md)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    pick = lambda value, gpu, cpu: value if value is not None else (gpu if cuda else cpu)
    args.seq = pick(args.seq, [1024, 2048, 4096, 8192, 16384, 32768, 65536],
                    [512, 1024, 2048])
    args.dtype = pick(args.dtype, "bfloat16", "float32")
    args.heads = pick(args.heads, 16, 4)
    args.kv_heads = args.kv_heads or max(1, args.heads // 2)
    args.head_dim = pick(args.head_dim, 128, 64)
    args.ssm_dim = pick(args.ssm_dim, 2048, 64)
    args.hidden = pick(args.hidden, 4096, 512)
    args.doc_len = pick(args.doc_len, 2048, 1024)
    args.vocab = pick(args.vocab, 128256, 8000)
    args.repeats = pick(args.repeats, 10, 3)
    args.recurrent_max_seq = pick(args.recurrent_max_seq, 2048, 512)
    args.reference_budget = pick(args.reference_budget, 8 * 2**30, 2**30)
    device_name = torch.device(args.device).type
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"kernels_{device_name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = run(args, flush=lambda partial: out.write_text(partial + "\n"))
    out.write_text(text + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
