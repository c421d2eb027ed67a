"""Hand-written Triton kernels for the FP8 path (CUDA only; every caller keeps a plain-torch fallback).

`gelu_quantize_rows(x)` = tanh-GELU of `x`, then E4M3 rows with one float32 scale per row, in one pass over the
data: one program per row holds the whole row (<= 16384 columns) in registers, so the row max and the cast need no
second read. It replaces what inductor generates for the same three steps on SD3.5's MLP activation (a looped
two-pass reduction evaluating GELU twice): 0.41 -> 0.11 ms at 8858 x 9728 on an H200 (launch settings swept by
bench/gelu_kernel_sweep.py; bench/NOTES.md); in the compiled SD3.5 Large step its 75 calls take 2.8 ms.

`quantize_rows(x)` is the same kernel without GELU, for (B, T, C) token activations with any batch and token strides
(the attention output's image and context halves, slices of one tensor): inductor compiles that quantization as
a looped two-pass reduction, 51 us a call on SD3.5 Large's image tokens on an H200 (1.9 ms a step, 37 calls).

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

`dequantize_blocks(data, scale_inv, block, dtype)` expands a weight stored as E4M3 with one float32 scale per
`block` (transformers' fine-grained FP8: T5's 128x128 blocks) to `dtype` in one pass, 3 bytes an element
(eager torch takes two kernels and 7: the cast to 16 bits, then the scaled copy). `Fp8BlockLinear` runs it for
every T5 layer of every prompt. Bit for bit what `sd35fp8.fp8.dequantize_blockwise` computes in `dtype`: the scale
is rounded to `dtype` first, the product of two 16-bit values is exact in float32 and rounded once.
"""

from __future__ import annotations

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


