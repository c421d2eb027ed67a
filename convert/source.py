"""Find the base pipeline (a local folder or a Hub repo), check that it is an SD3 pipeline we can read."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .checkpoint import WEIGHT_STEMS, CheckpointError, no_weights_error, shard_names, weight_files

SD3_PIPELINES = {"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"}
MODEL_LIBRARIES = {"diffusers", "transformers"}
NOT_MODELS = ("Tokenizer", "TokenizerFast", "Scheduler")
NEVER_DOWNLOAD = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "*.msgpack", "*.onnx", "*.onnx_data", "*.gguf"]


class SourceError(ValueError):
    """The source cannot be converted; the message says why and what to do."""


@dataclass(frozen=True)
class Component:
    name: str
    library: str  # "diffusers" or "transformers"
    class_name: str
    folder: Path
    weight_bytes: int = 0  # size of its safetensors weight files (0 for tokenizers and schedulers)

    @property
    def is_model(self) -> bool:
        """True for components with weights (not tokenizers or schedulers)."""
        return self.library in MODEL_LIBRARIES and not self.class_name.endswith(NOT_MODELS)


@dataclass(frozen=True)
class Source:
    """A checked base pipeline on local disk."""

    spec: str  # what the user typed: a repo id or a folder
    path: Path
    pipeline_class: str
    components: dict[str, Component]
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return not Path(self.spec).exists()


def _read_model_index(folder: Path, spec: str) -> dict:
    index = folder / "model_index.json"
    if not index.is_file():
        raise SourceError(f"{spec}: no model_index.json, so this is not a diffusers pipeline folder.")
    return json.loads(index.read_text())


def _check_sd3(model_index: dict, spec: str) -> str:
    class_name = model_index.get("_class_name", "?")
    if class_name not in SD3_PIPELINES:
        raise SourceError(
            f"{spec} is a {class_name}, not an SD3 pipeline. This tool converts Stable Diffusion 3 / 3.5 "
            "repos (e.g. stabilityai/stable-diffusion-3.5-large)."
        )
    return class_name


def _local_weight_bytes(component: Component) -> int:
    return sum(path.stat().st_size for path in weight_files(component.folder, component.library))


def inspect_folder(folder: Path, spec: str | None = None, revision: str | None = None,
                   weight_bytes: Callable[[Component], int] = _local_weight_bytes) -> Source:
    """Check a diffusers folder: SD3 pipeline, every listed component present, weights in safetensors.

    `weight_bytes(component)` sizes (and so checks) a component's weights; by default from the files on disk.
    """
    spec = spec or str(folder)
    model_index = _read_model_index(folder, spec)
    pipeline_class = _check_sd3(model_index, spec)
    components = {}
    for name, value in model_index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        component = Component(name, value[0], value[1], folder / name)
        if not component.folder.is_dir():
            raise SourceError(f"{spec}: model_index.json lists '{name}' but its folder is missing.")
        if component.is_model:
            try:
                component = replace(component, weight_bytes=weight_bytes(component))
            except CheckpointError as error:
                raise SourceError(f"{spec}: {error}") from None
        components[name] = component
    if "transformer" not in components:
        raise SourceError(f"{spec}: the pipeline has no transformer folder.")
    return Source(spec, folder, pipeline_class, components, revision)


def resolve(spec: str, revision: str | None = None, weights: bool = True) -> Source:
    """A local folder as it is, or a Hub repo downloaded (safetensors and configs only) to the local cache.

    With `weights=False` (a dry run) a Hub repo's configs are downloaded and its weights only sized.
    """
    folder = Path(spec).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise SourceError(f"{spec} is a file; give the pipeline's folder (the one holding model_index.json).")
        return inspect_folder(folder, spec)
    local = _download(spec, revision, weights)
    if weights:
        return inspect_folder(local, spec, revision)
    return inspect_folder(local, spec, revision, weight_bytes=lambda c: _remote_weight_bytes(spec, revision, c))


def _remote_weight_bytes(repo_id: str, revision: str | None, component: Component) -> int:
    """Size a component's safetensors on the Hub without downloading them (HEAD requests)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    def size(filename: str) -> int:
        return get_hf_file_metadata(hf_hub_url(repo_id, f"{component.name}/{filename}", revision=revision)).size

    stem = WEIGHT_STEMS[component.library]
    index = component.folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return sum(size(name) for name in shard_names(index))
    try:
        return size(f"{stem}.safetensors")
    except EntryNotFoundError:
        pass
    try:
        size(f"{stem}.bin")
    except EntryNotFoundError:
        raise no_weights_error(component.name, stem, pickle_only=False) from None
    raise no_weights_error(component.name, stem, pickle_only=True)


def _download(repo_id: str, revision: str | None, weights: bool) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HFValidationError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
        RepositoryNotFoundError, RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        index_path = hf_hub_download(repo_id, "model_index.json", revision=revision)
        model_index = json.loads(Path(index_path).read_text())
        _check_sd3(model_index, where)
        folders = [name for name, value in model_index.items()
                   if not name.startswith("_") and isinstance(value, list) and value[0] is not None]
        files = ["*"] if weights else ["*.json", "*.txt", "*.model"]  # a dry run reads configs and tokenizers only
        patterns = ["model_index.json", "README.md", "LICENSE*"] + [f"{name}/{f}" for name in folders for f in files]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=NEVER_DOWNLOAD))
    except GatedRepoError:
        raise SourceError(
            f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id}, then set HF_TOKEN "
            "(or run `hf auth login`) with a token of the account that accepted it."
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"{repo_id}: no such repo on the Hub, or it is private (then set HF_TOKEN or run `hf auth login`). "
            "For a local folder, check the path."
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"{repo_id} has no revision {revision!r}.") from None
    except RemoteEntryNotFoundError:
        raise SourceError(f"{where} has no model_index.json, so it is not a diffusers pipeline repo.") from None
    except HFValidationError:
        raise SourceError(f"{repo_id!r} is neither an existing folder nor a valid Hub repo id (owner/name).") from None
    except LocalEntryNotFoundError:
        raise SourceError(f"{where}: the Hub could not be reached and the repo is not in the local cache.") from None
