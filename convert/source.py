"""Find the base pipeline (a local folder or a Hub repo) and check it before any work: an SD3 pipeline whose
index, configs and safetensors files are all readable and consistent, with nothing that could be pickle."""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from sd35fp8.errors import BadInput
from sd35fp8.hub import hub_errors

from .checkpoint import (
    WEIGHT_STEMS, CheckpointError, SafetensorsReader, no_weights_error, read_json_object, shard_names, weight_files,
)
from .output import REPORT_NAME, disk_error

SD3_PIPELINES = {"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"}
MODEL_LIBRARIES = {"diffusers", "transformers"}
NOT_MODELS = ("Tokenizer", "TokenizerFast", "Scheduler")
NEVER_DOWNLOAD = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.gguf"]
NEVER_COPY = tuple(pattern.removeprefix("*") for pattern in NEVER_DOWNLOAD)  # suffixes
_COMPONENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")


class SourceError(BadInput):
    """The source cannot be converted; the message says why and what to do."""


@dataclass(frozen=True)
class Component:
    name: str
    library: str  # "diffusers" or "transformers" for models and tokenizers; "diffusers" for schedulers
    class_name: str
    folder: Path
    weight_bytes: int = 0  # size of its safetensors weight files (0 for tokenizers and schedulers)
    files: tuple[Path, ...] = ()  # every file a copy of it holds, relative to `folder`

    @property
    def is_model(self) -> bool:
        """True for components with weights (not tokenizers or schedulers)."""
        return self.library in MODEL_LIBRARIES and not self.class_name.endswith(NOT_MODELS)

    def config(self) -> dict:
        """Its config.json (checked to be a JSON object when the source was inspected)."""
        return read_json_object(self.folder / "config.json", "config")


@dataclass(frozen=True)
class Source:
    """A checked base pipeline on local disk."""

    spec: str  # what the user typed: a repo id or a folder
    path: Path
    pipeline_class: str
    components: dict[str, Component]
    revision: str | None = None
    is_hub: bool = False
    real_paths: frozenset[Path] = field(default=frozenset(), repr=False)  # every folder and file it is made of, resolved
    top_files: tuple[Path, ...] = ()  # the files next to model_index.json that a copy keeps


def _read_model_index(folder: Path, spec: str) -> dict:
    index = folder / "model_index.json"
    if not index.is_file():
        raise SourceError(f"{spec}: no model_index.json, so this is not a diffusers pipeline folder.")
    return read_json_object(index, "pipeline index")


def _check_sd3(model_index: dict, spec: str) -> str:
    class_name = model_index.get("_class_name", "?")
    if not isinstance(class_name, str) or class_name not in SD3_PIPELINES:
        raise SourceError(
            f"{spec} is a {class_name}, not an SD3 pipeline. This tool converts Stable Diffusion 3 / 3.5 "
            "repos (e.g. stabilityai/stable-diffusion-3.5-large)."
        )
    return class_name


def listed_components(model_index: dict, spec: str) -> dict[str, tuple[str, str]]:
    """name -> (library, class) of every component model_index.json lists (those set to null left out)."""
    components = {}
    for name, value in model_index.items():
        if name.startswith("_"):
            continue
        if not (isinstance(value, list) and len(value) == 2):
            raise SourceError(f"{spec}: model_index.json entry {name!r} is {value!r}, not [library, class].")
        if value == [None, None] or value[0] is None:
            continue
        library, class_name = value
        if not _COMPONENT_NAME.fullmatch(name) or name in (".", ".."):
            raise SourceError(f"{spec}: model_index.json lists a component named {name!r}; a component is a folder "
                              "next to model_index.json, so its name must be a plain folder name.")
        if not (isinstance(library, str) and isinstance(class_name, str) and _CLASS_NAME.fullmatch(class_name)):
            raise SourceError(f"{spec}: model_index.json entry {name!r} is {value!r}, not [library, class].")
        components[name] = (library, class_name)
    return components


def _component_files(component: Component, source_root: Path, spec: str, seen: set[Path]) -> tuple[Path, ...]:
    """The files of a component folder (links followed, loops refused), relative to it; real paths go to `seen`."""
    files = []
    for root, dirs, names in os.walk(component.folder, followlinks=True):
        here = Path(root)
        real = here.resolve()
        above = [source_root] + [parent for parent in here.parents if parent.is_relative_to(component.folder)]
        if any(real == parent.resolve() for parent in above):
            raise SourceError(f"{spec}: {here} links back to {real}, a folder that holds it (a symbolic link loop): "
                              "remove the link.")
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = here / name
            if name.startswith(".") or name.endswith(NEVER_COPY) or name == "README.md":
                continue
            if not path.exists():
                raise SourceError(f"{spec}: {path} is a link pointing nowhere: remove it or restore its target.")
            if not path.is_file():
                raise SourceError(f"{spec}: {path} is not a regular file (a pipe or device?): remove it.")
            if path.suffix == ".json":  # configs, tokenizer files, indexes: all read when the pipeline loads
                _check_json(path)
            seen.add(path.resolve())
            files.append(path.relative_to(component.folder))
    return tuple(files)


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SourceError(f"{path}: this file is not valid JSON. Download or save it again.") from None


