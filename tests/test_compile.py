"""Compilation paths on the CPU with the tiny model: regional compile without recompiles across sizes, the
compile cache setting, the AOTInductor package path (dequant FP8) and the ZeroGPU `spaces` path."""

import contextlib
import copy
import io
import threading
import types
import unittest.mock

import numpy as np
import pytest
import torch
from torch import nn

from sd35fp8 import compile as compile_module
from sd35fp8.compile import CudaGraphEncoder, CudaGraphModule, CudaGraphTransformer, block_groups, compile_counters, \
    compile_transformer, configure_compile_cache
from sd35fp8.generate import generate
from sd35fp8.loading import load_pipeline
from sd35fp8.metrics import ssim
from sd35fp8.request import GenerationRequest
from sd35fp8.tiny import build_tiny_pipeline


def run(transformer, side):
    x = torch.randn(2, 16, side, side)
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=torch.randn(2, 333, 64),
                           pooled_projections=torch.randn(2, 64), timestep=torch.tensor([500.0, 500.0]),
                           return_dict=False)[0]


def test_regional_compile_one_graph_per_block_kind_and_no_recompiles_across_sizes():
    torch._dynamo.reset()
    transformer = build_tiny_pipeline().transformer
    assert block_groups(transformer) == {"block": [0], "block_last": [1]}
    description = compile_transformer(transformer, "regional", backend="eager")  # dynamo only: fast on CI
    assert description.startswith("regional: 2 blocks, 2 kinds")
    before = compile_counters()
    for side in (16, 24, 8, 32):  # four image sizes
        run(transformer, side)
    after = compile_counters()
    assert after["unique_graphs"] - before["unique_graphs"] == 2 and after["recompiles"] == before["recompiles"]
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="unknown compile"):
        compile_transformer(transformer, "everything")


def test_compile_cache_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/set-by-inductor-at-first-compile")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/tmp/x")
    info = configure_compile_cache(tmp_path / "cache")
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor") and not info["warm"]
    (tmp_path / "cache" / "inductor" / "xy").mkdir()
    (tmp_path / "cache" / "inductor" / "xy" / "kernel.py").write_text("# compiled")
    assert configure_compile_cache(tmp_path / "cache")["warm"]
    assert configure_compile_cache(None) == {"cache_dir": None, "warm": False}


def test_cuda_graphs_pass_through_off_cuda():
    transformer = build_tiny_pipeline().transformer
    expected = run(transformer, 8)
    torch.manual_seed(0)
    wrapper = CudaGraphTransformer.install(transformer)
    torch.manual_seed(0)
    assert wrapper.graphs == {} and run(transformer, 8).shape == expected.shape
    wrapper.uninstall()
    assert "forward" not in transformer.__dict__


