"""Warm start without dynamo's tracing: each block kind compiled ahead of time, saved, reloaded in a fresh process.

    python -m bench.precompile_probe --out results.json [--device cuda] [--work DIR]

A warm compile cache still pays dynamo's tracing at start-up (8-9 s of SD3.5 Large's 13.5-14.5 s first image on the
H200). This probe tries torch's serializable route on the random tiny test pipeline (`load_pipeline("tiny", "fp8")`),
through the project's loader:
`torch.compile(type(block).forward, fullgraph=True, dynamic=True).aot_compile(((block, *args), kwargs))` for one
block of each kind (the compiled function takes the block as its first argument, so one file serves every block of
its kind), `save_compiled_function`, then in a fresh process `torch.compiler.load_compiled_function` and every
block's forward through its kind's function. Two things had to change on the CPU (torch 2.13) for it to build:
`torch._dynamo.config.specialize_float` (otherwise `TensorifyScalarRestartAnalysis`: aot_compile cannot restart its
analysis) and diffusers' `Attention.forward`, which calls `inspect.signature(self.processor.__call__)` on every call
and so leaves a guard that cannot be serialized: the probe's `DirectAttention` calls the processor directly. Writes
one JSON with the build process, the fresh process (load seconds, first image, torch's compile counters: no
tracing if it worked) and the largest pixel difference against the eager pipeline, at the built size and another.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from diffusers.models.attention_processor import Attention

ROOT = Path(__file__).resolve().parents[1]
SIZES = ((64, 64), (96, 128))  # the size the blocks are compiled at, and another (the token count is symbolic)


class DirectAttention(Attention):
    """diffusers' Attention calling its processor without `inspect.signature` (an unserializable guard); at module
    level, so the saved guards can name it."""

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **kwargs)


def _images(loaded, generate, GenerationRequest) -> list:
    return [np.asarray(generate(loaded, GenerationRequest(prompt="a red circle on a blue background", steps=2,
                                                          width=w, height=h, seed=1)).images[0], dtype=np.int16)
            for w, h in SIZES]


def phase(mode: str, work: Path, device: str) -> dict:
    """One process: "build" compiles and saves the block functions, "load" loads and runs them, "eager" neither."""
    import torch

    torch._dynamo.config.specialize_float = True  # aot_compile cannot restart after tensorifying float scalars
    from bench.h200 import compile_breakdown
    from sd35fp8.compile import block_groups, blocks_of, capture_block_calls, configure_compile_cache
    from sd35fp8.generate import generate
    from sd35fp8.loading import load_pipeline
    from sd35fp8.request import GenerationRequest

    configure_compile_cache(work / "cache")
    loaded = load_pipeline("tiny", "fp8", device=device)
    transformer = loaded.pipe.transformer
    for module in transformer.modules():
        if type(module) is Attention:  # noqa: E721 - exactly diffusers' class
            module.__class__ = DirectAttention
    report: dict = {"mode": mode, "device": device, "torch": torch.__version__}
    started = time.perf_counter()
    if mode == "build":
        with capture_block_calls(transformer) as calls:
            generate(loaded, GenerationRequest(prompt="a red circle", steps=1, width=SIZES[0][0], height=SIZES[0][1]))
        report["kinds"] = {}
        for kind, (args, kwargs) in calls.items():
            block = blocks_of(transformer)[block_groups(transformer)[kind][0]]
            try:
                with torch.no_grad():  # generation runs without autograd: the saved guards check it
                    compiled = torch.compile(type(block).forward, fullgraph=True, dynamic=True).aot_compile(
                        ((block, *args), kwargs))
                compiled.save_compiled_function(str(work / f"{kind}.bin"))
                report["kinds"][kind] = "saved"
            except Exception as error:  # noqa: BLE001 - the probe records what torch refused
                report["kinds"][kind] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        report["build_s"] = round(time.perf_counter() - started, 2)
    elif mode == "load":
        for kind, indices in block_groups(transformer).items():
            with open(work / f"{kind}.bin", "rb") as file:
                compiled = torch.compiler.load_compiled_function(file)
            for index in indices:
                block = blocks_of(transformer)[index]
                block.forward = (lambda fn, b: lambda *a, **k: fn(b, *a, **k))(compiled, block)
        report["load_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    images = _images(loaded, generate, GenerationRequest)
    report["images_s"] = round(time.perf_counter() - started, 2)
    report["compile"] = compile_breakdown()
    if mode != "eager":
        reference = [np.load(work / f"eager_{i}.npy") for i in range(len(SIZES))]
        report["max_pixel_difference"] = [int(abs(a - b).max()) for a, b in zip(images, reference)]
    else:
        for i, image in enumerate(images):
            np.save(work / f"eager_{i}.npy", image)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precompile_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, help="folder for the saved functions and caches (default: a new one)")
    parser.add_argument("--phase", choices=("eager", "build", "load"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="precompile-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.phase:
        args.out.write_text(json.dumps(phase(args.phase, work, args.device), indent=1) + "\n")
        return 0
    result = {"what": __doc__.split("\n\n")[0], "sizes": SIZES, "phases": []}
    for name in ("eager", "build", "load"):  # each a fresh process: "load" is the restarted app
        out = work / f"{name}.json"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "bench.precompile_probe", "--phase", name, "--work", str(work),
                               "--device", args.device, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
        row = json.loads(out.read_text()) if out.is_file() else {"mode": name}
        row["process_s"] = round(time.perf_counter() - started, 2)
        if done.returncode:
            row["error"] = done.stderr.strip().splitlines()[-1][:500] if done.stderr.strip() else f"exit {done.returncode}"
        result["phases"].append(row)
        print(json.dumps(row), flush=True)
        if done.returncode:
            break
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