def rows_supported(x: torch.Tensor) -> bool:
    """Whether `quantize_rows(x)` runs the kernel for this input: (B, T, C) on CUDA, 16-bit, C contiguous, a multiple
    of 8 and not too wide, the other strides multiples of 8 elements (16 bytes: the kernel's loads stay vectorized;
    a symbolic stride under torch.compile is a multiple of the row pitch C)."""
    return (available() and x.is_cuda and x.dim() == 3 and x.dtype in (torch.bfloat16, torch.float16)
            and x.shape[2] <= MAX_COLUMNS and x.shape[2] % 8 == 0 and x.stride(2) == 1
            and all(not isinstance(stride, int) or stride % 8 == 0 for stride in x.stride()[:2]))


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
    def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, n_cols, tokens, x_batch_stride, x_row_stride,
                              out_row_stride, FP8_MAX: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                              GELU: tl.constexpr, APPROX_TANH: tl.constexpr):
        # the row as two power-of-two tiles held in registers (9728 = 8192 + 1536 of 2048, 6144 = 4096 + 2048):
        # one tile of 16384 left 40% of the lanes masked and ran at 1.3-1.5 TB/s on the H200 instead of 2.4.
        # Row r is token r % tokens of batch r // tokens. The strides are multiples of 8 (the launchers check):
        # `// 8 * 8` tells Triton so where inductor passes them as plain integers, which keeps the loads 16 bytes wide.
        row = tl.program_id(0).to(tl.int64)
        cols_a = tl.arange(0, BLOCK_A)
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        mask_b = cols_b < n_cols
        x_row = x_ptr + (row // tokens) * (x_batch_stride // 8 * 8) + (row % tokens) * (x_row_stride // 8 * 8)
        value_a = tl.load(x_row + cols_a).to(tl.float32)
        value_b = tl.load(x_row + cols_b, mask=mask_b, other=0.0).to(tl.float32)
        if GELU:
            value_a = _gelu_tanh(value_a, APPROX_TANH).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded like
            value_b = _gelu_tanh(value_b, APPROX_TANH).to(x_ptr.dtype.element_ty).to(tl.float32)  # the eager GELU
        amax = tl.maximum(tl.max(tl.abs(value_a), axis=0), tl.max(tl.abs(value_b), axis=0))
        scale = tl.maximum(amax / FP8_MAX, 1e-12)
        inverse = 1.0 / scale
        out_row = out_ptr + row * out_row_stride
        tl.store(out_row + cols_a, tl.clamp(value_a * inverse, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty))
        tl.store(out_row + cols_b, tl.clamp(value_b * inverse, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty),
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

    def launch_quantize_rows(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, *, gelu: bool = False,
                             approx_tanh: bool = True, num_warps: int | None = None) -> None:
        """Run the kernel on a 2-D or (B, T, C) `x` into preallocated (rows, C) outputs, applying tanh-GELU first
        if `gelu`. `data` may be float32 to read the values before the FP8 cast, `approx_tanh=False` evaluates tanh
        through a sigmoid (for Triton's CPU interpreter)."""
        cols = x.shape[-1]
        batch_stride, tokens, row_stride = (0, x.shape[0], x.stride(0)) if x.dim() == 2 else \
            (x.stride(0), x.shape[1], x.stride(1))
        if any(isinstance(stride, int) and stride % 8 for stride in (batch_stride, row_stride)) or x.stride(-1) != 1:
            raise ValueError(f"quantize_rows needs contiguous rows whose strides are multiples of 8, got {x.stride()}")
        block_a, block_b = _tiles(cols)
        torch.library.wrap_triton(_quantize_rows_kernel)[(data.shape[0],)](
            x, data, scale, cols, tokens, batch_stride, row_stride, data.stride(0), FP8_MAX=FP8_MAX,
            BLOCK_A=block_a, BLOCK_B=block_b, GELU=gelu, APPROX_TANH=approx_tanh,
            num_warps=num_warps or (8 if block_a >= 8192 else 4))

    @torch.library.triton_op("sd35fp8::gelu_quantize_rows", mutates_args=())
    def gelu_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tanh-GELU then row-wise E4M3 quantization of a 2-D 16-bit CUDA tensor: (data, float32 scales [rows, 1])."""
        data, scale = _fp8_rows(x.shape[0], x.shape[1], x.device)
        launch_quantize_rows(x, data, scale, gelu=True)
        return data, scale

    @torch.library.triton_op("sd35fp8::quantize_rows", mutates_args=())
    def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-wise E4M3 quantization of a (B, T, C) 16-bit CUDA tensor, any batch/token strides (see
        `rows_supported`): (data (B*T, C), float32 scales [B*T, 1])."""
        data, scale = _fp8_rows(x.shape[0] * x.shape[1], x.shape[2], x.device)
        launch_quantize_rows(x, data, scale)
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
                                   row_scale_ptr, n_rows, n_cols, tokens, eps, gate_stride, shift_stride,
                                   scale_stride, FP8_MAX: tl.constexpr, ROWS: tl.constexpr, BLOCK_A: tl.constexpr,
                                   BLOCK_B: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        # rows of h, residual, h_out, out are contiguous with n_cols columns; shift/scale/gate are (B, n_cols) with
        # contiguous rows `*_stride` apart (chunks of the block's modulation: read in place, no copies). One program
        # normalizes ROWS rows, each row as two power-of-two tiles (BLOCK_A + BLOCK_B >= n_cols).
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        live = (rows < n_rows)[:, None]
        rows = tl.minimum(rows, n_rows - 1)  # the rows past the end repeat the last one (not stored)
        batch = (rows // tokens)[:, None]
        cols_a = tl.arange(0, BLOCK_A)[None, :]
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)[None, :]
        mask_b = cols_b < n_cols
        offset = (rows * n_cols)[:, None]
        h_a = tl.load(h_ptr + offset + cols_a).to(tl.float32)
        h_b = tl.load(h_ptr + offset + cols_b, mask=mask_b, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            gate_row = gate_ptr + batch * gate_stride
            y_a = tl.load(residual_ptr + offset + cols_a).to(tl.float32)
            y_b = tl.load(residual_ptr + offset + cols_b, mask=mask_b, other=0.0).to(tl.float32)
            new_a = (h_a + tl.load(gate_row + cols_a).to(tl.float32) * y_a).to(h_out_ptr.dtype.element_ty)
            new_b = (h_b + tl.load(gate_row + cols_b, mask=mask_b, other=0.0).to(tl.float32) * y_b).to(
                h_out_ptr.dtype.element_ty)
            tl.store(h_out_ptr + offset + cols_a, new_a, mask=live)
            tl.store(h_out_ptr + offset + cols_b, new_b, mask=mask_b & live)
            h_a = new_a.to(tl.float32)
            h_b = new_b.to(tl.float32)
        mean = (tl.sum(h_a, axis=1) + tl.sum(h_b, axis=1)) / n_cols
        d_a = h_a - mean[:, None]
        d_b = tl.where(mask_b, h_b - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt((tl.sum(d_a * d_a, axis=1) + tl.sum(d_b * d_b, axis=1)) / n_cols + eps)
        shift_row, scale_row = shift_ptr + batch * shift_stride, scale_ptr + batch * scale_stride
        m_a = d_a * rstd[:, None] * (1.0 + tl.load(scale_row + cols_a).to(tl.float32)) + tl.load(
            shift_row + cols_a).to(tl.float32)
        m_b = d_b * rstd[:, None] * (1.0 + tl.load(scale_row + cols_b, mask=mask_b, other=0.0).to(tl.float32)) + \
            tl.load(shift_row + cols_b, mask=mask_b, other=0.0).to(tl.float32)
        m_a = m_a.to(h_ptr.dtype.element_ty).to(tl.float32)  # rounded like a 16-bit modulated activation
        m_b = tl.where(mask_b, m_b.to(h_ptr.dtype.element_ty).to(tl.float32), 0.0)
        amax = tl.maximum(tl.max(tl.abs(m_a), axis=1), tl.max(tl.abs(m_b), axis=1))
        row_scale = tl.maximum(amax / FP8_MAX, 1e-12)
        inverse = (1.0 / row_scale)[:, None]
        tl.store(out_ptr + offset + cols_a, tl.clamp(m_a * inverse, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty),
                 mask=live)
        tl.store(out_ptr + offset + cols_b, tl.clamp(m_b * inverse, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty),
                 mask=mask_b & live)
        tl.store(row_scale_ptr + rows[:, None], row_scale[:, None], mask=live)

    def _unit_columns(t: torch.Tensor) -> torch.Tensor:
        """`t` (B, C) as the norm kernel reads it: as it is if its columns are contiguous (a chunk of the
        modulation), else a contiguous copy."""
        return t if t.stride(1) == 1 else t.contiguous()

    def launch_norm_quantize_rows(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                                  data: torch.Tensor, row_scale: torch.Tensor, residual: torch.Tensor | None = None,
                                  gate: torch.Tensor | None = None, h_out: torch.Tensor | None = None,
                                  num_warps: int = 4, rows_per_program: int = 2) -> None:
        """Run a norm kernel into preallocated outputs (`data` may be float32: the values before the FP8 cast);
        with `residual`, `gate` and `h_out` it adds the gated residual first and writes the sum to `h_out`.
        Launch settings: 2 rows a program on 4 warps, the fastest of bench/norm_kernel_sweep.py on the H200 at
        every SD3.5 shape (Large image tokens: 35.4 / 46.9 us without / with the residual, against 42.5 / 53.4 us
        for one row on 8 warps; gpu_h200_norm_sweep.json)."""
        cols = h.shape[-1]
        block_a, block_b = _tiles(cols)
        has_residual = residual is not None
        gate, shift, scale = (_unit_columns(t) for t in (gate if has_residual else shift, shift, scale))
        n_rows = h.shape[0] * h.shape[1]
        torch.library.wrap_triton(_norm_quantize_rows_kernel)[(triton.cdiv(n_rows, rows_per_program),)](
            h, residual if has_residual else h, gate, shift, scale, h_out if has_residual else h, data, row_scale,
            n_rows, cols, h.shape[1], eps, gate.stride(0), shift.stride(0), scale.stride(0), FP8_MAX=FP8_MAX,
            ROWS=rows_per_program, BLOCK_A=block_a, BLOCK_B=block_b, HAS_RESIDUAL=has_residual, num_warps=num_warps)


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


DEQUANT_TILE = (64, 128)  # rows x columns of the weight one program expands (inside one scale block)


def blocks_tile(shape: tuple[int, int], block: tuple[int, int], tile: tuple[int, int] = DEQUANT_TILE) -> bool:
    """Whether `dequantize_blocks` can expand a weight of this shape: its scale blocks tile it exactly and are
    whole multiples of `tile` (T5's layers)."""
    return shape[0] % block[0] == 0 and shape[1] % block[1] == 0 and block[0] % tile[0] == 0 and block[1] % tile[1] == 0


def blocks_supported(data: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether `dequantize_blocks` runs the kernel for this weight: contiguous E4M3 on CUDA that `blocks_tile`s
    (anything else uses torch)."""
    return (available() and data.is_cuda and data.dtype == torch.float8_e4m3fn and data.is_contiguous()
            and blocks_tile(tuple(data.shape), block))


if triton is not None:

    @triton.jit
    def _dequantize_blocks_kernel(data_ptr, scale_ptr, out_ptr, n_cols, scale_cols, BLOCK_ROWS: tl.constexpr,
                                  BLOCK_COLS: tl.constexpr, TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr):
        # program (i, j) expands the tile at rows i * TILE_ROWS, columns j * TILE_COLS: it lies inside one scale
        # block (the launcher checks), so its scale is one scalar, rounded to the output dtype as torch rounds it.
        tile_row, tile_col = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        scale_row, scale_col = tile_row * TILE_ROWS // BLOCK_ROWS, tile_col * TILE_COLS // BLOCK_COLS
        scale = tl.load(scale_ptr + scale_row * scale_cols + scale_col)
        scale = scale.to(out_ptr.dtype.element_ty).to(tl.float32)
        rows = tile_row * TILE_ROWS + tl.arange(0, TILE_ROWS)[:, None]
        cols = tile_col * TILE_COLS + tl.arange(0, TILE_COLS)[None, :]
        offsets = rows * n_cols + cols
        values = tl.load(data_ptr + offsets).to(tl.float32)
        tl.store(out_ptr + offsets, (values * scale).to(out_ptr.dtype.element_ty))

    def launch_dequantize_blocks(data: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                                 out: torch.Tensor, tile: tuple[int, int] = DEQUANT_TILE, num_warps: int = 4) -> None:
        """Run the kernel into a preallocated `out` (float32 in Triton's CPU interpreter: no rounding to 16 bits)."""
        rows, cols = data.shape
        if not blocks_tile((rows, cols), block, tile):
            raise ValueError(f"dequantize_blocks needs {tile} tiles inside {block} blocks tiling {tuple(data.shape)}")
        torch.library.wrap_triton(_dequantize_blocks_kernel)[(rows // tile[0], cols // tile[1])](
            data, scale_inv, out, cols, scale_inv.shape[1], BLOCK_ROWS=block[0], BLOCK_COLS=block[1],
            TILE_ROWS=tile[0], TILE_COLS=tile[1], num_warps=num_warps)

    @torch.library.triton_op("sd35fp8::dequantize_blocks", mutates_args=())
    def dequantize_blocks(data: torch.Tensor, scale_inv: torch.Tensor, block_rows: int, block_cols: int,
                          dtype: torch.dtype) -> torch.Tensor:
        """E4M3 `data` with one float32 scale per (block_rows, block_cols) block, as `dtype` (see `blocks_supported`)."""
        out = torch.empty(data.shape, dtype=dtype, device=data.device)
        launch_dequantize_blocks(data, scale_inv, (block_rows, block_cols), out)
        return out


KERNELS = ("gelu", "norm", "rows", "blocks")  # what `check` can test: gelu_quantize_rows, the two norm kernels,
# quantize_rows, dequantize_blocks


def check(device: torch.device | str, kernel: str = "gelu") -> str | None:
    """Run `kernel` (one of `KERNELS`) once on `device` against the torch arithmetic; None if it agrees, else why
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
        elif kernel == "blocks":  # a 256 x 384 weight of 128 x 128 blocks, expanded to bf16 bit for bit
            from .fp8 import dequantize_blockwise, quantize_blockwise

            data, scale_inv = (t.to(device) for t in quantize_blockwise(torch.randn(256, 384, generator=generator)))
            expanded = dequantize_blocks(data, scale_inv, 128, 128, torch.bfloat16)
            results = [agreement(expanded, dequantize_blockwise(data, scale_inv, (128, 128), torch.bfloat16))]
        elif kernel == "rows":  # the image half of an attention output: a strided (B, T, C) slice
            x = (torch.randn(2, 50, 1000, generator=generator) * 3).to(device, torch.bfloat16)[:, :40]
            data, scale = quantize_rows(x)
            expected_data, expected_scale = _quantize_rows_eager(x.reshape(-1, 1000))
            results = [agreement(data, expected_data, scale, expected_scale)]
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
