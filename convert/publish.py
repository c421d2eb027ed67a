"""Publish a verified FP8 folder to the Hugging Face Hub (through `sd35fp8.hub`, the project's one Hub module)."""

from __future__ import annotations

from pathlib import Path

from sd35fp8.errors import Failure
from sd35fp8.hub import upload_folder, validate_repo_id

from .output import REPORT_NAME, is_previous_output

COMMIT_MESSAGE = "Add FP8 (E4M3) variant made with sd35fp8 convert"


class PublishError(Failure):
    """The folder must not be published; the message says why."""


def push(folder: Path, repo_id: str, *, private: bool = False, create_pr: bool = False) -> str:
    """Upload `folder` in one commit (or as a pull request) and return the URL; refuses unverified folders."""
    validate_repo_id(repo_id, "--push-to")
    if not is_previous_output(Path(folder)):
        raise PublishError(f"{folder} did not pass verification ({REPORT_NAME} missing or not verified): not uploading.")
    info = upload_folder(Path(folder), repo_id, private=private, create_pr=create_pr, commit_message=COMMIT_MESSAGE)
    return info.pr_url if create_pr and info.pr_url else f"https://huggingface.co/{repo_id}"
