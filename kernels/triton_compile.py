"""Compile every Triton kernel for an NVIDIA GPU that is not here, and report what it became.

    python -m ctxscale.kernels.triton_compile --arch 90                 # H100 / H200 (sm_90)
    python -m ctxscale.kernels.triton_compile --arch 80 --markdown F    # A100 (sm_80)

The Triton wheel carries its whole CUDA tool chain (ptxas, cuobjdump), so a CPU machine can
lower a kernel all the way to a cubin for a chosen architecture. This module does that for every
launch the Triton paths make, through the same Python wrappers a GPU run takes (forward and
backward, autograd included), on `meta` tensors of realistic shapes, so nothing is allocated:

- a stand-in driver reports the target GPU (no CUDA driver is needed or touched);
- an autotuned kernel compiles every config its pruning keeps instead of timing them;
- a `jit_cache_hook` compiles each specialization itself and stops the launch.

Triton's own binder specializes the arguments (pointer alignment, integers equal to 1 or
divisible by 16), so the code is the code a GPU run with these shapes compiles. For each launch
the report gives registers per thread, local memory per thread (register spills and stack),
shared memory, whether `tl.dot` became Hopper warp-group MMA (`wgmma`), Ampere `mma.sync`, or
plain FMA, and whether the launch fits the target's limits, with the thread blocks per SM those
resources allow.

What this cannot show: time. It catches what only a real compile sees (errors the interpreter
lets through, spills, shared memory over the limit, tensor cores not used); speed needs a GPU
(`benchmarks/kernels.py --device cuda`).

TRITON_INTERPRET must be unset or 0 when the kernel modules are first imported (Triton decides
at `@triton.jit` time whether a kernel compiles or interprets), so run this in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# Per-architecture limits (CUDA programming guide, compute capability table): max dynamic shared
# memory per block and per SM, registers per SM, resident warps and blocks per SM, and the SM
# count of the usual data-centre part (it sizes the persistent grids).
ARCHS = {
    80: dict(gpu="A100", smem_block=166912, smem_sm=167936, regs_sm=65536, warps_sm=64,
             blocks_sm=32, sms=108),
    89: dict(gpu="L4 / L40S", smem_block=101376, smem_sm=102400, regs_sm=65536, warps_sm=48,
             blocks_sm=24, sms=58),
    90: dict(gpu="H100 / H200", smem_block=232448, smem_sm=233472, regs_sm=65536, warps_sm=64,
             blocks_sm=32, sms=132),
}
OPS = ("attention", "linear_attention", "selective_scan", "rms_norm", "cross_entropy")


@dataclasses.dataclass
class Launch:
    """One compiled specialization of one kernel."""

    op: str
    case: str
    kernel: str
    config: str
    num_warps: int
    num_stages: int
    registers: int
    local_bytes: int
    shared_bytes: int
    mma: str
    fits: bool
    blocks_per_sm: int
    error: str = ""


_INTERPRET_REFUSAL = ("TRITON_INTERPRET=1 makes Triton interpret the kernels instead of "
                      "compiling them; unset it (or set 0) to compile")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class _TargetDriver:
    """Just enough of a Triton driver to compile for `target` without a GPU."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local bytes per thread) from `cuobjdump -res-usage`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True,
                             text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    if regs is None or local is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return int(regs.group(1)), int(local.group(1))


def _mma_kind(asm: dict) -> str:
    ptx = asm.get("ptx", "")
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma" if "tt.dot" in asm.get("ttir", "") else "-"


def _blocks_per_sm(limits: dict, warps: int, regs: int, shared: int) -> int:
    regs_block = max(regs, 1) * 32 * warps
    by_regs = limits["regs_sm"] // regs_block
    by_smem = limits["smem_sm"] // shared if shared else limits["blocks_sm"]
    by_warps = limits["warps_sm"] // warps
    return max(0, min(by_regs, by_smem, by_warps, limits["blocks_sm"]))


