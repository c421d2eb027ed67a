"""Compiling the SD3 transformer: regional torch.compile, on-disk caches, AOTInductor packages, CUDA graphs.

* `compile_transformer(t, "regional")` compiles each `JointTransformerBlock` (SD3's transformer declares no
  `_repeated_blocks`, so diffusers' `compile_repeated_blocks` does nothing for it). Blocks of one kind share
  one compiled graph (torch.compile guards on code and shapes, not on which block's weights run), so SD3.5
  Large compiles two graphs (its last block has no context output) and Medium three. With `dynamic=True` the
  token and batch dimensions are symbolic, so a new image size or batch runs the same code: no recompilation.
  `"full"` compiles the whole transformer instead (one big graph, minutes for Large).
* `precompile_blocks(t, folder)` is regional compile whose compiled block functions are saved to disk
  (`torch.compile(...).aot_compile`, one file per block kind and input class) and loaded by the next process
  with no tracing: a warm regional compile still spends most of its start re-tracing with dynamo.
* `configure_compile_cache(dir)` points inductor's and Triton's on-disk caches (FX graph cache, AOTAutograd
  cache, compiled kernels) at a folder kept between runs, so a restarted app compiles from cache.
* `aot_compile_blocks` exports one block of each kind (`torch.export`, symbolic token dimension) and builds an
  AOTInductor package per kind (`torch._inductor.aoti_compile_and_package`, weights left out of the package);
  `apply_aot_packages` loads them and runs every block through its kind's package with that block's own
  weights. `sd35fp8.zerogpu` does the same through the `spaces` package on ZeroGPU. `package_load_failure` loads
  packages in a child process first: a loader that crashes (every CUDA package, even of one Linear layer, segfaulted
  in `aoti_load_package` on the H200 image with torch 2.11 + CUDA 13) must not take the app down with it.
* `CudaGraphTransformer` captures whole transformer steps in CUDA graphs (one per input shape) and replays them;
  `CudaGraphEncoder` does the same for the text encoders (one graph per token-ids shape).
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from .errors import error_summary

COMPILE_CHOICES = ("off", "regional", "precompiled", "full", "aot")
RECOMPILE_LIMIT = 64  # graphs per code object: block kinds x pipelines x (batch 1 / CFG); torch's default 8 is too few
TOKEN_RANGE = (16, 16384)  # image tokens of a 64..2048 px side at VAE factor 8, patch 2
BATCH_RANGE = (2, 16)  # CFG doubles the batch; batch 1 (no CFG) runs the blocks eagerly on the AOT path
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- caches


def configure_compile_cache(cache_dir: str | os.PathLike | None) -> dict:
    """Keep inductor's and Triton's caches under `cache_dir` (created if needed); returns what was set and whether
    the folder already held compiled artifacts (a warm cache). Sets TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR
    (inductor writes its own default there at its first compile, so an existing value is not a user's choice:
    point SD35FP8_COMPILE_CACHE, which the default `SPEED.compile_cache_dir` reads, at the folder you want)."""
    if not cache_dir:
        return {"cache_dir": None, "warm": False}
    root = Path(cache_dir).expanduser().resolve()
    inductor, triton = root / "inductor", root / "triton"
    inductor.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    os.environ["TRITON_CACHE_DIR"] = str(triton)
    from torch._inductor import config as inductor_config
    from torch._functorch import config as functorch_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    warm = any(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).rglob("*.py")) if inductor.exists() else False
    return {"cache_dir": str(root), "inductor": os.environ["TORCHINDUCTOR_CACHE_DIR"],
            "triton": os.environ["TRITON_CACHE_DIR"], "warm": bool(warm)}


def compile_counters() -> dict:
    """Graphs compiled and recompilations so far in this process (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
            "frames_compiled": int(counters["frames"].get("ok", 0))}


# ------------------------------------------------------------------------------------------- regional compile


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Every compiled block kind of every pipeline is one cache entry of JointTransformerBlock.forward; past torch's
    limit (8) further ones silently run eagerly (seen on the H200: a third compiled pipeline ran eager)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < limit:
            setattr(config, name, limit)


