"""Mamba selective scan (S6) in Triton, forward and backward, chunked, with initial and last state.

Paper: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023). Per
channel c, state index n and time t (zero-order hold, as mamba-ssm's `selective_scan_fn`):

    Δ_t = softplus(delta_t + delta_bias),   a_t = exp(Δ_t A_cn),   b_t = Δ_t u_t B_nt
    x_t = a_t x_{t−1} + b_t,   y_t = Σ_n C_nt x_t + D_c u_t,   out_t = y_t · silu(z_t)

Schedule (the mamba-ssm CUDA kernel's, in Triton): one program owns BD channels of one sequence
and walks the time axis in chunks of T tokens, keeping its (BD, dstate) state in registers. Inside
a chunk, for each state index n, the linear recurrence over the T tokens is one parallel
`tl.associative_scan` of pairs (a_t, b_t) with (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2), started
from the carried state: x_t = X_t + P_t x_start (P = running product of a).

Backward (reverse sweep over chunks, forward states recomputed from the chunk-start states saved by
the forward pass), with dy = dout · silu(z) and the adjoint h_t = ∂L/∂x_t given by the reversed
scan h_t = C_t dy_t + a_{t+1} h_{t+1} (h after the last token = d last_state):

    dΔ_t = Σ_n h_t (A_n (x_t − b_t) + u_t B_nt),    du_t = Σ_n h_t Δ_t B_nt + D dy_t
    dB_nt = Σ_c h_t Δ_t u_t,   dC_nt = Σ_c dy_t x_t,   dA_cn = Σ_t h_t Δ_t (x_t − b_t)
    dD_c = Σ_t dy_t u_t,   dz_t = dout_t (y_t + D u_t) silu'(z_t),   d x_0 = a_1 h_1

(a_t x_{t−1} = x_t − b_t), then the softplus / bias chain rule. dB and dC are summed over the
channels of a group with atomic adds into float32 buffers.

Packed documents (`segments` `(batch, seq)` ids, semantics in `kernels/recurrent_segments.py`):
the host turns the ids into a per-token uint8 flag (1 where t > 0 starts a document) and the
kernels, under the constexpr HAS_SEGMENTS (segments=None compiles to the same code as before),
replace a_t by 0 at a start: the forward scan gives x_t = b_t there; the backward's reversed scan
uses a_{t+1} = 0 across a start, so h stops at the document edge, a_t x_{t−1} = x_t − b_t is
exactly 0 there (no dΔ / dA term through a_t), and d x_0 = a_1 h_1 sees the first document only.

Shapes (mamba-ssm): u, delta, z `(batch, dim, seq)`; A `(dim, dstate)` real; B, C `(batch, dstate,
seq)` or grouped `(batch, groups, dstate, seq)` (fixed `(dim, dstate)` B/C are left to the PyTorch
path: `supports` says no); D, delta_bias `(dim,)`; initial / last state `(batch, dim, dstate)`
float32. Reference and dispatcher: `kernels/selective_scan.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ctxscale.kernels.dispatch import triton_runnable
from ctxscale.kernels.recurrent_segments import starts, valid_segments
from ctxscale.kernels.triton_launch import INTERPRET


@triton.jit
def _linear_combine(a1, b1, a2, b2):
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(x):
    # log1p(e^{-|x|}) with Goldberg's correction keeps full float32 precision for tiny e^{-|x|}
    y = tl.exp(-tl.abs(x))
    w = 1.0 + y
    log1p = tl.where(w == 1.0, y, tl.log(w) * y / (w - 1.0))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _load_delta(DELTA, DBIAS, row_off, offs_c, offs_t, mask, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr):
    """Δ (BD, T) in float32 (0 where masked: a = 1, b = 0, the state passes unchanged)."""
    pre = tl.load(DELTA + row_off + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        pre += tl.load(DBIAS + offs_c, mask=offs_c >= 0, other=0.0).to(tl.float32)[:, None]
    dt = pre
    if SOFTPLUS:
        dt = _softplus(pre)
    return tl.where(mask, dt, 0.0), pre


@triton.jit
def _decay(dt, a_n, starts, HAS_SEGMENTS: tl.constexpr):
    """a_t = exp(Δ_t A_n) (BD, T); 0 where a document starts (`starts` (T,), only read when
    HAS_SEGMENTS): the scan then drops the carried state there, x_t = b_t."""
    a = tl.exp(dt * a_n[:, None])
    if HAS_SEGMENTS:
        a = tl.where(starts[None, :], 0.0, a)
    return a


@triton.jit
def _load_starts(RESET, b, seq, offs_t):
    """Whether each token of the chunk starts a document (t > 0 with a new id), (T,) bool."""
    return tl.load(RESET + b * seq + offs_t, mask=offs_t < seq, other=0) != 0


@triton.jit
def _column(tile, cols, n):
    return tl.sum(tl.where(cols[None, :] == n, tile, 0.0), 1)


@triton.jit
def _ss_fwd_kernel(U, DELTA, A, B, C, D, Z, DBIAS, X0, RESET, OUT, XLAST, XCHUNK,
                   stride_ub, stride_Bb, stride_Bg, stride_Bn, stride_xc,
                   dim, seq, dstate, chans_per_group,
                   HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SOFTPLUS: tl.constexpr, HAS_X0: tl.constexpr, STORE_CHUNKS: tl.constexpr,
                   HAS_SEGMENTS: tl.constexpr, BD: tl.constexpr, T: tl.constexpr, N: tl.constexpr):
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_c = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, N)
    c_mask = offs_c < dim
    offs_c = tl.where(c_mask, offs_c, 0)
    cn_mask = c_mask[:, None] & (offs_n < dstate)[None, :]
    state_off = b * dim * dstate + offs_c[:, None] * dstate + offs_n[None, :]
    if HAS_X0:
        x = tl.load(X0 + state_off, mask=cn_mask, other=0.0).to(tl.float32)
    else:
        x = tl.zeros([BD, N], dtype=tl.float32)
    row_off = b * stride_ub + offs_c[:, None] * seq
    bc_off = b * stride_Bb + (offs_c // chans_per_group)[:, None] * stride_Bg
    if HAS_D:
        d_skip = tl.load(D + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    for t0 in range(0, seq, T):
        offs_t = t0 + tl.arange(0, T)
        ct_mask = c_mask[:, None] & (offs_t < seq)[None, :]
        u = tl.load(U + row_off + offs_t[None, :], mask=ct_mask, other=0.0).to(tl.float32)
        dt, _ = _load_delta(DELTA, DBIAS, row_off, offs_c, offs_t, ct_mask, HAS_BIAS, SOFTPLUS)
        if STORE_CHUNKS:
            tl.store(XCHUNK + (t0 // T) * stride_xc + state_off, x, mask=cn_mask)
        starts = 0  # no document starts (only read when HAS_SEGMENTS)
        if HAS_SEGMENTS:
            starts = _load_starts(RESET, b, seq, offs_t)
        dtu = dt * u
        y = tl.zeros([BD, T], dtype=tl.float32)
        for n in range(dstate):
            a_n = tl.load(A + offs_c * dstate + n, mask=c_mask, other=0.0).to(tl.float32)
            b_n = tl.load(B + bc_off + n * stride_Bn + offs_t[None, :], mask=ct_mask, other=0.0).to(tl.float32)
            c_n = tl.load(C + bc_off + n * stride_Bn + offs_t[None, :], mask=ct_mask, other=0.0).to(tl.float32)
            prod, local = tl.associative_scan((_decay(dt, a_n, starts, HAS_SEGMENTS), dtu * b_n), 1,
                                              _linear_combine)
            xs = local + prod * _column(x, offs_n, n)[:, None]
            y += xs * c_n
            x_end = tl.sum(tl.where(tl.arange(0, T)[None, :] == T - 1, xs, 0.0), 1)
            x = tl.where(offs_n[None, :] == n, x_end[:, None], x)
        if HAS_D:
            y += d_skip[:, None] * u
        if HAS_Z:
            z = tl.load(Z + row_off + offs_t[None, :], mask=ct_mask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(OUT + row_off + offs_t[None, :], y.to(OUT.dtype.element_ty), mask=ct_mask)
    tl.store(XLAST + state_off, x, mask=cn_mask)


@triton.jit
def _ss_bwd_kernel(U, DELTA, A, B, C, D, Z, DBIAS, DOUT, DLAST, XCHUNK, RESET,
                   DU, DDELTA, DZ, DB, DC, DA_PART, DD_PART, DX0,
                   stride_ub, stride_Bb, stride_Bg, stride_Bn, stride_xc,
                   dim, seq, dstate, chans_per_group,
                   HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                   BD: tl.constexpr, T: tl.constexpr, N: tl.constexpr):
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_c = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, N)
    idx_t = tl.arange(0, T)
    c_mask = offs_c < dim
    offs_c = tl.where(c_mask, offs_c, 0)
    cn_mask = c_mask[:, None] & (offs_n < dstate)[None, :]
    state_off = b * dim * dstate + offs_c[:, None] * dstate + offs_n[None, :]
    if HAS_DLAST:
        h_carry = tl.load(DLAST + state_off, mask=cn_mask, other=0.0).to(tl.float32)
    else:
        h_carry = tl.zeros([BD, N], dtype=tl.float32)
    row_off = b * stride_ub + offs_c[:, None] * seq
    bc_off = b * stride_Bb + (offs_c // chans_per_group)[:, None] * stride_Bg
    d_skip = tl.zeros([BD], dtype=tl.float32)
    if HAS_D:
        d_skip = tl.load(D + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    dA = tl.zeros([BD, N], dtype=tl.float32)
    dD = tl.zeros([BD], dtype=tl.float32)
    n_chunks = tl.cdiv(seq, T)
    for ci in range(n_chunks):
        t0 = (n_chunks - 1 - ci) * T
        offs_t = t0 + idx_t
        ct_mask = c_mask[:, None] & (offs_t < seq)[None, :]
        next_mask = c_mask[:, None] & (offs_t + 1 < seq)[None, :]
        u = tl.load(U + row_off + offs_t[None, :], mask=ct_mask, other=0.0).to(tl.float32)
        dt, pre = _load_delta(DELTA, DBIAS, row_off, offs_c, offs_t, ct_mask, HAS_BIAS, SOFTPLUS)
        dt_next, _ = _load_delta(DELTA, DBIAS, row_off, offs_c, offs_t + 1, next_mask, HAS_BIAS, SOFTPLUS)
        dout = tl.load(DOUT + row_off + offs_t[None, :], mask=ct_mask, other=0.0).to(tl.float32)
        x_start = tl.load(XCHUNK + (t0 // T) * stride_xc + state_off, mask=cn_mask, other=0.0)
        starts, starts_next = 0, 0  # document starts at t and t + 1 (only read when HAS_SEGMENTS)
        if HAS_SEGMENTS:
            starts = _load_starts(RESET, b, seq, offs_t)
            starts_next = _load_starts(RESET, b, seq, offs_t + 1)
        dtu = dt * u
        dy = dout
        if HAS_Z:  # dz needs y: one forward pass over the states of this chunk
            z = tl.load(Z + row_off + offs_t[None, :], mask=ct_mask, other=0.0).to(tl.float32)
            y = d_skip[:, None] * u
            for n in range(dstate):
                a_n = tl.load(A + offs_c * dstate + n, mask=c_mask, other=0.0).to(tl.float32)
                b_n = tl.load(B + bc_off + n * stride_Bn + offs_t[None, :], mask=ct_mask, other=0.0).to(tl.float32)
                c_n = tl.load(C + bc_off + n * stride_Bn + offs_t[None, :], mask=ct_mask, other=0.0).to(tl.float32)
                prod, local = tl.associative_scan((_decay(dt, a_n, starts, HAS_SEGMENTS), dtu * b_n),
                                                  1, _linear_combine)
                y += (local + prod * _column(x_start, offs_n, n)[:, None]) * c_n
            sig = tl.sigmoid(z)
            dy = dout * z * sig
            dz = dout * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(DZ + row_off + offs_t[None, :], dz, mask=ct_mask)
        ddt = tl.zeros([BD, T], dtype=tl.float32)
        du = dy * d_skip[:, None]
        dD += tl.sum(dy * u, 1)
        for n in range(dstate):
            a_n = tl.load(A + offs_c * dstate + n, mask=c_mask, other=0.0).to(tl.float32)
            b_n = tl.load(B + bc_off + n * stride_Bn + offs_t[None, :], mask=ct_mask, other=0.0).to(tl.float32)
            c_n = tl.load(C + bc_off + n * stride_Bn + offs_t[None, :], mask=ct_mask, other=0.0).to(tl.float32)
            bb = dtu * b_n
            prod, local = tl.associative_scan((_decay(dt, a_n, starts, HAS_SEGMENTS), bb), 1,
                                              _linear_combine)
            xs = local + prod * _column(x_start, offs_n, n)[:, None]
            # h_t = C_t dy_t + a_{t+1} h_{t+1}: a_{t+1} = 0 cuts the adjoint at a document start
            rprod, rlocal = tl.associative_scan((_decay(dt_next, a_n, starts_next, HAS_SEGMENTS),
                                                 c_n * dy), 1, _linear_combine, reverse=True)
            h = rlocal + rprod * _column(h_carry, offs_n, n)[:, None]
            ax_prev = xs - bb  # a_t x_{t-1}: exactly 0 at a document start (xs = bb there)
            ddt += h * (a_n[:, None] * ax_prev + u * b_n)
            du += h * dt * b_n
            dA = tl.where(offs_n[None, :] == n, dA + tl.sum(h * dt * ax_prev, 1)[:, None], dA)
            db_t = tl.sum(h * dtu, 0)  # summed over this program's channels (one group)
            dc_t = tl.sum(dy * xs, 0)
            t_ok = offs_t < seq
            grp_off = b * stride_Bb + (pid_d * BD // chans_per_group) * stride_Bg + n * stride_Bn
            tl.atomic_add(DB + grp_off + offs_t, db_t, mask=t_ok)
            tl.atomic_add(DC + grp_off + offs_t, dc_t, mask=t_ok)
            h_first = tl.sum(tl.where(idx_t[None, :] == 0, h, 0.0), 1)
            h_carry = tl.where(offs_n[None, :] == n, h_first[:, None], h_carry)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(pre)
        tl.store(DU + row_off + offs_t[None, :], du, mask=ct_mask)
        tl.store(DDELTA + row_off + offs_t[None, :], ddt, mask=ct_mask)
    # d x_0 = a_0 ⊙ h_0 (h_carry now holds the adjoint at t = 0)
    zero_t = idx_t * 0
    first = c_mask[:, None] & (idx_t == 0)[None, :]
    dt_first, _ = _load_delta(DELTA, DBIAS, row_off, offs_c, zero_t, first, HAS_BIAS, SOFTPLUS)
    dt0 = tl.sum(dt_first, 1)  # masked entries are 0: this is Δ_0
    A_tile = tl.load(A + offs_c[:, None] * dstate + offs_n[None, :], mask=cn_mask, other=0.0).to(tl.float32)
    tl.store(DX0 + state_off, tl.exp(dt0[:, None] * A_tile) * h_carry, mask=cn_mask)
    tl.store(DA_PART + state_off, dA, mask=cn_mask)
    tl.store(DD_PART + b * dim + offs_c, dD, mask=c_mask)


def _blocks(chans_per_group: int, dstate: int):
    """(BD channels, T tokens, N padded dstate, num_warps). BD divides chans_per_group so that a
    program's channels share one B/C group (dB, dC are reduced inside the program)."""
    bd_max, T, warps = (4, 16, 1) if INTERPRET else (16, 128, 4)
    bd = 1
    while bd * 2 <= bd_max and chans_per_group % (bd * 2) == 0:
        bd *= 2
    return bd, T, triton.next_power_of_2(dstate), warps


