"""Warm start without dynamo's tracing: each block kind compiled ahead of time, saved, reloaded in a fresh process.

    python -m bench.precompile_probe --out results.json [--device cuda] [--model large] [--work DIR]

A warm compile cache still pays dynamo's tracing at start-up (8-9 s of SD3.5 Large's 13.5-14.5 s first image on the
H200). This probe tries torch's serializable route on the random tiny test pipeline (`load_pipeline("tiny", "fp8")`),
or with `--model large|medium` on a full-size SD3.5 architecture with RANDOM weights (built as `bench.h200` does),
through the project's loader. On CUDA the transformer runs the project's GPU pieces (`SpeedOptions`' "auto": its Triton
custom ops must serialize too) and the load phase captures CUDA graphs over the loaded functions, as the app's
default does:
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
# per model: the size the blocks are compiled at, and another (the token count is symbolic); steps per image
SIZES = {"tiny": ((64, 64), (96, 128)), "large": ((1024, 1024), (768, 1344)), "medium": ((1024, 1024), (768, 1344))}
STEPS = {"tiny": 2, "large": 28, "medium": 28}


class DirectAttention(Attention):
    """diffusers' Attention calling its processor without `inspect.signature` (an unserializable guard); at module
    level, so the saved guards can name it."""

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **kwargs)


def _images(loaded, model: str, seconds: list) -> list:
    """One image at each of the model's sizes, then the first size again (steady state); appends each one's seconds."""
    from sd35fp8.generate import generate
    from sd35fp8.request import GenerationRequest

    images = []
    for w, h in (*SIZES[model], SIZES[model][0]):
        started = time.perf_counter()
        result = generate(loaded, GenerationRequest(prompt="a red circle on a blue background", steps=STEPS[model],
                                                    width=w, height=h, seed=1))
        seconds.append(round(time.perf_counter() - started, 2))
        images.append(np.asarray(result.images[0], dtype=np.int16))
    return images[:2]


def _load(model: str, device: str):
    """The FP8 pipeline: the tiny test model, or a full-size architecture with random weights; on CUDA with the
    project's GPU pieces and no compilation (the probe compiles the blocks)."""
    import torch

    from sd35fp8.loading import load_pipeline
    from sd35fp8.tiny import build_tiny_pipeline

    if model == "tiny":  # four blocks: three of one kind share one compiled function
        return load_pipeline(build_tiny_pipeline(num_layers=4), "fp8", device=device)
    from diffusers import StableDiffusion3Pipeline

    from bench.h200 import build_components

    pipe = StableDiffusion3Pipeline(**build_components(torch, model, torch.device(device)))
    return load_pipeline(pipe, "fp8", device=device)


def _first_call_checked(compiled, block, name: str, work: Path, guards: dict):
    """`block`'s forward through the loaded function. Its saved guards are checked once, at the first call of the
    kind: where they fail (on the H200, session 12: "'NoneType' object has no attribute 'size'"), the reason and
    the guard tree go to `guards[kind]` and guards_<kind>.txt, and dynamo's check is switched off so that the
    images, compared with eager ones, say whether the compiled code is right anyway."""
    def forward(*args, **kwargs):
        if name not in guards:
            if compiled.guard_check(block, *args, **kwargs):
                guards[name] = "passed"
            else:
                manager = compiled._artifacts.guard_manager
                f_locals = compiled.prepare_f_locals(block, *args, **kwargs)
                guards[name] = {"reason": str(manager.check_verbose(f_locals))[:2000],
                                "inputs": {k: None if v is None else type(v).__name__ for k, v in kwargs.items()}}
                (work / f"guards_{name}.txt").write_text(str(manager))
                if hasattr(compiled, "disable_guard_check"):
                    compiled.disable_guard_check()
                else:
                    compiled._guard_check_enabled = False
                guards[name]["check_disabled"] = True
        return compiled(block, *args, **kwargs)
    return forward


