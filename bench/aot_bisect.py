"""Which piece makes an AOTInductor package of an SD3 block crash when it loads? (issue 11)

On the H200 a package of a Large FP8 block built fine and then segfaulted in `torch._inductor.aoti_load_package`
(bench/NOTES.md). This builds a small SD3 transformer with Large's block structure (head_dim 64, a normal block and
the last, context-free one; RANDOM weights) and, for each variant below, in its own process (a segfault takes only
that process): applies the speed pieces, builds the packages of one block kind (or both), loads them, runs the
transformer through them and compares it with the same transformer run eagerly. One JSON row per variant, written as
each finishes, with the exit code (-11 is a segfault) and the last lines of its output.

    python3 -m bench.aot_bisect --out $OUT --device cuda --jobs 6
    python3 -m bench.aot_bisect --out /tmp/bisect --device cpu --only bf16_plain   # the plumbing, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

NO_PIECES = dict(fuse_projections=False, fuse_gelu=False, fuse_norm=False, attention="sdpa")
DEFAULT_PIECES = dict(fuse_projections=True, fuse_gelu=True, fuse_norm=True, attention="sdpa")
SPACES_CONFIGS = {"always_keep_tensor_constants": True, "joint_graph_constant_folding": False}
# name: (precision, speed pieces, how it is compiled, extra inductor configs)
VARIANTS = {
    "bf16_plain": ("bf16", NO_PIECES, "ours", {}),
    "fp8_plain": ("fp8", NO_PIECES, "ours", {}),
    "fp8_fused_projections": ("fp8", {**NO_PIECES, "fuse_projections": True}, "ours", {}),
    "fp8_gelu_kernel": ("fp8", {**NO_PIECES, "fuse_gelu": True}, "ours", {}),
    "fp8_norm_kernel": ("fp8", {**NO_PIECES, "fuse_norm": True}, "ours", {}),
    "fp8_default": ("fp8", DEFAULT_PIECES, "ours", {}),  # what crashed on the H200 (Large)
    "fp8_default_spaces_configs": ("fp8", DEFAULT_PIECES, "ours", SPACES_CONFIGS),
    "fp8_default_constants_in_so": ("fp8", DEFAULT_PIECES, "ours", {"aot_inductor.package_constants_in_so": True}),
    "fp8_fp8_attention": ("fp8", {**DEFAULT_PIECES, "attention": "fp8_triton"}, "ours", {}),
    "spaces_bf16": ("bf16", NO_PIECES, "spaces", {}),
    "spaces_fp8_default": ("fp8", DEFAULT_PIECES, "spaces", {}),
}
IMAGE = 1024  # px: 4096 image tokens, as at SD3.5's 1024²
CONTEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens


class _BlockPipe:
    """Stands in for a pipeline where `sd35fp8.zerogpu.zerogpu_compile` runs one step: calls the transformer."""

    def __init__(self, transformer, inputs):
        self.transformer, self.inputs = transformer, inputs

    def __call__(self, **_ignored):
        return self.transformer(**self.inputs)


class _Loaded:
    def __init__(self, pipe):
        self.pipe, self.pieces = pipe, {}


def build(torch, device, seed: int = 0):
    """A 2-block SD3 transformer with Large's block layout at a small width (4 heads of 64), bf16, random weights."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=IMAGE // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=128,
        pos_embed_max_size=192, qk_norm="rms_norm")
    model = model.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)
    generator = torch.Generator("cpu").manual_seed(seed + 1)
    inputs = dict(
        hidden_states=torch.randn(2, 16, IMAGE // 8, IMAGE // 8, generator=generator),
        encoder_hidden_states=torch.randn(2, CONTEXT_TOKENS, 256, generator=generator),
        pooled_projections=torch.randn(2, 128, generator=generator),
        timestep=torch.tensor([500.0, 500.0]))
    inputs = {name: value.to(device=device, dtype=torch.bfloat16 if value.is_floating_point() else value.dtype)
              for name, value in inputs.items()}
    inputs["return_dict"] = False
    return model, inputs


def run_variant(name: str, device_name: str, work: Path, kinds: list[str] | None) -> dict:
    """Build, load and run one variant in this process; returns its row (a crash never returns)."""
    import torch

    from sd35fp8.compile import aot_compile_blocks, apply_aot_packages, block_groups
    from sd35fp8.fp8 import quantize_linears
    from sd35fp8.speed import SpeedOptions, prepare_transformer

    precision, pieces, how, configs = VARIANTS[name]
    device = torch.device(device_name)
    model, inputs = build(torch, device)
    if precision == "fp8":
        quantize_linears(model, "scaled_mm" if device.type == "cuda" else "dequant")
    with torch.no_grad():
        expected = model(**inputs)[0].float()
    row = {"variant": name, "precision": precision, "pieces": pieces, "how": how, "inductor_configs": configs}
    options = SpeedOptions(**pieces, compile=False, cuda_graphs=False).resolved(device, fp8_weights=precision == "fp8")
    row["ran"] = {key: value for key, value in prepare_transformer(model, device, options).items()
                  if key.startswith(("fused", "attention"))}
    run_once = lambda: model(**inputs)  # noqa: E731
    kinds = kinds or list(block_groups(model))
    started = time.perf_counter()
    print(f"[{name}] building packages of {kinds}", flush=True)
    if how == "spaces":
        from sd35fp8.zerogpu import zerogpu_compile

        loaded = _Loaded(_BlockPipe(model, inputs))
        row["built"] = zerogpu_compile(loaded, kinds=kinds)
        row["loaded"] = "lazily, at the first call"
    else:
        row["built"] = aot_compile_blocks(model, run_once, work / name, inductor_configs=configs, kinds=kinds)
        row["build_s"] = round(time.perf_counter() - started, 1)
        print(f"[{name}] built in {row['build_s']} s; loading", flush=True)
        loading = time.perf_counter()
        row["patched"] = apply_aot_packages(model, work / name)
        row["load_s"] = round(time.perf_counter() - loading, 2)
    print(f"[{name}] running", flush=True)
    calling = time.perf_counter()
    with torch.no_grad():
        got = model(**inputs)[0].float()
    if device.type == "cuda":
        torch.cuda.synchronize()
    row["first_call_s"] = round(time.perf_counter() - calling, 2)
    row["rel_error_vs_eager"] = float((got - expected).norm() / expected.norm())
    row["finite"] = bool(torch.isfinite(got).all())
    row["ok"] = row["finite"] and row["rel_error_vs_eager"] < 0.05
    return row


def child_main(args) -> int:
    row = run_variant(args.child, args.device, Path(args.work), args.kinds)
    Path(args.row).write_text(json.dumps(row, indent=1, default=str))
    print(f"[{args.child}] ok={row['ok']} error={row['rel_error_vs_eager']:.2e}", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for aot_bisect.json and the children's logs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", action="append", choices=sorted(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--kinds", action="append", help="block kinds to package (default: both)")
    parser.add_argument("--jobs", type=int, default=4, help="variants building at the same time")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "packages"
    names = args.only or list(VARIANTS)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_COMPILE_THREADS=str(max(1, 16 // args.jobs)))
    waiting, running, rows = list(names), {}, []
    results = out / "aot_bisect.json"
    while waiting or running:
        while waiting and len(running) < args.jobs:
            name = waiting.pop(0)
            command = [sys.executable, "-X", "faulthandler", "-m", "bench.aot_bisect", "--child", name,
                       "--device", args.device, "--row", str(out / f"{name}.json"), "--work", str(work),
                       "--out", str(out)] + [f"--kinds={kind}" for kind in args.kinds or []]
            log = open(out / f"{name}.log", "w")
            running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                             time.perf_counter())
        time.sleep(1)
        for name, (process, log, started) in list(running.items()):
            timed_out = time.perf_counter() - started > args.timeout
            if process.poll() is None and not timed_out:
                continue
            if timed_out and process.poll() is None:
                process.kill()
                process.wait()
            log.close()
            del running[name]
            row_file = out / f"{name}.json"
            row = json.loads(row_file.read_text()) if row_file.is_file() else {"variant": name, "ok": False}
            row["exit_code"] = process.returncode
            row["timed_out"] = timed_out
            row["seconds"] = round(time.perf_counter() - started, 1)
            row["log_tail"] = (out / f"{name}.log").read_text(errors="replace").splitlines()[-12:]
            rows.append(row)
            results.write_text(json.dumps({"device": args.device, "weights": "RANDOM", "rows": rows}, indent=1))
            print(f"{name:<30} exit {process.returncode} ok={row.get('ok')} {row['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