def test_graph_replay_captures_once_per_signature_copies_outputs_and_runs_eagerly_where_capture_fails(monkeypatch):
    """`CudaGraphModule.replay`, the part of the CUDA-graph wrappers a CPU can run: a graph stands in for CUDA's."""
    from transformers.modeling_outputs import BaseModelOutput

    encoder = nn.Linear(2, 2)
    wrapper = CudaGraphEncoder.install(encoder)
    assert CudaGraphModule.installed(encoder) is wrapper and CudaGraphTransformer.installed(encoder) is None
    captures = []

    def capture(tensors, run):
        static_in = {name: t.clone() for name, t in tensors.items()}
        static_out = run(static_in)
        captures.append(static_out)

        class Graph:
            def replay(self):
                fresh = run(static_in)
                static_out.last_hidden_state.copy_(fresh.last_hidden_state)
                static_out.hidden_states[0].copy_(fresh.hidden_states[0])
        return Graph(), static_in, static_out

    def run(tensors):
        doubled = tensors["input_ids"] * 2.0
        return BaseModelOutput(last_hidden_state=doubled, hidden_states=(doubled + 1,))

    monkeypatch.setattr(wrapper, "_capture", capture)
    ids = torch.tensor([[1.0, 2.0]])
    first = wrapper.replay(("ids", (1, 2)), {"input_ids": ids}, run)  # EAGER_FIRST is False: captured at once
    second = wrapper.replay(("ids", (1, 2)), {"input_ids": ids + 1}, run)
    assert len(captures) == 1 and torch.equal(second.last_hidden_state, (ids + 1) * 2)
    assert torch.equal(second.hidden_states[0], (ids + 1) * 2 + 1) and isinstance(second, BaseModelOutput)
    assert torch.equal(first[0], ids * 2)  # a copy: the replay after it did not overwrite it
    assert second.last_hidden_state.data_ptr() != captures[0].last_hidden_state.data_ptr()

    def failing(tensors, run):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(wrapper, "_capture", failing)
    out = wrapper.replay(("ids", (1, 3)), {"input_ids": torch.ones(1, 3)}, run)
    assert torch.equal(out[0], torch.full((1, 3), 2.0)) and "not permitted" in wrapper.failures[("ids", (1, 3))]
    assert encoder(torch.ones(1, 2)).shape == (1, 2)  # CPU input: the module's own forward
    encoder.to(torch.float64)
    assert wrapper.graphs == {} and wrapper.failures == {}
    wrapper.uninstall()
    assert CudaGraphModule.installed(encoder) is None


def test_text_encoders_are_wrapped_once_and_cpu_calls_pass_through():
    from sd35fp8.loading import graph_encoders
    from sd35fp8.prompts import ENCODER_NAMES

    pipe = build_tiny_pipeline()
    reference = pipe.encode_prompt("a cat", None, None, device="cpu", do_classifier_free_guidance=False)
    assert graph_encoders(pipe) == 3
    wrappers = [CudaGraphEncoder.installed(getattr(pipe, name)) for name in ENCODER_NAMES]
    assert all(wrappers) and graph_encoders(pipe) == 3  # pipelines of both precisions share the encoders
    assert [CudaGraphEncoder.installed(getattr(pipe, name)) for name in ENCODER_NAMES] == wrappers
    again = pipe.encode_prompt("a cat", None, None, device="cpu", do_classifier_free_guidance=False)
    assert all(torch.equal(a, b) for a, b in zip(reference, again) if a is not None)
    assert all(not w.graphs and not w.failures for w in wrappers)


@pytest.fixture(scope="module")
def tiny_aot_dir(tmp_path_factory):
    """AOTInductor packages of the tiny FP8 model's two block kinds, built once for the tests below (slow: C++)."""
    folder = tmp_path_factory.mktemp("aot")
    loaded = load_pipeline("tiny", "fp8", device="cpu", compile="aot", aot_dir=str(folder))
    return folder, loaded


def test_aot_inductor_package_of_the_tiny_fp8_model(tiny_aot_dir, monkeypatch):
    """export + torch._inductor.aoti_compile_and_package per block kind (dequant FP8 path), then reload."""
    request = GenerationRequest("a cat", steps=2, width=64, height=64, seed=1)
    eager = generate(load_pipeline("tiny", "fp8", device="cpu"), request)
    tmp_path, loaded = tiny_aot_dir
    info = loaded.pieces["aot"]
    assert loaded.pieces["compile"] == "aot: 2 blocks through 2 AOTInductor packages" and set(info["built"]) == {
        "block", "block_last"}
    result = generate(loaded, request)
    assert result.ok and ssim(result.image, eager.image) > 0.99
    assert generate(loaded, GenerationRequest("a cat", steps=1, width=96, height=128)).ok  # another size, no rebuild
    reloaded = load_pipeline("tiny", "fp8", device="cpu", compile="aot", aot_dir=str(tmp_path))
    assert reloaded.pieces["aot"]["loaded_from_disk"]
    assert np.array_equal(np.asarray(generate(reloaded, request).image), np.asarray(result.image))
    # a machine whose loader crashes (as every CUDA package's did on the H200 image): regional compile instead
    monkeypatch.setattr(compile_module, "LOAD_CHECK_CODE", CRASHING_LOADER)
    crashed = load_pipeline("tiny", "fp8", device="cpu", compile="aot", aot_dir=str(tmp_path), compile_backend="eager")
    assert crashed.pieces["compile_fallback"].startswith("AOTInductor packages do not load here (the loader crashed "
                                                         "its process (signal 11, SIGSEGV)); regional compile")
    assert crashed.pieces["compile"].startswith("regional") and generate(crashed, request).ok


