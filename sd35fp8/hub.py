"""Everything the project says to the Hugging Face Hub, in one place: repo ids, the token, card metadata, uploads.

Used by `convert` (publishing a variant), `space.deploy` (publishing the app) and the app (reading which
base model a variant's card names). The token comes from HF_TOKEN or the saved login (`hf auth login`)
and is never printed: every message that could carry it goes through `redact`.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInput, Failure, one_line

HUB_URL = "https://huggingface.co"
NO_TOKEN_MESSAGE = (
    "no Hugging Face token found: set HF_TOKEN to a token with write access "
    "(https://huggingface.co/settings/tokens) or run `hf auth login`, then run this again."
)
_BAD_PART = re.compile(r"(^|/)[-.]|[-.]($|/)")


def validate_repo_id(value: str, setting: str = "repo id") -> str:
    """`value` stripped if it is a Hub repo id OWNER/NAME, else BadInput naming `setting`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    value = str(value).strip()
    if value.count("/") != 1 or not all(value.split("/")):
        hint = ""
        if Path(value).expanduser().exists():
            hint = (" It names a local path; push the folder to the Hub first "
                    "(python -m convert SRC --out DIR --push-to OWNER/NAME) and pass that repo id.")
        raise BadInput(f"{setting} must be a Hub repo id of the form OWNER/NAME, got {value!r}.{hint}")
    try:
        hub_validate(value)
    except HFValidationError:
        raise BadInput(f"{setting} {value!r} is not a valid Hub repo id: use OWNER/NAME with letters, digits, "
                       "'-', '_' and '.'.") from None
    if _BAD_PART.search(value) or "--" in value or ".." in value:
        raise BadInput(f"{setting} {value!r} is not a valid Hub repo id: no part may start or end with '-' or '.', "
                       "or hold '--' or '..'.")
    return value


def find_token() -> tuple[str | None, str | None]:
    """(token, where it came from: "HF_TOKEN" or "saved login"), or (None, None)."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        return None, None
    from_env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return token, ("HF_TOKEN" if from_env and from_env.strip() == token else "saved login")


def require_token() -> str:
    """The Hub token, or BadInput saying how to provide one."""
    token, _ = find_token()
    if not token:
        raise BadInput(NO_TOKEN_MESSAGE)
    return token


def redact(text: str, token: str | None = None) -> str:
    """`text` with the token (given, or the one found) replaced by hf_***."""
    token = token if token is not None else find_token()[0]
    return text.replace(token, "hf_***") if token else text


def _http_hint(status: int | None, repo_id: str) -> str:
    owner = repo_id.split("/")[0]
    return {
        401: " The token was rejected: set HF_TOKEN to a valid token or run `hf auth login`.",
        402: " The Hub wants a paid plan for this (ZeroGPU needs PRO, paid hardware a payment method).",
        403: f" The token cannot write to {owner!r}: use a token with write access to that user or organization.",
    }.get(status, "")


@contextmanager
def hub_errors(action: str, repo_id: str):
    """Turn what the Hub (or the network to it) raises during `action` into one-line project errors."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise BadInput(f"cannot {action}: HF_HUB_OFFLINE is set; unset it to reach the Hub.") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        raise Failure(redact(f"the Hub refused to {action} ({status}): {one_line(error)}"
                             f"{_http_hint(status, repo_id)}")) from None
    except (httpx2.HTTPError, OSError) as error:
        raise Failure(redact(f"cannot {action}: the Hub could not be reached ({type(error).__name__}: "
                             f"{one_line(error)}). Check the network (or HF_ENDPOINT) and run this again.")) from None


def upload_folder(folder: Path, repo_id: str, *, repo_type: str = "model", private: bool = False,
                  create_pr: bool = False, commit_message: str, commit_description: str | None = None,
                  delete_patterns: str | None = None, api=None):
    """Create `repo_id` if needed and upload `folder` in one commit; returns the commit info.

    Network and Hub errors become `Failure` with a one-line message (the token redacted).
    """
    from huggingface_hub import HfApi

    api = api or HfApi(token=require_token())
    with hub_errors(f"upload to {repo_id}", repo_id):
        kwargs = {"space_sdk": "gradio"} if repo_type == "space" else {}
        api.create_repo(repo_id, repo_type=repo_type, private=private or None, exist_ok=True, **kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, create_pr=create_pr,
                                 commit_message=commit_message, commit_description=commit_description,
                                 delete_patterns=delete_patterns)


# ------------------------------------------------------------------------------------------- cards


def model_card_data(base_model: str, *, tags: list[str], license_fields: dict | None = None):
    """The front matter of an FP8 variant's card: its base model (a quantization of it), library, task, tags."""
    from huggingface_hub import ModelCardData

    return ModelCardData(base_model=base_model, base_model_relation="quantized", library_name="diffusers",
                         pipeline_tag="text-to-image", tags=tags, **(license_fields or {}))


def license_fields(folder: Path) -> dict:
    """License fields of the card in `folder` (README.md), to carry over; empty if it has none."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub import ModelCard

    data = ModelCard.load(readme).data.to_dict()
    return {key: data[key] for key in ("license", "license_name", "license_link") if key in data}


def base_model_of(model: str) -> tuple[str | None, str]:
    """The `base_model` an FP8 variant's card names (a folder's README.md or a Hub repo's), and why if none.

    Expected absences (no card, no field, offline and not cached) return (None, reason); a model id the Hub
    does not know raises BadInput, so a typo is reported rather than hidden.
    """
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import (
        EntryNotFoundError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
    )

    path = Path(model)
    try:
        if path.is_dir():
            readme = path / "README.md"
            if not readme.is_file():
                return None, f"{model} has no README.md (model card)"
            card = ModelCard.load(readme)
        else:
            card = ModelCard.load(model)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        return None, f"the Hub could not be reached to read {model}'s model card"
    except EntryNotFoundError:
        return None, f"{model} has no model card"
    except RepositoryNotFoundError:
        raise BadInput(f"{model}: no such model on the Hub (or it is private: set HF_TOKEN). Check the id.") from None
    except HFValidationError:
        raise BadInput(f"{model!r} is neither a folder nor a Hub repo id (OWNER/NAME).") from None
    base = card.data.to_dict().get("base_model")
    if isinstance(base, list):
        base = base[0] if base else None
    if not base:
        return None, f"{model}'s model card names no base_model"
    return str(base), f"`base_model` in {model}'s model card"
