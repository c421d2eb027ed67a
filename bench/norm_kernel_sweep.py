"""Launch settings of the adaLN + FP8 quantization kernels (sd35fp8/kernels.py), swept on the GPU at SD3.5's shapes.

`norm_quantize_rows` reads a 16-bit row and writes its E4M3 row and scale (3 bytes an element); with the gated
residual (`add_norm_quantize_rows`) it also reads the residual and writes the new hidden state (7 bytes an element).
So their floor is memory bandwidth (about 4.8 TB/s on an H200). The sweep varies the rows one program normalizes
(`rows_per_program`) and the warps it runs on; GPU time from CUDA graphs (`bench.runner.cuda_graph_ms`), so Python
launch cost is not timed. Each setting's FP8 bytes and scales are compared with those of one row a program on
8 warps (4 below 2048 columns), the setting shipped before this sweep ("same_bytes_as_shipped"). Writes
gpu_h200_norm_sweep.json under --out.

    python -m bench.norm_kernel_sweep --out /tmp/sweep          # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.runner import cuda_graph_ms, environment
from sd35fp8 import kernels

# (B, T, C) at 1024², CFG batch 2: the image tokens of Large and Medium, and Large's text tokens
SHAPES = {"large": (2, 4096, 2432), "medium": (2, 4096, 1536), "large_context": (2, 333, 2432)}
SETTINGS = [(1, 4), (1, 8), (1, 16), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8), (4, 16)]  # (rows per program, warps)


def run_setting(h, y, gate, shift, scale, rows: int, warps: int, residual: bool):
    """One launch of the kernel with these settings; returns its outputs (FP8 rows, scales[, new h])."""
    n = h.shape[0] * h.shape[1]
    data = torch.empty((n, h.shape[2]), dtype=torch.float8_e4m3fn, device=h.device)
    row_scale = torch.empty((n, 1), dtype=torch.float32, device=h.device)
    h_out = torch.empty_like(h) if residual else None
    kernels.launch_norm_quantize_rows(h, shift, scale, 1e-6, data, row_scale, y if residual else None,
                                      gate if residual else None, h_out, num_warps=warps, rows_per_program=rows)
    return data, row_scale, h_out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    report = {"environment": environment(torch, device), "settings": [list(s) for s in SETTINGS], "rows": []}
    for shape_name, (batch, tokens, cols) in SHAPES.items():
        h, y = ((torch.randn(batch, tokens, cols, device=device) * 2).to(torch.bfloat16) for _ in range(2))
        modulation = torch.randn(batch, 6 * cols, device=device).to(torch.bfloat16)  # chunks, as the blocks pass them
        shift, scale, gate = modulation[:, :cols], modulation[:, cols:2 * cols], modulation[:, 2 * cols:3 * cols]
        for residual in (False, True):
            moved = h.numel() * (7 if residual else 3)
            shipped = run_setting(h, y, gate, shift, scale, 1, 8 if cols >= 2048 else 4, residual)
            for rows, warps in SETTINGS:
                started = time.perf_counter()
                try:
                    out = run_setting(h, y, gate, shift, scale, rows, warps, residual)
                    same = kernels.agreement(out[0], shipped[0], out[1], shipped[1])
                    ms = cuda_graph_ms(torch, lambda: run_setting(h, y, gate, shift, scale, rows, warps, residual))
                    row = {"shape": shape_name, "residual": residual, "rows_per_program": rows, "num_warps": warps,
                           "ms": round(ms, 4), "tb_per_s": round(moved / ms / 1e9, 2),
                           "same_bytes_as_shipped": round(same[0], 5), "scale_error": same[1]}
                except Exception as error:  # noqa: BLE001 - a setting that does not build is a row, not a stop
                    row = {"shape": shape_name, "residual": residual, "rows_per_program": rows, "num_warps": warps,
                           "error": str(error)[:300]}
                row["wall_s"] = round(time.perf_counter() - started, 2)
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
                (args.out / "gpu_h200_norm_sweep.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
