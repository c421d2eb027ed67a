"""Stream safetensors checkpoints one tensor at a time, in and out, so RAM holds at most one output shard.

Reading goes through plain file reads (no mmap): a memory map of a 10 GB shard would count every page
touched towards the process's resident memory, which is what the low-memory target measures.
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
WEIGHT_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def release_freed_memory_promptly() -> None:
    """Ask glibc to serve large allocations with mmap, so freed tensors leave the resident set at once.

    Without it glibc keeps freed mixed-size tensor buffers on its heap: converting SD3.5 Large held about twice the
    pending shard (12.4 GB RSS with 5 GB shards instead of 5.7 GB; bench/results/convert_memory.json).
    Process-wide and harmless; a no-op where the C library is not glibc.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # -3: M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


class CheckpointError(ValueError):
    """A component folder holds no usable safetensors weights."""


def shard_names(index: Path) -> list[str]:
    """The shard files a `*.safetensors.index.json` names."""
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def no_weights_error(component: str, stem: str, pickle_only: bool) -> CheckpointError:
    if pickle_only:
        return CheckpointError(
            f"{component}: only pickle weights (.bin/.ckpt) found. Pickle can run code when loaded, so this tool "
            "reads safetensors only: use a repo that ships safetensors, or convert it with safetensors first."
        )
    return CheckpointError(f"{component}: no {stem}.safetensors (or sharded index) found.")


def weight_files(folder: Path, library: str) -> list[Path]:
    """The 16-bit safetensors files of a component folder (single file or the shards of an index)."""
    stem = WEIGHT_STEMS[library]
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        missing = [name for name in shard_names(index) if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder.name}: the index names shards that are missing: {', '.join(missing)}")
        return [folder / name for name in shard_names(index)]
    if single.is_file():
        return [single]
    raise no_weights_error(folder.name, stem, any(path.suffix in PICKLE_SUFFIXES for path in folder.iterdir()))


class SafetensorsReader:
    """Random access to the tensors of one or more safetensors files, reading each tensor from disk on demand."""

    def __init__(self, files: list[Path]):
        self._entries: dict[str, tuple[Path, int, torch.dtype, list[int], int]] = {}
        for path in files:
            with open(path, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_len))
            header.pop("__metadata__", None)
            for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                self._entries[name] = (path, 8 + header_len + start, _DTYPES[info["dtype"]], info["shape"], end - start)

    def keys(self) -> list[str]:
        return list(self._entries)

    def nbytes(self, name: str | None = None) -> int:
        if name is not None:
            return self._entries[name][4]
        return sum(entry[4] for entry in self._entries.values())

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][2]

    def shape(self, name: str) -> list[int]:
        return self._entries[name][3]

    def read(self, name: str) -> torch.Tensor:
        path, offset, dtype, shape, size = self._entries[name]
        buffer = bytearray(size)
        with open(path, "rb") as handle:
            handle.seek(offset)
            handle.readinto(buffer)
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._entries:
            yield name, self.read(name)


class ShardedWriter:
    """Write tensors into `{stem}.{variant}-0000k-of-0000n.safetensors` shards plus the index diffusers expects.

    A single shard is written as `{stem}.{variant}.safetensors` with no index, as `save_pretrained` does.
    """

    def __init__(self, folder: Path, library: str, variant: str, max_shard_bytes: int):
        self.folder, self.stem, self.variant, self.max_shard_bytes = folder, WEIGHT_STEMS[library], variant, max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"{self.stem}.{self.variant}.part{len(self._shards) + 1}.safetensors"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give the shards their final names, write the index; returns the files."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            final = self.folder / f"{self.stem}.{self.variant}.safetensors"
            self._shards[0][0].rename(final)
            return [final]
        weight_map, files = {}, []
        for number, (path, names) in enumerate(self._shards, start=1):
            final = self.folder / f"{self.stem}.{self.variant}-{number:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = self.folder / f"{self.stem}.safetensors.index.{self.variant}.json"
        index.write_text(json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2))
        return files + [index]


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as diffusers' max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * units[unit])
    return int(upper)
