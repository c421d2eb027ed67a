"""One replica per device: dispatch, retry on another replica, comparison on two at once (two CPU replicas)."""

from __future__ import annotations

import os
import socket
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client  # noqa: E402

from sd35fp8.errors import BadInput  # noqa: E402
from sd35fp8.generate import OutOfMemory  # noqa: E402
from sd35fp8.request import GenerationRequest  # noqa: E402
from space.replicas import Replicas, parse_devices  # noqa: E402
from space.ui import build_demo, launch_kwargs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")
REQUEST = GenerationRequest("a cat", seed=3, steps=2, width=64, height=64)


@pytest.fixture(scope="module")
def pool():
    return Replicas.load("tiny", None, parse_devices("cpu,cpu"))


def test_device_lists():
    assert parse_devices("cpu,cpu") == [torch.device("cpu")] * 2
    if not torch.cuda.is_available():
        assert parse_devices("auto") == [torch.device("cpu")]
        with pytest.raises(BadInput, match="cuda:1 does not exist here"):
            parse_devices("cuda:1")
    with pytest.raises(BadInput, match="not a device"):
        parse_devices("cuda:x")
    with pytest.raises(BadInput, match="not supported"):
        parse_devices("meta")


def test_a_failing_replica_is_reported_and_the_job_runs_on_another(pool, monkeypatch):
    broken = pool.replicas[0]

    def out_of_memory(*args, **kwargs):
        raise OutOfMemory("The GPU ran out of memory at 64x64, batch 1.")

    monkeypatch.setattr(broken.models, "run", out_of_memory)
    results = [pool.run("fp8", REQUEST) for _ in range(3)]
    assert all(r.ok for r in results)
    assert any(f"{broken.name} failed (OutOfMemory" in " ".join(r.warnings) for r in results)
    assert broken.failures >= 1 and pool.reports and "OutOfMemory" in pool.reports[-1]


def test_when_every_replica_fails_the_error_reaches_the_caller(pool, monkeypatch):
    for replica in pool.replicas:
        monkeypatch.setattr(replica.models, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken")))
    with pytest.raises(RuntimeError, match="broken"):
        pool.run("fp8", REQUEST)
    monkeypatch.undo()
    assert pool.run("fp8", REQUEST).ok  # and the pool serves again


def _record_spans(pool, monkeypatch, seconds=0.3):
    spans, lock = [], threading.Lock()
    for replica in pool.replicas:
        original = replica.models.run

        def timed(precision, request, _original=original, _name=replica.name, **kwargs):
            started = time.monotonic()
            time.sleep(seconds)
            result = _original(precision, request, **kwargs)
            with lock:
                spans.append((_name, precision, started, time.monotonic()))
            return result

        monkeypatch.setattr(replica.models, "run", timed)
    return spans


def test_the_comparison_runs_both_precisions_at_once_on_two_replicas(pool, monkeypatch):
    spans = _record_spans(pool, monkeypatch)
    fp8, ref = pool.run_pair(REQUEST)
    assert (fp8.precision, ref.precision) == ("fp8", "bf16")
    (_, _, start_a, end_a), (_, _, start_b, end_b) = spans
    assert start_a < end_b and start_b < end_a  # the two runs overlapped in time
    assert {s[0] for s in spans} == {"cpu"} and len(spans) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_concurrent_clients_are_served_by_every_replica_at_once(pool, monkeypatch):
    for replica in pool.replicas:
        replica.jobs = 0
    in_flight, peak, lock = [0], [0], threading.Lock()
    for replica in pool.replicas:
        original = replica.models.run

        def counted(precision, request, _original=original, **kwargs):
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            try:
                time.sleep(0.3)
                return _original(precision, request, **kwargs)
            finally:
                with lock:
                    in_flight[0] -= 1

        monkeypatch.setattr(replica.models, "run", counted)
    demo = build_demo(pool)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    try:
        clients = [Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in range(4)]
        jobs = [c.submit("a cat", "", i, False, 2, 4.5, 64, 64, "fp8", api_name="/generate")
                for i, c in enumerate(clients)]
        seeds = sorted(job.result(timeout=120)[1] for job in jobs)
        assert seeds == [0, 1, 2, 3]
        assert peak[0] == 2  # two replicas: two jobs at a time, never more
        assert all(r.jobs >= 1 for r in pool.replicas)
        stats = clients[0].predict(api_name="/gpu_stats")
        assert len(stats["gpus"]) == 1  # both CPU replicas share the no-GPU sampler
    finally:
        demo.close()
