"""Micro-benchmark of the Triton FP8 flash-attention kernel (sd35fp8.attention_kernel) against PyTorch's 16-bit
SDPA backends at SD3.5's attention shapes, on one GPU (written for the H200).

    python -m bench.attention_fp8_micro --out DIR [--deadline-s 150] [--shapes large,medium]
    TRITON_INTERPRET=1 python -m bench.attention_fp8_micro --tiny --out DIR   # CPU smoke test (Triton's interpreter)

Shapes (B, S, H, D): large (2, 4429, 38, 64), medium (2, 4429, 24, 64); non-causal, no mask. Inputs: random bf16
(B, S, H, D), q and k RMS-normed (as SD3.5's q/k norms make them). Rows, in order (per shape):
  * cudnn_bf16 / flash_bf16 / sdpa_auto_bf16: `F.scaled_dot_product_attention` on (B, H, S, D) *views* of the
    (B, S, H, D) tensors (`transpose(1, 2)`, no copy, as `sd35fp8.attention`'s "sdpa" backend calls it; the strided
    inputs are read by the kernel directly, no transpose kernels are timed) under `sdpa_kernel(CUDNN_ATTENTION)`,
    `sdpa_kernel(FLASH_ATTENTION)` and PyTorch's own pick.
  * triton_fp8_in_compile: the default config called from `torch.compile(dynamic=True)` code, as the model's compiled
    blocks call it (inductor passes its scalars and strides differently from an eager launch);
  * triton_fp8: the kernel per config (`ak.CONFIGS`, V in the K-major (B, H, D, S_pad) layout, "bhds"), then the
    best of those with V as (B, S, H, D) ("bshd"), with K in its natural order (P then crosses threads to reach the
    second dot: "_shuffled") and with the other P @ V accumulation ("_chained" or not). Inputs quantized from the
    same bf16 tensors with per-tensor amax scales (not timed).
  * cudnn_fp8_frontend: cuDNN's sdpa_fp8 through `sd35fp8.attention` (FP8 output) if the cuDNN frontend imports;
    timed eagerly only (not captured: a failed capture of its own handle/stream must not disturb later rows).
  * v_transpose: `ak.transpose_v` alone (what writing V K-major costs if done as a separate copy).
  * qkv_prepare_kernel / qkv_prepare_inductor: q/k RMS norms + concatenation of image and context tokens + E4M3
    quantization of q/k/v (V written transposed) from the fused projections' outputs, by `ak.quantize_qkv` and by
    torch.compile of its torch reference (what the model's compiled blocks would otherwise run).

Timing: `ms` = GPU time of one call from a CUDA graph of 10 calls, replayed 20 times (median replay / 10), so
Python launch cost is excluded; `launched_ms` = median of 20 eagerly launched calls timed with CUDA events (after
3 warm-up calls); `first_call_s` includes Triton's compilation. TFLOP/s = 4*B*H*S*S*D / ms. `rel_error` =
||out - ref|| / ||ref|| with ref = float32 attention (no TF32) of the same bf16 inputs.

The JSON (DIR/attention_fp8_micro.json) is rewritten after every row, so a timeout keeps what finished; no new
measurement starts after --deadline-s. A config that fails to compile or run is an error row. `--only-compiled`
runs just cuDNN bf16, triton_fp8_in_compile, the default config with and without its key order and the two
qkv_prepare rows (a short check). Needs no diffusers or quanto:
it imports torch, triton (through sd35fp8.attention_kernel), sd35fp8's attention/errors/metrics and bench.runner.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.runner import cuda_graph_ms, cuda_median_ms, environment
from sd35fp8 import attention_kernel as ak
from sd35fp8.errors import error_summary
from sd35fp8.metrics import relative_error

SHAPES = {"large": (2, 4429, 38, 64), "medium": (2, 4429, 24, 64)}
TINY_SHAPES = {"tiny": (1, 75, 2, 64)}
TINY_CONFIGS = (ak.Config(32, 32, 4, 1), ak.Config(64, 64, 4, 1))
GRAPH_CALLS = 10
NOT_ATTENTION = ("v_transpose", "qkv_prepare_kernel", "qkv_prepare_inductor")  # rows without an attention output
CONTEXT_TOKENS = 333  # SD3.5's text tokens (77 CLIP + 256 T5) among the sequence


def reference_attention(q, k, v) -> torch.Tensor:
    """float32 attention of (B, S, H, D) tensors, (B, S, H, D) out, a few heads at a time (no TF32)."""
    batch, seq, heads, dim = q.shape
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    chunk = max(1, (1 << 30) // (seq * seq * 4))  # ~1 GiB of scores at a time
    for b in range(batch):
        for h in range(0, heads, chunk):
            qs, ks, vs = (t[b, :, h:h + chunk].float().transpose(0, 1) for t in (q, k, v))
            scores = (qs @ ks.transpose(-1, -2)) / math.sqrt(dim)
            out[b, :, h:h + chunk] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1)
    return out


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor E4M3: (x8, float32 descale of shape (1,))."""
    scale = 448.0 / x.float().abs().amax().clamp(min=1e-12)
    return (x.float() * scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), (1.0 / scale).reshape(1)


