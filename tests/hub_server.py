"""A local stand-in for the Hugging Face Hub: olah serving plain git repos over the Hub's HTTP API.

olah (`python -m olah.server --config olah.toml`) is a Hub mirror. With `offline = true` it never
contacts huggingface.co and answers the Hub's download API (`/api/models/{id}/revision/{rev}`,
`/{id}/resolve/{rev}/{file}`) from plain git repositories laid out as
`<mirrors-path>/models/<owner>/<name>` (a non-bare repo; olah reads its objects and refs, not its work
tree). Each request re-reads the repo, so a commit made while the server runs is downloadable at once.

olah accepts no uploads. `commit_operations` plays the Hub's side of a commit instead: it applies
huggingface_hub `CommitOperationAdd` / `CommitOperationDelete` objects to such a repo with git
plumbing (a private index, no work tree) on `main` or on a `refs/pr/N` ref, like the Hub does.

Known limits of olah 0.5.4 in offline mode (the tests work around them): it answers 401 RepoNotFound
for a missing revision or a missing file (the real Hub answers 404 RevisionNotFound / EntryNotFound),
`/api/models/{id}` without a revision (diffusers' `from_pretrained` with `revision=None`) also
answers RepoNotFound, so pass `revision="main"`; and it has no notion of gated or private repos.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "hub-test", "GIT_AUTHOR_EMAIL": "hub-test@localhost",
    "GIT_COMMITTER_NAME": "hub-test", "GIT_COMMITTER_EMAIL": "hub-test@localhost",
}
STARTUP_TIMEOUT_S = 60
STOP_TIMEOUT_S = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git(repo: Path, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
    """Run git in `repo` (bounded), return its stdout stripped; raise with git's stderr on failure."""
    full_env = {**os.environ, **GIT_IDENTITY, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", **(env or {})}
    result = subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True, env=full_env, timeout=60)
    if result.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
    return result.stdout.decode().strip()


def init_repo(repo: Path) -> Path:
    """An empty git repo with `main` as its default branch (what create_repo makes on the Hub)."""
    repo.mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        git(repo, "init", "-q", "-b", "main")
    return repo


def _ref_commit(repo: Path, ref: str) -> str | None:
    try:
        return git(repo, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}")
    except RuntimeError:
        return None


def commit_operations(repo: Path, operations, message: str, ref: str = "refs/heads/main",
                      base: str = "refs/heads/main") -> str:
    """Apply huggingface_hub commit operations to `repo` as one commit on `ref` (parent: `base`); return its sha."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    with tempfile.TemporaryDirectory() as scratch:
        env = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        parent = _ref_commit(repo, base)
        git(repo, "read-tree", parent, env=env) if parent else git(repo, "read-tree", "--empty", env=env)
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                with op.as_file() as file:
                    blob = git(repo, "hash-object", "-w", "--stdin", input=file.read())
                git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{op.path_in_repo}", env=env)
            elif isinstance(op, CommitOperationDelete):
                path = op.path_in_repo.rstrip("/")
                git(repo, "rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", path, env=env)
            else:
                raise TypeError(f"the fake Hub does not support {type(op).__name__}")
        tree = git(repo, "write-tree", env=env)
        sha = git(repo, "commit-tree", tree, *(["-p", parent] if parent else []), "-m", message)
        git(repo, "update-ref", ref, sha)
        return sha


def commit_folder(repo: Path, folder: Path, message: str) -> str:
    """Commit every file under `folder` to `main` of `repo` (creating the repo)."""
    from huggingface_hub import CommitOperationAdd

    init_repo(repo)
    ops = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
           for p in sorted(folder.rglob("*")) if p.is_file()]
    return commit_operations(repo, ops, message)


class OlahHub:
    """One olah process on 127.0.0.1:<free port>, offline, serving the git repos under `root/mirrors`."""

    def __init__(self, root: Path):
        self.root = root
        self.mirrors = root / "mirrors"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = root / "olah.out"
        self.process: subprocess.Popen | None = None

    def repo_path(self, repo_id: str) -> Path:
        owner, name = repo_id.split("/")
        return self.mirrors / "models" / owner / name

    def start(self) -> "OlahHub":
        (self.mirrors / "models").mkdir(parents=True, exist_ok=True)
        config = self.root / "olah.toml"
        # hf-netloc points at the discard port of this machine: should anything ever try upstream, it fails at once.
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f'repos-path = "{self.root / "cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            'hf-scheme = "http"\n'
            'hf-netloc = "127.0.0.1:9"\n'
            'hf-lfs-netloc = "127.0.0.1:9"\n'
            "metadata-cache-ttl = 0\n"
            "[accessibility]\n"
            "offline = true\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "olah.server", "--config", str(config), "--log-path", str(self.root / "logs")],
                cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited with {self.process.returncode}:\n{self.log.read_text(errors='replace')}")
            try:
                # Any HTTP answer (olah says 404/401 for an unknown path) means the server is up.
                opener.open(f"{self.endpoint}/api/whoami-v2", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"olah did not answer within {STARTUP_TIMEOUT_S} s:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
