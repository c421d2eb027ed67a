"""Multi-GPU serving benchmark (issue 13): images per minute for 1 and 2 replicas under concurrent clients, and the
FP16-vs-FP8 comparison's latency on 1 vs 2 GPUs. Full-size SD3.5 Large with RANDOM weights.

Each replica is what `python app.py --devices cuda:0,cuda:1` serves: a `space.runtime.Models` (the FP8 pipeline from
`load_pipeline` plus a 16-bit reference sharing its text encoders and VAE) in a `space.replicas.Replicas` pool; the
clients are threads calling the pool, as the queue's workers do (one job per replica at a time).

    python -m bench.multi_gpu --out /tmp/multi --deadline-s 540          # on a 2-GPU machine
    python -m bench.multi_gpu --tiny --out /tmp/multi-tiny               # CPU dry run: two CPU replicas, tiny model

Writes `gpu_multi.json` under --out (one row per measurement, as it goes).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

from bench.runner import RANDOM_WEIGHTS_NOTE, Deadline, Rows, environment, log, rounded

PROMPT = "a photo of an astronaut riding a horse on the moon"


def build_replica(torch, model: str, device, compile_option):
    """One replica on `device`: FP8 pipeline + 16-bit reference transformer, random weights, through the loader."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from bench.h200 import build_components, component_configs
    from sd35fp8.gpu import GpuSampler
    from sd35fp8.loading import load_pipeline, with_transformer
    from space.replicas import Replica
    from space.runtime import Models

    parts = build_components(torch, model, device)
    if model == "tiny":
        reference = SD3Transformer2DModel.from_config(parts["transformer"].config).to(device, torch.bfloat16)
        reference.load_state_dict(parts["transformer"].state_dict())
    else:
        torch.manual_seed(0)  # the same random transformer as build_components made first
        with torch.device(device):
            reference = SD3Transformer2DModel.from_config(component_configs(model)["transformer"]).to(torch.bfloat16)
    reference.eval().requires_grad_(False)
    fp8 = load_pipeline(StableDiffusion3Pipeline(**parts), "fp8", device=device, compile=compile_option)
    ref = with_transformer(fp8, reference, "bf16", source="random 16-bit", compile=compile_option)
    models = Models(fp8, ref, base="random 16-bit", base_note="random weights of the same shapes")
    sampler = GpuSampler(index=device.index or 0) if device.type == "cuda" else GpuSampler()
    return Replica(models, sampler)


def throughput(pool, request, clients: int, images: int) -> dict:
    """`clients` threads take images from a shared count until `images` are made; images per minute of wall time."""
    left, lock, errors = [images], threading.Lock(), []

    def client():
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            try:
                pool.run("fp8", request)
            except Exception as error:  # noqa: BLE001 - recorded in the row
                errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": rounded(seconds), "images_per_min": rounded(images * 60 / seconds, 2),
            "errors": errors[:3]}


def main(argv=None) -> int:
    import torch

    from sd35fp8.request import GenerationRequest
    from space.replicas import Replicas

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="two CPU replicas of the tiny model (a dry run)")
    parser.add_argument("--deadline-s", type=float, default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--images", type=int, default=16, help="images per throughput measurement")
    parser.add_argument("--compile", default="auto", help="load_pipeline's compile option (the app's default: auto)")
    args = parser.parse_args(argv)
    deadline = Deadline(args.deadline_s)
    model = "tiny" if args.tiny else "large"
    devices = [torch.device("cpu")] * 2 if args.tiny else [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if len(devices) < 2:
        raise SystemExit(f"needs two GPUs, found {len(devices)}")
    size, steps = (64, 4) if args.tiny else (1024, 28)
    request = GenerationRequest(PROMPT, seed=42, steps=steps, guidance=4.5, width=size, height=size)
    env = environment(torch, devices[0])
    rows = Rows(args.out / "gpu_multi.json", {
        "model": f"sd3.5-{model}", "weights": RANDOM_WEIGHTS_NOTE, "size": size, "steps": steps,
        "gpu": env.get("gpu_name", str(devices[0])), "compile": args.compile, "environment": env})
    replicas = []
    for device in devices[:2]:
        log(f"building a replica on {device} ({deadline.left():.0f} s left)")
        replicas.append(build_replica(torch, model, device, args.compile))
        replicas[-1].models.run("fp8", request)  # warm-up (compiles where compile is on)
        replicas[-1].models.run("bf16", request)
    for count in (1, 2):
        pool = Replicas(replicas[:count])
        log(f"{count} replica(s): throughput with {args.clients} clients ({deadline.left():.0f} s left)")
        row = {"replicas": count, "clients": args.clients, **throughput(pool, request, args.clients, args.images)}
        latencies = []
        for _ in range(2):
            started = time.perf_counter()
            pool.run_pair(request)
            latencies.append(time.perf_counter() - started)
        row["compare_latency_s"] = rounded(statistics.median(latencies))
        log(f"  {row['images_per_min']} images/min, comparison {row['compare_latency_s']} s")
        rows.add(row)
    one, two = rows.rows
    summary = {"summary": True, "throughput_ratio": rounded(two["images_per_min"] / one["images_per_min"], 3),
               "compare_latency_ratio": rounded(two["compare_latency_s"] / one["compare_latency_s"], 3),
               "targets": {"throughput_ratio": ">= 1.9", "compare_latency_ratio": "<= 0.6"}}
    rows.add(summary)
    log(f"2 vs 1 replicas: {summary['throughput_ratio']}x images/min, comparison {summary['compare_latency_ratio']}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
