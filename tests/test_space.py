"""The Space: its card, the deploy command, and that what deploy uploads starts as an app.

No test touches the network. The upload tests run the real `HfApi` code (create_repo, repo_exists,
add_space_variable, upload_folder with both its Xet pipeline and its legacy create_commit path)
against a fake Hub that sits at the lowest level there is: the HTTP transport of the one
`httpx2.Client` huggingface_hub uses. The fake Hub applies the ndjson commits it receives to an
in-memory tree, so the tests check what a Space would really hold, and then start the app from it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import pytest
import yaml
from huggingface_hub import SpaceCard, SpaceHardware, constants, set_client_factory
from huggingface_hub.utils import _http as hf_http

from space import deploy

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "space" / "README.md"
TOKEN = "hf_FAKEtokenFORtestsONLY0123456789abcdef"
SPACE, MODEL, BASE = "me/sd35-fp8-demo", "me/sd35-large-fp8", "stabilityai/stable-diffusion-3.5-large"
STARTUP_TIMEOUT_S = 180


def front_matter(text: str) -> tuple[dict, str]:
    match = re.match(r"^---\r?\n(.*?)\r?\n---\r?\n(.*)$", text, flags=re.DOTALL)
    assert match, "the card must start with a YAML block between '---' lines"
    meta = yaml.safe_load(match.group(1))
    assert isinstance(meta, dict)
    return meta, match.group(2)


def requirements_gradio_pin() -> str:
    pins = re.findall(r"^gradio==(\S+)\s*$", (ROOT / "requirements.txt").read_text(), flags=re.MULTILINE)
    assert len(pins) == 1, "requirements.txt must pin gradio exactly once (gradio==X)"
    return pins[0]


# ------------------------------------------------------------------------------------ the card


def test_card_front_matter_is_valid_and_matches_the_gradio_pin():
    meta, body = front_matter(CARD.read_text(encoding="utf-8"))
    assert meta["sdk"] == "gradio"
    assert str(meta["sdk_version"]) == requirements_gradio_pin()
    assert meta["python_version"] == "3.11"  # a string: unquoted 3.10 would read as 3.1
    assert meta["app_file"] == "app.py"
    assert meta["suggested_hardware"] in {hardware.value for hardware in SpaceHardware}
    assert meta["colorFrom"] in {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
    assert meta["colorTo"] in {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
    assert meta["title"] and meta["emoji"] and meta["license"]
    assert 0 < len(meta["short_description"]) <= 60  # the Hub's limit
    assert meta["models"] == [deploy.DEFAULT_BASE, deploy.PLACEHOLDER_MODEL]
    for words in ("Generate", "FP16 vs FP8", "latency", "VRAM", "energy", "temperature", "SSIM", "PSNR",
                  "GPU", "zero-a10g", "@spaces.GPU", "MODEL_ID", "BASE_MODEL_ID"):
        assert words in body, words
    # huggingface_hub's own parser agrees
    assert SpaceCard(CARD.read_text(encoding="utf-8")).data.sdk == "gradio"


@pytest.mark.parametrize("base", [BASE, "someone/sd35-medium"])
def test_rendered_card_names_the_models(base):
    text = deploy.render_space_card(MODEL, base, requirements=ROOT / "requirements.txt")
    meta, body = front_matter(text)
    assert meta["models"] == [base, MODEL]
    assert deploy.PLACEHOLDER_MODEL not in text
    assert MODEL in body
    template, _ = front_matter(CARD.read_text(encoding="utf-8"))
    assert {k: v for k, v in meta.items() if k != "models"} == {k: v for k, v in template.items() if k != "models"}


def test_card_and_pin_disagreeing_is_refused(tmp_path):
    (tmp_path / "requirements.txt").write_text("gradio==5.0.0\n")
    with pytest.raises(deploy.DeployError, match="sdk_version"):
        deploy.render_space_card(MODEL, BASE, requirements=tmp_path / "requirements.txt")


# ------------------------------------------------------------------------------------ a fake Hub


class FakeHub:
    """Answers huggingface_hub's HTTP requests like the Hub would, keeping repos in memory."""

    GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}
        self.variables: dict[str, dict[str, str]] = {}
        self.hardware: dict[str, str] = {}
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[str] = []
        self.authorization: set[str | None] = set()

    # -- helpers
    @staticmethod
    def _json(status: int, data, headers: dict | None = None) -> httpx2.Response:
        return httpx2.Response(status, json=data, headers=headers or {})

    def _not_found(self, repo_id: str) -> httpx2.Response:
        return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

    # -- entry point (an httpx2.MockTransport handler)
    def handle(self, request: httpx2.Request) -> httpx2.Response:
        method, path = request.method, request.url.path
        self.requests.append((method, path))
        self.authorization.add(request.headers.get("authorization"))
        if method != "GET" and request.headers.get("authorization") != f"Bearer {self.token}":
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(request.content))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(request.content))
        match = re.fullmatch(r"/api/spaces/([^/]+/[^/]+)(?:/(tree|preupload|commit)/main|/(variables|hardware))?", path)
        if not match:
            self.unexpected.append(f"{method} {request.url}")
            return self._json(404, {"error": f"fake hub: no route for {method} {path}"})
        repo_id, action = match.group(1), match.group(2) or match.group(3)
        if repo_id not in self.repos:
            return self._not_found(repo_id)
        if method == "GET" and action is None:
            return self._json(200, {"id": repo_id, "sdk": "gradio", "private": False, "sha": "0" * 40})
        if method == "GET" and action == "tree":
            return self._json(200, [
                {"type": "file", "path": name, "size": len(data), "oid": self._git_oid(data)}
                for name, data in sorted(self.repos[repo_id].items())
            ])
        if method == "POST" and action == "preupload":
            files = json.loads(request.content)["files"]
            return self._json(200, {"files": [
                {"path": f["path"], "uploadMode": "lfs" if f["size"] > 10_000_000 else "regular",
                 "shouldIgnore": False, "oid": None}
                for f in files
            ]})
        if method == "POST" and action == "commit":
            return self._commit(repo_id, request.content)
        if method == "POST" and action == "variables":
            payload = json.loads(request.content)
            self.variables.setdefault(repo_id, {})[payload["key"]] = payload["value"]
            return self._json(200, {k: {"value": v} for k, v in self.variables[repo_id].items()})
        if method == "POST" and action == "hardware":
            self.hardware[repo_id] = json.loads(request.content)["flavor"]
            return self._json(200, {"stage": "BUILDING", "hardware": {"current": None,
                                                                      "requested": self.hardware[repo_id]}})
        self.unexpected.append(f"{method} {request.url}")
        return self._json(405, {"error": f"fake hub: {method} not allowed on {path}"})

    @staticmethod
    def _git_oid(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def _create(self, payload: dict) -> httpx2.Response:
        self.created.append(payload)
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"https://huggingface.co/spaces/{repo_id}"
        if payload.get("type") != "space" or payload.get("sdk") not in {"gradio", "docker", "static"}:
            return self._json(400, {"error": "a Space needs type=space and an sdk"})
        if repo_id in self.repos:
            return self._json(409, {"error": "You already created this space repo", "url": url})
        # Like the Hub: a new Space comes with a .gitattributes and a stub README.
        self.repos[repo_id] = {".gitattributes": self.GITATTRIBUTES,
                               "README.md": b"---\ntitle: stub\nsdk: gradio\n---\n"}
        return self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, payload: dict) -> httpx2.Response:
        try:
            front_matter(payload["content"])
        except (AssertionError, yaml.YAMLError) as error:
            return self._json(400, {"errors": [{"message": str(error)}]})
        return self._json(200, {"errors": [], "warnings": []})

    def _commit(self, repo_id: str, content: bytes) -> httpx2.Response:
        lines = [json.loads(line) for line in content.decode().splitlines() if line.strip()]
        header, operations = lines[0], lines[1:]
        assert header["key"] == "header"
        tree = dict(self.repos[repo_id])
        for operation in operations:
            key, value = operation["key"], operation["value"]
            if key == "file":
                assert value["encoding"] == "base64"
                tree[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                tree.pop(value["path"])
            else:  # lfsFile: would need an LFS/Xet upload first; deploy only uploads small text files
                return self._json(400, {"error": f"fake hub: unsupported commit operation {key}"})
        self.repos[repo_id] = tree
        oid = hashlib.sha1(content).hexdigest()
        self.commits.append({"repo": repo_id, "summary": header["value"]["summary"],
                             "description": header["value"].get("description", ""),
                             "operations": [(op["key"], op["value"]["path"]) for op in operations]})
        return self._json(200, {"commitUrl": f"https://huggingface.co/spaces/{repo_id}/commit/{oid}",
                                "commitOid": oid})

    def unpack(self, repo_id: str, folder: Path) -> Path:
        for name, data in self.repos[repo_id].items():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return folder


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Route every request huggingface_hub makes to a FakeHub; give it a token; keep it away from ~/.cache."""
    fake = FakeHub()
    previous = hf_http._GLOBAL_CLIENT_FACTORY
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake.handle),
                                             event_hooks={"request": [hf_http.hf_request_event_hook]},
                                             follow_redirects=True))
    yield fake
    set_client_factory(previous)


def write(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def project(tmp_path):
    """A project tree with the real card and requirements, the app's packages, and everything that must stay home."""
    root = tmp_path / "project"
    shutil.copy(ROOT / "requirements.txt", _mk(root / "requirements.txt"))
    shutil.copy(CARD, _mk(root / "space" / "README.md"))
    write(root / "app.py", "print('app')\n")
    write(root / "README.md", "# project readme, not the Space card\n")
    write(root / "sd35fp8" / "__init__.py", '"""core"""\n')
    write(root / "sd35fp8" / "loading.py", "X = 1\n")
    write(root / "sd35fp8" / "assets" / "vocab.json", "{}\n")
    write(root / "sd35fp8" / "models" / "tiny-shapes" / "model_index.json", "{}\n")  # the built-in model stays home
    write(root / "space" / "__init__.py", '"""ui"""\n')
    write(root / "space" / "ui.py", "Y = 2\n")
    write(root / "space" / "deploy.py", "# deploy-only\n")
    for junk in ["sd35fp8/__pycache__/loading.cpython-311.pyc", "space/__pycache__/ui.cpython-311.pyc",
                 "space/ui.py~", "space/ui.pyi", "space/.ipynb_checkpoints/ui-checkpoint.py", "space/.DS_Store",
                 "tests/test_core.py", "bench/bench.py", "bench/results/a.json", "convert/__main__.py",
                 "docs/notes.md", ".ci/run", ".git/HEAD", ".venv/bin/python", ".gitignore", "out/x.png"]:
        write(root / junk, "junk\n")
    return root


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


PROJECT_FILES = ["README.md", "app.py", "requirements.txt", "sd35fp8/__init__.py", "sd35fp8/assets/vocab.json",
                 "sd35fp8/loading.py", "space/__init__.py", "space/ui.py"]


# ------------------------------------------------------------------------------------ dry run


def test_dry_run_lists_exactly_the_space_files_and_uses_no_network(hub, project, monkeypatch, capsys):
    monkeypatch.setattr(deploy, "ROOT", project)
    assert deploy.main(["--space-id", SPACE, "--model", MODEL, "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  (\S+)  \(\d+ bytes\)", out, flags=re.MULTILINE)
    assert listed == PROJECT_FILES
    assert hub.requests == []
    meta, _ = front_matter(out.split("----- README.md (Space card) -----\n", 1)[1].split("----- end of")[0])
    assert meta["models"] == [BASE, MODEL]
    assert "Token: found (HF_TOKEN)" in out and TOKEN not in out


def test_dry_run_on_this_repo_ships_the_app_and_nothing_else(capsys, monkeypatch):
    if not (ROOT / "app.py").is_file():
        pytest.fail("app.py is missing from the project root")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert deploy.main(["--space-id", SPACE, "--model", MODEL, "--dry-run"]) == 0
    listed = set(re.findall(r"^  (\S+)  \(\d+ bytes\)", capsys.readouterr().out, flags=re.MULTILINE))
    assert {"README.md", "app.py", "requirements.txt", "sd35fp8/__init__.py", "space/__init__.py"} <= listed
    assert {name.split("/")[0] for name in listed} <= {"README.md", "app.py", "requirements.txt", "sd35fp8", "space"}
    assert not any("__pycache__" in name or name.endswith((".pyc", ".pyi")) for name in listed)
    assert not listed & deploy.DEPLOY_ONLY
    git = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard",
                          "sd35fp8", "space"], capture_output=True, text=True)
    if git.returncode == 0:  # every file git knows of (or would) in the two packages, minus deploy-only ones
        expected = {name for name in git.stdout.split() if (ROOT / name).is_file() and not name.endswith(".pyi")
                    and not name.startswith(deploy.NOT_FOR_THE_SPACE)} - deploy.DEPLOY_ONLY
        assert {name for name in listed if "/" in name} == expected


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("flag, value", [
    ("--space-id", "sd35-fp8-demo"),          # no owner
    ("--space-id", "me/sd35/fp8"),             # too many parts
    ("--space-id", "me/sd35 fp8"),             # space
    ("--space-id", "me/-demo"),                # leading dash
    ("--space-id", "me/demo--x"),              # double dash
    ("--model", "https://huggingface.co/me/m"),
    ("--model", "me/"),
    ("--base", "me/" + "b" * 97),              # name longer than 96 characters
])
def test_bad_ids_are_refused_before_any_request(hub, flag, value, capsys):
    argv = {"--space-id": SPACE, "--model": MODEL}
    argv[flag] = value
    assert deploy.main([item for pair in argv.items() for item in pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err and "repo id" in err
    assert hub.requests == []


def test_local_model_path_gets_a_hint(hub, tmp_path, capsys):
    assert deploy.main(["--space-id", SPACE, "--model", str(tmp_path)]) == 2
    assert "push" in capsys.readouterr().err


def test_no_token_stops_before_any_work(hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(deploy, "stage", lambda *a, **k: pytest.fail("staged files without a token"))
    assert deploy.main(["--space-id", SPACE, "--model", MODEL]) == 2
    err = capsys.readouterr().err
    assert "HF_TOKEN" in err and "hf auth login" in err
    assert hub.requests == []


def test_rejected_token_is_explained_and_never_printed(hub, project, monkeypatch, capsys):
    monkeypatch.setattr(deploy, "ROOT", project)
    hub.token = "hf_someOtherToken"  # the Hub does not accept ours
    assert deploy.main(["--space-id", SPACE, "--model", MODEL]) == 1
    captured = capsys.readouterr()
    assert "401" in captured.err and "hf auth login" in captured.err
    assert TOKEN not in captured.out + captured.err


# ------------------------------------------------------------------------------------ upload


@pytest.fixture(params=["xet-pipeline", "create_commit"])
def upload_path(request, monkeypatch):
    """upload_folder has two code paths: the Xet pipeline (hf_xet installed) and create_commit (HF_HUB_DISABLE_XET=1)."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", request.param == "create_commit")
    return request.param


def test_deploy_creates_the_space_sets_variables_and_uploads_one_commit(hub, project, upload_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(deploy, "ROOT", project)
    assert deploy.main(["--space-id", SPACE, "--model", MODEL, "--hardware", "l40sx1", "--private"]) == 0
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert "Space URL: https://huggingface.co/spaces/me/sd35-fp8-demo" in captured.out
    assert hub.unexpected == []
    assert hub.authorization <= {f"Bearer {TOKEN}"}

    assert hub.created == [{"name": "sd35-fp8-demo", "organization": "me", "visibility": "private",
                            "type": "space", "sdk": "gradio"}]
    assert hub.variables[SPACE] == {"MODEL_ID": MODEL, "BASE_MODEL_ID": BASE}
    assert hub.hardware[SPACE] == "l40sx1"
    assert len(hub.commits) == 1
    assert sorted(hub.repos[SPACE]) == sorted([".gitattributes", *PROJECT_FILES])
    assert hub.repos[SPACE]["space/ui.py"] == b"Y = 2\n"
    meta, _ = front_matter(hub.repos[SPACE]["README.md"].decode())
    assert meta["models"] == [BASE, MODEL] and meta["sdk_version"] == requirements_gradio_pin()
    if upload_path == "create_commit":
        assert ("POST", "/api/validate-yaml") in hub.requests  # the card was checked before the upload
    # the variables exist before the commit that triggers the build
    order = [path for _, path in hub.requests]
    assert order.index(f"/api/spaces/{SPACE}/variables") < order.index(f"/api/spaces/{SPACE}/commit/main")

    # Second deploy: the Space exists, a file left the project -> one more commit, which also deletes it.
    (project / "sd35fp8" / "loading.py").unlink()
    write(project / "sd35fp8" / "new.py", "Z = 3\n")
    assert deploy.main(["--space-id", SPACE, "--model", "me/other-fp8", "--private"]) == 0
    out = capsys.readouterr().out
    assert "already there" in out and "keeps its visibility" in out
    assert len(hub.commits) == 2 and ("deletedFile", "sd35fp8/loading.py") in hub.commits[1]["operations"]
    assert sorted(hub.repos[SPACE]) == sorted(
        [".gitattributes", *(n for n in PROJECT_FILES if n != "sd35fp8/loading.py"), "sd35fp8/new.py"])
    assert hub.variables[SPACE]["MODEL_ID"] == "me/other-fp8"
    assert hub.unexpected == []


# ------------------------------------------------------------------------------------ it starts


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uploaded_space_starts_and_answers_http(hub, tmp_path, capsys):
    """Deploy this repo to the fake Hub, unpack what the Space got in a fresh folder, and start `python app.py` there."""
    if not (ROOT / "app.py").is_file():
        pytest.fail("app.py is missing from the project root")
    assert deploy.main(["--space-id", SPACE, "--model", MODEL]) == 0
    assert len(hub.commits) == 1 and hub.unexpected == []
    space = hub.unpack(SPACE, tmp_path / "space-checkout")
    assert not any((space / name).exists() for name in ("tests", "bench", "convert", "docs", ".ci"))

    port = free_port()
    env = {key: value for key, value in os.environ.items()
           if key not in {"PYTHONPATH", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODEL_ID", "BASE_MODEL_ID"}}
    # The Space sets MODEL_ID to the FP8 repo; offline there is none, so the app starts on its random tiny model
    # (built in code: the trained built-in model is not uploaded to Spaces).
    env.update(MODEL_ID="tiny", GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", HF_HOME=str(tmp_path / "hf-home"))
    log = tmp_path / "app.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, answered = time.monotonic() + STARTUP_TIMEOUT_S, None
        while time.monotonic() < deadline and answered is None:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    answered = response.status
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        assert answered == 200, f"no HTTP answer within {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-4000:]}"
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
