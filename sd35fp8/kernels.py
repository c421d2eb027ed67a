"""Hand-written Triton kernels for the FP8 path (CUDA only; every caller keeps a plain-torch fallback).

`gelu_quantize_rows(x)` = tanh-GELU of `x`, then E4M3 rows with one float32 scale per row, in one pass over the
data: one program per row holds the whole row (<= 16384 columns) in registers, so the row max and the cast need no
second read. It replaces what inductor generates for the same three steps on SD3.5's MLP activation (a looped
two-pass reduction evaluating GELU twice): 0.41 -> 0.11 ms at 8858 x 9728 on an H200 (launch settings swept by
bench/gelu_kernel_sweep.py; bench/NOTES.md); in the compiled SD3.5 Large step its 75 calls take 2.8 ms.

Registered with `torch.library.triton_op`, so torch.compile and torch.export see one opaque op and inductor calls
the kernel from its generated code (no graph break). The arithmetic matches `F.gelu(x, approximate="tanh")` in
`x.dtype` followed by `sd35fp8.fp8.quantize_rows`, with two shortcuts: tanh is the GPU's `tanh.approx.f32` and each
element is multiplied by 1/scale instead of divided by scale (99.87% of the FP8 bytes equal to the exact arithmetic's,
the rest one E4M3 step apart). GELU is rounded to `x.dtype` before the row max, as the unfused path does.

`norm_quantize_rows(x, shift, scale, eps)` = SD3's adaLN input to an FP8 layer: LayerNorm (no affine) of each row,
modulated by its batch's `(1 + scale)` and `shift`, then E4M3 rows with one float32 scale per row; and
`add_norm_quantize_rows(h, y, gate, shift, scale, eps)` first adds the gated residual (`h + gate * y`, rounded to
`h.dtype` and returned: the block's new hidden state) and normalizes that. One program per row, one read of the
row: inductor's version of the same computation is a looped three-pass reduction (LayerNorm statistics, row
max, cast) that took 83-109 us a call on SD3.5 Large's image tokens on an H200 where the bytes allow ~15-30 us.
In the compiled Large step the 151 calls take 4.5 ms; the Triton time of the step fell from 14.6 to 11.6 ms
(bench/NOTES.md). `sd35fp8.blocks` calls them; `norm_quantize_reference` is the same arithmetic in torch.

`fp8_gemm(x_fp8, weight, x_scale, weight_scale, bias, dtype)` = the FP8 GEMM with row-wise scales that
`torch._scaled_mm` computes, as a Triton matmul with fixed tiles for short inputs (`SHORT_GEMM_MAX_ROWS`):
`Fp8Linear` calls it instead of `_scaled_mm` where the `short_gemm` piece is on; `fp8_gemm_reference` is its
arithmetic in torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import error_summary

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use the torch fallback
    triton = None

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MAX_COLUMNS = 16384  # one program per row keeps the row in registers up to this width
_CHECKS: dict[str, str | None] = {}


def available() -> bool:
    """True where the fused kernel can run: Triton importable (CUDA tensors are checked per call)."""
    return triton is not None


def supports(x: torch.Tensor) -> bool:
    """Whether `gelu_quantize_rows(x)` runs the kernel for this input (2-D, CUDA, 16-bit, not too wide)."""
    return (available() and x.is_cuda and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16)
            and x.shape[1] <= MAX_COLUMNS and x.stride(1) == 1)


if triton is not None:

    @triton.jit
    def _gelu_tanh(x, APPROX_TANH: tl.constexpr):
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) * (x + 0.044715 x^3)
        if APPROX_TANH:  # one PTX instruction (sm_75+); Triton's CPU interpreter cannot run it
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=tl.float32, is_pure=True,
                                          pack=1)
        else:
            t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        return 0.5 * x * (1.0 + t)

    @triton.jit
    def _gelu_quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, n_cols, x_row_stride, out_row_stride,
                                   FP8_MAX: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                                   APPROX_TANH: tl.constexpr):
        # the row as two power-of-two tiles held in registers (9728 = 8192 + 1536 of 2048, 6144 = 4096 + 2048):
        # one tile of 16384 left 40% of the lanes masked and ran at 1.3-1.5 TB/s on the H200 instead of 2.4
        row = tl.program_id(0).to(tl.int64)
        cols_a = tl.arange(0, BLOCK_A)
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        mask_b = cols_b < n_cols
        x_row = x_ptr + row * x_row_stride
        gelu_a = _gelu_tanh(tl.load(x_row + cols_a).to(tl.float32), APPROX_TANH)
        gelu_b = _gelu_tanh(tl.load(x_row + cols_b, mask=mask_b, other=0.0).to(tl.float32), APPROX_TANH)
        gelu_a = gelu_a.to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded like the eager GELU's output
        gelu_b = gelu_b.to(x_ptr.dtype.element_ty).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(gelu_a), axis=0), tl.max(tl.abs(gelu_b), axis=0))
        scale = tl.maximum(amax / FP8_MAX, 1e-12)
        inverse = 1.0 / scale
        out_row = out_ptr + row * out_row_stride
        tl.store(out_row + cols_a, tl.clamp(gelu_a * inverse, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty))
        tl.store(out_row + cols_b, tl.clamp(gelu_b * inverse, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty),
                 mask=mask_b)
        tl.store(scale_ptr + row, scale)

    def _tiles(cols: int) -> tuple[int, int]:
        """The two power-of-two tiles a row of `cols` columns is held in: the largest power of two <= cols, and
        the next power of two >= the rest (at least 16)."""
        block_a = 1 << (cols.bit_length() - 1)
        return block_a, max(16, triton.next_power_of_2(cols - block_a)) if cols > block_a else 16

    def _fp8_rows(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty outputs of a row-quantizing kernel: E4M3 (rows, cols) and float32 scales (rows, 1)."""
        return (torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=device),
                torch.empty((rows, 1), dtype=torch.float32, device=device))

    def launch_gelu_quantize_rows(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, *,
                                  approx_tanh: bool = True, num_warps: int | None = None) -> None:
        """Run the kernel into preallocated outputs. `data` may be float32 to read the values before the FP8 cast,
        `approx_tanh=False` evaluates tanh through a sigmoid (for Triton's CPU interpreter)."""
        cols = x.shape[1]
        block_a, block_b = _tiles(cols)
        torch.library.wrap_triton(_gelu_quantize_rows_kernel)[(x.shape[0],)](
            x, data, scale, cols, x.stride(0), data.stride(0), FP8_MAX=FP8_MAX, BLOCK_A=block_a, BLOCK_B=block_b,
            APPROX_TANH=approx_tanh, num_warps=num_warps or (8 if block_a >= 8192 else 4))

    @torch.library.triton_op("sd35fp8::gelu_quantize_rows", mutates_args=())
    def gelu_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tanh-GELU then row-wise E4M3 quantization of a 2-D 16-bit CUDA tensor: (data, float32 scales [rows, 1])."""
        data, scale = _fp8_rows(x.shape[0], x.shape[1], x.device)
        launch_gelu_quantize_rows(x, data, scale)
        return data, scale


def norm_supports(x: torch.Tensor) -> bool:
    """Whether the LayerNorm + modulation + quantize kernels run for this (B, T, C) input."""
    return (available() and x.is_cuda and x.dim() == 3 and x.dtype in (torch.bfloat16, torch.float16)
            and x.shape[2] <= MAX_COLUMNS and x.is_contiguous())


def norm_quantize_reference(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                            residual: torch.Tensor | None = None, gate: torch.Tensor | None = None):
    """What the norm kernels compute, in torch: (new hidden state or `h`, E4M3 rows, float32 row scales).

    `h` (B, T, C); `shift`, `scale`, `gate` (B, C). The gated residual is added in float32 and rounded to `h.dtype`;
    LayerNorm and modulation run in float32 and are rounded to `h.dtype` before the row max (as a 16-bit
    modulated activation followed by `quantize_rows` is)."""
    from .fp8 import _quantize_rows_eager

    if residual is not None:
        h = (h.float() + gate.float()[:, None] * residual.float()).to(h.dtype)
    normed = F.layer_norm(h.float(), (h.shape[-1],), eps=eps)
    modulated = (normed * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(h.dtype)
    data, row_scale = _quantize_rows_eager(modulated.reshape(-1, h.shape[-1]))
    return h, data, row_scale


if triton is not None:

    @triton.jit
    def _norm_quantize_rows_kernel(h_ptr, residual_ptr, gate_ptr, shift_ptr, scale_ptr, h_out_ptr, out_ptr,
                                   row_scale_ptr, n_cols, tokens, eps, FP8_MAX: tl.constexpr,
                                   BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        # rows of h, residual, h_out, out are contiguous with n_cols columns; shift/scale/gate are (B, n_cols)
        row = tl.program_id(0).to(tl.int64)
        batch = row // tokens
        cols_a = tl.arange(0, BLOCK_A)
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        mask_b = cols_b < n_cols
        offset = row * n_cols
        h_a = tl.load(h_ptr + offset + cols_a).to(tl.float32)
        h_b = tl.load(h_ptr + offset + cols_b, mask=mask_b, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            gate_row = gate_ptr + batch * n_cols
            y_a = tl.load(residual_ptr + offset + cols_a).to(tl.float32)
            y_b = tl.load(residual_ptr + offset + cols_b, mask=mask_b, other=0.0).to(tl.float32)
            new_a = (h_a + tl.load(gate_row + cols_a).to(tl.float32) * y_a).to(h_out_ptr.dtype.element_ty)
            new_b = (h_b + tl.load(gate_row + cols_b, mask=mask_b, other=0.0).to(tl.float32) * y_b).to(
                h_out_ptr.dtype.element_ty)
            tl.store(h_out_ptr + offset + cols_a, new_a)
            tl.store(h_out_ptr + offset + cols_b, new_b, mask=mask_b)
            h_a = new_a.to(tl.float32)
            h_b = new_b.to(tl.float32)
        mean = (tl.sum(h_a, axis=0) + tl.sum(h_b, axis=0)) / n_cols
        d_a = h_a - mean
        d_b = tl.where(mask_b, h_b - mean, 0.0)
        rstd = 1.0 / tl.sqrt((tl.sum(d_a * d_a, axis=0) + tl.sum(d_b * d_b, axis=0)) / n_cols + eps)
        shift_row, scale_row = shift_ptr + batch * n_cols, scale_ptr + batch * n_cols
        m_a = d_a * rstd * (1.0 + tl.load(scale_row + cols_a).to(tl.float32)) + tl.load(shift_row + cols_a).to(
            tl.float32)
        m_b = d_b * rstd * (1.0 + tl.load(scale_row + cols_b, mask=mask_b, other=0.0).to(tl.float32)) + tl.load(
            shift_row + cols_b, mask=mask_b, other=0.0).to(tl.float32)
        m_a = m_a.to(h_ptr.dtype.element_ty).to(tl.float32)  # rounded like a 16-bit modulated activation
        m_b = tl.where(mask_b, m_b.to(h_ptr.dtype.element_ty).to(tl.float32), 0.0)
        amax = tl.maximum(tl.max(tl.abs(m_a), axis=0), tl.max(tl.abs(m_b), axis=0))
        row_scale = tl.maximum(amax / FP8_MAX, 1e-12)
        inverse = 1.0 / row_scale
        tl.store(out_ptr + offset + cols_a, tl.clamp(m_a * inverse, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty))
        tl.store(out_ptr + offset + cols_b, tl.clamp(m_b * inverse, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty),
                 mask=mask_b)
        tl.store(row_scale_ptr + row, row_scale)

    def launch_norm_quantize_rows(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                                  data: torch.Tensor, row_scale: torch.Tensor, residual: torch.Tensor | None = None,
                                  gate: torch.Tensor | None = None, h_out: torch.Tensor | None = None,
                                  num_warps: int | None = None) -> None:
        """Run a norm kernel into preallocated outputs (`data` may be float32: the values before the FP8 cast);
        with `residual`, `gate` and `h_out` it adds the gated residual first and writes the sum to `h_out`."""
        cols = h.shape[-1]
        block_a, block_b = _tiles(cols)
        has_residual = residual is not None
        torch.library.wrap_triton(_norm_quantize_rows_kernel)[(h.shape[0] * h.shape[1],)](
            h, residual if has_residual else h, gate.contiguous() if has_residual else shift,
            shift.contiguous(), scale.contiguous(), h_out if has_residual else h, data, row_scale, cols, h.shape[1],
            eps, FP8_MAX=FP8_MAX, BLOCK_A=block_a, BLOCK_B=block_b, HAS_RESIDUAL=has_residual,
            num_warps=num_warps or (8 if block_a >= 2048 else 4))

    @torch.library.triton_op("sd35fp8::norm_quantize_rows", mutates_args=())
    def norm_quantize_rows(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """LayerNorm + adaLN modulation + row-wise E4M3 of a (B, T, C) 16-bit CUDA tensor: (data (B*T, C), scales)."""
        data, row_scale = _fp8_rows(h.shape[0] * h.shape[1], h.shape[2], h.device)
        launch_norm_quantize_rows(h, shift, scale, eps, data, row_scale)
        return data, row_scale

    @torch.library.triton_op("sd35fp8::add_norm_quantize_rows", mutates_args=())
    def add_norm_quantize_rows(h: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                               scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`h + gate * residual` (returned), then `norm_quantize_rows` of it: (new h, data, scales)."""
        h_out = torch.empty_like(h)
        data, row_scale = _fp8_rows(h.shape[0] * h.shape[1], h.shape[2], h.device)
        launch_norm_quantize_rows(h, shift, scale, eps, data, row_scale, residual, gate, h_out)
        return h_out, data, row_scale


