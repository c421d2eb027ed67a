"""The converter against a Hub: download the base over HTTP, convert, publish, download what was published.

The Hub is olah (tests/hub_server.py): a real HTTP server on 127.0.0.1 that answers the Hub's download
API from plain git repos, so `resolve()`, `hf_hub_download`, `snapshot_download` and diffusers'
`from_pretrained` run unmodified over the network. olah accepts no uploads, so the publish tests run
the real `convert.publish.push` / `python -m convert --push-to` and the real `HfApi.upload_folder`,
and replace only the calls that would write to the Hub: `HfApi.create_repo`, `HfApi.create_commit`,
and `HfApi._validate_yaml` (upload_folder POSTs the model card to the Hub's /api/validate-yaml, which
olah does not have). The fake `create_commit` commits the uploaded files into olah's git mirror, so the
next download, through olah, gets exactly what was "pushed".

Nothing here leaves 127.0.0.1; every wait is bounded; the olah process and its files are removed at
the end of the session.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import httpx2
import numpy as np
import pytest
import torch
import huggingface_hub
from huggingface_hub import CommitInfo, HfApi, ModelCard, constants, hf_api, snapshot_download
from huggingface_hub.hf_api import RepoUrl
from huggingface_hub.utils import _http as http_utils, hf_raise_for_status

from convert.cli import main
from convert.publish import REPORT_NAME, PublishError, push
from convert.source import SourceError, resolve
from sd35fp8.hub import NO_TOKEN_MESSAGE
from sd35fp8.loading import load_pipeline
from sd35fp8.tiny import save_tiny_pipeline

try:
    from hub_server import OlahHub, commit_folder, commit_operations, free_port, git, init_repo
except ModuleNotFoundError:  # tests/ imported as a package
    from tests.hub_server import OlahHub, commit_folder, commit_operations, free_port, git, init_repo

BASE = "tiny-org/tiny-sd3"
NOT_SD3 = "tiny-org/not-sd3"
TOKEN = "hf_DummyHubTestToken0123456789abcdefXYZ"  # never valid anywhere; must never be printed
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN",
             "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING")


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def olah(tmp_path_factory):
    """olah on 127.0.0.1:<free port> serving `tiny-org/tiny-sd3` (the tiny bf16 pipeline) and `tiny-org/not-sd3`."""
    root = tmp_path_factory.mktemp("olah")
    server = OlahHub(root)
    work = root / "work"
    save_tiny_pipeline(work / "tiny-sd3", with_t5=True, dtype=torch.bfloat16, max_shard_size=None)
    commit_folder(server.repo_path(BASE), work / "tiny-sd3", "tiny SD3 pipeline (random weights)")
    (work / "not-sd3").mkdir()
    (work / "not-sd3" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"]}))
    commit_folder(server.repo_path(NOT_SD3), work / "not-sd3", "an SD1 pipeline index")
    try:
        yield server.start()
    finally:
        server.cleanup()


def point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """Make huggingface_hub (and diffusers through it) talk to `endpoint`, cache under `home`, with no token.

    huggingface_hub reads its environment once, at import (already done by the time a test runs), into
    `huggingface_hub.constants`; and the module-level `HfApi()` behind `huggingface_hub.model_info`
    (which diffusers' `from_pretrained` calls) kept the endpoint it was built with. So set the
    environment for anything started later, and patch the constants and that instance too.
    """
    home.mkdir(parents=True, exist_ok=True)
    for name in TOKEN_ENV:
        monkeypatch.delenv(name, raising=False)
    env = {
        "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,  # else upload_folder takes the Xet pipeline and never calls create_commit
        "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_OFFLINE": False,
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)


@pytest.fixture
def hub(olah, tmp_path, monkeypatch) -> OlahHub:
    """The olah Hub, with huggingface_hub pointed at it and a fresh, empty HF_HOME (no token, empty cache)."""
    point_hub_at(monkeypatch, olah.endpoint, tmp_path / "hf-home")
    return olah


@pytest.fixture
def hub_writes(hub, monkeypatch):
    """Replace the Hub's write calls of HfApi with ones that commit into olah's git mirror; record every call."""
    record = SimpleNamespace(repos=[], commits=[], cards=[])

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
        record.repos.append({"repo_id": repo_id, "private": private, "repo_type": repo_type, "exist_ok": exist_ok,
                             "token": token if token is not None else self.token})
        path = hub.repo_path(repo_id)
        if path.exists() and not exist_ok:
            raise AssertionError(f"{repo_id} exists and exist_ok=False: the Hub would answer 409")
        init_repo(path)
        return RepoUrl(f"{self.endpoint}/{repo_id}", endpoint=self.endpoint)

    def create_commit(self, repo_id, operations, *, commit_message, commit_description=None, token=None,
                      repo_type=None, revision=None, create_pr=None, parent_commit=None, **kwargs):
        operations = list(operations)
        path = hub.repo_path(repo_id)
        assert path.exists(), f"commit to {repo_id} before create_repo: the Hub would answer 404"
        if create_pr:
            number = 1 + sum(1 for line in git(path, "for-each-ref", "refs/pr/").splitlines() if line)
            ref, pr_url = f"refs/pr/{number}", f"{self.endpoint}/{repo_id}/discussions/{number}"
        else:
            ref, pr_url = f"refs/heads/{revision or 'main'}", None
        sha = commit_operations(path, operations, commit_message, ref=ref)
        record.commits.append({"repo_id": repo_id, "ref": ref, "message": commit_message, "sha": sha,
                               "paths": sorted(op.path_in_repo for op in operations),
                               "token": token if token is not None else self.token})
        return CommitInfo(commit_url=f"{self.endpoint}/{repo_id}/commit/{sha}", commit_message=commit_message,
                          commit_description=commit_description or "", oid=sha, _endpoint=self.endpoint,
                          pr_url=pr_url)

    def validate_yaml(self, content, *, repo_type=None, token=None):
        # What the Hub's /api/validate-yaml rejects first: front matter that is not valid YAML.
        ModelCard(content, ignore_metadata_errors=False)
        record.cards.append(content)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "_validate_yaml", validate_yaml)
    return record


def hub_error(code: str, status: int, url: str) -> Exception:
    """The exception huggingface_hub raises for the Hub's answer `status` with `X-Error-Code: code`."""
    response = httpx2.Response(status, headers={"X-Error-Code": code, "X-Error-Message": code},
                               request=httpx2.Request("HEAD", url))
    try:
        hf_raise_for_status(response)
    except Exception as error:  # noqa: BLE001 - that is the point
        return error
    raise AssertionError(f"{code} was not turned into an error")


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_generates_finite_image(loaded) -> None:
    images = loaded.pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, guidance_scale=2.0,
                         generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


# ------------------------------------------------------------------------------------------- downloads


def test_convert_downloads_the_base_from_the_hub(hub, tmp_path):
    out = tmp_path / "out"
    assert main([BASE, "--revision", "main", "--out", str(out), "--device", "cpu"]) == 0

    report = json.loads((out / REPORT_NAME).read_text())
    assert report["verified"] is True and report["base"] == BASE and report["revision"] == "main"
    assert list((out / "transformer").glob("*.fp8.safetensors")) and list((out / "text_encoder_3").glob("*.fp8*"))
    # it really came over HTTP: the snapshot is in this test's empty cache, at the commit olah serves
    head = git(hub.repo_path(BASE), "rev-parse", "main")
    assert (Path(constants.HF_HUB_CACHE) / "models--tiny-org--tiny-sd3" / "snapshots" / head / "model_index.json").is_file()

    loaded = load_pipeline(str(out), "fp8", device="cpu")
    assert loaded.fp8_path is not None
    assert_generates_finite_image(loaded)


def test_dry_run_on_a_hub_repo_downloads_no_weights(hub, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([BASE, "--revision", "main", "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "FP8 (" in printed and "copy 16-bit" in printed and "KB" in printed and "->" in printed
    cache = Path(constants.HF_HUB_CACHE) / "models--tiny-org--tiny-sd3"
    assert list(cache.rglob("config.json")) and not list(cache.rglob("*.safetensors"))  # sized by HEAD requests
    assert not out.exists()


def test_resolve_reports_missing_repo_bad_revision_and_non_sd3_clearly(hub):
    with pytest.raises(SourceError, match=r"^tiny-org/no-such-repo: no such repo on the Hub, or it is private"):
        resolve("tiny-org/no-such-repo")
    # olah 0.5.4 (offline) answers a missing revision with 401 RepoNotFound, not the Hub's 404
    # RevisionNotFound, so over olah this is the "no such repo" message; the Hub's own answer is
    # checked in test_hub_answers_become_clear_errors.
    with pytest.raises(SourceError, match=r"^tiny-org/tiny-sd3: no such repo"):
        resolve(BASE, revision="no-such-branch")
    with pytest.raises(SourceError, match=r"is a StableDiffusionPipeline, not an SD3 pipeline"):
        resolve(NOT_SD3, revision="main")
    with pytest.raises(SourceError, match=r"is neither an existing folder nor a valid Hub repo id"):
        resolve("not/a/repo/id")


def test_cli_reports_a_missing_repo_without_traceback_or_output(hub, tmp_path, capfd):
    out = tmp_path / "out"
    assert main(["tiny-org/no-such-repo", "--out", str(out), "--device", "cpu"]) == 2
    err = capfd.readouterr().err
    assert "error: tiny-org/no-such-repo: no such repo on the Hub" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(("code", "status", "message"), [
    # olah cannot emulate a gated repo (its metadata hard-codes gated=False and it never sends GatedRepo),
    # so these are the Hub's real answers (status + X-Error-Code), turned into exceptions by
    # huggingface_hub's own hf_raise_for_status and raised from hf_hub_download, the boundary resolve() calls.
    ("GatedRepo", 403, "tiny-org/tiny-sd3 is gated: accept its license at https://huggingface.co/tiny-org/tiny-sd3, then set HF_TOKEN"),
    ("RevisionNotFound", 404, "tiny-org/tiny-sd3 has no revision 'v9'"),
    ("EntryNotFound", 404, "tiny-org/tiny-sd3@v9 has no model_index.json, so it is not a diffusers pipeline repo"),
])
def test_hub_answers_become_clear_errors(hub, monkeypatch, code, status, message):
    url = f"{hub.endpoint}/{BASE}/resolve/v9/model_index.json"
    error = hub_error(code, status, url)

    def hf_hub_download(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with pytest.raises(SourceError) as raised:
        resolve(BASE, revision="v9")
    assert str(raised.value).startswith(message)


def test_unreachable_hub_is_a_clear_error(hub, tmp_path, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused at once
    point_hub_at(monkeypatch, closed, tmp_path / "hf-home-closed")
    # huggingface_hub retries a refused connection 5 times with 1+2+4+8+8 s of sleep: keep the retries, skip the sleeps
    sleeps = []
    monkeypatch.setattr(http_utils, "time", SimpleNamespace(sleep=sleeps.append))
    with pytest.raises(SourceError) as raised:
        resolve(BASE, revision="main")
    assert sleeps, "the download was not retried"
    assert str(raised.value) == "tiny-org/tiny-sd3@main: the Hub could not be reached and the repo is not in the local cache."


# --------------------------------------------------------------------------------------------- uploads


def test_push_to_publishes_a_repo_that_downloads_and_generates(hub, hub_writes, tmp_path, monkeypatch, capfd):
    target = "tiny-org/tiny-sd3-fp8"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    rc = main([BASE, "--revision", "main", "--out", str(out), "--device", "cpu", "--push-to", target])
    stdout, stderr = capfd.readouterr()
    assert rc == 0, stderr
    assert f"published: https://huggingface.co/{target}" in stdout
    assert TOKEN not in stdout + stderr

    # the real upload_folder reached the boundary once, with the token, and committed the whole folder
    assert hub_writes.repos == [{"repo_id": target, "private": None, "repo_type": "model", "exist_ok": True, "token": TOKEN}]
    [commit] = hub_writes.commits
    assert commit["ref"] == "refs/heads/main" and commit["token"] == TOKEN
    written = files_of(out)
    assert commit["paths"] == sorted(written)
    assert len(hub_writes.cards) == 1 and hub_writes.cards[0] == written["README.md"].decode()
    assert not any(TOKEN.encode() in data for data in written.values())
    assert TOKEN not in hub.log.read_text(errors="replace")

    # download what was pushed, through olah: byte for byte the folder, and a working FP8 pipeline
    pushed = Path(snapshot_download(target, revision="main"))
    assert files_of(pushed) == written
    loaded = load_pipeline(target, "fp8", device="cpu", revision="main")
    assert loaded.fp8_path is not None
    assert_generates_finite_image(loaded)
    assert TOKEN not in "".join(capfd.readouterr())


def make_verified_folder(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: other\ntags:\n- fp8\n---\n# test\n")
    (folder / "weights.txt").write_text(text)
    (folder / REPORT_NAME).write_text(json.dumps({"verified": True}))
    return folder


def test_push_create_pr_opens_a_pull_request_and_leaves_main(hub, hub_writes, tmp_path, monkeypatch):
    target = "tiny-org/pr-target"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert push(make_verified_folder(tmp_path / "v1", "one"), target) == f"https://huggingface.co/{target}"
    url = push(make_verified_folder(tmp_path / "v2", "two"), target, private=True, create_pr=True)
    assert url == f"{hub.endpoint}/{target}/discussions/1"
    assert [c["ref"] for c in hub_writes.commits] == ["refs/heads/main", "refs/pr/1"]
    assert [r["private"] for r in hub_writes.repos] == [None, True]  # None: the Hub's default (public) for a new repo
    # main still serves v1 over HTTP; the PR ref holds v2
    path = huggingface_hub.hf_hub_download(target, "weights.txt", revision="main")
    assert Path(path).read_text() == "one"
    assert git(hub.repo_path(target), "show", "refs/pr/1:weights.txt") == "two"


def test_push_to_without_token_fails_at_once_and_writes_nothing(hub, tmp_path, monkeypatch, capfd):
    # no HF_TOKEN and HF_HOME is an empty folder (the `hub` fixture): get_token() finds nothing
    assert huggingface_hub.get_token() is None

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted before the token check")

    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, no_network)
    for name in ("create_repo", "create_commit", "upload_folder"):
        monkeypatch.setattr(HfApi, name, no_network)

    out = tmp_path / "out"
    rc = main([BASE, "--out", str(out), "--device", "cpu", "--push-to", "tiny-org/tiny-sd3-fp8"])
    err = capfd.readouterr().err
    assert rc == 2
    assert f"error: {NO_TOKEN_MESSAGE}" in err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_push_refuses_a_folder_without_a_verified_report(hub, hub_writes, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = tmp_path / "unverified"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(PublishError, match=r"did not pass verification \(fp8_conversion.json missing or not verified\)"):
        push(folder, "tiny-org/unverified")
    (folder / REPORT_NAME).write_text(json.dumps({"verified": False}))
    with pytest.raises(PublishError, match=r"did not pass verification"):
        push(folder, "tiny-org/unverified")
    assert hub_writes.repos == [] and hub_writes.commits == []
    assert not hub.repo_path("tiny-org/unverified").exists()


def test_push_to_an_unreachable_hub_is_one_line_and_keeps_the_verified_output(hub, tmp_path, monkeypatch, capfd):
    out = tmp_path / "out"
    assert main([BASE, "--revision", "main", "--out", str(out), "--device", "cpu"]) == 0  # downloads through olah
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused at once
    point_hub_at(monkeypatch, closed, Path(constants.HF_HOME))  # same cache, Hub gone
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(http_utils, "time", SimpleNamespace(sleep=lambda s: None))  # keep the retries, skip the sleeps
    capfd.readouterr()
    rc = main([BASE, "--revision", "main", "--out", str(out), "--overwrite", "--device", "cpu", "--push-to", "tiny-org/x"])
    err = capfd.readouterr().err
    assert rc == 1, err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "the Hub could not be reached" in line and "Traceback" not in err and TOKEN not in err
    assert json.loads((out / REPORT_NAME).read_text())["verified"] is True  # complete and verified: push it later
    assert not list(tmp_path.glob(".out.*"))
