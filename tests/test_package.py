"""The project installs as a package (`pip install .`): its console scripts name real entry points."""

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_console_scripts_point_at_main_functions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(project["scripts"]) == {"sd35fp8-convert", "sd35fp8-app", "sd35fp8-deploy-space"}
    for target in project["scripts"].values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target


def test_every_directly_imported_library_is_declared():
    declared = {line.split("==")[0].strip().lower().replace("_", "-")
                for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line}
    names = {"PIL": "pillow", "huggingface_hub": "huggingface-hub", "pynvml": "nvidia-ml-py", "optimum": "optimum-quanto"}
    # GPU-only, imported where used and optional there: nvidia-cudnn-frontend (an extra) and triton (a dependency of
    # torch's CUDA wheels; the CPU wheel has none, and requirements-dev pins it for the kernel tests)
    optional = {"cudnn", "triton"}
    imported = set()
    for path in [ROOT / "app.py", *ROOT.glob("sd35fp8/*.py"), *ROOT.glob("convert/*.py"), *ROOT.glob("space/*.py")]:
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in ("import", "from") and not words[1].startswith("."):
                imported.add(words[1].split(".")[0])
    third_party = {name for name in imported if name not in __import__("sys").stdlib_module_names}
    third_party -= {"sd35fp8", "convert", "space", "__future__", *optional}
    missing = {names.get(name, name).lower() for name in third_party} - declared
    assert not missing, f"imported but not in requirements.txt: {sorted(missing)}"
