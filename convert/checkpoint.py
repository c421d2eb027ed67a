"""Stream safetensors checkpoints one tensor at a time, in and out, so RAM holds at most one output shard.

Reading goes through plain file reads (no mmap): a memory map of a 10 GB shard would count every page
touched towards the process's resident memory, which is what the low-memory target measures.

Every file is checked against its own header before any tensor is read (`SafetensorsReader`), as strictly
as the safetensors library itself checks it: the header is a JSON object of known dtypes and shapes whose
byte ranges tile the data exactly, and the file is exactly as long as the header says. Every read checks
that it got all the bytes it asked for.
"""

from __future__ import annotations

import ctypes
import json
import math
import re
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from sd35fp8.errors import BadInput
from sd35fp8.settings import CONVERSION

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
WEIGHT_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
MAX_HEADER_BYTES = 100_000_000  # what the safetensors library accepts
METADATA = {"format": "pt"}


class CheckpointError(BadInput):
    """A weight file or index cannot be used; the message names the file and says what to do."""


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


def _damaged(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}. The file is damaged or not a safetensors file: download or save it again.")


def read_json_object(path: Path, what: str = "file") -> dict:
    """The JSON object in `path`, or CheckpointError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: this {what} is not valid JSON. Download or save it again.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: this {what} holds JSON but not an object ({{...}}). Download or save it again.")
    return data


def shard_names(index: Path) -> list[str]:
    """The shard files a `*.safetensors.index.json` names: plain file names next to it, never paths."""
    weight_map = read_json_object(index, "index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no 'weight_map' object naming the shards. Download or save it again.")
    names = set()
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise CheckpointError(f"{index}: tensor {tensor!r} is mapped to {shard!r}, which is not a file in this "
                                  "folder. An index may only name shards next to it.")
        names.add(shard)
    return sorted(names)


def _index_map(index: Path) -> dict[str, str]:
    return read_json_object(index, "index")["weight_map"]


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
        names = shard_names(index)
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shards that are missing: {', '.join(missing)}")
        return [folder / name for name in names]
    if single.is_file():
        return [single]
    raise no_weights_error(folder.name, stem, any(path.suffix in PICKLE_SUFFIXES for path in folder.iterdir()))


class SafetensorsReader:
    """Random access to the tensors of one or more checked safetensors files, reading each from disk on demand.

    `index`, if given, is the `*.safetensors.index.json` the files come from: every tensor it names must be in
    the shard it names, and every tensor of the shards must be named.
    """

    def __init__(self, files: list[Path], index: Path | None = None):
        self._entries: dict[str, tuple[Path, int, torch.dtype, list[int], int]] = {}
        for path in files:
            for name, entry in _read_header(Path(path)).items():
                if name in self._entries:
                    raise CheckpointError(f"{path}: tensor {name!r} is also in {self._entries[name][0]}; a checkpoint "
                                          "may hold each tensor once. Download or save it again.")
                self._entries[name] = entry
        if index is not None:
            self._check_index(index)

    def _check_index(self, index: Path) -> None:
        weight_map = _index_map(index)
        for name, shard in weight_map.items():
            if name not in self._entries:
                raise CheckpointError(f"{index}: names tensor {name!r} in {shard}, which does not hold it. "
                                      "Download or save the checkpoint again.")
            if self._entries[name][0].name != shard:
                raise CheckpointError(f"{index}: names tensor {name!r} in {shard}, but it is in "
                                      f"{self._entries[name][0].name}. Download or save the checkpoint again.")
        unlisted = [name for name in self._entries if name not in weight_map]
        if unlisted:
            raise CheckpointError(f"{index}: does not name tensor {unlisted[0]!r} of {self._entries[unlisted[0]][0].name}"
                                  f"{f' (and {len(unlisted) - 1} more)' if len(unlisted) > 1 else ''}. "
                                  "Download or save the checkpoint again.")

    def keys(self) -> list[str]:
        return list(self._entries)

    def file_of(self, name: str) -> Path:
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        return self._entries[name][4]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][2]

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name`, read from disk (CheckpointError if the file has become shorter)."""
        path, offset, dtype, shape, size = self._entries[name]
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(size)
        with open(path, "rb") as handle:
            handle.seek(offset)
            got = handle.readinto(buffer)
        if got != size:
            raise _damaged(path, f"tensor {name!r} needs {size} bytes at offset {offset} but only {got} could be read "
                                 "(the file is shorter than when it was checked)")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._entries:
            yield name, self.read(name)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"the key {duplicate!r} appears twice")
    return dict(pairs)