# ---------------------------------------------------------------------------------------------- short FP8 GEMMs

# FP8 GEMMs of at most this many rows (activation rows: batch x tokens) run `fp8_gemm` instead of torch._scaled_mm
# when the piece is on: SD3.5's text-token stream (2 x 333 = 666 rows with CFG) and its adaLN layers (2 rows). There,
# inductor's max-autotune timed Triton matmuls against torch._scaled_mm with row-wise scales on the H200 (Large,
# bench/NOTES.md, session 11): 666 x 9728 -> 2432 0.061 vs 0.111 ms, and for 666 x 2432 -> 7296 / 2432 / 9728
# 0.048 / 0.021 / 0.064 ms with _scaled_mm not among the ten fastest choices; at 8192 rows (the image tokens)
# _scaled_mm won by 1.6-1.8x.
SHORT_GEMM_MAX_ROWS = 1024
HOPPER_SHARED_MEMORY = 228 * 1024  # bytes per block the H100/H200 allow a kernel; Ada and consumer Blackwell: 99 KB


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int


def gemm_config(rows: int, columns: int, shared_memory: int = HOPPER_SHARED_MEMORY) -> GemmConfig:
    """The tiles `fp8_gemm` launches for `rows` activation rows and `columns` output channels on a GPU with
    `shared_memory` bytes per block: the winners of that autotuning. 2 rows: 16 x 256 x 128 (M x N x K), 4 stages,
    8 warps (0.025 ms; its 102 KB of buffers exceed Ada's and consumer Blackwell's 99 KB, which get the runner-up,
    16 x 256 x 64 in 6 stages, 85 KB: 0.027 ms). 666 rows: 64 x 128 x 64, 4 stages, where the output has 2432 columns
    (attention out, ff down: 0.021 / 0.061 ms, against 0.035 / 0.066 with the other tile); 64 x 128 x 128, 3 stages,
    where it has 7296 or 9728 (q/k/v, ff up: 0.048 / 0.064 ms, against 0.054 / 0.072)."""
    if rows <= 16:
        return GemmConfig(16, 256, 128, 4, 8) if shared_memory >= 104448 else GemmConfig(16, 256, 64, 6, 4)
    return GemmConfig(64, 128, 64, 4, 4) if columns <= 4096 else GemmConfig(64, 128, 128, 3, 4)