def time_gpu(fn, iters: int = 20, graph: bool = True) -> dict:
    """{'ms': one call's time from a CUDA graph of GRAPH_CALLS calls (no launch cost; the eager figure where the
    capture fails or `graph` is off), 'launched_ms': eager median of `iters` calls}."""
    launched = round(cuda_median_ms(torch, fn, iters=iters), 4)
    graphed = cuda_graph_ms(torch, fn, repeat=GRAPH_CALLS) if graph else None
    result = {"launched_ms": launched, "ms": launched if graphed is None else round(graphed, 4)}
    if graph and graphed is None:
        result["graph_error"] = "CUDA graph capture failed: eager timing"
    return result


def time_cpu(fn, iters: int = 2, graph: bool = False) -> dict:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"ms": round(statistics.median(times), 4), "launched_ms": None}


class Report:
    def __init__(self, out_dir: Path, args, device: torch.device):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "attention_fp8_micro.json"
        interpreter = os.environ.get("TRITON_INTERPRET") == "1"
        self.data = {"environment": {**environment(torch, device), "interpreter": interpreter},
                     "args": {k: str(v) for k, v in vars(args).items()},
                     "timing": "ms: CUDA graph of 10 calls replayed 20x, median / 10 (no launch cost); launched_ms: "
                               "eager, CUDA events, median of 20; SDPA rows take transposed views, no copies",
                     "default_config": {str(d): ak.choose_config(d).label() for d in ak.HEAD_DIMS},
                     "rows": [], "best": {}, "stopped_at_deadline": False}
        self.write()

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.write()
        if "error" in row:
            print(f"{row['shape']:7s} {row['kernel']:20s} {row.get('config', ''):28s} ERROR {row['error'][:150]}")
        else:
            ms, tflops, err = row.get("ms"), row.get("tflops"), row.get("rel_error")
            print(f"{row['shape']:7s} {row['kernel']:20s} {row.get('config', ''):28s} {ms!s:>9} ms "
                  f"{tflops!s:>7} TFLOP/s  rel_err {err!s:8}  launched {row.get('launched_ms')!s} ms")
        sys.stdout.flush()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def run_shape(report: Report, name: str, shape, device, deadline: float, tiny: bool, top_configs: list | None,
              only_compiled: bool = False):
    """All rows of one shape; returns the FP8 configs sorted by time (for the next shape's shorter sweep)."""
    batch, seq, heads, dim = shape
    flops = 4 * batch * heads * seq * seq * dim
    cuda = device.type == "cuda"
    timer = time_gpu if cuda else time_cpu
    generator = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, dim, generator=generator).to(device, torch.bfloat16) for _ in range(3))
    q, k = F.rms_norm(q, (dim,)), F.rms_norm(k, (dim,))
    reference = reference_attention(q, k, v)
    (q8, dq), (k8, dk), (v8, dv) = quantize(q), quantize(k), quantize(v)
    v8t = ak.transpose_v(v8)
    attn_scale = 1.0 / math.sqrt(dim)

    def measure(kernel: str, fn, config: str = "", bhsd: bool = False, graph: bool = True, **extra) -> dict | None:
        if time.monotonic() > deadline:
            report.data["stopped_at_deadline"] = True
            report.write()
            return None
        row = {"shape": name, "dims_bshd": list(shape), "kernel": kernel, "config": config, **extra}
        try:
            start = time.monotonic()
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            row["first_call_s"] = round(time.monotonic() - start, 2)
            if kernel not in NOT_ATTENTION:
                out = out.transpose(1, 2).float() if bhsd else out.float()
                row["rel_error"] = round(relative_error(out, reference), 5)
            del out
            row.update(timer(fn, graph=graph))
            if kernel not in NOT_ATTENTION and row.get("ms"):
                row["tflops"] = round(flops / row["ms"] / 1e9, 1)
        except Exception as error:  # noqa: BLE001 - one failing kernel or config must not stop the sweep
            row["error"] = error_summary(error, 300)
        report.add(row)
        return row

    views = [t.transpose(1, 2) for t in (q, k, v)]  # (B, H, S, D) views of the (B, S, H, D) tensors
    def sdpa():
        return F.scaled_dot_product_attention(*views)

    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def under(backend):
            def fn():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(*views)
            return fn

        measure("cudnn_bf16", under(SDPBackend.CUDNN_ATTENTION), bhsd=True)
        if not only_compiled:
            measure("flash_bf16", under(SDPBackend.FLASH_ATTENTION), bhsd=True)
    if not only_compiled:
        measure("sdpa_auto_bf16", sdpa, bhsd=True)

    def fp8(config: ak.Config, transposed: bool):
        values = v8t if transposed else v8
        return lambda: ak.flash_attention_fp8(q8, k8, values, dq, dk, dv, attn_scale, config=config,
                                              v_transposed=transposed)

    if not ak.available():
        report.add({"shape": name, "kernel": "triton_fp8", "error": "triton is not installed"})
        return []
    if cuda:  # the kernel as the model's compiled blocks call it: from inductor's code, dynamic shapes
        compiled = torch.compile(lambda a, b, c: ak.flash_attention_fp8(a, b, c, dq, dk, dv, attn_scale,
                                                                        v_transposed=True), dynamic=True)
        measure("triton_fp8_in_compile", lambda: compiled(q8, k8, v8t), ak.choose_config(dim).label(),
                v_layout="bhds", default=True)
    if only_compiled:
        measure("triton_fp8", fp8(ak.choose_config(dim), True), ak.choose_config(dim).label(), v_layout="bhds",
                default=True)
        shuffled = ak.choose_config(dim)._replace(key_order=False)
        measure("triton_fp8", fp8(shuffled, True), shuffled.label(), v_layout="bhds")
    if cuda and seq > CONTEXT_TOKENS:  # preparing q/k/v from the fused projections: our kernel vs inductor's
        qkv = torch.randn(batch, seq - CONTEXT_TOKENS, 3 * heads * dim, generator=generator).to(device, torch.bfloat16)
        context = torch.randn(batch, CONTEXT_TOKENS, 3 * heads * dim, generator=generator).to(device, torch.bfloat16)
        norms = [torch.nn.RMSNorm(dim, eps=1e-6, device=device, dtype=torch.bfloat16) for _ in range(4)]
        scales = torch.tensor([20.0, 25.0], device=device)
        prepared = torch.compile(lambda a, b: ak.quantize_qkv_reference(a, b, norms, heads, scales), dynamic=True)
        measure("qkv_prepare_kernel", lambda: ak.quantize_qkv(qkv, context, norms, heads, scales), "norms + cat + E4M3")
        measure("qkv_prepare_inductor", lambda: prepared(qkv, context), "torch.compile of the same arithmetic")
    if only_compiled:
        return []
    configs = list(TINY_CONFIGS) if tiny else [ak.choose_config(dim)] + [c for c in ak.CONFIGS
                                                                         if c != ak.choose_config(dim)]
    if top_configs:
        configs = [ak.choose_config(dim)] + [c for c in top_configs if c != ak.choose_config(dim)]
    timed = []
    for config in configs:
        row = measure("triton_fp8", fp8(config, True), config.label(), v_layout="bhds",
                      default=config == ak.choose_config(dim))
        if row is not None and "error" not in row and row.get("ms"):
            timed.append((row["ms"], config))
    timed.sort(key=lambda item: item[0])
    if timed:
        best = timed[0][1]
        measure("triton_fp8", fp8(best, False), best.label(), v_layout="bshd")
        variants = [best._replace(key_order=False)] + ([] if tiny else [best._replace(promote_acc=not best.promote_acc)])
        for variant in variants:  # P crossing threads to reach the second dot; the other accumulation
            measure("triton_fp8", fp8(variant, True), variant.label(), v_layout="bhds")
        fp8_rows = [r for r in report.data["rows"] if r["shape"] == name and r["kernel"] == "triton_fp8"
                    and r.get("ms") and "error" not in r]
        fastest = min(fp8_rows, key=lambda r: r["ms"])
        baseline = next((r for r in report.data["rows"] if r["shape"] == name and r["kernel"] == "cudnn_bf16"
                         and r.get("ms")), None)
        report.data["best"][name] = {"config": fastest["config"], "v_layout": fastest["v_layout"],
                                     "ms": fastest["ms"], "tflops": fastest.get("tflops"),
                                     "rel_error": fastest.get("rel_error"),
                                     "speedup_vs_cudnn_bf16": round(baseline["ms"] / fastest["ms"], 3)
                                     if baseline else None}
        report.write()
    if cuda:
        from sd35fp8.attention import cudnn_fp8_available

        why_not = cudnn_fp8_available()
        if why_not is None:
            scale_o = (1.0 / dv) * 0.5

            def cudnn_fp8():
                return torch.ops.sd35fp8.sdpa_fp8(q8, k8, v8, dq, dk, dv, scale_o, attn_scale, "cudnn")

            row = measure("cudnn_fp8_frontend", cudnn_fp8, "fp8 output, eager", graph=False)
            if row is not None and "rel_error" in row:  # its output is E4M3 scaled by scale_o: redo the error
                row["rel_error"] = round(relative_error(cudnn_fp8().float() / scale_o, reference), 5)
                report.write()
        else:
            report.add({"shape": name, "kernel": "cudnn_fp8_frontend", "error": f"skipped: {why_not}"})
        measure("v_transpose", lambda: ak.transpose_v(v8))
    return [config for _, config in timed]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline-s", type=float, default=150.0, help="start no measurement after this")
    parser.add_argument("--shapes", default="large,medium")
    parser.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke test under TRITON_INTERPRET=1)")
    parser.add_argument("--top", type=int, default=3, help="configs of the first shape's sweep re-run on the others")
    parser.add_argument("--only-compiled", action="store_true",
                        help="just cuDNN bf16 and the default kernel, eager and inside torch.compile (a short check)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.deadline_s
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        ak.patch_interpreter_for_numpy2()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference
        torch.backends.cudnn.allow_tf32 = False
    report = Report(args.out, args, device)
    shapes = TINY_SHAPES if args.tiny else {n: SHAPES[n] for n in args.shapes.split(",") if n}
    top = None
    for name, shape in shapes.items():
        if time.monotonic() > deadline:
            report.data["stopped_at_deadline"] = True
            report.write()
            break
        ranked = run_shape(report, name, shape, device, deadline, args.tiny, top, args.only_compiled)
        if top is None and ranked:
            top = ranked[:args.top]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(report.data["best"], indent=1))
    print(f"wrote {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
