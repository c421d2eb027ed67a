"""Hand-written Triton kernels for the FP8 path (CUDA only; every caller keeps a plain-torch fallback).

`gelu_quantize_rows(x)` = tanh-GELU of `x`, then E4M3 rows with one float32 scale per row, in one pass over the
data: one program per row holds the whole row (<= 16384 columns) in registers, so the row max and the cast need no
second read. It replaces what inductor generates for the same three steps on SD3.5's MLP activation (a looped
two-pass reduction evaluating GELU twice): 0.41 -> 0.11 ms at 8858 x 9728 on an H200 (launch settings swept by
bench/gelu_kernel_sweep.py; bench/NOTES.md).

Registered with `torch.library.triton_op`, so torch.compile and torch.export see one opaque op and inductor calls
the kernel from its generated code (no graph break). The arithmetic matches `F.gelu(x, approximate="tanh")` in
`x.dtype` followed by `sd35fp8.fp8.quantize_rows`, with two shortcuts: tanh is the GPU's `tanh.approx.f32` and each
element is multiplied by 1/scale instead of divided by scale (99.87% of the FP8 bytes equal to the exact arithmetic's,
the rest one E4M3 step apart). GELU is rounded to `x.dtype` before the row max, as the unfused path does.
"""

from __future__ import annotations

import torch

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

    def launch_gelu_quantize_rows(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, *,
                                  approx_tanh: bool = True, num_warps: int | None = None) -> None:
        """Run the kernel into preallocated outputs. `data` may be float32 to read the values before the FP8 cast,
        `approx_tanh=False` evaluates tanh through a sigmoid (for Triton's CPU interpreter)."""
        cols = x.shape[1]
        block_a = 1 << (cols.bit_length() - 1)  # the largest power of two <= cols
        block_b = max(16, triton.next_power_of_2(cols - block_a)) if cols > block_a else 16
        torch.library.wrap_triton(_gelu_quantize_rows_kernel)[(x.shape[0],)](
            x, data, scale, cols, x.stride(0), data.stride(0), FP8_MAX=FP8_MAX, BLOCK_A=block_a, BLOCK_B=block_b,
            APPROX_TANH=approx_tanh, num_warps=num_warps or (8 if block_a >= 8192 else 4))

    @torch.library.triton_op("sd35fp8::gelu_quantize_rows", mutates_args=())
    def gelu_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tanh-GELU then row-wise E4M3 quantization of a 2-D 16-bit CUDA tensor: (data, float32 scales [rows, 1])."""
        data = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
        launch_gelu_quantize_rows(x, data, scale)
        return data, scale


def check(device: torch.device | str) -> str | None:
    """Run the kernel once on `device` against the torch arithmetic; None if it agrees, else why not (cached).
    `load_pipeline` calls this before fusing, so a GPU or Triton that cannot run it falls back instead of failing."""
    key = str(device)
    if key not in _CHECKS:
        _CHECKS[key] = _check(torch.device(device))
    return _CHECKS[key]


def _check(device: torch.device) -> str | None:
    import torch.nn.functional as F

    from .fp8 import _quantize_rows_eager

    if not available():
        return "triton is not installed"
    if device.type != "cuda":
        return "the kernel runs on CUDA only"
    try:
        x = (torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 3).to(device, torch.bfloat16)
        data, scale = gelu_quantize_rows(x)
        expected_data, expected_scale = _quantize_rows_eager(F.gelu(x, approximate="tanh"))
        same = (data.view(torch.uint8) == expected_data.view(torch.uint8)).float().mean().item()
        scale_error = ((scale - expected_scale).abs() / expected_scale).max().item()
    except Exception as error:  # a Triton or driver that cannot build or run it
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    if same < 0.99 or scale_error > 1e-2:
        return f"disagrees with torch: {same:.1%} equal bytes, scale error {scale_error:.2%}"
    return None
