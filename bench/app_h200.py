"""The app's default configuration end to end on a GPU, through `space/` (issues 10, 11): what a user of
`python app.py --model <fp8 repo>` gets, with full-size SD3.5 components and RANDOM weights (bench/h200.py builds
them in memory; no checkpoint exists here).

Loads the FP8 pipeline and the 16-bit reference the way `space.runtime.Models.load` does (compile "auto": regional
torch.compile, CUDA graphs, and on Hopper the FP8 attention), then drives `space.replicas.Replicas`, what the page's
handlers call (`space.handlers` itself needs gradio, which the GPU image lacks): generate in each precision (first call
= compile + warm-up + capture), the comparison, a second image size and back. One JSON row per call, written as it
goes: latency, s/step, peak and reserved memory, the CUDA graphs held, image checks and the FP8-vs-16-bit SSIM.

    python3 -m bench.app_h200 --out $OUT --model large
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

PROMPT = "a photo of an astronaut riding a horse on the moon"
# (what, precision, width, height): the order a visitor's first minutes could take
CALLS = [("generate", "fp8", 1024, 1024), ("generate", "fp8", 1024, 1024), ("generate", "bf16", 1024, 1024),
         ("generate", "bf16", 1024, 1024), ("compare", None, 1024, 1024), ("generate", "fp8", 832, 1216),
         ("generate", "fp8", 832, 1216), ("generate", "fp8", 1024, 1024), ("compare", None, 832, 1216)]


def graphs_held(loaded) -> int | None:
    from sd35fp8.compile import CudaGraphTransformer

    wrapper = CudaGraphTransformer.installed(loaded.pipe.transformer)
    return None if wrapper is None else len(wrapper.graphs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="large", choices=["large", "medium", "tiny"])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--deadline-s", type=float, default=480, help="skip the remaining calls after this")
    args = parser.parse_args(argv)
    import torch

    from bench.h200 import build_components
    from diffusers import StableDiffusion3Pipeline
    from sd35fp8 import metrics
    from sd35fp8.gpu import GpuSampler
    from sd35fp8.loading import load_pipeline, with_transformer
    from sd35fp8.request import GenerationRequest
    from space.replicas import Replica, Replicas
    from space.runtime import Models

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"model": args.model, "weights": "RANDOM", "steps": args.steps, "gpu": torch.cuda.get_device_name()
              if device.type == "cuda" else "cpu", "torch": torch.__version__, "calls": []}

    def save():
        (out / "app_h200.json").write_text(json.dumps(report, indent=1, default=str))

    parts = build_components(torch, args.model, device)
    bf16_transformer = copy.deepcopy(parts["transformer"])
    report["build_s"] = round(time.perf_counter() - started, 1)
    loading = time.perf_counter()
    fp8 = load_pipeline(StableDiffusion3Pipeline(**parts), "fp8", device=device, compile="auto")
    reference = with_transformer(fp8, bf16_transformer, "bf16", source="random bf16", compile="auto")
    models = Models(fp8, reference, base="random bf16", base_note="the same random weights in bf16")
    report["load_s"] = round(time.perf_counter() - loading, 1)
    report["summary"] = models.summary_lines()
    save()
    print("\n".join(report["summary"]), flush=True)
    replicas = Replicas([Replica(models, GpuSampler(device.index or 0))])

    def figures(result) -> dict:
        return {"precision": result.precision, "latency_s": round(result.latency_s, 3), "s_per_step":
                round(result.seconds_per_step, 4), "encode_s": result.encode_s, "ok": result.ok,
                "peak_vram_gb": round((result.peak_vram_bytes or 0) / 1e9, 2), "warnings": result.warnings}

    for what, precision, width, height in CALLS:
        if time.perf_counter() - started > args.deadline_s:
            report["calls"].append({"what": what, "skipped": "deadline"})
            break
        request = GenerationRequest(prompt=PROMPT, seed=42, steps=args.steps, guidance=4.5, width=width,
                                    height=height)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        row = {"what": what, "precision": precision, "width": width, "height": height}
        try:
            if what == "generate":
                row["result"] = figures(replicas.run(precision, request))
            else:
                fp8_result, ref_result = replicas.run_pair(request)
                row["results"] = [figures(fp8_result), figures(ref_result)]
                row["ssim"] = round(metrics.ssim(fp8_result.image, ref_result.image), 4)
                row["psnr_db"] = round(metrics.psnr(fp8_result.image, ref_result.image), 2)
        except Exception as error:  # record it and go on: the point is to see what a visitor would see
            row["error"] = f"{type(error).__name__}: {error}"
        row["seconds"] = round(time.perf_counter() - began, 2)
        if device.type == "cuda":
            row["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            row["reserved_gb"] = round(torch.cuda.memory_reserved() / 1e9, 2)
        row["graphs_held"] = {"fp8": graphs_held(fp8), "bf16": graphs_held(reference)}
        report["calls"].append(row)
        save()
        print(f"{what:<8} {precision or 'both':<5} {width}x{height}: {row['seconds']} s {row.get('error', '')}",
              flush=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