def blocks_of(transformer: nn.Module) -> list[nn.Module]:
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"{type(transformer).__name__} has no transformer_blocks")
    return list(blocks)


def block_kind(block: nn.Module) -> str:
    """Blocks of one kind run the same code: SD3's differ in whether they emit a context and use dual attention."""
    return "block" + ("_dual" if getattr(block, "use_dual_attention", False) else "") + (
        "_last" if getattr(block, "context_pre_only", False) else "")


def block_groups(transformer: nn.Module) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for index, block in enumerate(blocks_of(transformer)):
        groups.setdefault(block_kind(block), []).append(index)
    return groups


def compile_transformer(transformer: nn.Module, how: str = "regional", *, mode: str | None = None,
                        dynamic: bool = True, backend: str = "inductor") -> str:
    """torch.compile the transformer in place, `how` = "regional" (each block) or "full"; returns a description."""
    raise_recompile_limit()
    options = dict(dynamic=dynamic, backend=backend)
    if mode and mode != "default":
        options["mode"] = mode
    if how == "regional":
        for block in blocks_of(transformer):
            block.compile(**options)
        kinds = len(block_groups(transformer))
        return (f"regional: {len(blocks_of(transformer))} blocks, {kinds} kinds"
                + (", dynamic token/batch dims" if dynamic else "") + (f", {mode}" if mode else ""))
    if how == "full":
        transformer.compile(**options)
        return "full model" + (", dynamic" if dynamic else "") + (f", {mode}" if mode else "")
    raise ValueError(f"unknown compile choice {how!r}; use regional or full")


# ------------------------------------------------------------------------------------------- precompiled blocks


PRECOMPILE_AVAILABLE = hasattr(torch.compiler, "load_compiled_function")  # torch >= 2.10
PRECOMPILED_PER_KIND = 8  # saved functions a block kind may gather (batch 1, CFG, dtypes); past it: one dynamo compile


class DirectAttention(Attention):
    """diffusers' `Attention` calling its processor directly. Its own forward reads
    `inspect.signature(self.processor.__call__)` on every call, which dynamo guards with an object-identity guard that
    cannot be saved; the project's processors take every keyword, so nothing is lost."""

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **kwargs)


def _aot_config() -> dict:
    """dynamo settings `aot_compile` needs: float scalars specialized (it cannot restart its analysis after
    turning them into tensors), and torch 2.11's opt-in flag (default on from 2.13)."""
    config = torch._dynamo.config
    return {name: True for name in ("specialize_float", "enable_aot_compile") if hasattr(config, name)}