class _Recorder:
    def __init__(self, arch: int):
        self.arch = arch
        self.limits = ARCHS[arch]
        self.op = ""
        self.case = ""
        self.launches: list[Launch] = []

    def hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        jit = fn.jit_function
        constants = compile["constants"]
        # the constexprs an autotuner config or the wrapper chose: BLOCK_*, C, BK, T, ...
        meta = ", ".join(f"{jit.arg_names[p[0]]}={v}" for p, v in constants.items()
                         if len(p) == 1 and jit.params[p[0]].is_constexpr
                         and isinstance(v, int) and not isinstance(v, bool))
        warps, stages = compile["num_warps"], compile["num_stages"]
        row = dict(op=self.op, case=self.case, kernel=fn.name, config=meta, num_warps=warps,
                   num_stages=stages)
        try:
            src = ASTSource(jit, compile["signature"], constants, compile["configs"][0])
            options = dict(num_warps=warps, num_stages=stages, num_ctas=compile["num_ctas"],
                           enable_fp_fusion=compile["enable_fp_fusion"])
            kernel = triton.compile(src, target=GPUTarget("cuda", self.arch, 32), options=options)
            regs, local = _resource_usage(kernel.asm["cubin"])
            shared = int(kernel.metadata.shared)
            fits = shared <= self.limits["smem_block"] and regs <= 255
            self.launches.append(Launch(
                **row, registers=regs, local_bytes=local, shared_bytes=shared,
                mma=_mma_kind(kernel.asm), fits=fits,
                blocks_per_sm=_blocks_per_sm(self.limits, warps, regs, shared)))
        except Exception as exc:  # a compile error is a finding, reported per launch
            msg = " ".join(str(exc).split())[:300]
            self.launches.append(Launch(**row, registers=0, local_bytes=0, shared_bytes=0,
                                        mma="", fits=False, blocks_per_sm=0,
                                        error=f"{type(exc).__name__}: {msg}"))
        return True  # compiled here: Triton neither caches nor launches it


@contextlib.contextmanager
def compile_only(arch: int):
    """Within the block, Triton launches compile for `arch` and record a `Launch` instead of
    running; kernels take `meta` tensors. Yields the recorder (`.launches`, `.op`, `.case`)."""
    if _interpreting():
        raise RuntimeError(_INTERPRET_REFUSAL)
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch} is not one of {sorted(ARCHS)} (sm_80 A100, sm_89 L4/L40S, "
                         "sm_90 H100/H200)")
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver

    from ctxscale.kernels import dispatch

    recorder = _Recorder(arch)

    def compile_all_configs(self, *args, warmup=False, **kwargs):
        return self.warmup(*args, **kwargs)

    saved = (Autotuner.run, knobs.runtime.jit_cache_hook, dispatch._compile_only_gpu)
    saved_driver = driver._active  # None until a real driver was first asked for
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    Autotuner.run = compile_all_configs
    knobs.runtime.jit_cache_hook = recorder.hook
    dispatch._compile_only_gpu = {"sms": ARCHS[arch]["sms"], "smem_block": ARCHS[arch]["smem_block"]}
    try:
        yield recorder
    finally:
        Autotuner.run, knobs.runtime.jit_cache_hook, dispatch._compile_only_gpu = saved
        driver._active = saved_driver


# ------------------------------------------------------------------ the launches of each op
def _meta(*shape, dtype, grad=True):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def _backward(out, *inputs):
    grads = [torch.empty_like(o) for o in out]
    torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grads, allow_unused=True)


def _attention(rec, dtype, head_dim, seq, batch):
    from ctxscale.kernels import flash_attention_triton as fat

    heads, kv_heads = 16, 8
    for causal in (True, False):
        rec.case = f"b{batch} s{seq} h{heads}/{kv_heads} d{head_dim} {'causal' if causal else 'full'}"
        q = _meta(batch, seq, heads, head_dim, dtype=dtype)
        k = _meta(batch, seq, kv_heads, head_dim, dtype=dtype)
        v = _meta(batch, seq, kv_heads, head_dim, dtype=dtype)
        _backward(fat.flash_attention(q, k, v, causal=causal), q, k, v)
    # packed documents: segment ids mask the tiles and skip those that share no document
    rec.case = f"b{batch} s{seq} h{heads}/{kv_heads} d{head_dim} causal segments"
    q = _meta(batch, seq, heads, head_dim, dtype=dtype)
    k = _meta(batch, seq, kv_heads, head_dim, dtype=dtype)
    v = _meta(batch, seq, kv_heads, head_dim, dtype=dtype)
    ids = torch.empty(batch, seq, dtype=torch.int32, device="meta")
    _backward(fat.flash_attention(q, k, v, causal=True, q_segments=ids, k_segments=ids), q, k, v)
    # the ring / LightSeq step: merge into the running (o, lse) in place, backward with a
    # global lse adding into the running gradient sums
    rec.case = f"ring step b{batch} s{seq} d{head_dim} merge+dlse"
    q = _meta(batch, seq, heads, head_dim, dtype=dtype, grad=False)
    k = _meta(batch, seq, kv_heads, head_dim, dtype=dtype, grad=False)
    o_prev = _meta(batch, seq, heads, head_dim, dtype=torch.float32, grad=False)
    lse_prev = _meta(batch, heads, seq, dtype=torch.float32, grad=False)
    fat.flash_attention_forward(q, k, k, causal=True, o_prev=o_prev, lse_prev=lse_prev,
                                inplace=True)
    dkv = _meta(2, batch, seq, kv_heads, head_dim, dtype=torch.float32, grad=False)
    fat.flash_attention_backward(q, q, k, k, q, lse_prev, causal=True, dlse=lse_prev,
                                 accumulate_into=(o_prev, dkv[0], dkv[1]))