CRASHING_LOADER = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"


def test_package_load_failure_says_why_a_package_would_not_load(tiny_aot_dir, tmp_path):
    path = str(next(tiny_aot_dir[0].rglob("block.pt2")))  # a real package: the tiny model's block kind
    assert compile_module.package_load_failure([path]) is None
    assert compile_module.package_load_failure([io.BytesIO(open(path, "rb").read())]) is None  # spaces' archives
    (tmp_path / "broken.pt2").write_bytes(b"not a zip archive")
    assert compile_module.package_load_failure([tmp_path / "broken.pt2"]).startswith("the loader failed: ")


class StandInSpaces:
    """The four `spaces` AOT functions zerogpu_compile uses, with spaces' semantics. The real ones cannot be imported
    here: importing spaces.zero.torch patches CUDA torch for ZeroGPU and fails on a CPU build of torch."""

    def __init__(self, folder):
        self.folder, self.calls = folder, []

    @contextlib.contextmanager
    def aoti_capture(self, module):
        class Captured(Exception):
            pass

        call = types.SimpleNamespace(args=(), kwargs={})

        def capture(*args, **kwargs):
            call.args, call.kwargs = args, kwargs
            raise Captured

        self.calls.append("aoti_capture")
        with unittest.mock.patch.object(module, "forward", new=capture):
            try:
                yield call
            except Captured:
                pass

    def aoti_compile(self, exported):
        self.calls.append("aoti_compile")
        path = self.folder / f"{len(self.calls)}.pt2"
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path),
                                                 inductor_configs={"aot_inductor.package_constants_in_so": False})
        return types.SimpleNamespace(archive_file=str(path))

    class LazyAOTIModel:
        def __init__(self, archive):
            self.runner = torch._inductor.aoti_load_package(archive)

    def aoti_patch(self, module, lazy):
        self.calls.append("aoti_patch")
        weights = module.state_dict()

        def forward(*args, **kwargs):
            lazy.runner.load_constants({k: weights[k] for k in lazy.runner.get_constant_fqns()},
                                       check_full_update=True, user_managed=True)
            return lazy.runner(*args, **kwargs)

        module.forward = forward


def test_zerogpu_path_compiles_blocks_ahead_of_time(tmp_path):
    """capture -> torch.export -> aoti_compile -> every block of the kind runs it with its own weights."""
    from sd35fp8.zerogpu import zerogpu_compile

    request = GenerationRequest("a cat", steps=2, width=64, height=64, seed=2)
    loaded = load_pipeline("tiny", "bf16", device="cpu")
    eager = generate(loaded, request)
    spaces = StandInSpaces(tmp_path)
    report = zerogpu_compile(loaded, kinds=["block"], spaces_module=spaces)  # one kind keeps the test short
    assert spaces.calls == ["aoti_capture", "aoti_compile", "aoti_patch"]
    assert report["kinds"]["block"]["blocks"] == 1 and loaded.pieces["compile"].startswith("aot (spaces)")
    result = generate(loaded, request)
    assert result.ok and ssim(result.image, eager.image) > 0.99