def _as_groups(X: torch.Tensor) -> torch.Tensor:
    return (X.unsqueeze(1) if X.dim() == 3 else X).contiguous()


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, x0, reset, softplus, needs_grad):
        batch, dim, seq = u.shape
        dstate = A.shape[1]
        u, delta = u.contiguous(), delta.contiguous()
        z = z.contiguous() if z is not None else None
        Bg, Cg = _as_groups(B), _as_groups(C)
        groups = Bg.shape[1]
        cpg = dim // groups
        BD, T, N, warps = _blocks(cpg, dstate)
        n_chunks = triton.cdiv(seq, T)
        out = torch.empty_like(u)
        x_last = torch.empty(batch, dim, dstate, dtype=torch.float32, device=u.device)
        x_chunks = (torch.empty(n_chunks, batch, dim, dstate, dtype=torch.float32, device=u.device)
                    if needs_grad else x_last)
        A32 = A.float().contiguous()
        dummy = x_last
        _ss_fwd_kernel[(triton.cdiv(dim, BD), batch)](
            u, delta, A32, Bg, Cg, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, x0 if x0 is not None else dummy,
            reset, out, x_last, x_chunks, u.stride(0), Bg.stride(0), Bg.stride(1), Bg.stride(2),
            x_chunks.stride(0) if needs_grad else 0, dim, seq, dstate, cpg,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(softplus), HAS_X0=x0 is not None, STORE_CHUNKS=bool(needs_grad),
            HAS_SEGMENTS=reset is not None, BD=BD, T=T, N=N, num_warps=warps)
        if needs_grad:
            ctx.save_for_backward(u, delta, A32, Bg, Cg, D, z, delta_bias, x_chunks, reset)
            ctx.meta = (softplus, B.dim(), C.dim(), x0 is not None, A.dtype)
        return out, x_last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A32, Bg, Cg, D, z, delta_bias, x_chunks, reset = ctx.saved_tensors
        softplus, b_dim, c_dim, has_x0, a_dtype = ctx.meta
        batch, dim, seq = u.shape
        dstate = A32.shape[1]
        cpg = dim // Bg.shape[1]
        BD, T, N, warps = _blocks(cpg, dstate)
        f32 = dict(dtype=torch.float32, device=u.device)
        du = torch.empty(batch, dim, seq, **f32)
        ddelta = torch.empty_like(du)
        dz = torch.empty_like(du) if z is not None else du
        dB = torch.zeros(Bg.shape, **f32)
        dC = torch.zeros(Cg.shape, **f32)
        dA = torch.empty(batch, dim, dstate, **f32)
        dD = torch.empty(batch, dim, **f32)
        dx0 = torch.empty(batch, dim, dstate, **f32)
        dummy = dA
        _ss_bwd_kernel[(triton.cdiv(dim, BD), batch)](
            u, delta, A32, Bg, Cg, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, dout.contiguous(),
            dlast.contiguous() if dlast is not None else dummy, x_chunks, reset,
            du, ddelta, dz, dB, dC, dA, dD, dx0,
            u.stride(0), Bg.stride(0), Bg.stride(1), Bg.stride(2), x_chunks.stride(0),
            dim, seq, dstate, cpg,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(softplus), HAS_DLAST=dlast is not None, HAS_SEGMENTS=reset is not None,
            BD=BD, T=T, N=N, num_warps=warps)
        gB = dB.squeeze(1) if b_dim == 3 else dB
        gC = dC.squeeze(1) if c_dim == 3 else dC
        return (
            du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(a_dtype), gB.to(Bg.dtype),
            gC.to(Cg.dtype), dD.sum(0).to(D.dtype) if D is not None else None,
            dz.to(z.dtype) if z is not None else None,
            ddelta.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None,
            dx0 if has_x0 else None, None, None, None,
        )


