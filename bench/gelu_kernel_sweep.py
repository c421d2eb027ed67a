"""Launch settings of the GELU + FP8 quantization kernel (sd35fp8/kernels.py), swept on the GPU at SD3.5's MLP shapes.

The kernel reads a 16-bit row and writes its E4M3 row and scale: 3 bytes an element, so its floor is memory bandwidth
(about 4.8 TB/s on an H200). Layouts: one power-of-two tile per row (the first version; exact or fast arithmetic),
the shipped two tiles (sd35fp8.kernels), and a looped one (the row in chunks: a first loop for the row max, a second
recomputing GELU from L2 and writing), over several warp counts. "exact" (sigmoid, divide by the scale) is the
reference the others' bytes are compared with. Writes gpu_h200_gelu_sweep.json under --out.

    python -m bench.gelu_kernel_sweep --out /tmp/sweep          # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from bench.runner import cuda_median_ms
from sd35fp8 import kernels
from sd35fp8.kernels import _gelu_tanh

# MLP activations at 1024², CFG batch 2: image + text tokens (Large, Medium), and text tokens alone (Large context)
SHAPES = {"large": (8858, 9728), "medium": (8858, 6144), "large_context": (666, 9728)}


@triton.jit
def _one_tile_kernel(x_ptr, out_ptr, scale_ptr, n_cols, x_row_stride, out_row_stride,
                     FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr):
    """The first shipped version: the row as one power-of-two tile (16384 for 9728 columns). FAST: tanh.approx and
    a multiply by 1/scale (the shipped arithmetic) instead of sigmoid and a division per element."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if FAST:
        gelu = _gelu_tanh(x, True)
    else:
        gelu = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    gelu = gelu.to(x_ptr.dtype.element_ty).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(gelu), axis=0) / FP8_MAX, 1e-12)
    if FAST:
        quantized = tl.clamp(gelu * (1.0 / scale), -FP8_MAX, FP8_MAX)
    else:
        quantized = tl.clamp(gelu / scale, -FP8_MAX, FP8_MAX)
    tl.store(out_ptr + row * out_row_stride + cols, quantized.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _looped_fast_kernel(x_ptr, out_ptr, scale_ptr, n_cols, x_row_stride, out_row_stride,
                        FP8_MAX: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, n_cols, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(_gelu_tanh(x, True).to(x_ptr.dtype.element_ty).to(tl.float32)))
    scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX, 1e-12)
    inverse = 1.0 / scale
    for start in range(0, n_cols, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        gelu = _gelu_tanh(x, True).to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * out_row_stride + cols,
                 tl.clamp(gelu * inverse, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def looped_fast(x, data, scale, num_warps, chunk):
    _looped_fast_kernel[(x.shape[0],)](x, data, scale, x.shape[1], x.stride(0), data.stride(0),
                                       FP8_MAX=kernels.FP8_MAX, CHUNK=chunk, num_warps=num_warps)


def one_tile(x, data, scale, num_warps, fast):
    _one_tile_kernel[(x.shape[0],)](x, data, scale, x.shape[1], x.stride(0), data.stride(0), FP8_MAX=kernels.FP8_MAX,
                                    BLOCK=triton.next_power_of_2(x.shape[1]), FAST=fast, num_warps=num_warps)


def shipped(x, data, scale, num_warps):
    kernels.launch_quantize_rows(x, data, scale, gelu=True, num_warps=num_warps, approx_tanh=True)


def variants():
    yield "one_tile_exact_w8", lambda x, d, s: one_tile(x, d, s, 8, False)
    for warps in (8, 16):
        yield f"one_tile_fast_w{warps}", lambda x, d, s, w=warps: one_tile(x, d, s, w, True)
    for warps in (4, 8, 16):
        yield f"shipped_two_tile_w{warps}", lambda x, d, s, w=warps: shipped(x, d, s, w)
    for chunk in (512, 1024, 2048):
        for warps in (2, 4, 8):
            yield f"looped_fast_c{chunk}_w{warps}", lambda x, d, s, c=chunk, w=warps: looped_fast(x, d, s, w, c)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(), "shapes": {}}
    for name, (rows, cols) in SHAPES.items():
        x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 2).to("cuda", torch.bfloat16)
        reference = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device="cuda")
        reference_scale = torch.empty(rows, 1, device="cuda")
        one_tile(x, reference, reference_scale, 8, False)
        entry = {}
        for label, run in variants():
            data, scale = torch.empty_like(reference), torch.empty_like(reference_scale)
            try:
                run(x, data, scale)
                same = (data.view(torch.uint8) == reference.view(torch.uint8)).float().mean().item()
                ms = cuda_median_ms(torch, lambda: run(x, data, scale), iters=30)
                entry[label] = {"ms": round(ms, 4), "gb_per_s": round(rows * cols * 3 / ms / 1e6, 1),
                                "equal_bytes_vs_exact": round(same, 6),
                                "scales_equal": bool(torch.equal(scale, reference_scale))}
            except Exception as error:  # a launch setting the compiler refuses (e.g. too many registers)
                entry[label] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            print(name, label, entry[label], flush=True)
        report["shapes"][name] = entry
        (args.out / "gpu_h200_gelu_sweep.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"done {time.strftime('%H:%M:%S')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