def test_a_failed_ahead_of_time_compile_leaves_the_app_serving(tmp_path):
    from space.runtime import Models

    class RefusingSpaces(StandInSpaces):
        def aoti_compile(self, exported):
            raise RuntimeError("AOTInductor refused the graph\nlong details")

    models = Models.load("tiny", "tiny", device="cpu", compile="off")
    reports = models.compile_ahead_of_time(spaces_module=RefusingSpaces(tmp_path))
    assert reports == [{"error": "RuntimeError: AOTInductor refused the graph", "fallback": "eager"}] * 2
    assert models.fp8.pieces["compile"].startswith("eager (ahead-of-time compile failed: RuntimeError")
    assert generate(models.fp8, GenerationRequest("a cat", steps=1, width=64, height=64)).ok



def test_zerogpu_refuses_a_package_that_would_crash_its_loader(tmp_path, monkeypatch):
    """The package loads lazily at the first request, where a crash would take the Space down: checked first."""
    from sd35fp8.zerogpu import zerogpu_compile

    class UncompiledSpaces(StandInSpaces):  # the crashing loader never reads the package: skip building it
        def aoti_compile(self, exported):
            self.calls.append("aoti_compile")
            path = self.folder / "never-built.pt2"
            path.write_bytes(b"a package the loader crashes on")
            return types.SimpleNamespace(archive_file=str(path))

    monkeypatch.setattr(compile_module, "LOAD_CHECK_CODE", CRASHING_LOADER)
    loaded = load_pipeline("tiny", "bf16", device="cpu")
    spaces = UncompiledSpaces(tmp_path)
    with pytest.raises(RuntimeError, match=r"the block package\(s\) do not load here: the loader crashed its process"):
        zerogpu_compile(loaded, kinds=["block"], spaces_module=spaces)
    assert spaces.calls == ["aoti_capture", "aoti_compile"]  # never patched in
    assert generate(loaded, GenerationRequest("a cat", steps=1, width=64, height=64)).ok


def test_cuda_graphs_are_dropped_when_the_transformer_moves_or_after_an_out_of_memory():
    """A captured graph holds the weights' addresses: `.to()` (the app's CPU/GPU swap) must drop the graphs, and so
    does `reset()` (after a CUDA out-of-memory); `uninstall` puts the transformer back as it was."""
    transformer = build_tiny_pipeline().transformer
    wrapper = CudaGraphTransformer.install(transformer)
    assert CudaGraphTransformer.installed(transformer) is wrapper
    wrapper.graphs["shape"], wrapper.seen, wrapper.pool = ("graph", {}, None), {"shape"}, "pool"  # as after a capture
    transformer.to(torch.float32)  # moves/casts go through nn.Module._apply
    assert wrapper.graphs == {} and wrapper.seen == set() and wrapper.pool is None
    assert transformer.dtype == torch.float32
    wrapper.seen.add("shape")
    wrapper.reset()
    assert wrapper.seen == set()
    wrapper.graphs["shape"] = (threading.Lock(), {}, None)  # like a CUDAGraph, it cannot be copied
    clone = copy.deepcopy(transformer)  # the benchmark copies shared components; so may a user
    copied = CudaGraphTransformer.installed(clone)
    assert copied is not wrapper and copied.module is clone and copied.graphs == {} and "shape" in wrapper.graphs
    clone.to(torch.float64)  # moves the copy only, and drops only the copy's graphs
    assert clone.dtype == torch.float64 and transformer.dtype == torch.float32 and "shape" in wrapper.graphs
    assert run(clone.to(torch.float32), 8).shape == run(transformer, 8).shape
    wrapper.uninstall()
    assert CudaGraphTransformer.installed(transformer) is None
    assert "_apply" not in transformer.__dict__ and "forward" not in transformer.__dict__


PRECOMPILED_CHILD = """
import hashlib, json, sys
import numpy as np
from sd35fp8.compile import compile_counters
from sd35fp8.generate import generate
from sd35fp8.loading import load_pipeline
from sd35fp8.request import GenerationRequest
from sd35fp8.tiny import build_tiny_pipeline

loaded = load_pipeline(build_tiny_pipeline(num_layers=4), "fp8", device="cpu", compile="precompiled",
                       compile_cache=sys.argv[1], compile_backend="eager")
image = generate(loaded, GenerationRequest("a cat", steps=2, width=64, height=64, seed=1)).image
print(json.dumps({"loaded": loaded.pieces["precompiled"]["loaded"], "counters": compile_counters(),
                  "image": hashlib.sha256(np.asarray(image).tobytes()).hexdigest()}))
"""