def _document_starts(segments: torch.Tensor) -> torch.Tensor:
    """`(batch, seq)` uint8: 1 where a document starts after the first token (the id differs
    from the previous token's), else 0. Computed on the device, no host sync."""
    return starts(segments).to(torch.uint8)


def supports(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             return_last_state=False, *, initial_state=None, segments=None) -> bool:
    """Whether the Triton kernel runs this call (else the dispatcher uses the chunked path)."""
    on_device = triton_runnable(u.device)
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if u.device.type != "cpu" else (
        torch.float16, torch.float32)
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None]
    return (
        on_device
        and u.dim() == 3
        and delta.shape == u.shape
        and A.dim() == 2
        and not A.is_complex()
        and B.dim() in (3, 4)
        and C.shape == B.shape
        and A.shape[1] <= 256
        and all(t.dtype in dtypes for t in tensors)
        and all(t.device == u.device for t in tensors)
        and valid_segments(segments, u.shape[0], u.shape[2], u.device)
    )


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, initial_state=None, segments=None):
    """mamba-ssm `selective_scan_fn` (see the module docstring). Returns out `(batch, dim, seq)`
    in u's dtype, or `(out, last_state float32 (batch, dim, dstate))`. `segments` `(batch, seq)`
    int32/int64 document ids reset the state where the id changes (`kernels/recurrent_segments.py`)."""
    from ctxscale.kernels.selective_scan import _prepare

    # shape checks (document ids included)
    _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, segments)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if not supports(*args, initial_state=initial_state, segments=segments):
        raise ValueError(
            "the Triton selective scan needs CUDA tensors (or TRITON_INTERPRET=1), float16/float32 "
            "(bfloat16 on CUDA) inputs, a real A, dstate <= 256 and time-varying B and C "
            "of the same shape (batch, [groups,] dstate, seq); use kernels.selective_scan instead"
        )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    x0 = initial_state.float().contiguous() if initial_state is not None else None
    reset = _document_starts(segments) if segments is not None else None
    out, last = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, x0, reset,
                                     bool(delta_softplus), needs_grad)
    return (out, last) if return_last_state else out


__all__ = ["supports", "selective_scan"]
