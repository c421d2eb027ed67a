"""Peak RAM and throughput of the FP8 converter on one full-size component (CPU; RANDOM weights).

Runs the converter's own code on a component folder written by `bench.make_random_checkpoint`:
`convert.source.inspect_folder` -> `convert.quantize.plan_component` -> `write_component` (the FP8 variant,
sharded) -> `convert.verify.verify_component` (reload through diffusers, tensor digests, forward probe), in a
fresh child process, so the peak resident memory measured is the converter's own and nothing else's.

Memory is measured three ways in the child:
  * `resource.getrusage(RUSAGE_SELF).ru_maxrss` (the kernel's high-water mark), read after every phase, so the
    phase that set the peak is known exactly (the mark only rises during the phase that sets it);
  * a thread sampling psutil RSS every 20 ms, giving each phase's own peak, with the anonymous / file-backed
    split from /proc/self/status (file-backed = pages of memory-mapped files);
  * the parent's `RUSAGE_CHILDREN` high-water mark, as a cross-check.
Phases: import, plan, write (split into write.stream = read + quantize + digest, and write.flush = safetensors
save of a full shard), verify (split into verify.reload, verify.compare, verify.probe, verify.rest). The
split is done by wrapping the converter's functions for timing only; what runs is unchanged.

The input files' page cache is dropped (fsync + posix_fadvise DONTNEED on those files only) before the run, so
the input is read from disk as on a first conversion.

    python -m bench.make_random_checkpoint --config bench/configs/sd35_large --out bench/work/sd35_large_random
    python -m bench.convert_memory --source bench/work/sd35_large_random
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import inspect
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGET_PEAK_GB = 12.0
GB = 1e9
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- child side

def _status_kb(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in kB (Linux); empty elsewhere."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports kB, macOS bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PhaseMeter:
    """Phase bookkeeping + an RSS sampler thread (psutil), with per-phase peaks and a coarse timeline."""

    def __init__(self, interval: float = 0.02, timeline_step: float = 1.0):
        import psutil

        self._process = psutil.Process()
        self._interval, self._timeline_step = interval, timeline_step
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self.phase = "start"
        self._last_switch = self._t0
        self.phases: dict[str, dict] = {}
        self.timeline: list[list] = []
        self._bucket_end, self._bucket_max = timeline_step, 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _entry(self, phase: str) -> dict:
        return self.phases.setdefault(phase, {"seconds": 0.0, "sampled_peak": 0, "anon_at_peak": None,
                                              "file_at_peak": None, "maxrss_after": 0, "calls": 0})

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def sample(self) -> None:
        rss = self._process.memory_info().rss
        with self._lock:
            entry = self._entry(self.phase)
            if rss > entry["sampled_peak"]:
                split = _status_kb("RssAnon", "RssFile", "RssShmem")
                entry["sampled_peak"] = rss
                entry["anon_at_peak"] = split.get("RssAnon", 0) * 1024 if split else None
                entry["file_at_peak"] = split.get("RssFile", 0) * 1024 if split else None
            now = time.perf_counter() - self._t0
            self._bucket_max = max(self._bucket_max, rss)
            if now >= self._bucket_end:
                self.timeline.append([round(now, 1), round(self._bucket_max / GB, 3), self.phase])
                self._bucket_end, self._bucket_max = now + self._timeline_step, 0

    def _switch(self, phase: str) -> None:
        """Charge the time since the last switch to the current phase (exclusive time), then switch."""
        now = time.perf_counter()
        self._entry(self.phase)["seconds"] += now - self._last_switch
        self._last_switch, self.phase = now, phase

    def enter(self, phase: str) -> str:
        """Switch to `phase`; returns the phase to hand to `leave` to switch back to."""
        self.sample()
        with self._lock:
            previous = self.phase
            self._switch(phase)
            self._entry(phase)["calls"] += 1
        return previous

    def leave(self, phase: str, previous: str) -> None:
        self.sample()
        with self._lock:
            self._entry(phase)["maxrss_after"] = _maxrss_bytes()
            self._switch(previous)

    def measure(self, phase: str):
        meter = self

        class _Context:
            def __enter__(self):
                self.token = meter.enter(phase)

            def __exit__(self, *exc):
                meter.leave(phase, self.token)

        return _Context()

    def wrap(self, owner, attribute: str, phase: str) -> None:
        """Attribute time and memory spent inside owner.attribute to `phase` (behaviour unchanged)."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            with self.measure(phase):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapper)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def child(args: argparse.Namespace) -> int:
    meter = PhaseMeter()
    meter.start()
    report: dict = {"rss_at_start": meter._process.memory_info().rss}
    with meter.measure("import"):
        import torch

        from convert import checkpoint, verify
        from convert.quantize import plan_component, write_component
        from convert.source import inspect_folder
    torch.set_num_threads(args.threads or torch.get_num_threads())
    source_dir, out_dir = Path(args.source).resolve(), Path(args.out).resolve()

    # where inside write/verify the memory goes: wrap the converter's own steps (timing and sampling only)
    meter.wrap(checkpoint.ShardedWriter, "_flush", "write.flush")
    meter.wrap(verify, "_reload", "verify.reload")
    meter.wrap(verify, "_compare_tensors", "verify.compare")
    meter.wrap(verify, "_probe", "verify.probe")

    with meter.measure("plan"):
        source = inspect_folder(source_dir)
        component = source.components[args.component]
        plan = plan_component(component, True, [])
        files = checkpoint.weight_files(component.folder, component.library)
        reader = checkpoint.SafetensorsReader(files)
        names = reader.keys()  # a SafetensorsReader, not a dict: iterating it reads tensors
        dtype = next(reader.dtype(n) for n in names if reader.dtype(n).is_floating_point)
        report["stored_elements"] = sum(reader.nbytes(n) // reader.dtype(n).itemsize for n in names)
        del reader
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in source_dir.iterdir():  # top-level files, as the CLI copies them
        if item.is_file():
            shutil.copy2(item, out_dir / item.name)

    started = time.perf_counter()
    with meter.measure("write.stream"):  # everything in write_component that is not write.flush
        result = write_component(plan, out_dir / component.name, [], checkpoint.parse_size(args.max_shard_size))
    write_seconds = time.perf_counter() - started

    started = time.perf_counter()
    with meter.measure("verify.rest"):  # everything in verify_component outside reload / compare / probe
        extra = {"device": torch.device("cpu")} if "device" in inspect.signature(verify.verify_component).parameters else {}
        verification = verify.verify_component(out_dir, result, dtype, **extra)
    verify_seconds = time.perf_counter() - started
    meter.stop()

    report.update({
        "component": component.name, "class_name": component.class_name, "source_dtype": str(dtype).removeprefix("torch."),
        "input_files": [{"name": f.name, "bytes": f.stat().st_size} for f in files],
        "input_bytes": plan.bytes_before, "planned_output_bytes": plan.bytes_after, "output_bytes": result.bytes_after,
        "output_files": [{"name": f.name, "bytes": f.stat().st_size} for f in result.files],
        "quantized_layers": len(plan.quantized_layers), "tensors_written": len(result.digests),
        "write_seconds": write_seconds, "verify_seconds": verify_seconds, "verification": verification,
        "torch_threads": torch.get_num_threads(), "maxrss": _maxrss_bytes(), "phases": meter.phases,
        "timeline": meter.timeline,
    })
    Path(args.child_report).write_text(json.dumps(report))
    return 0


# ---------------------------------------------------------------------------------------------- parent side

def drop_page_cache(files: list[Path]) -> bool:
    """Evict these files (only) from the page cache, so they are read from disk as on a first run."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def disk_read_speed(path: Path, nbytes: int = 2 * 10**9, block: int = 64 * 2**20) -> float:
    """GB/s of plain sequential reads of the first `nbytes` of a file (cache dropped first, and after)."""
    drop_page_cache([path])
    buffer, done, started = bytearray(block), 0, time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while done < nbytes:
            count = handle.readinto(buffer)
            if not count:
                break
            done += count
    seconds = time.perf_counter() - started
    drop_page_cache([path])
    return done / GB / seconds


def machine_facts() -> dict:
    import psutil

    facts = {"cpu": platform.processor() or platform.machine(), "cores_logical": psutil.cpu_count(),
             "cores_physical": psutil.cpu_count(logical=False), "ram_gb": round(psutil.virtual_memory().total / GB, 1),
             "os": platform.platform(), "python": platform.python_version(), "gpu": None}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name, module in (("torch", "torch"), ("diffusers", "diffusers"), ("optimum-quanto", "optimum.quanto"),
                         ("transformers", "transformers"), ("safetensors", "safetensors"), ("psutil", "psutil")):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing package is recorded, not fatal
            versions[name] = None
    facts["versions"] = versions
    return facts


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summarize(child_report: dict, args: argparse.Namespace, parent_maxrss: int, wall: float, disk_gbps: float | None,
              cache_dropped: bool) -> dict:
    phases = {}
    for name, entry in child_report["phases"].items():
        if name == "start":
            continue
        phases[name] = {
            "seconds": round(entry["seconds"], 2), "calls": entry["calls"],
            "peak_rss_gb": round(entry["sampled_peak"] / GB, 3),
            "anon_gb_at_peak": None if entry["anon_at_peak"] is None else round(entry["anon_at_peak"] / GB, 3),
            "file_mapped_gb_at_peak": None if entry["file_at_peak"] is None else round(entry["file_at_peak"] / GB, 3),
            "ru_maxrss_gb_after": round(entry["maxrss_after"] / GB, 3),
        }
    # write/verify totals: the max over their sub-phases
    for group in ("write", "verify"):
        members = [v for k, v in phases.items() if k.startswith(group + ".")]
        phases[group] = {"peak_rss_gb": max(v["peak_rss_gb"] for v in members),
                         "seconds": round(child_report[f"{group}_seconds"], 2)}
    peak = child_report["maxrss"]
    peak_phase = max((k for k in phases if "." in k or k in ("import", "plan")), key=lambda k: phases[k]["peak_rss_gb"])
    input_gb = child_report["input_bytes"] / GB
    write_s, verify_s = child_report["write_seconds"], child_report["verify_seconds"]
    return {
        "benchmark": "convert_memory",
        "weights": "RANDOM (bench/make_random_checkpoint.py): real names, shapes, dtype and byte count of the "
                   "published model, random values; the figures measure memory and speed, not quality",
        "model": f"{args.label} {child_report['class_name']} ({child_report['component']})",
        "stored_elements": child_report["stored_elements"],
        "config": args.config_note,
        "command": "python -m bench.convert_memory " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "converter_steps": "convert.source.inspect_folder -> convert.quantize.plan_component -> write_component "
                           f"(max shard {args.max_shard_size}) -> convert.verify.verify_component (bf16 reload via "
                           "diffusers + quanto, digests of every tensor, forward probe)",
        "input_gb": round(input_gb, 3),
        "input_dtype": child_report["source_dtype"],
        "input_files": child_report["input_files"],
        "output_gb": round(child_report["output_bytes"] / GB, 3),
        "output_files": child_report["output_files"],
        "quantized_layers": child_report["quantized_layers"],
        "tensors_written": child_report["tensors_written"],
        "target_peak_rss_gb": TARGET_PEAK_GB,
        "peak_rss_gb": round(peak / GB, 3),
        "peak_rss_source": "getrusage(RUSAGE_SELF).ru_maxrss of the converter's child process",
        "peak_rss_gb_parent_view": round(parent_maxrss / GB, 3),
        "peak_phase": peak_phase,
        "meets_target": peak / GB <= TARGET_PEAK_GB,
        "rss_gb_at_start": round(child_report["rss_at_start"] / GB, 3),
        "write_seconds": round(write_s, 1),
        "verify_seconds": round(verify_s, 1),
        "child_wall_seconds": round(wall, 1),
        "throughput_write_gb_per_s": round(input_gb / write_s, 3),
        "throughput_write_and_verify_gb_per_s": round(input_gb / (write_s + verify_s), 3),
        "throughput_unit": "GB (1e9 bytes) of 16-bit input per second",
        "disk_read_gb_per_s": None if disk_gbps is None else round(disk_gbps, 3),
        "input_page_cache": "dropped before the run (posix_fadvise DONTNEED on the input files)" if cache_dropped
                            else "not dropped",
        "phases": phases,
        "verification": child_report["verification"],
        "machine": {**machine_facts(), "torch_threads": child_report["torch_threads"]},
        "rss_timeline_gb": {"step_seconds": 1.0, "columns": ["t_seconds", "max_rss_gb", "phase"],
                            "rows": child_report["timeline"]},
    }


def print_table(result: dict) -> None:
    print(f"\n{result['model']} — {result['input_gb']:.2f} GB {result['input_dtype']} in, "
          f"{result['output_gb']:.2f} GB FP8 out, {result['quantized_layers']} layers quantized (RANDOM weights)")
    print(f"  {'phase':<16}{'seconds':>10}{'peak RSS GB':>13}{'anon GB':>10}{'mapped GB':>11}{'ru_maxrss GB':>14}")
    for name, phase in result["phases"].items():
        if name in ("write", "verify"):
            continue
        anon = "" if phase["anon_gb_at_peak"] is None else f"{phase['anon_gb_at_peak']:.2f}"
        mapped = "" if phase["file_mapped_gb_at_peak"] is None else f"{phase['file_mapped_gb_at_peak']:.2f}"
        print(f"  {name:<16}{phase['seconds']:>10.1f}{phase['peak_rss_gb']:>13.2f}{anon:>10}{mapped:>11}"
              f"{phase['ru_maxrss_gb_after']:>14.2f}")
    verdict = "meets" if result["meets_target"] else "EXCEEDS"
    print(f"  peak RSS {result['peak_rss_gb']:.2f} GB (in {result['peak_phase']}) — {verdict} the "
          f"{result['target_peak_rss_gb']:.0f} GB target")
    print(f"  write {result['write_seconds']:.0f} s ({result['throughput_write_gb_per_s']:.3f} GB/s), verify "
          f"{result['verify_seconds']:.0f} s; write+verify {result['throughput_write_and_verify_gb_per_s']:.3f} GB/s; "
          f"disk read {result['disk_read_gb_per_s']} GB/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convert_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT / "bench/work/sd35_large_random",
                        help="pipeline folder from bench.make_random_checkpoint (default: %(default)s)")
    parser.add_argument("--component", default="transformer")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/work/convert_memory_out",
                        help="converted output folder, deleted afterwards unless --keep-output (default: %(default)s)")
    parser.add_argument("--max-shard-size", default="5GB", help="as convert's --max-shard-size (default: %(default)s)")
    parser.add_argument("--result", type=Path, default=ROOT / "bench/results/convert_memory.json")
    parser.add_argument("--label", default="SD3.5 Large", help="model name for the result (default: %(default)s)")
    parser.add_argument("--config-note", default="bench/configs/sd35_large/transformer/config.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the child (default: torch's)")
    parser.add_argument("--keep-output", action="store_true")
    parser.add_argument("--keep-cache", action="store_true", help="do not drop the input files' page cache")
    parser.add_argument("--skip-disk-probe", action="store_true", help="do not time raw disk reads")
    parser.add_argument("--child-report", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_report:
        return child(args)

    from convert.checkpoint import weight_files

    files = weight_files(args.source / args.component, "diffusers")
    disk = None if args.skip_disk_probe else disk_read_speed(files[0])
    outcome = run_child(args, files)
    if isinstance(outcome, int):
        return outcome
    child_report, parent_maxrss, wall, dropped = outcome
    result = summarize(child_report, args, parent_maxrss, wall, disk, dropped)
    print_table(result)
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.result}")
    return 0 if result["meets_target"] else 1


def run_child(args: argparse.Namespace, files: list[Path]):
    """One conversion in a fresh child process; returns (child report, its peak RSS seen by the OS, wall, cache dropped)."""
    if args.out.exists():
        shutil.rmtree(args.out)
    dropped = False if args.keep_cache else drop_page_cache(files)
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "child.json"
        command = [sys.executable, "-m", "bench.convert_memory", "--child-report", str(report_path),
                   "--source", str(args.source), "--component", args.component, "--out", str(args.out),
                   "--max-shard-size", args.max_shard_size, "--threads", str(args.threads)]
        print(f"converting {args.source / args.component}", flush=True)
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        if process.returncode != 0:
            print(f"the converter child failed with exit status {process.returncode}", file=sys.stderr)
            return process.returncode or 1
        child_report = json.loads(report_path.read_text())
    if not args.keep_output:
        shutil.rmtree(args.out, ignore_errors=True)
    return child_report, usage.ru_maxrss * 1024, wall, dropped


if __name__ == "__main__":
    sys.exit(main())