def _sha(image) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def test_precompiled_blocks_are_saved_and_a_fresh_process_runs_them_without_tracing(tmp_path):
    """compile="precompiled": each block kind's compiled forward is saved at its first call (one more file per input
    class: CFG batch 2, batch 1), serves every block of its kind, and a new process loads the files and generates
    the same image with no dynamo tracing at all."""
    import json
    import subprocess
    import sys

    request = GenerationRequest("a cat", steps=2, width=64, height=64, seed=1)
    eager = generate(load_pipeline(build_tiny_pipeline(num_layers=4), "fp8", device="cpu"), request)
    loaded = load_pipeline(build_tiny_pipeline(num_layers=4), "fp8", device="cpu", compile="precompiled",
                           compile_cache=str(tmp_path), compile_backend="eager")
    assert loaded.pieces["compile"] == ("precompiled: 4 blocks, 2 kinds, 0 saved functions loaded, "
                                        "compiles and saves them")
    folder = tmp_path / "precompiled"
    assert _sha(generate(loaded, request).image) == _sha(eager.image)  # three blocks share one function
    saved = lambda: sorted(p.name.split("-")[0] for p in folder.rglob("*.bin"))  # noqa: E731 - kind of each file
    assert saved() == ["block", "block_last"]
    assert generate(loaded, GenerationRequest("a cat", steps=1, width=96, height=128)).ok  # same files serve it
    assert generate(loaded, GenerationRequest("a cat", steps=1, width=64, height=64, guidance=1.0)).ok  # batch 1
    assert saved() == ["block", "block", "block_last", "block_last"]
    assert not list(folder.rglob("*.partial"))
    done = subprocess.run([sys.executable, "-c", PRECOMPILED_CHILD, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["loaded"] == {"block": 2, "block_last": 2}
    assert child["counters"]["unique_graphs"] == 0 and child["counters"]["frames_compiled"] == 0  # nothing traced
    assert child["image"] == _sha(eager.image)


def test_precompiled_blocks_survive_a_damaged_file_and_a_failed_compile(tmp_path, monkeypatch, caplog):
    """A cache file that does not load is reported, removed and compiled anew; a kind whose compiled forward cannot be
    built or saved runs dynamo's regular compile of the same forward, with a warning."""
    request = GenerationRequest("a cat", steps=1, width=64, height=64, seed=1)
    reference = generate(load_pipeline(build_tiny_pipeline(), "fp8", device="cpu"), request)
    options = dict(device="cpu", compile="precompiled", compile_cache=str(tmp_path), compile_backend="eager")
    generate(load_pipeline(build_tiny_pipeline(), "fp8", **options), request)
    (damaged,) = (tmp_path / "precompiled").rglob("block-*.bin")
    damaged.write_bytes(b"not a compiled function")
    loaded = load_pipeline(build_tiny_pipeline(), "fp8", **options)
    assert loaded.pieces["precompiled"]["loaded"] == {"block": 0, "block_last": 1}
    assert loaded.pieces["precompiled"]["unreadable"][0].startswith(f"{damaged.name}: ") and not damaged.exists()
    assert _sha(generate(loaded, request).image) == _sha(reference.image)
    monkeypatch.setattr(compile_module, "_aot_config", lambda: {"no_such_dynamo_setting": True})
    unsaved = load_pipeline(build_tiny_pipeline(), "fp8", **{**options, "compile_cache": str(tmp_path / "other")})
    assert _sha(generate(unsaved, request).image) == _sha(reference.image)
    assert "regional torch.compile instead" in caplog.text and not list((tmp_path / "other").rglob("*.bin"))
