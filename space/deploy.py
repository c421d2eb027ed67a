"""Deploy the demo to a Hugging Face Space.

    python -m space.deploy --space-id me/sd35-fp8-demo --model me/sd35-large-fp8 [--base REPO]
                           [--hardware l40sx1] [--private] [--dry-run]

Creates the Space if needed (Gradio SDK), sets the Space variables MODEL_ID / BASE_MODEL_ID, and
uploads in ONE commit exactly what the Space runs: app.py, requirements.txt, the core package
sd35fp8/, the UI package space/ (without caches and without this deploy-only module), and the card
space/README.md rendered with the model ids as the Space's README.md. Files on the Space that are
not part of the upload are deleted in that same commit, so the Space mirrors the project.

The upload folder is staged in a temporary directory and sent with `HfApi.upload_folder`.
`--dry-run` stages the same folder, lists it and prints the card, and touches no network.
The token comes from HF_TOKEN or the saved login (`hf auth login`); it is never printed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, SpaceCard, SpaceHardware

from sd35fp8.errors import BadInput, run_command
from sd35fp8.hub import HUB_URL, NO_TOKEN_MESSAGE, find_token, hub_errors, redact, validate_repo_id

ROOT = Path(__file__).resolve().parents[1]
CARD_TEMPLATE = Path(__file__).with_name("README.md")

DEFAULT_BASE = "stabilityai/stable-diffusion-3.5-large"
PLACEHOLDER_MODEL = "your-name/sd35-large-fp8"  # in the card template; replaced by --model
MODEL_VARIABLE, BASE_VARIABLE = "MODEL_ID", "BASE_MODEL_ID"

# What the Space needs, relative to the project root. Nothing else is uploaded (no tests/, bench/,
# convert/, docs/, .ci/): the Space runs the app, not the converter or the test suite.
TOP_FILES = ("app.py", "requirements.txt")
PACKAGES = ("sd35fp8", "space")
REQUIRED = ("app.py", "requirements.txt", "sd35fp8/__init__.py", "space/__init__.py")
# Deploy-only files inside the uploaded packages: this module (needs a write token, useless on the
# Space) and the card template (uploaded rendered, as the root README.md).
DEPLOY_ONLY = frozenset({"space/deploy.py", "space/README.md"})
# The built-in demo model (22 MB of weights) stays home: the Space runs the FP8 repo named by MODEL_ID.
NOT_FOR_THE_SPACE = ("sd35fp8/models/",)
SKIP_DIRS = frozenset({"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints"})
# .pyi: gradio writes stubs next to modules that subclass its components (space/ui.pyi); the Space never needs them.
SKIP_SUFFIXES = (".pyc", ".pyo", ".pyi", ".orig", ".rej", ".swp", ".bak", "~")
SKIP_NAMES = frozenset({".DS_Store", "Thumbs.db"})

HARDWARE = {hardware.value: hardware for hardware in SpaceHardware}


class DeployError(BadInput):
    """A problem with the project checkout or the arguments that the user can fix."""


# ------------------------------------------------------------------------------------- checks


def gradio_pin(requirements: str) -> str | None:
    """The exact version pinned by a `gradio==X` line of a requirements file (None if there is none)."""
    match = re.search(r"^\s*gradio\s*==\s*([^\s;#]+)", requirements, flags=re.MULTILINE | re.IGNORECASE)
    return match.group(1) if match else None


# ------------------------------------------------------------------------------------- folder


def _skipped(path: Path) -> bool:
    return (path.name in SKIP_NAMES or path.name.startswith(".") or path.name.endswith(SKIP_SUFFIXES)
            or path.name.endswith(".egg-info"))


def collect_files(root: Path | None = None) -> dict[str, Path]:
    """Map each path the Space gets (POSIX, relative) to its source file under `root` (README.md not included)."""
    root = Path(root or ROOT)
    missing = [name for name in REQUIRED if not (root / name).is_file()]
    if missing:
        raise DeployError(f"{', '.join(missing)} missing under {root}: run this from the project's checkout.")
    files = {name: root / name for name in TOP_FILES}
    for package in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(root / package):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not _skipped(Path(d)))
            for filename in sorted(filenames):
                source = Path(dirpath) / filename
                relative = source.relative_to(root).as_posix()
                if (relative not in DEPLOY_ONLY and not relative.startswith(NOT_FOR_THE_SPACE)
                        and not _skipped(source) and source.is_file()):
                    files[relative] = source
    return dict(sorted(files.items()))


def render_space_card(model: str, base: str, template: Path = CARD_TEMPLATE, requirements: Path | None = None) -> str:
    """The Space's README.md: the card template with `models:` (and the body's placeholder) set to base + model."""
    card = SpaceCard(Path(template).read_text(encoding="utf-8"))
    card.data.models = list(dict.fromkeys([base, model]))
    card.text = card.text.replace(PLACEHOLDER_MODEL, model)
    if requirements is not None:
        pin = gradio_pin(Path(requirements).read_text(encoding="utf-8"))
        if str(card.data.sdk_version) != pin:
            raise DeployError(
                f"the card's sdk_version ({card.data.sdk_version}) differs from the gradio pin in requirements.txt"
                f" ({pin}); the Space would run another Gradio than the one pinned. Make them equal.")
    return card.content


def stage(folder: Path, model: str, base: str, root: Path | None = None) -> list[str]:
    """Copy what the Space needs into `folder` (plus the rendered card as README.md); return the sorted paths."""
    folder, root = Path(folder), Path(root or ROOT)
    card = render_space_card(model, base, template=Path(root) / "space" / "README.md",
                       requirements=Path(root) / "requirements.txt")
    for relative, source in collect_files(root).items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    (folder / "README.md").write_text(card, encoding="utf-8")
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def _project_revision(root: Path) -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *TOP_FILES, *PACKAGES],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+local-changes" if dirty else "") if head else None


# ------------------------------------------------------------------------------------- deploy


def space_url(space_id: str, endpoint: str = HUB_URL) -> str:
    return f"{endpoint.rstrip('/')}/spaces/{space_id}"


def deploy(space_id: str, model: str, base: str, *, token: str, hardware: str | None = None,
           private: bool = False, root: Path | None = None, api: HfApi | None = None, say=print) -> str:
    """Create/update the Space and upload the app in one commit; return the Space's URL."""
    api = api or HfApi(token=token)
    root = Path(root or ROOT)
    with tempfile.TemporaryDirectory(prefix="space-deploy-") as tmp:
        files = stage(Path(tmp), model, base, root)  # local problems surface before any request

        existed = api.repo_exists(space_id, repo_type="space", token=token)
        api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private or None,
                        exist_ok=True, token=token)
        say(f"Space {space_id}: {'already there' if existed else 'created'}"
            + (" (private)" if private and not existed else ""))
        if private and existed:
            say("  note: --private applies to new Spaces only; the existing Space keeps its visibility.")

        # Variables first: the upload below triggers the build, which should see the model ids.
        api.add_space_variable(space_id, MODEL_VARIABLE, model, description="FP8 model repo the app loads",
                               token=token)
        api.add_space_variable(space_id, BASE_VARIABLE, base, description="16-bit base repo for FP16 vs FP8",
                               token=token)
        say(f"Variables: {MODEL_VARIABLE}={model}  {BASE_VARIABLE}={base}")
        if hardware:
            api.request_space_hardware(space_id, HARDWARE[hardware], token=token)
            say(f"Hardware requested: {hardware}")

        revision = _project_revision(root)
        say(f"Uploading {len(files)} files in one commit ...")
        commit = api.upload_folder(
            repo_id=space_id, repo_type="space", folder_path=tmp, token=token,
            commit_message=f"Deploy SD3.5 FP8 demo ({model})",
            commit_description="\n".join([
                f"Model: {model}", f"Base: {base}",
                f"Project revision: {revision or 'unknown'}",
                "Files: " + ", ".join(files),
            ]),
            delete_patterns="*",  # mirror: drop files a previous deploy left that are no longer part of the app
        )
    say(f"Commit: {commit.commit_url}")
    url = space_url(space_id, api.endpoint)
    say(f"Space URL: {url}")
    if base == DEFAULT_BASE:
        say(f"  note: {base} is gated; add a secret HF_TOKEN (read token with access) in the Space's settings"
            " or the FP16 side cannot download.")
    return url