_SHARED_MEMORY: dict[str, int] = {}


def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory a kernel may use per block on `device` (cached; the H200's figure off CUDA)."""
    key = str(device)
    if key not in _SHARED_MEMORY:
        _SHARED_MEMORY[key] = torch.cuda.get_device_properties(device).shared_memory_per_block_optin \
            if device.type == "cuda" else HOPPER_SHARED_MEMORY
    return _SHARED_MEMORY[key]


def gemm_supports(x_fp8: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `Fp8Linear` runs `fp8_gemm` for these operands: CUDA, E4M3 rows with unit column
    stride, dimensions multiples of 16, at most SHORT_GEMM_MAX_ROWS rows. Not while exporting: a size test on a
    symbolic size would become an export guard."""
    return (available() and x_fp8.is_cuda and not torch.compiler.is_exporting() and x_fp8.dtype == torch.float8_e4m3fn
            and x_fp8.dim() == 2 and x_fp8.stride(1) == 1 and weight.stride(1) == 1
            and x_fp8.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0 and x_fp8.shape[0] <= SHORT_GEMM_MAX_ROWS)


def fp8_gemm_reference(x_fp8: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """What `fp8_gemm` (and torch._scaled_mm with row-wise scales) computes, in float32 torch: (x @ w^T) scaled per
    activation row and per weight channel, plus the bias, rounded once to `dtype`."""
    out = (x_fp8.float() @ weight.float().t()) * x_scale.reshape(-1, 1).float() * weight_scale.reshape(1, -1).float()
    return (out if bias is None else out + bias.float()).to(dtype)


if triton is not None:

    @triton.jit
    def _fp8_gemm_kernel(a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_bn,
                         stride_cm, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # C (M, N) = A (M, K) @ B (N, K)^T with both operands K-major (the layout FP8 wgmma takes), float32
        # accumulators, the row and channel scales and the bias applied once in the epilogue. N, K and the strides
        # are multiples of 16 (the launcher checks); written as such, so the loads and stores stay 16 bytes wide
        # without the divisibility hints inductor's generated calls do not pass.
        N = N // 16 * 16
        K = K // 16 * 16
        stride_am = stride_am // 16 * 16
        stride_bn = stride_bn // 16 * 16
        stride_cm = stride_cm // 16 * 16
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * grid_n  # groups of GROUP_M row tiles walk the columns together (B tiles reused in L2)
        group = pid // width
        group_size = tl.minimum(grid_m - group * GROUP_M, GROUP_M)
        pid_m = group * GROUP_M + (pid % width) % group_size
        pid_n = (pid % width) // group_size
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # rows and columns past the end read row/column 0 again (computed, never stored): no masks on the loads
        ram = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
        rbn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
        a_ptrs = a_ptr + ram[:, None].to(tl.int64) * stride_am + rk[None, :]
        b_ptrs = b_ptr + rbn[None, :].to(tl.int64) * stride_bn + rk[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=rk[None, :] < left, other=0.0)
                b = tl.load(b_ptrs, mask=rk[:, None] < left, other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        row_ok = rm < M
        col_ok = rn < N
        acc = acc * tl.load(a_scale_ptr + rm, mask=row_ok, other=0.0)[:, None]
        acc = acc * tl.load(b_scale_ptr + rn, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    def launch_fp8_gemm(x_fp8: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None, out: torch.Tensor, config: GemmConfig | None = None) -> None:
        """Run the GEMM into the preallocated `out` (M, N); `config` defaults to `gemm_config` for its shape and GPU."""
        rows, depth = x_fp8.shape
        columns = weight.shape[0]
        if depth % 16 or columns % 16 or any(stride % 16 for stride in (x_fp8.stride(0), weight.stride(0), out.stride(0))):
            raise ValueError("fp8_gemm needs K, N and the row strides to be multiples of 16")
        config = config or gemm_config(rows, columns, shared_memory_per_block(out.device))
        grid = (triton.cdiv(rows, config.block_m) * triton.cdiv(columns, config.block_n),)
        torch.library.wrap_triton(_fp8_gemm_kernel)[grid](
            x_fp8, weight, x_scale, weight_scale, bias if bias is not None else weight_scale, out, rows, columns, depth,
            x_fp8.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
            EVEN_K=depth % config.block_k == 0, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, GROUP_M=8, num_stages=config.num_stages, num_warps=config.num_warps)

    @torch.library.triton_op("sd35fp8::fp8_gemm", mutates_args=())
    def fp8_gemm(x_fp8: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """`fp8_gemm_reference`'s product of E4M3 rows `x_fp8` (M, K) and E4M3 `weight` (N, K) on the GPU: (M, N)."""
        out = torch.empty((x_fp8.shape[0], weight.shape[0]), dtype=dtype, device=x_fp8.device)
        launch_fp8_gemm(x_fp8, weight, x_scale.reshape(-1), weight_scale.reshape(-1), bias, out)
        return out


KERNELS = ("gelu", "norm", "gemm")  # what `check` can test: gelu_quantize_rows, the two norm kernels, fp8_gemm


def check(device: torch.device | str, kernel: str = "gelu") -> str | None:
    """Run `kernel` ("gelu", "norm" or "gemm") once on `device` against the torch arithmetic; None if it agrees, else why
    not (cached). `prepare_transformer` calls this before fusing, so a GPU or Triton that cannot run a kernel falls
    back to the separate kernels instead of failing."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    key = f"{torch.device(device)}:{kernel}"
    if key not in _CHECKS:
        _CHECKS[key] = _check(torch.device(device), kernel)
    return _CHECKS[key]


def agreement(data: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None,
               expected_scale: torch.Tensor | None = None) -> tuple[float, float]:
    """(share of equal elements, FP8 compared byte for byte; largest relative scale error)."""
    if data.dtype == torch.float8_e4m3fn:
        data, expected = data.view(torch.uint8), expected.view(torch.uint8)
    same = (data == expected).float().mean().item()
    error = 0.0 if scale is None else ((scale - expected_scale).abs() / expected_scale).max().item()
    return same, error


def _check(device: torch.device, kernel: str) -> str | None:
    from .fp8 import _quantize_rows_eager

    if not available():
        return "triton is not installed"
    if device.type != "cuda":
        return "the kernel runs on CUDA only"
    generator = torch.Generator().manual_seed(0)
    try:
        if kernel == "gelu":
            x = (torch.randn(64, 1000, generator=generator) * 3).to(device, torch.bfloat16)
            data, scale = gelu_quantize_rows(x)
            expected_data, expected_scale = _quantize_rows_eager(F.gelu(x, approximate="tanh"))
            results = [agreement(data, expected_data, scale, expected_scale)]
        elif kernel == "gemm":
            from .fp8 import quantize_weight_rows

            worst = 0.0
            # each of gemm_config's tiles; K not a multiple of the K tiles
            for rows, columns in ((2, 272), (75, 272), (75, 4112)):
                x = torch.randn(rows, 1040, generator=generator).to(device, torch.bfloat16)
                weight, weight_scale = quantize_weight_rows(torch.randn(columns, 1040, generator=generator) * 0.05)
                weight, weight_scale = weight.to(device), weight_scale.reshape(1, -1).float().to(device)
                bias = torch.randn(columns, generator=generator).to(device, torch.bfloat16)
                x_fp8, x_scale = _quantize_rows_eager(x)
                out = fp8_gemm(x_fp8, weight, x_scale, weight_scale, bias, torch.bfloat16).float()
                expected = fp8_gemm_reference(x_fp8, weight, x_scale, weight_scale, bias, torch.float32)
                worst = max(worst, float((out - expected).norm() / expected.norm()))
            # bf16 rounding of the output is ~0.1% in norm; a wrong index or scale gives tens of percent
            return None if worst < 5e-3 else f"disagrees with torch: relative error {worst:.2%}"
        else:
            h, y = ((torch.randn(2, 40, 1000, generator=generator) * 3).to(device, torch.bfloat16) for _ in range(2))
            shift, scale, gate = (torch.randn(2, 1000, generator=generator).to(device, torch.bfloat16) for _ in range(3))
            _, data, row_scale = norm_quantize_reference(h, shift, scale, 1e-6)
            ours = norm_quantize_rows(h, shift, scale, 1e-6)
            new_h, added_data, added_scale = add_norm_quantize_rows(h, y, gate, shift, scale, 1e-6)
            expected_h, expected_data, expected_scale = norm_quantize_reference(h, shift, scale, 1e-6, y, gate)
            results = [agreement(ours[0], data, ours[1], row_scale), agreement(new_h, expected_h),
                       agreement(added_data, expected_data, added_scale, expected_scale)]
    except Exception as error:  # a Triton or driver that cannot build or run it
        return error_summary(error)
    same, scale_error = min(r[0] for r in results), max(r[1] for r in results)
    if same < 0.99 or scale_error > 1e-2:
        return f"disagrees with torch: {same:.1%} equal bytes, scale error {scale_error:.2%}"
    return None
