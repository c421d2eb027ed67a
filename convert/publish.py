"""Publish a verified FP8 folder to the Hugging Face Hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPORT_NAME = "fp8_conversion.json"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class PublishError(RuntimeError):
    """The folder cannot or must not be published; the message says why."""


def require_token() -> str:
    """The Hub token from HF_TOKEN or the saved login; never printed."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PublishError("No Hugging Face token: set HF_TOKEN or run `hf auth login`, then try again.")
    return token


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise PublishError(f"{repo_id!r} is not a valid Hub repo id: use OWNER/NAME (letters, digits, '-', '_', '.').")
    return repo_id


def is_verified(folder: Path) -> bool:
    report = folder / REPORT_NAME
    return report.is_file() and json.loads(report.read_text()).get("verified") is True


def push(folder: Path, repo_id: str, *, private: bool = False, create_pr: bool = False) -> str:
    """Upload `folder` in one commit (or as a pull request) and return the URL; refuses unverified folders."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    if not is_verified(folder):
        raise PublishError(f"{folder} did not pass verification ({REPORT_NAME} missing or not verified): not uploading.")
    api = HfApi(token=require_token())
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=folder, repo_type="model", create_pr=create_pr,
        commit_message="Add FP8 (E4M3) variant made with sd35fp8 convert",
    )
    return info.pr_url if create_pr and info.pr_url else f"https://huggingface.co/{repo_id}"
