"""Plot the H200 results (gpu_h200_speed.json + gpu_h200_everywhere.json): end-to-end latency and peak VRAM per
configuration -> docs/bench-latency-vram.png.

Usage: python -m bench.plot [--results bench/results] [--out docs/bench-latency-vram.png] (needs matplotlib)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("gpu_h200_speed.json", "gpu_h200_everywhere.json")
TITLES = {"large": "SD3.5 Large", "medium": "SD3.5 Medium"}


def load_rows(results: Path, run_contains: dict[str, str] | None = None) -> list[tuple[str, list[dict]]]:
    """Measured rows per model, each model's from one run (the first whose `run` contains `run_contains[model]`, or
    `run_contains["*"]`; default the run of its first row: rows of other runs are not drawn), each configuration once
    (the first file that has it)."""
    by_model: dict[str, dict[str, dict]] = {}
    runs: dict[str, str | None] = {}
    run_contains = run_contains or {}
    for name in FILES:
        path = results / name
        if not path.is_file():
            continue
        for row in json.loads(path.read_text()):
            wanted = run_contains.get(row["model"], run_contains.get("*"))
            if wanted is not None and wanted not in (row.get("run") or ""):
                continue
            run = runs.setdefault(row["model"], row.get("run"))
            if row.get("latency_s") is not None and row.get("run") == run:
                by_model.setdefault(row["model"], {}).setdefault(row["config"], row)
    return [(TITLES.get(model, model), list(rows.values())) for model, rows in by_model.items()]


def plot(results: Path, out: Path, run_contains: dict[str, str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = load_rows(results, run_contains)
    if not groups:
        raise SystemExit(f"no measured rows in {', '.join(FILES)} under {results}")
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.6 * len(groups)), squeeze=False)
    for (title, rows), (ax_lat, ax_mem) in zip(groups, axes):
        names = [r["config"].split(" (")[0] for r in rows]
        colors = ["#c44e52" if r["precision"] == "fp8" else "#4c72b0" for r in rows]
        latency = [r["latency_s"] for r in rows]
        bars = ax_lat.barh(names, latency, color=colors)
        ax_lat.bar_label(bars, labels=[f"{v:.2f} s" for v in latency], padding=3, fontsize=8)
        ax_lat.set_xlabel("end-to-end latency, 1024², 28 steps, CFG (s)")
        ax_lat.set_title(f"{title}: latency (lower is better)")
        ax_lat.invert_yaxis()
        ax_lat.set_xlim(0, max(latency) * 1.25)
        peak = [r.get("peak_vram_gb") or 0 for r in rows]
        bars = ax_mem.barh(names, peak, color=colors, alpha=0.8)
        ax_mem.bar_label(bars, labels=[f"{p:.1f} GB" if p else "not recorded" for p in peak], padding=3, fontsize=8)
        ax_mem.axvline(16, color="gray", linestyle="--", linewidth=1)
        ax_mem.text(16, 0.02, " 16 GB target", color="gray", fontsize=8, va="bottom",
                    transform=ax_mem.get_xaxis_transform())
        ax_mem.set_xlabel("peak GPU memory during generation (GB)")
        ax_mem.set_title(f"{title}: memory")
        ax_mem.invert_yaxis()
        ax_mem.set_xlim(0, max(peak + [16]) * 1.35)
    gpu = groups[0][1][0].get("gpu", "GPU")
    fig.suptitle(f"{gpu}, each model from one process — RANDOM weights (speed/memory only; blue bf16, red FP8)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-latency-vram.png")
    parser.add_argument("--run", action="append", default=[],
                        help="draw the rows whose `run` contains this, e.g. 'session 6, call 5', or MODEL=TEXT for "
                             "one model (repeatable; default: each model's first run in the files)")
    args = parser.parse_args(argv)
    runs = dict(("*", text) if "=" not in text else tuple(text.split("=", 1)) for text in args.run)
    print(plot(args.results, args.out, runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