def _check_component(component: Component, spec: str, local: bool) -> Component:
    """Check a model component's config and (when `local`) every safetensors file it holds against its header."""
    config = component.config()
    if config.get("quantization_config"):
        raise SourceError(f"{spec}: {component.name} is already quantized (its config.json has a quantization_config): "
                          "convert the 16-bit base pipeline instead.")
    if not local:
        return component
    files = weight_files(component.folder, component.library)
    stem = WEIGHT_STEMS[component.library]
    index = component.folder / f"{stem}.safetensors.index.json"
    SafetensorsReader(files, index if index.is_file() else None)
    for extra in component.files:  # other safetensors files are copied too, so they are checked too
        path = component.folder / extra
        if path.suffix == ".safetensors" and path not in files:
            SafetensorsReader([path])
    return replace(component, weight_bytes=sum(path.stat().st_size for path in files))


def inspect_folder(folder: Path, spec: str | None = None, revision: str | None = None,
                   remote_weight_bytes: Callable[[Component], int] | None = None, is_hub: bool = False) -> Source:
    """Check a diffusers folder: SD3 pipeline, every listed component present, weights in checked safetensors.

    With `remote_weight_bytes` (a dry run on a Hub repo whose weights were not downloaded) the weights are only
    sized by that function, not checked.
    """
    spec = spec or str(folder)
    folder = Path(folder).resolve()
    model_index = _read_model_index(folder, spec)
    pipeline_class = _check_sd3(model_index, spec)
    seen = {folder}
    components = {}
    for name, (library, class_name) in listed_components(model_index, spec).items():
        component = Component(name, library, class_name, folder / name)
        if not component.folder.is_dir():
            raise SourceError(f"{spec}: model_index.json lists '{name}' but its folder is missing.")
        component = replace(component, files=_component_files(component, folder, spec, seen))
        if component.is_model:
            try:
                component = _check_component(component, spec, remote_weight_bytes is None)
                if remote_weight_bytes is not None:
                    component = replace(component, weight_bytes=remote_weight_bytes(component))
            except CheckpointError as error:
                raise SourceError(f"{spec}: {error}") from None
        components[name] = component
    if "transformer" not in components:
        raise SourceError(f"{spec}: the pipeline has no transformer folder.")
    top_files = tuple(
        path for path in sorted(folder.iterdir())
        if path.is_file() and not path.name.startswith(".") and path.name not in ("README.md", REPORT_NAME)
        and not path.name.endswith(NEVER_COPY + (".safetensors",))
    )
    seen.update(path.resolve() for path in top_files + (folder / "model_index.json", folder / "README.md"))
    return Source(spec, folder, pipeline_class, components, revision, is_hub, frozenset(seen), top_files)


def resolve(spec: str, revision: str | None = None, weights: bool = True) -> Source:
    """A local folder as it is, or a Hub repo downloaded (safetensors and configs only) to the local cache.

    With `weights=False` (a dry run) a Hub repo's configs are downloaded and its weights only sized.
    """
    folder = Path(spec).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise SourceError(f"{spec} is a file; give the pipeline's folder (the one holding model_index.json).")
        if revision:
            raise SourceError(f"--revision {revision} applies to Hub repos, but {spec} is a local folder: drop it.")
        return inspect_folder(folder, spec)
    local = _download(spec, revision, weights)
    if weights:
        return inspect_folder(local, spec, revision, is_hub=True)
    return inspect_folder(local, spec, revision, remote_weight_bytes=lambda c: _remote_weight_bytes(spec, revision, c),
                          is_hub=True)


def _remote_weight_bytes(repo_id: str, revision: str | None, component: Component) -> int:
    """Size a component's safetensors on the Hub without downloading them (HEAD requests)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    def size(filename: str) -> int:
        with hub_errors(f"size {repo_id}/{component.name}/{filename}", repo_id):
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
    with hub_errors(f"download {where}", repo_id):
        try:
            index_path = hf_hub_download(repo_id, "model_index.json", revision=revision)
            model_index = read_json_object(Path(index_path), "pipeline index")
            _check_sd3(model_index, where)
            folders = list(listed_components(model_index, where))
            files = ["*"] if weights else ["*.json", "*.txt", "*.model"]  # a dry run reads configs and tokenizers only
            patterns = ["model_index.json", "README.md", "LICENSE*"] + [f"{name}/{f}" for name in folders for f in files]
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                          ignore_patterns=NEVER_DOWNLOAD))
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
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise disk_error(error, f"downloading {where} into the Hugging Face cache (HF_HOME)") from None
            raise