class PrecompiledKind:
    """The compiled forwards of one block kind, kept as files in `folder` (`<kind>-<random id>.bin`: processes and
    GPUs sharing the folder never overwrite each other's).

    Each is `torch.compile(type(block).forward, fullgraph=True, dynamic=True).aot_compile(...)`: it takes the block
    as its first argument, so one function serves every block of the kind, and `torch.compiler.
    load_compiled_function` loads it in a later process with no tracing at all (a warm regional compile still
    re-traces every kind with dynamo). A call runs the first function whose saved guards accept its inputs; a call
    none accepts (the first ever, batch 1, another dtype or GPU) compiles one more from its own inputs and saves it. A
    file that does not load is removed (listed in `failures`); a kind whose compile or save fails runs dynamo's plain
    compile of the same forward from then on."""

    def __init__(self, kind: str, block_type: type, folder: Path, backend: str, mode: str | None = None):
        self.kind, self.folder, self.options = kind, folder, {"backend": backend, "mode": mode}
        self.forward = block_type.forward
        self.functions, self.failures = [], []
        self.lock = threading.Lock()
        self.fallback = None
        for path in sorted(folder.glob(f"{kind}-*.bin")):
            try:
                with open(path, "rb") as file:
                    self.functions.append(torch.compiler.load_compiled_function(file))
            except Exception as error:  # noqa: BLE001 - a damaged cache file (a killed save leaves none): drop it
                self.failures.append(f"{path.name}: {type(error).__name__}, removed")
                path.unlink(missing_ok=True)
        self.loaded = len(self.functions)

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict):
        for function in self.functions:
            if function.guard_check(block, *args, **kwargs):
                return function(block, *args, **kwargs)
        if self.fallback is None:
            with self.lock:
                function = self._compile(block, args, kwargs)
            if function is not None:
                return function(block, *args, **kwargs)
        return self.fallback(block, *args, **kwargs)

    def _compile(self, block: nn.Module, args: tuple, kwargs: dict):
        """One more saved function from this call's inputs (None if it cannot be built: `fallback` is set)."""
        for function in self.functions:  # another thread may have built it while this one waited
            if function.guard_check(block, *args, **kwargs):
                return function
        if len(self.functions) < PRECOMPILED_PER_KIND:
            # fresh tensors: the first block's context arrives as a view, and guards traced from a view check its
            # `_base`, which every later block's input lacks
            args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))
            installed = block.__dict__.pop("forward", None)  # saving pickles what the guards reach in the block
            try:
                with torch._dynamo.config.patch(**_aot_config()):
                    function = torch.compile(self.forward, fullgraph=True, dynamic=True, **self.options) \
                        .aot_compile(((block, *args), kwargs))
                self.folder.mkdir(parents=True, exist_ok=True)
                path = self.folder / f"{self.kind}-{uuid.uuid4().hex[:12]}.bin"
                partial = path.with_suffix(".partial")
                function.save_compiled_function(str(partial))
                os.replace(partial, path)  # a stopped save leaves no file a later process would load
                self.functions.append(function)
                return function
            except Exception as error:  # noqa: BLE001 - this kind runs dynamo's regular compile instead
                self.failures.append(f"compile: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
                log.warning("saving the compiled %s blocks failed (%s); regional torch.compile instead",
                            self.kind, self.failures[-1])
            finally:
                if installed is not None:
                    block.forward = installed
        self.fallback = torch.compile(self.forward, dynamic=True, **self.options)
        return None


class _PrecompiledBlock:
    """Installed as a block's `forward`: its kind's precompiled functions with this block as their first argument."""

    def __init__(self, block: nn.Module, kind: PrecompiledKind):
        self.block, self.kind = block, kind

    def __call__(self, *args, **kwargs):
        return self.kind(self.block, args, kwargs)


def precompile_blocks(transformer: nn.Module, folder: str | os.PathLike, backend: str = "inductor",
                      mode: str | None = None) -> dict:
    """Run every block through its kind's saved compiled functions in `folder` (loaded now; the missing ones are
    compiled and saved at the first call that needs them); returns {kind: PrecompiledKind}."""
    if not PRECOMPILE_AVAILABLE:
        raise RuntimeError(f"torch {torch.__version__} cannot save compiled functions (torch >= 2.10 can)")
    raise_recompile_limit()
    for module in transformer.modules():
        if type(module) is Attention:  # noqa: E721 - exactly diffusers' class, whose forward inspects the processor
            module.__class__ = DirectAttention
    kinds = {}
    blocks = blocks_of(transformer)
    for kind, indices in block_groups(transformer).items():
        kinds[kind] = PrecompiledKind(kind, type(blocks[indices[0]]), Path(folder), backend, mode)
        for index in indices:
            blocks[index].forward = _PrecompiledBlock(blocks[index], kinds[kind])
    return kinds


# ------------------------------------------------------------------------------------------- AOTInductor


@contextmanager
def capture_block_calls(transformer: nn.Module):
    """Record the args/kwargs of the first call of the first block of each kind while the body runs."""
    calls: dict[str, tuple[tuple, dict]] = {}
    hooks = []
    for kind, indices in block_groups(transformer).items():
        def hook(module, args, kwargs, kind=kind):
            calls.setdefault(kind, (args, dict(kwargs)))
        hooks.append(blocks_of(transformer)[indices[0]].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def block_dynamic_shapes(kwargs: dict, tokens=TOKEN_RANGE, batch=BATCH_RANGE) -> dict:
    """torch.export dynamic shapes for a block call: image tokens and batch symbolic, the rest static."""
    from torch.export import Dim

    token_dim = Dim("tokens", min=tokens[0], max=tokens[1])
    batch_dim = Dim("batch", min=batch[0], max=batch[1])
    shapes = {}
    for name, value in kwargs.items():
        if name == "hidden_states":
            shapes[name] = {0: batch_dim, 1: token_dim}
        elif isinstance(value, torch.Tensor) and value.dim() >= 1:
            shapes[name] = {0: batch_dim}
        else:
            shapes[name] = None
    return shapes


def export_block(block: nn.Module, args: tuple, kwargs: dict, dynamic: bool = True):
    shapes = block_dynamic_shapes(kwargs) if dynamic else None
    with torch.no_grad():
        return torch.export.export(block, args, kwargs, dynamic_shapes=shapes, strict=False)


AOT_INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False}


def aot_compile_blocks(transformer: nn.Module, run_once: Callable[[], object], package_dir: str | os.PathLike,
                       *, dynamic: bool = True, inductor_configs: dict | None = None,
                       kinds: list[str] | None = None) -> dict:
    """Export one block of each kind (inputs captured while `run_once()` runs the model eagerly) and build an
    AOTInductor package per kind in `package_dir` (weights not included); returns {kind: {path, export_s, compile_s}}."""
    package_dir = Path(package_dir)
    package_dir.mkdir(parents=True, exist_ok=True)
    with capture_block_calls(transformer) as calls:
        with torch.no_grad():
            run_once()
    report = {}
    blocks = blocks_of(transformer)
    for kind, indices in block_groups(transformer).items():
        if kinds is not None and kind not in kinds:
            continue
        args, kwargs = calls[kind]
        started = time.perf_counter()
        exported = export_block(blocks[indices[0]], args, kwargs, dynamic)
        exported_s = time.perf_counter() - started
        path = torch._inductor.aoti_compile_and_package(
            exported, package_path=str(package_dir / f"{kind}.pt2"),
            inductor_configs={**AOT_INDUCTOR_CONFIGS, **(inductor_configs or {})})
        report[kind] = {"path": str(path), "export_s": round(exported_s, 2),
                        "compile_s": round(time.perf_counter() - started - exported_s, 2),
                        "bytes": Path(path).stat().st_size}
    return report


LOAD_CHECK_CODE = ("import sys, torch\nprint('cuda' if torch.cuda.is_available() else 'no cuda', flush=True)\n"
                   "for path in sys.argv[1:]:\n    torch._inductor.aoti_load_package(path)\n")
LOAD_CHECK_TIMEOUT_S = 300


def package_load_failure(packages: list, timeout_s: float = LOAD_CHECK_TIMEOUT_S) -> str | None:
    """Load AOTInductor packages (paths, or in-memory archives such as `spaces.aoti_compile`'s) in a fresh Python
    process; None if they all load, else why not in one line. A crash there is only a failed check. Where this
    process has a GPU the child cannot see (a GPU lent to one process), the check cannot be made: None."""
    with tempfile.TemporaryDirectory(prefix="sd35fp8-aoti-check-") as folder:
        paths = []
        for index, package in enumerate(packages):
            if hasattr(package, "getvalue"):  # a BytesIO archive
                path = Path(folder) / f"{index}.pt2"
                path.write_bytes(package.getvalue())
                package = path
            paths.append(str(package))
        try:
            done = subprocess.run([sys.executable, "-c", LOAD_CHECK_CODE, *paths], capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"loading them took over {timeout_s:.0f} s"
    if done.returncode == 0:
        return None
    if done.returncode > 0 and done.stdout.startswith("no cuda") and torch.cuda.is_available():
        return None
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = "unknown"
        return f"the loader crashed its process (signal {-done.returncode}, {name})"
    lines = done.stderr.strip().splitlines()
    return "the loader failed: " + (lines[-1][:200] if lines else f"exit code {done.returncode}")


class _SharedRunner:
    """One loaded AOTInductor package, run with the weights of whichever block calls it."""

    def __init__(self, path: str | os.PathLike):
        self.runner = torch._inductor.aoti_load_package(str(path))
        self.fqns = set(self.runner.get_constant_fqns())
        self.current = None
        self.lock = threading.Lock()

    def __call__(self, owner: _AotBlock, args, kwargs):
        with self.lock:
            if self.current is not owner:
                self.runner.load_constants(owner.constants(self.fqns), check_full_update=owner.first,
                                           user_managed=True)
                owner.first = False
                self.current = owner
            return self.runner(*args, **kwargs)


class _AotBlock:
    """Installed as a block's `forward`: runs the shared package with this block's weights, or the block's own
    eager forward for inputs outside the exported ranges (batch 1, tiny sizes)."""

    def __init__(self, block: nn.Module, runner: _SharedRunner, eager_forward):
        self.block, self.runner, self.eager_forward = block, runner, eager_forward
        self.first = True
        self._constants = None

    def constants(self, fqns):
        if self._constants is None:
            state = self.block.state_dict()
            missing = fqns - set(state)
            if missing:
                raise RuntimeError(f"AOT package expects weights the block lacks: {sorted(missing)[:5]}")
            self._constants = {name: state[name] for name in fqns}
        return self._constants

    def __call__(self, *args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None or not (BATCH_RANGE[0] <= hidden.shape[0] <= BATCH_RANGE[1]
                                  and TOKEN_RANGE[0] <= hidden.shape[1] <= TOKEN_RANGE[1]):
            return self.eager_forward(*args, **kwargs)
        return self.runner(self, args, kwargs)


def apply_aot_packages(transformer: nn.Module, package_dir: str | os.PathLike) -> dict:
    """Run every block whose kind has a package in `package_dir` through it; returns {kind: blocks patched}."""
    package_dir = Path(package_dir)
    patched = {}
    blocks = blocks_of(transformer)
    for kind, indices in block_groups(transformer).items():
        path = package_dir / f"{kind}.pt2"
        if not path.is_file():
            continue
        runner = _SharedRunner(path)
        for index in indices:
            block = blocks[index]
            eager = block.forward
            block.forward = _AotBlock(block, runner, eager)
        patched[kind] = len(indices)
    return patched


# ------------------------------------------------------------------------------------------- CUDA graphs


def _cloned(output):
    """`output` (a tensor, a tuple of them, a transformers `ModelOutput`, None) with every tensor copied out of a
    graph's static buffers."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_cloned(item) for item in output)
    if isinstance(output, dict):  # transformers' ModelOutput is an OrderedDict
        return type(output)(**{key: _cloned(value) for key, value in output.items()})
    return output


class CudaGraphModule:
    """Capture a module's forward in one CUDA graph per input signature and replay it (CUDA only); subclasses say
    which calls qualify and what their tensor inputs are (`__call__`).

    Installed with `install(module)`; callers keep calling `module(...)` as before. The graphs of all signatures
    share one memory pool; outputs are copied out of the graph's static buffers; replays are serialized (one
    lock). A graph holds the addresses of the weights it was captured with, so moving or casting the module
    (`.to()`, `.cuda()`, `.half()`: anything through `nn.Module._apply`, as the app's CPU/GPU swap does) drops every
    graph; `reset()` does it by hand (the app does after a CUDA out-of-memory, to give the pool back).
    """

    EAGER_FIRST = True  # the first call at a new signature runs eagerly (compiled code compiles there), then captures

    def __init__(self, module: nn.Module):
        self.module = module
        self.forward = module.forward
        self.graphs: dict[tuple, tuple] = {}
        self.seen: set[tuple] = set()
        self.failures: dict[tuple, str] = {}  # signatures whose forward could not be captured: they run eagerly
        self.pool = None
        self.lock = threading.RLock()

    @classmethod
    def install(cls, module: nn.Module):
        wrapper = cls(module)
        module.forward = wrapper
        module._apply = wrapper.moved
        return wrapper

    def moved(self, *args, **kwargs):
        """`nn.Module._apply` of the module, after dropping the graphs: the weights get new addresses, which the
        captured graphs would still read."""
        self.reset()
        return type(self.module)._apply(self.module, *args, **kwargs)

    def __deepcopy__(self, memo):
        """A deep copy of the module gets a wrapper of its own and no graphs (they hold this module's addresses)."""
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone.module = copy.deepcopy(self.module, memo)
        bound = getattr(self.forward, "__self__", None) is self.module
        clone.forward = types.MethodType(self.forward.__func__, clone.module) if bound else \
            copy.deepcopy(self.forward, memo)
        clone.graphs, clone.seen, clone.failures, clone.pool = {}, set(), {}, None
        clone.lock = threading.RLock()
        return clone

    @classmethod
    def installed(cls, module: nn.Module):
        """The wrapper of this class `install` put on `module`, if any."""
        forward = module.__dict__.get("forward")
        return forward if isinstance(forward, cls) else None

    def uninstall(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward
            self.module.__dict__.pop("_apply", None)
        self.reset()

    def reset(self) -> None:
        """Drop every captured graph and the memory pool (the next calls at each signature warm up and capture)."""
        with self.lock:
            self.graphs.clear()
            self.seen.clear()
            self.failures.clear()
            self.pool = None

    def replay(self, key: tuple, tensors: dict[str, torch.Tensor], run: Callable[[dict], object]):
        """`run(tensors)`, from the graph captured for `key` (see `EAGER_FIRST`); eagerly where capture failed."""
        with self.lock:
            if key in self.failures:
                return run(tensors)
            if key not in self.graphs:
                if self.EAGER_FIRST and key not in self.seen:
                    self.seen.add(key)
                    return run(tensors)
                try:
                    self.graphs[key] = self._capture(tensors, run)
                except RuntimeError as error:  # e.g. a host synchronization inside the forward
                    self.failures[key] = error_summary(error)
                    return run(tensors)
            graph, static_in, static_out = self.graphs[key]
            for name, tensor in tensors.items():
                static_in[name].copy_(tensor)
            graph.replay()
            return _cloned(static_out)

    def _capture(self, tensors: dict, run: Callable[[dict], object]):
        static_in = {name: t.clone() for name, t in tensors.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run(static_in)  # one more warm-up on the side stream, as CUDA graphs need
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = run(static_in)
        return graph, static_in, static_out


class CudaGraphTransformer(CudaGraphModule):
    """Whole SD3 transformer steps in CUDA graphs, one per input shape: the first call at a new shape runs eagerly
    (warm-up, compiles if compiled), the second captures, later calls replay."""

    TENSOR_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")

    def __call__(self, *args, **kwargs):
        tensors = {name: kwargs.get(name) for name in self.TENSOR_INPUTS}
        if args or any(not isinstance(t, torch.Tensor) or t.device.type != "cuda" for t in tensors.values()) \
                or kwargs.get("return_dict", True) or torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in tensors.items())
        rest = {k: v for k, v in kwargs.items() if k not in self.TENSOR_INPUTS}
        return (self.replay(key, tensors, lambda static: self.forward(**static, **rest)[0]),)


class CudaGraphEncoder(CudaGraphModule):
    """A text encoder (CLIP, T5) in CUDA graphs, one per token-ids shape and set of options: the pipeline pads every
    prompt to a fixed length, so after its first call each prompt replays one graph instead of launching hundreds of
    small kernels from Python (T5-XXL: ~25 ms of GPU work in a ~100-150 ms eager call on the H200)."""

    EAGER_FIRST = False  # nothing to compile: the first call captures (after one warm-up run on a side stream)

    def __call__(self, input_ids=None, **kwargs):
        if not isinstance(input_ids, torch.Tensor) or input_ids.device.type != "cuda" or torch.is_grad_enabled() \
                or any(not isinstance(value, (bool, int, str, type(None))) for value in kwargs.values()):
            return self.forward(input_ids, **kwargs)
        key = (tuple(input_ids.shape), input_ids.dtype, tuple(sorted(kwargs.items())))
        return self.replay(key, {"input_ids": input_ids}, lambda static: self.forward(static["input_ids"], **kwargs))