def _linear_attention(rec, dtype, head_dim, seq, batch):
    from ctxscale.kernels import linear_attention_triton as lat

    heads = 16
    # the third case: grouped q/k (Mamba-2's B and C, 2 groups for 16 heads)
    for decay, qk_heads in ((True, heads), (False, heads), (True, 2)):
        kind = ("decay+states" if decay else "plain") + (f" qk{qk_heads}" if qk_heads < heads else "")
        rec.case = f"b{batch} s{seq} h{heads} dk=dv={head_dim} {kind}"
        q = _meta(batch, seq, qk_heads, head_dim, dtype=dtype)
        k = _meta(batch, seq, qk_heads, head_dim, dtype=dtype)
        v = _meta(batch, seq, heads, head_dim, dtype=dtype)
        g = _meta(batch, seq, heads, dtype=torch.float32) if decay else None
        s0 = _meta(batch, heads, head_dim, head_dim, dtype=torch.float32) if decay else None
        out = lat.linear_attention(q, k, v, log_decay=g, initial_state=s0, return_final_state=decay)
        out = out if isinstance(out, tuple) else (out,)
        _backward(out, *[t for t in (q, k, v, g, s0) if t is not None])
    # packed documents: the state resets where the id changes (masks and a restarting cumsum)
    rec.case = f"b{batch} s{seq} h{heads} dk=dv={head_dim} decay+states segments"
    q, k, v = (_meta(batch, seq, heads, head_dim, dtype=dtype) for _ in range(3))
    g = _meta(batch, seq, heads, dtype=torch.float32)
    s0 = _meta(batch, heads, head_dim, head_dim, dtype=torch.float32)
    ids = torch.empty(batch, seq, dtype=torch.int32, device="meta")
    out = lat.linear_attention(q, k, v, log_decay=g, initial_state=s0, return_final_state=True,
                               segments=ids)
    _backward(out, q, k, v, g, s0)


def _selective_scan(rec, dtype, seq, batch):
    from ctxscale.kernels import selective_scan_triton as sst

    dim, dstate = 2048, 16
    rec.case = f"b{batch} s{seq} dim{dim} dstate{dstate} D z softplus states"
    u = _meta(batch, dim, seq, dtype=dtype)
    delta = _meta(batch, dim, seq, dtype=dtype)
    A = _meta(dim, dstate, dtype=torch.float32)
    B = _meta(batch, dstate, seq, dtype=dtype)
    C = _meta(batch, dstate, seq, dtype=dtype)
    D = _meta(dim, dtype=torch.float32)
    z = _meta(batch, dim, seq, dtype=dtype)
    bias = _meta(dim, dtype=torch.float32)
    x0 = _meta(batch, dim, dstate, dtype=torch.float32)
    out = sst.selective_scan(u, delta, A, B, C, D, z, bias, True, True, initial_state=x0)
    _backward(out, u, delta, A, B, C, D, z, bias, x0)
    # packed documents: the state resets where the document id changes
    rec.case = f"b{batch} s{seq} dim{dim} dstate{dstate} D z softplus states segments"
    ids = torch.empty(batch, seq, dtype=torch.int32, device="meta")
    out = sst.selective_scan(u, delta, A, B, C, D, z, bias, True, True, initial_state=x0,
                             segments=ids)
    _backward(out, u, delta, A, B, C, D, z, bias, x0)


def _rms_norm(rec, dtype, seq, batch):
    from ctxscale.kernels import rms_norm_triton as rnt

    for hidden in (4096, 8192):
        rec.case = f"tokens {batch * seq} hidden {hidden}"
        x = _meta(batch * seq, hidden, dtype=dtype)
        w = _meta(hidden, dtype=dtype)
        _backward((rnt.rms_norm(x, w),), x, w)