def phase(mode: str, work: Path, device: str, model: str) -> dict:
    """One process: "build" compiles and saves the block functions, "load" loads and runs them, "eager" neither."""
    import torch

    torch._dynamo.config.specialize_float = True  # aot_compile cannot restart after tensorifying float scalars
    torch._dynamo.config.enable_aot_compile = True  # off by default in torch 2.11 (the H200 image), on in 2.13
    from bench.h200 import compile_breakdown
    from sd35fp8.compile import CudaGraphTransformer, block_groups, blocks_of, capture_block_calls, \
        configure_compile_cache
    from sd35fp8.generate import generate
    from sd35fp8.request import GenerationRequest

    configure_compile_cache(work / "cache")
    started = time.perf_counter()
    loaded = _load(model, device)
    transformer = loaded.pipe.transformer
    for module in transformer.modules():
        if type(module) is Attention:  # noqa: E721 - exactly diffusers' class
            module.__class__ = DirectAttention
    report: dict = {"mode": mode, "device": device, "model": model, "torch": torch.__version__,
                    "pieces": {k: v for k, v in loaded.pieces.items() if k != "compile_cache"},
                    "model_build_s": round(time.perf_counter() - started, 2)}
    started = time.perf_counter()
    if mode == "build":
        (width, height), _ = SIZES[model]
        with capture_block_calls(transformer) as calls:
            generate(loaded, GenerationRequest(prompt="a red circle", steps=1, width=width, height=height))
        report["kinds"] = {}
        for kind, captured in calls.items():
            block = blocks_of(transformer)[block_groups(transformer)[kind][0]]
            # fresh tensors: the first block's context is a view, and guards traced from it check its `_base`,
            # which the next blocks' inputs lack ("'NoneType' object has no attribute 'size'" in every later block)
            args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, captured)
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
        report["guards"] = {}
        for kind, indices in block_groups(transformer).items():
            with open(work / f"{kind}.bin", "rb") as file:
                compiled = torch.compiler.load_compiled_function(file)
            for index in indices:
                block = blocks_of(transformer)[index]
                block.forward = _first_call_checked(compiled, block, f"{kind}_{index}", work, report["guards"])
        if device.startswith("cuda"):  # as the app's default: whole steps replayed from CUDA graphs
            CudaGraphTransformer.install(transformer)
            report["cuda_graphs"] = True
        report["load_s"] = round(time.perf_counter() - started, 2)
    report["image_s"] = []  # each size once, then the first again
    images = _images(loaded, model, report["image_s"])
    report["compile"] = compile_breakdown()
    if device.startswith("cuda"):
        report["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    if mode != "eager":
        reference = [np.load(work / f"eager_{i}.npy") for i in range(len(SIZES[model]))]
        report["max_pixel_difference"] = [int(abs(a - b).max()) for a, b in zip(images, reference)]
    else:
        for i, image in enumerate(images):
            np.save(work / f"eager_{i}.npy", image)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precompile_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", choices=sorted(SIZES),
                        help="tiny test pipeline, or a full-size SD3.5 architecture with random weights (needs CUDA)")
    parser.add_argument("--work", type=Path, help="folder for the saved functions and caches (default: a new one)")
    parser.add_argument("--phase", choices=("eager", "build", "load"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="precompile-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.phase:
        args.out.write_text(json.dumps(phase(args.phase, work, args.device, args.model), indent=1) + "\n")
        return 0
    result = {"what": __doc__.split("\n\n")[0], "model": args.model, "sizes": SIZES[args.model],
              "steps": STEPS[args.model], "random_weights": True, "phases": []}
    for name in ("eager", "build", "load"):  # each a fresh process: "load" is the restarted app
        out = work / f"{name}.json"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "bench.precompile_probe", "--phase", name, "--work", str(work),
                               "--device", args.device, "--model", args.model, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
        row = json.loads(out.read_text()) if out.is_file() else {"mode": name}
        row["process_s"] = round(time.perf_counter() - started, 2)
        if done.returncode:
            lines = [line for line in done.stderr.strip().splitlines() if "Warning" not in line]
            row["error"] = "\n".join(lines[-25:])[-3000:] if lines else f"exit {done.returncode}"
        result["phases"].append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # as it goes: a timeout keeps the phases done
        if done.returncode:
            break
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
