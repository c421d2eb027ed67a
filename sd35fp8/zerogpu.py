"""ZeroGPU: compiled code without torch.compile (ahead of time, through `spaces`), and GPU lease durations.

ZeroGPU attaches a GPU only while a `@spaces.GPU` function runs and does not keep torch.compile's code, so the
app compiles ahead of time once at start-up, inside one `@spaces.GPU` call, for each pipeline:

    @spaces.GPU(duration=900)
    def compile_at_startup():
        for loaded in (models.fp8, models.reference):
            zerogpu_compile(loaded)

`zerogpu_compile` follows `spaces`' own recipe: `spaces.aoti_capture` (the inputs of one real call) ->
`torch.export` (image tokens and batch symbolic) -> `spaces.aoti_compile` -> apply. Regionally (the default) it
compiles one package per kind of transformer block and runs every block of that kind through it with the
block's own weights (`spaces.aoti_patch`); `whole=True` exports the whole transformer (`spaces.aoti_apply`).

`gpu_duration(request, pipelines)` is what `@spaces.GPU(duration=...)` should return for a request: its steps
times the seconds per step measured for that size on each pipeline (estimated from SpeedSettings until one is
measured), plus fixed overhead and a margin, capped at ZeroGPU's limit.
"""

from __future__ import annotations

import math
import time

import torch

from .compile import BATCH_RANGE, TOKEN_RANGE, block_groups, blocks_of, export_block, package_load_failure
from .settings import SPEED, AppSettings


# ------------------------------------------------------------------------------------------- durations


def seconds_per_step(loaded, width: int, height: int, batch: int, settings=SPEED) -> tuple[float, bool]:
    """Seconds one denoising step takes on `loaded` at this size: measured if this size ran, else scaled from the
    nearest measured size, else the settings' estimate; returns (seconds, measured here)."""
    measured = getattr(loaded, "step_seconds", None) or {}
    if (width, height, batch) in measured:
        return measured[(width, height, batch)], True
    pixels = width * height * batch
    if measured:
        (w, h, b), value = min(measured.items(), key=lambda kv: abs(math.log(kv[0][0] * kv[0][1] * kv[0][2] / pixels)))
        return value * (pixels / (w * h * b)) ** settings.size_exponent, False
    return settings.seconds_per_step_1024 * settings.unmeasured_safety * (pixels / 1024**2) ** settings.size_exponent, False


def gpu_duration(request, pipelines, *, margin_s: float | None = None, max_s: float | None = None,
                 settings=SPEED) -> int:
    """Seconds to ask ZeroGPU for one request run on each of `pipelines` (LoadedPipeline objects):
    steps x seconds per step (+ fixed overhead) per pipeline, plus `margin_s`, at most `max_s`."""
    app = AppSettings()
    margin_s = app.zerogpu_margin_s if margin_s is None else margin_s
    max_s = app.zerogpu_max_s if max_s is None else max_s
    total = margin_s
    for loaded in pipelines:
        step, _ = seconds_per_step(loaded, request.width, request.height, request.batch_size, settings)
        total += request.steps * step + settings.fixed_overhead_s
    return int(min(max_s, math.ceil(total)))


# ------------------------------------------------------------------------------------------- compile


class _InRange:
    """A block's forward: the AOT-compiled one for inputs inside the exported ranges, the eager one otherwise."""

    def __init__(self, compiled, eager):
        self.compiled, self.eager = compiled, eager

    def __call__(self, *args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is not None and BATCH_RANGE[0] <= hidden.shape[0] <= BATCH_RANGE[1] \
                and TOKEN_RANGE[0] <= hidden.shape[1] <= TOKEN_RANGE[1]:
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)


def _require_loadable(archives: list, what: str) -> None:
    """Raise if the loader of the `what` packages would fail or crash: they load at the first request, where a crash
    would take the Space down (checked all at once in one child process, `compile.package_load_failure`)."""
    failure = package_load_failure(archives)
    if failure is not None:
        raise RuntimeError(f"the {what} package(s) do not load here: {failure}")


def zerogpu_compile(loaded, *, whole: bool = False, size: int | None = None, kinds: list[str] | None = None,
                    spaces_module=None) -> dict:
    """Compile `loaded`'s transformer ahead of time with the `spaces` package (call inside `@spaces.GPU`).

    Needs 16-bit attention ("sdpa"): a Python custom op cannot run inside an AOTInductor package. Returns what it
    did (kinds, seconds). `kinds` limits regional compilation to some block kinds (the rest stay eager).
    """
    from .attention import attention_of, set_attention
    from .loading import warmup_call, warmup_size

    spaces = spaces_module
    if spaces is None:
        import spaces
    pipe, transformer = loaded.pipe, loaded.pipe.transformer
    if attention_of(transformer) != "sdpa":  # e.g. "auto" chose the FP8 attention kernel (Hopper slices)
        set_attention(transformer, "sdpa")
    loaded.pieces["attention"] = "sdpa"
    size = size or warmup_size(pipe)
    run = warmup_call(pipe, size)
    report: dict[str, object] = {"mode": "whole" if whole else "regional", "size": size}
    started = time.perf_counter()
    if whole:
        from torch.export import Dim

        with spaces.aoti_capture(transformer) as call:
            run()
        shapes = {name: None for name in call.kwargs}
        shapes["hidden_states"] = {2: 2 * Dim("half_height", min=4, max=128), 3: 2 * Dim("half_width", min=4, max=128)}
        exported = torch.export.export(transformer, args=call.args, kwargs=call.kwargs, dynamic_shapes=shapes,
                                       strict=False)
        compiled = spaces.aoti_compile(exported)
        _require_loadable([compiled.archive_file], "whole-model")
        spaces.aoti_apply(compiled, transformer)
        report["seconds"] = round(time.perf_counter() - started, 1)
        return report
    LazyAOTIModel = getattr(spaces, "LazyAOTIModel", None)
    if LazyAOTIModel is None:
        from spaces.zero.torch.aoti import LazyAOTIModel

    blocks = blocks_of(transformer)
    groups, archives, compiled_kinds = block_groups(transformer), {}, {}
    for kind, indices in groups.items():
        if kinds is not None and kind not in kinds:
            continue
        first = blocks[indices[0]]
        kind_started = time.perf_counter()
        with spaces.aoti_capture(first) as call:
            run()
        exported = export_block(first, call.args, dict(call.kwargs))
        archives[kind] = spaces.aoti_compile(exported).archive_file
        compiled_kinds[kind] = {"blocks": len(indices), "seconds": round(time.perf_counter() - kind_started, 1)}
    if archives:
        _require_loadable(list(archives.values()), ", ".join(archives))
    for kind, archive in archives.items():
        lazy = LazyAOTIModel(archive)
        for index in groups[kind]:
            block = blocks[index]
            eager = type(block).forward.__get__(block)
            spaces.aoti_patch(block, lazy)
            block.forward = _InRange(block.forward, eager)
    report["kinds"] = compiled_kinds
    report["seconds"] = round(time.perf_counter() - started, 1)
    loaded.pieces["compile"] = f"aot (spaces): {sum(k['blocks'] for k in compiled_kinds.values())} blocks"
    return report