def _cross_entropy(rec, dtype, seq, batch):
    from ctxscale.kernels import cross_entropy_triton as cet

    for vocab in (32000, 128256):
        rec.case = f"chunk {cet.DEFAULT_CHUNK} rows, vocab {vocab}"
        logits = _meta(cet.DEFAULT_CHUNK, vocab, dtype=dtype, grad=False)
        labels = torch.empty(cet.DEFAULT_CHUNK, dtype=torch.int64, device="meta")
        for grad in (False, True):
            cet._rows_loss(logits, labels, -100, 1.0, grad)


def compile_all(arch: int = 90, *, dtype: torch.dtype = torch.bfloat16, head_dims=(64, 128),
                seq: int = 8192, batch: int = 2, ops=OPS) -> list[Launch]:
    """Compile every launch of `ops` for `arch` (see the module docstring); returns the rows."""
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    with compile_only(arch) as rec:
        for op in ops:
            rec.op = op
            if op == "attention":
                for d in head_dims:
                    _attention(rec, dtype, d, seq, batch)
            elif op == "linear_attention":
                for d in head_dims:
                    _linear_attention(rec, dtype, d, seq, batch)
            elif op == "selective_scan":
                _selective_scan(rec, dtype, seq, batch)
            elif op == "rms_norm":
                _rms_norm(rec, dtype, seq, batch)
            else:
                _cross_entropy(rec, dtype, seq, batch)
    return rec.launches


def _unique(launches: list[Launch]) -> list[Launch]:
    """Drop repeats (the same kernel, config and resources compiled for another case)."""
    seen, rows = set(), []
    for r in launches:
        key = (r.op, r.kernel, r.config, r.num_warps, r.num_stages, r.registers, r.local_bytes,
               r.shared_bytes, r.mma, r.error)
        if key not in seen:
            seen.add(key)
            rows.append(r)
    return rows


def _count(items) -> dict:
    counts: dict = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def markdown(launches: list[Launch], arch: int, dtype: torch.dtype, command: str) -> str:
    import triton

    lim = ARCHS[arch]
    lines = [
        f"# Triton kernels compiled for sm_{arch} ({lim['gpu']}) on a machine without a GPU",
        "",
        f"- `{command}`; triton {triton.__version__}, torch {torch.__version__}, inputs {dtype}",
        f"- limits of sm_{arch}: {lim['smem_block'] // 1024} KiB shared memory per block, 255 "
        f"registers per thread, {lim['regs_sm']} registers and {lim['warps_sm']} warps per SM",
        "- compiled, not run: these are the compiler's resource counts, not speed. 'local' is "
        "local memory per thread (register spills and stack); 'mma' is what tl.dot became "
        "(wgmma: Hopper warp-group tensor cores; mma.sync: Ampere-style tensor cores; fma: no "
        "tensor cores); 'blocks/SM' is the occupancy the registers, shared memory and warps allow. "
        "Autotuned kernels list every config the pruning keeps; a GPU run picks one by timing.",
        f"- {len(launches)} launches compiled ({len(_unique(launches))} distinct rows below): "
        f"{sum(bool(r.error) for r in launches)} compile errors, "
        f"{sum(not r.fits and not r.error for r in launches)} over the limits, "
        f"{sum(r.local_bytes > 0 for r in launches)} with local memory (spills); products: "
        + ", ".join(f"{k} {v}" for k, v in sorted(_count(r.mma for r in launches if r.mma != "-").items())),
        "",
        "| op | kernel | first case | config | warps | stages | regs | local B | shared KiB | mma | blocks/SM | fits |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in _unique(launches):
        if r.error:
            lines.append(f"| {r.op} | {r.kernel} | {r.case} | {r.config} | {r.num_warps} | "
                         f"{r.num_stages} | | | | | | **error**: {r.error} |")
            continue
        lines.append(
            f"| {r.op} | {r.kernel} | {r.case} | {r.config} | {r.num_warps} | {r.num_stages} | "
            f"{r.registers} | {r.local_bytes} | {r.shared_bytes / 1024:.1f} | {r.mma} | "
            f"{r.blocks_per_sm} | {'yes' if r.fits else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(ARCHS),
                        help="compute capability x 10: 80 A100, 89 L4/L40S, 90 H100/H200")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as markdown here")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if _interpreting():
        parser.error(_INTERPRET_REFUSAL)
    launches = compile_all(args.arch, dtype=dtype, head_dims=tuple(args.head_dims), seq=args.seq,
                           batch=args.batch, ops=tuple(args.ops))
    command = "python -m ctxscale.kernels.triton_compile " + " ".join(argv if argv is not None
                                                                        else sys.argv[1:])
    table = markdown(launches, args.arch, dtype, command.strip())
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in launches], indent=1))
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    bad = [r for r in launches if r.error or not r.fits]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
