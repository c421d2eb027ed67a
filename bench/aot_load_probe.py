"""Does this machine load any AOTInductor package at all? (issue 11; follows bench/aot_bisect.py)

On the H200 image every CUDA package of an SD3 block (even a bf16 one with none of the project's pieces) segfaulted
in `torch._inductor.aoti_load_package`. This builds the smallest packages there are (Linear + ReLU, CPU and CUDA,
with and without the weights inside the .so), loads each in the process that built it and in a fresh one, and
records the facts that decide dynamic loading (and loads a copy whose .so no longer asks for an executable stack): glibc, compiler, the .so's GNU_STACK flags and libraries, and a
native backtrace of the crash where gdb exists. One JSON file, written as it goes.

    python3 -m bench.aot_load_probe --out $OUT/probe [--cases cpu,cuda] [--timeout 240]

Each package is also opened with a bare `dlopen` (ctypes) in a fresh process, so a crash there points at the
library itself rather than torch's package loader.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

CASES = ("cpu", "cuda", "cuda_constants_outside")  # cheapest first: a run that times out still says something
PT_GNU_STACK, PF_X = 0x6474E551, 1


def clear_executable_stack(so: bytes) -> bytes:
    """The ELF64 shared object with its GNU_STACK program header no longer asking for an executable stack (glibc 2.41
    refuses to dlopen such objects; inductor's wrappers ask for one)."""
    data = bytearray(so)
    phoff = int.from_bytes(data[0x20:0x28], "little")
    size, count = int.from_bytes(data[0x36:0x38], "little"), int.from_bytes(data[0x38:0x3A], "little")
    for index in range(count):
        header = phoff + index * size
        if int.from_bytes(data[header:header + 4], "little") == PT_GNU_STACK:
            flags = int.from_bytes(data[header + 4:header + 8], "little") & ~PF_X
            data[header + 4:header + 8] = flags.to_bytes(4, "little")
    return bytes(data)


def without_executable_stack(package: Path, target: Path) -> None:
    """A copy of the package whose .so files no longer ask for an executable stack."""
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for item in source.infolist():
            data = source.read(item)
            out.writestr(item, clear_executable_stack(data) if item.filename.endswith(".so") else data)


def _model(torch, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()).to(device).eval()
    return model, (torch.randn(8, 64, device=device),)


def build(case: str, folder: Path) -> dict:
    """Export + package the model of `case`, then load and run it in this process."""
    import torch

    device = "cpu" if case == "cpu" else "cuda"
    model, inputs = _model(torch, device)
    configs = {"aot_inductor.package_constants_in_so": False} if case == "cuda_constants_outside" else {}
    exported = torch.export.export(model, inputs)
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(folder / f"{case}.pt2"),
                                                    inductor_configs=configs)
    print(f"[{case}] built {path}; loading in the same process", flush=True)
    return load(case, folder)


def dlopen(case: str, folder: Path) -> dict:
    """Only `dlopen` the package's .so files (no torch loader): does the crash come from loading the library?"""
    import ctypes

    import torch  # noqa: F401  (the .so files link against torch's libraries)

    unpacked = folder / f"{case}_dlopen"
    with zipfile.ZipFile(folder / f"{case}.pt2") as archive:
        archive.extractall(unpacked)
    return {"loaded": [so.name for so in sorted(unpacked.rglob("*.so")) if ctypes.CDLL(str(so))]}


def load(case: str, folder: Path) -> dict:
    import torch

    device = "cpu" if case == "cpu" else "cuda"
    model, inputs = _model(torch, device)
    if case == "cuda_stack_cleared":
        without_executable_stack(folder / "cuda.pt2", folder / f"{case}.pt2")
    runner = torch._inductor.aoti_load_package(str(folder / f"{case}.pt2"))
    if case == "cuda_constants_outside":
        runner.load_constants(dict(model.state_dict()), check_full_update=True, user_managed=True)
    with torch.no_grad():
        got = runner(*inputs)
        got = got[0] if isinstance(got, (list, tuple)) else got
        return {"max_abs_error": float((got - model(*inputs)).abs().max())}


def _run(command: list[str], timeout: int = 240) -> dict:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    return {"exit_code": done.returncode, "tail": (done.stdout + done.stderr).splitlines()[-25:]}


def facts(folder: Path) -> dict:
    """glibc, gcc, gdb and, per package, the .so's program headers and libraries."""
    found = {"ldd": _run(["ldd", "--version"]).get("tail", [""])[:1], "gcc": _run(["gcc", "--version"]).get(
        "tail", [""])[:1], "gdb": shutil.which("gdb"), "python": sys.version.split()[0]}
    for package in sorted(folder.glob("*.pt2")):
        unpacked = folder / (package.stem + "_unpacked")
        with zipfile.ZipFile(package) as archive:
            archive.extractall(unpacked)
        for so in unpacked.rglob("*.so"):
            found[f"{package.stem}:{so.name}"] = {
                "gnu_stack": [line.strip() for line in _run(["readelf", "-lW", str(so)]).get("tail", [])
                              if "GNU_STACK" in line],
                "ldd": [line.strip() for line in _run(["ldd", str(so)]).get("tail", []) if "not found" in line
                        or "torch" in line or "cuda" in line][:12]}
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES), help="which packages to build (default: %(default)s)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per child process")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # "build:<case>" / "load:<case>", in a child process
    args = parser.parse_args(argv)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    if args.step:
        what, case = args.step.split(":")
        row = {"build": build, "load": load, "dlopen": dlopen}[what](case, folder)
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    report: dict = {"cases": {}}
    results = folder / "aot_load_probe.json"
    me = [sys.executable, "-X", "faulthandler", "-m", "bench.aot_load_probe", "--out", str(folder)]
    for case in args.cases.split(","):
        for what in ("build", "dlopen", "load"):
            report["cases"][f"{what}:{case}"] = _run(me + ["--step", f"{what}:{case}"], args.timeout)
            results.write_text(json.dumps(report, indent=1))
            print(f"{what}:{case}: exit {report['cases'][f'{what}:{case}'].get('exit_code')}", flush=True)
    if (folder / "cuda.pt2").is_file():
        report["cases"]["load:cuda_stack_cleared"] = _run(me + ["--step", "load:cuda_stack_cleared"], args.timeout)
    report["facts"] = facts(folder)
    gdb = report["facts"]["gdb"]
    if gdb and (folder / "cuda.pt2").is_file():
        report["gdb_backtrace"] = _run([gdb, "-batch", "-ex", "run", "-ex", "bt 30", "--args", *me[:1], *me[3:],
                                        "--step", "load:cuda"], timeout=300)
    results.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
