"""Caption accuracy of the shipped tiny-shapes model, 16-bit vs FP8, on held-out captions.

    python -m bench.eval_shapes [--count 200] [--seeds 1] [--paths dequant,quanto,scaled_mm] [--device auto]

1. converts the model with `python -m convert` (on the CPU) into a temporary folder (the FP8 variant users would
   publish);
2. renders each held-out caption (`shapes.data.eval_specs`: unseen colour/shape pairs and unseen two-object
   captions, never trained on) with the 16-bit model and with the FP8 variant on each FP8 compute path, all
   through `sd35fp8.loading.load_pipeline` and `sd35fp8.generate.generate`, same seed(s) per caption (`--seeds N`
   renders each caption with N seeds: the FP8-minus-16-bit difference then comes with a smaller standard error);
3. scores every image with the analytic detector (`shapes.detector.score`) and compares FP8 with 16-bit
   images (SSIM, PSNR from `sd35fp8.metrics`);
4. scores the model's VAE reconstructions of the rendered captions the same way (`vae_reconstruction_ceiling` in
   the run's metadata: the accuracy the transformer could at most reach through this VAE).

Writes one row per (device, configuration) into `bench/results/tiny_shapes_eval.json` (rows for other devices,
e.g. a GPU run that adds `scaled_mm`, are kept) and a grid of prompts -> 16-bit / FP8 images to
`docs/tiny-shapes-grid.png`. `scaled_mm` needs a GPU with FP8 tensor cores (compute capability >= 8.9);
elsewhere its row says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]

from sd35fp8.fp8 import FP8_PATHS, fp8_tensor_cores_available
from sd35fp8.generate import GenerationRequest, generate
from sd35fp8.loading import load_pipeline
from sd35fp8.metrics import psnr, ssim
from sd35fp8.tiny import SHAPES_GUIDANCE, SHAPES_STEPS
from shapes.data import Spec, eval_specs
from shapes.detector import score
from shapes.train import total, training_runs

MODEL = ROOT / "sd35fp8" / "models" / "tiny-shapes"
RESULTS = ROOT / "bench" / "results" / "tiny_shapes_eval.json"
GRID = ROOT / "docs" / "tiny-shapes-grid.png"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTRIBUTES = ("background", "count", "colours", "shapes", "size", "position")


def convert(model: Path, out: Path, device: str) -> None:
    command = [sys.executable, "-m", "convert", str(model), "--out", str(out), "--verify-size", "128",
               "--verify-steps", "4", "--device", device]
    subprocess.run(command, check=True, cwd=ROOT)


def group_of(spec: Spec) -> str:
    if len(spec.objects) == 2:
        return "two objects (unseen captions)"
    return "one object (unseen colour/shape pairs)"


def seed_of(index: int, count: int) -> int:
    """The seed of image `index` (caption index % count, round index // count): round 0 uses the caption's index."""
    return index % count + 1000 * (index // count)


def render_all(loaded, specs: list[Spec], settings: dict, label: str) -> tuple[list[Image.Image], list[float]]:
    """One image per entry of `specs` (a caption may appear once per seed round)."""
    images, latencies = [], []
    started = time.perf_counter()
    count = len({id(spec) for spec in specs})
    for index, spec in enumerate(specs):
        result = generate(loaded, GenerationRequest(spec.caption, seed=seed_of(index, count), **settings))
        if not result.finite:
            raise RuntimeError(f"{label}: non-finite image for {spec.caption!r}")
        images.append(result.image)
        latencies.append(result.latency_s)
        if (index + 1) % 20 == 0 or index + 1 == len(specs):
            print(f"  {label}: {index + 1}/{len(specs)} ({time.perf_counter() - started:.0f} s)", flush=True)
    return images, latencies


def accuracy_row(specs: list[Spec], images: list[Image.Image], latencies: list[float]) -> dict:
    scores = [score(spec, image) for spec, image in zip(specs, images)]
    groups: dict[str, list[bool]] = {}
    for spec, result in zip(specs, scores):
        groups.setdefault(group_of(spec), []).append(result["correct"])
    return {
        "caption_accuracy": round(100 * sum(r["correct"] for r in scores) / len(scores), 2),
        "accuracy_by_group": {g: round(100 * sum(v) / len(v), 2) for g, v in groups.items()},
        "attribute_accuracy": {a: round(100 * sum(r[a] for r in scores) / len(scores), 2) for a in ATTRIBUTES},
        "median_latency_s": round(statistics.median(latencies), 3),
        "correct": [r["correct"] for r in scores],
    }


def paired_standard_error(fp8: list[bool], base: list[bool]) -> float:
    """Standard error, in points, of the FP8-minus-16-bit accuracy, from the per-image differences (same caption
    and seed in both): the images where both agree contribute no variance."""
    diffs = [int(a) - int(b) for a, b in zip(fp8, base)]
    return round(100 * statistics.pstdev(diffs) / len(diffs) ** 0.5, 2)


def grid(specs: list[Spec], columns: dict[str, list[Image.Image]], correct: dict[str, list[bool]],
         picks: list[int], path: Path, cell: int = 160) -> None:
    """Rows of prompt | image per column, each image marked with the detector's verdict."""
    label_w, pad = 330, 8
    width = label_w + len(columns) * (cell + pad) + pad
    height = 30 + len(picks) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((label_w + pad + j * (cell + pad), 8), name, fill="black")
    for i, index in enumerate(picks):
        y = 30 + i * (cell + pad)
        words, lines, line = specs[index].caption.split(), [], ""
        for word in words:
            if len(line) + len(word) > 42:
                lines.append(line)
                line = ""
            line = f"{line} {word}".strip()
        lines.append(line)
        for k, text in enumerate(lines):
            draw.text((pad, y + cell // 2 - 8 * len(lines) + 16 * k), text, fill="black")
        for j, name in enumerate(columns):
            x = label_w + pad + j * (cell + pad)
            canvas.paste(columns[name][index].resize((cell, cell), Image.NEAREST), (x, y))
            ok = correct[name][index]
            draw.rectangle([x, y, x + 18, y + 14], fill=(30, 140, 60) if ok else (200, 40, 40))
            draw.text((x + 4, y + 1), "ok" if ok else "x", fill="white")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def pick_for_grid(specs: list[Spec], count: int = 8) -> list[int]:
    """A varied handful: plain, small, large, positioned single objects, then two-object captions."""
    wanted = [lambda s: len(s.objects) == 1 and not s.size and not s.position,
              lambda s: s.size == "small", lambda s: s.size == "large", lambda s: s.position in ("left", "right"),
              lambda s: s.position in ("top", "bottom")] + [lambda s: len(s.objects) == 2] * 3
    picks: list[int] = []
    for test in wanted[:count]:
        index = next((i for i, s in enumerate(specs) if test(s) and i not in picks), None)
        if index is not None:
            picks.append(index)
    return picks


def model_identity(folder: Path) -> dict:
    """Which model was evaluated: its folder and how long it was trained, so rows of a model trained further later
    can be told from the earlier model's."""
    log = folder / "training_log.json"
    runs = training_runs(json.loads(log.read_text())) if log.is_file() else []
    folder = folder.resolve()
    name = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    return {"model": str(name), "model_transformer_iterations": total(runs)}


@torch.no_grad()
def vae_ceiling(folder: Path, specs: list[Spec], size: int, seed: int = 7) -> dict:
    """The detector's accuracy on the model's own VAE reconstructions of rendered ground truth (each caption laid out
    once): the most the transformer could reach through this VAE. Tells a blurry VAE from an unsure transformer."""
    from diffusers import AutoencoderKL

    from shapes import data

    rng = random.Random(seed)
    images = data.render([data.layout(spec, rng) for spec in specs], size) * 2 - 1
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32).eval()
    recon = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in images.split(50)])
    scores = [score(spec, image) for spec, image in zip(specs, data.to_uint8((recon + 1) / 2))]
    return {"caption_accuracy": round(100 * sum(r["correct"] for r in scores) / len(scores), 2),
            "shapes": round(100 * sum(r["shapes"] for r in scores) / len(scores), 2),
            "mean_abs_error": round(float((recon.clamp(-1, 1) - images).abs().mean()) / 2, 5)}


def merge_rows(path: Path, rows: list[dict], meta: dict) -> dict:
    previous = json.loads(path.read_text()) if path.exists() else {}
    kept = [r for r in previous.get("rows", []) if r.get("device") != meta["device"]]
    runs = {k: v for k, v in previous.get("runs", {}).items() if k != meta["device"]}
    runs[meta["device"]] = meta
    document = {
        "what": "caption accuracy (analytic detector) of sd35fp8/models/tiny-shapes on held-out captions, 16-bit vs FP8 "
                "(converted with `python -m convert`, loaded with sd35fp8.loading.load_pipeline); SSIM/PSNR of each FP8 "
                "image against the 16-bit image of the same caption and seed; written by python -m bench.eval_shapes",
        "runs": runs,
        "rows": kept + rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--fp8-dir", type=Path, help="an FP8 variant already converted from --model (skips converting)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=1, help="images per caption, each with its own seed")
    parser.add_argument("--steps", type=int, default=SHAPES_STEPS)
    parser.add_argument("--guidance", type=float, default=SHAPES_GUIDANCE)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="compute dtype of both (the app's: bf16)")
    parser.add_argument("--paths", default="dequant,quanto,scaled_mm",
                        help=f"FP8 compute paths to run, comma-separated, from {', '.join(FP8_PATHS)} (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="on CUDA, replay each denoising step as a CUDA graph (the same kernels, fewer launches: "
                        "this tiny model renders one image at a time, launch-bound)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--grid", type=Path, default=GRID)
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = DTYPES[args.dtype]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    settings = dict(steps=args.steps, guidance=args.guidance, width=args.size, height=args.size)
    captions = eval_specs(args.count)
    specs = captions * args.seeds
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    meta = {"device": device.type, "device_name": device_name, "torch": torch.__version__, "dtype": args.dtype,
            "count": len(captions), "seeds": args.seeds, **settings, "date": time.strftime("%Y-%m-%d"),
            "cuda_graphs": bool(args.cuda_graphs and device.type == "cuda"),
            **model_identity(args.model), "vae_reconstruction_ceiling": vae_ceiling(args.model, captions, args.size)}
    print(f"{len(captions)} held-out captions x {args.seeds} seed(s) on {device_name}, {args.steps} steps, guidance {args.guidance}, "
          f"{args.size}x{args.size}, {args.dtype}", flush=True)

    with tempfile.TemporaryDirectory() as work:
        fp8_dir = args.fp8_dir
        if fp8_dir is None:
            fp8_dir = Path(work) / "tiny-shapes-fp8"
            # Verified on the CPU whatever --device says (convert's --device only picks where it verifies; the files
            # are the same): on CUDA its reload moves quanto's FP8 weights to the GPU, where quanto repacks them for
            # its Marlin kernels, which first builds its CUDA extension with nvcc (the likely reason an H200 call's
            # evaluation ran out of its 96 s inside convert's transformer verification).
            convert(args.model, fp8_dir, "cpu")
        speed = {"cuda_graphs": True} if args.cuda_graphs else {}
        base = load_pipeline(str(args.model), args.dtype if args.dtype != "fp32" else "fp16", device=device, dtype=dtype,
                             **speed)
        base_images, base_latency = render_all(base, specs, settings, "16-bit")
        del base
        base_row = accuracy_row(specs, base_images, base_latency)
        rows = [{"device": device.type, "precision": f"16-bit ({args.dtype})", "fp8_path": None,
                 **{k: v for k, v in base_row.items() if k != "correct"}}]
        columns, correct = {"16-bit": base_images}, {"16-bit": base_row["correct"]}
        for path in paths:
            if path == "scaled_mm" and not fp8_tensor_cores_available(device):
                rows.append({"device": device.type, "precision": "fp8", "fp8_path": path,
                             "skipped": "needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)"})
                continue
            loaded = load_pipeline(str(fp8_dir), "fp8", device=device, dtype=dtype, fp8_path=path, **speed)
            images, latency = render_all(loaded, specs, settings, f"FP8 {path}")
            del loaded
            row = accuracy_row(specs, images, latency)
            ssims = [ssim(a, b) for a, b in zip(images, base_images)]
            psnrs = [psnr(a, b) for a, b in zip(images, base_images)]
            finite_psnr = [p for p in psnrs if p != float("inf")]
            rows.append({
                "device": device.type, "precision": "fp8", "fp8_path": path,
                **{k: v for k, v in row.items() if k != "correct"},
                "accuracy_minus_16bit_points": round(row["caption_accuracy"] - base_row["caption_accuracy"], 2),
                "difference_standard_error_points": paired_standard_error(row["correct"], base_row["correct"]),
                "same_verdict_as_16bit": round(100 * sum(a == b for a, b in zip(row["correct"], base_row["correct"])) / len(specs), 2),
                "ssim_vs_16bit": {"mean": round(statistics.mean(ssims), 4), "min": round(min(ssims), 4)},
                "psnr_vs_16bit_db": {"mean": round(statistics.mean(finite_psnr), 2) if finite_psnr else None,
                                     "min": round(min(psnrs), 2), "identical_images": len(psnrs) - len(finite_psnr)},
            })
            columns[f"FP8 ({path})"], correct[f"FP8 ({path})"] = images, row["correct"]
    document = merge_rows(args.out, rows, meta)
    if args.grid:
        shown = {name: columns[name] for name in list(columns)[:3]}
        grid(specs, shown, correct, pick_for_grid(specs), args.grid)
    print(f"\n{'configuration':<40}{'accuracy':>10}{'SSIM':>8}{'PSNR':>8}{'s/image':>9}")
    for row in rows:
        name = row["precision"] if row["fp8_path"] is None else f"FP8 {row['fp8_path']}"
        if "skipped" in row:
            print(f"{name:<40}  skipped: {row['skipped']}")
            continue
        s = row.get("ssim_vs_16bit", {}).get("mean", "")
        p = row.get("psnr_vs_16bit_db", {}).get("mean", "")
        print(f"{name:<40}{row['caption_accuracy']:>9.1f}%{s:>8}{p:>8}{row['median_latency_s']:>9.2f}")
    print(f"wrote {args.out}" + (f" and {args.grid}" if args.grid else ""))
    return 0 if document else 1


if __name__ == "__main__":
    sys.exit(main())