def dry_run(space_id: str, model: str, base: str, *, hardware: str | None, private: bool,
            token_source: str | None, root: Path | None = None, say=print) -> list[str]:
    """Stage the folder, list it and print the card; no network."""
    with tempfile.TemporaryDirectory(prefix="space-deploy-") as tmp:
        files = stage(Path(tmp), model, base, root)
        card = (Path(tmp) / "README.md").read_text(encoding="utf-8")
        sizes = {name: (Path(tmp) / name).stat().st_size for name in files}
    say("Dry run: nothing is uploaded and no network is used.")
    say(f"Space: {space_url(space_id)} (sdk gradio"
        + (", private if created" if private else "") + (f", hardware {hardware}" if hardware else "") + ")")
    say(f"Variables: {MODEL_VARIABLE}={model}  {BASE_VARIABLE}={base}")
    say(f"Files ({len(files)}, one commit; other files on the Space would be deleted):")
    for name in files:
        note = "   <- rendered from space/README.md" if name == "README.md" else ""
        say(f"  {name}  ({sizes[name]} bytes){note}")
    say(f"Token: found ({token_source})" if token_source else
        "Token: none found; a real run would stop here: " + NO_TOKEN_MESSAGE)
    say("----- README.md (Space card) -----")
    say(card.rstrip("\n"))
    say("----- end of README.md -----")
    return files


# ------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m space.deploy",
        description="Create or update the Hugging Face Space that runs this app (one commit).",
    )
    parser.add_argument("--space-id", required=True, help="the Space, OWNER/NAME (e.g. me/sd35-fp8-demo)")
    parser.add_argument("--model", required=True, help="FP8 model repo on the Hub, OWNER/NAME (Space variable MODEL_ID)")
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help=f"16-bit base repo for the comparison (Space variable BASE_MODEL_ID; default {DEFAULT_BASE})")
    parser.add_argument("--hardware", choices=sorted(HARDWARE), default=None,
                        help="request this hardware for the Space (billed by the Hub); default: leave it as it is")
    parser.add_argument("--private", action="store_true", help="create the Space private (new Spaces only)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the files and print the card that would be uploaded; no network, no token needed")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Deploy (or --dry-run); returns the exit code: 2 for bad input, 1 when the Hub or the network fails."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        space_id = validate_repo_id(args.space_id, "--space-id")
        model = validate_repo_id(args.model, "--model")
        base = validate_repo_id(args.base, "--base")
        token, source = find_token()
        if args.dry_run:
            dry_run(space_id, model, base, hardware=args.hardware, private=args.private, token_source=source)
            return 0
        if not token:
            raise BadInput(NO_TOKEN_MESSAGE)
        with hub_errors(f"deploy the Space {space_id}", space_id):
            deploy(space_id, model, base, token=token, hardware=args.hardware, private=args.private)
        return 0

    return run_command(run, redact=redact)


if __name__ == "__main__":
    sys.exit(main())