def read_header_bytes(path: Path) -> bytes:
    """The first 8 + header-length bytes of a checked safetensors file (what a byte-identical copy starts with)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return struct.pack("<Q", length) + handle.read(length)


def _read_header(path: Path) -> dict[str, tuple[Path, int, torch.dtype, list[int], int]]:
    """Check `path` against its header; its tensors as name -> (path, file offset, dtype, shape, bytes)."""
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _damaged(path, f"only {file_size} bytes long, shorter than a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length < 2 or length > min(MAX_HEADER_BYTES, file_size - 8):
                raise _damaged(path, f"its header length field says {length} bytes, but the file holds "
                                     f"{file_size - 8} after it (and a header is 2 to {MAX_HEADER_BYTES} bytes)")
            raw = handle.read(length)
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a safetensors file.") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (a link pointing nowhere?). Download or save it again.") from None
    except PermissionError:
        raise CheckpointError(f"{path} cannot be read (permission denied): make it readable and run this again.") from None
    if len(raw) != length:
        raise _damaged(path, "the header could not be read completely")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _damaged(path, f"its header is not valid JSON ({str(error)[:80]})") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is JSON but not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _damaged(path, "its __metadata__ is not an object of strings")
    data_start, data_size = 8 + length, file_size - 8 - length
    entries, ranges = {}, []
    for name, info in header.items():
        dtype, shape, (start, end) = _tensor_info(path, name, info)
        expected = math.prod(shape) * dtype.itemsize
        if end > data_size:
            raise _damaged(path, f"truncated: tensor {name!r} ends {end - data_size} bytes past the end of the file "
                                 f"(offsets {start}..{end}, {data_size} bytes of tensor data)")
        if end - start != expected:
            raise _damaged(path, f"tensor {name!r} ({DTYPE_NAMES[dtype]} {shape}) needs {expected} bytes but its "
                                 f"offsets span {end - start}")
        entries[name] = (path, data_start + start, dtype, shape, expected)
        ranges.append((start, end, name))
    position = 0
    for start, end, name in sorted(ranges):
        if start != position:
            problem = "overlaps the tensor before it" if start < position else f"leaves a gap of {start - position} bytes"
            raise _damaged(path, f"tensor {name!r} {problem} (offsets {start}..{end})")
        position = end
    if position < data_size:
        raise _damaged(path, f"{data_size - position} bytes longer than its header describes")
    return {name: entries[name] for _, _, name in sorted(ranges)}


def _tensor_info(path: Path, name: str, info) -> tuple[torch.dtype, list[int], tuple[int, int]]:
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(info, dict):
        raise _damaged(path, f"the header entry of {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise _damaged(path, f"tensor {name!r} has dtype {dtype!r}, which this tool does not know "
                             f"(known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(whole(dim) for dim in shape):
        raise _damaged(path, f"tensor {name!r} has shape {shape!r}, not a list of whole numbers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(whole(v) for v in offsets)
            and offsets[0] <= offsets[1]):
        raise _damaged(path, f"tensor {name!r} has data_offsets {offsets!r}, not [start, end] with start <= end")
    return DTYPES[dtype], shape, (offsets[0], offsets[1])


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to a new file `path` in the safetensors format, tensor by tensor (no second copy in RAM)."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))  # keeps every tensor aligned
    header: dict = {"__metadata__": dict(metadata or METADATA)}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "xb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:
            flat = tensors[name].detach().contiguous().reshape(-1)
            if flat.numel():
                handle.write(memoryview(flat.view(torch.uint8).numpy()))


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
        write_safetensors(path, self._pending)
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


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMG]I?B|B)?", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, setting: str = "--max-shard-size") -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as diffusers' max_shard_size; KiB/MiB/GiB binary); at least
    `CONVERSION.min_shard_bytes`. BadInput naming `setting` otherwise."""
    match = _SIZE.fullmatch(str(text).strip())
    if not match:
        raise BadInput(f"{setting} {text!r} is not a size: use a number with an optional unit, e.g. 5GB, 500MB, 2GiB.")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size < CONVERSION.min_shard_bytes:
        raise BadInput(f"{setting} {text!r} is too small: use at least {CONVERSION.min_shard_bytes // 1000}KB "
                       "(the default, 5GB, suits the Hub).")
    return size
