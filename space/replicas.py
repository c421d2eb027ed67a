"""One model replica per GPU, and a pool that sends each job to a free one.

`Replicas.load(..., devices=["cuda:0", "cuda:1"])` loads a `Models` (the FP8 pipeline and, where memory
allows, its 16-bit reference) on every listed device. `run()` takes a free replica; a replica that runs out
of memory or fails is reported and the job is retried on another one, while the rest keep serving.
`run_pair()` runs FP8 and 16-bit at the same time on two replicas when there are two, so a comparison
takes as long as the slower of the two instead of their sum. No gradio here.

To scale past one host, run this app behind an existing engine (Spaces replicas, or a serving framework such
as Ray Serve calling the same `sd35fp8.generate.generate`); README says how.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sd35fp8.errors import BadInput, one_line
from sd35fp8.generate import GenerationResult, Stopped
from sd35fp8.gpu import GpuSampler
from sd35fp8.loading import default_device
from sd35fp8.request import GenerationRequest, InvalidRequest
from sd35fp8.settings import AppSettings

from .runtime import Models

log = logging.getLogger(__name__)


def parse_devices(spec: str) -> list[torch.device]:
    """"auto" (every CUDA GPU, else the CPU) or a comma-separated list such as "cuda:0,cuda:1"."""
    spec = (spec or "auto").strip().lower()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        return [torch.device("cuda", i) for i in range(count)] if count > 1 else [default_device()]
    devices = []
    for item in (part.strip() for part in spec.split(",")):
        try:
            device = torch.device(item)
        except RuntimeError:
            raise BadInput(f"--devices / DEVICES: {item!r} is not a device; use auto, cpu or cuda:N,cuda:M.") from None
        if device.type == "cuda":
            index = 0 if device.index is None else device.index
            if index >= count:
                raise BadInput(f"--devices / DEVICES: {item} does not exist here ({count} CUDA GPU(s) visible).")
            device = torch.device("cuda", index)
        elif device.type != "cpu":
            raise BadInput(f"--devices / DEVICES: {item!r} is not supported; use cpu or cuda:N.")
        devices.append(device)
    return devices


@dataclass(eq=False)
class Replica:
    """One `Models` on one device, with the sampler that measures that device."""

    models: Models
    sampler: GpuSampler
    busy: bool = False
    jobs: int = 0
    failures: int = 0

    @property
    def name(self) -> str:
        return str(self.models.fp8.device)


class Replicas:
    """A pool of replicas; each job takes a free one. The facts of the first replica describe them all."""

    def __init__(self, replicas: list[Replica]):
        if not replicas:
            raise ValueError("a pool needs at least one replica")
        self.replicas = replicas
        self.reports: deque[str] = deque(maxlen=50)  # failures seen, newest last
        self._free = threading.Condition()

    @classmethod
    def load(cls, model: str, base: str | None, devices: list[torch.device], *, offload: bool = False,
             compile: str = "auto", settings: AppSettings | None = None,
             sampler_for: Callable[[torch.device], GpuSampler] | None = None) -> Replicas:
        """Load one replica per device (each with its own sampler)."""
        settings = settings or AppSettings()
        sampler_for = sampler_for or default_sampler(settings)
        replicas = []
        for device in devices:
            models = Models.load(model, base, offload=offload, device=device, compile=compile, settings=settings)
            replicas.append(Replica(models, sampler_for(device)))
        return cls(replicas)

    # --------------------------------------------------------------------------------------- facts

    @property
    def first(self) -> Models:
        return self.replicas[0].models

    def __getattr__(self, name: str):
        """Facts of the models (fp8, reference, base, defaults, max_size, precisions, ...): the first replica's."""
        if name.startswith("_") or name == "replicas":
            raise AttributeError(name)
        return getattr(self.replicas[0].models, name)

    @property
    def size(self) -> int:
        return len(self.replicas)

    @property
    def samplers(self) -> list[GpuSampler]:
        """One sampler per distinct device, in replica order."""
        seen, samplers = set(), []
        for replica in self.replicas:
            if id(replica.sampler) not in seen:
                seen.add(id(replica.sampler))
                samplers.append(replica.sampler)
        return samplers

    def summary_lines(self) -> list[str]:
        lines = self.first.summary_lines()
        if self.size > 1:
            lines.append(f"{self.size} replicas: " + ", ".join(
                f"{r.name} ({'FP8 + 16-bit' if r.models.reference is not None else 'FP8 only'})"
                for r in self.replicas))
        return lines

    # ---------------------------------------------------------------------------------------- jobs

    @contextmanager
    def _take(self, count: int = 1, avoid: tuple[Replica, ...] = ()):
        """Wait for `count` free replicas (preferring ones not in `avoid`), mark them busy while in use."""
        candidates = [r for r in self.replicas if r not in avoid] or self.replicas
        count = min(count, len(candidates))
        with self._free:
            while sum(not r.busy for r in candidates) < count:
                self._free.wait()
            taken = [r for r in candidates if not r.busy][:count]
            for replica in taken:
                replica.busy = True
        try:
            yield taken
        finally:
            with self._free:
                for replica in taken:
                    replica.busy = False
                self._free.notify_all()

    def _run_on(self, replica: Replica, precision: str, request: GenerationRequest, **kwargs) -> GenerationResult:
        replica.jobs += 1
        return replica.models.run(precision, request, sampler=replica.sampler, **kwargs)

    def run(self, precision: str, request: GenerationRequest, *, on_step=None, should_stop=None,
            avoid: tuple[Replica, ...] = ()) -> GenerationResult:
        """One generation on a free replica; on a failure (out of memory included), again on another one."""
        failed: list[str] = []
        tried = list(avoid)
        while True:
            with self._take(1, avoid=tuple(tried)) as (replica,):
                try:
                    result = self._run_on(replica, precision, request, on_step=on_step, should_stop=should_stop)
                except (InvalidRequest, Stopped):
                    raise
                except Exception as error:  # noqa: BLE001 - out of memory or a broken replica: try another
                    failed.append(self._report(replica, error))
                    tried.append(replica)
                    if len(set(tried)) >= self.size:
                        raise
                    continue
            if failed:
                result.warnings.append(f"{'; '.join(failed)}; the job ran on {replica.name} instead.")
            return result

    def run_pair(self, request: GenerationRequest, *, on_step_for=None, should_stop=None
                 ) -> tuple[GenerationResult, GenerationResult]:
        """FP8 and 16-bit results of `request`: at the same time on two replicas where there are two."""
        on_step_for = on_step_for or (lambda precision: None)
        if self.size < 2 or any(r.models.reference is None for r in self.replicas):
            return (self.run("fp8", request, on_step=on_step_for("fp8"), should_stop=should_stop),
                    self.run("bf16", request, on_step=on_step_for("bf16"), should_stop=should_stop))
        with self._take(2) as pair, ThreadPoolExecutor(2, thread_name_prefix="compare") as pool:
            futures = {precision: pool.submit(self._run_on, replica, precision, request,
                                              on_step=on_step_for(precision), should_stop=should_stop)
                       for replica, precision in zip(pair, ("fp8", "bf16"))}
            outcomes = {}
            for (precision, future), replica in zip(futures.items(), pair):
                try:
                    outcomes[precision] = future.result()
                except (InvalidRequest, Stopped):
                    raise
                except Exception as error:  # noqa: BLE001 - retried below, once the pair is released
                    outcomes[precision] = (replica, self._report(replica, error))
        results = []
        for precision in ("fp8", "bf16"):
            outcome = outcomes[precision]
            if isinstance(outcome, tuple):
                replica, report = outcome
                outcome = self.run(precision, request, on_step=on_step_for(precision), should_stop=should_stop,
                                   avoid=(replica,))
                outcome.warnings.insert(0, report + ".")
            results.append(outcome)
        return results[0], results[1]

    def _report(self, replica: Replica, error: BaseException) -> str:
        replica.failures += 1
        report = f"{replica.name} failed ({type(error).__name__}: {one_line(error)})"
        log.warning("replica %s", report)
        self.reports.append(report)
        return report


def default_sampler(settings: AppSettings) -> Callable[[torch.device], GpuSampler]:
    """A sampler per device: the GPU's own NVML index (one shared sampler for every CPU replica)."""
    samplers: dict[int | None, GpuSampler] = {}

    def sampler_for(device: torch.device) -> GpuSampler:
        index = (device.index or 0) if device.type == "cuda" else None
        if index not in samplers:
            samplers[index] = GpuSampler(index=index or 0, history_seconds=settings.gpu_history_s)
        return samplers[index]

    return sampler_for
