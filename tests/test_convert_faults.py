"""Fault injection for `python -m convert`: hostile folders, corrupt files, bad arguments, full and read-only disks,
signals to a child process.

Each case checks what issue 8 asks of the converter: the exit code (2 bad input, 1 failure, 128 + N for signal N),
one `error:` line on stderr and no traceback, a source whose every file hashes as before, and nothing left behind:
no new --out (an existing one unchanged) and no hidden work folder next to it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert import checkpoint, cli, quantize
from convert.checkpoint import CheckpointError, SafetensorsReader
from sd35fp8.settings import CONVERSION

ROOT = Path(__file__).resolve().parent.parent
REPORT = "fp8_conversion.json"


# ------------------------------------------------------------------------------------------------ helpers


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links followed, not into folders) hashed, and every link's target."""
    hashes = {}
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(root) / name
            key = path.relative_to(folder).as_posix()
            if path.is_symlink():
                hashes[key + " ->"] = os.readlink(path)
            if path.is_file():
                hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")) if out.parent.is_dir() else []


def error_line(err: str) -> str:
    """The one `error:` line of a run's stderr (progress bars and library warnings may precede it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def refused(capsys, argv, code: int, *phrases: str, source: Path, out: Path) -> str:
    """Run the converter in this process; assert it fails with `code`, one line holding `phrases`, and no trace."""
    before = tree_hashes(source)
    out_before = tree_hashes(out) if out.is_dir() else None
    rc = cli.main([str(a) for a in argv])
    line = error_line(capsys.readouterr().err)
    assert rc == code, line
    for phrase in phrases:
        assert phrase in line, line
    assert tree_hashes(source) == before, "the source changed"
    assert (tree_hashes(out) if out.is_dir() else None) == out_before and (out.exists() or out_before is None)
    assert not leftovers(out), leftovers(out)
    return line


@pytest.fixture
def src(tiny_base, tmp_path) -> Path:
    """A private copy of the tiny bf16 pipeline (sharded transformer and T5 text encoder), free to damage."""
    return Path(shutil.copytree(tiny_base, tmp_path / "src"))


@pytest.fixture
def src1(tiny_base_no_t5, tmp_path) -> Path:
    """A private copy of the tiny fp16 pipeline without T5 (single-file weights), free to damage."""
    return Path(shutil.copytree(tiny_base_no_t5, tmp_path / "src"))


def fake_output(folder: Path) -> Path:
    """Make `folder` look like an earlier output of the converter (what --overwrite accepts)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT).write_text(json.dumps({"verified": True}))
    return folder


def rewrite_header(path: Path, change) -> None:
    """Rewrite a safetensors file's header through `change(header) -> header | bytes`, keeping its data bytes."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = change(json.loads(raw[8:8 + length]))
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])


def first_shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


# ------------------------------------------------------------------------------ item 1: the source is never lost


def test_out_equal_to_the_source_is_refused(src, capsys):
    refused(capsys, [src, "--out", src, "--overwrite"], 2, f"--out {src} is {src}, part of the source", source=src, out=src)
    fake_output(src)  # even a source that looks like an earlier output
    refused(capsys, [src, "--out", src, "--overwrite"], 2, "part of the source", source=src, out=src)


def test_out_holding_the_source_is_refused(src, capsys):
    parent = fake_output(src.parent)
    refused(capsys, [src, "--out", parent, "--overwrite"], 2, "holds", "part of the source", source=src, out=parent)


def test_out_inside_the_source_is_refused(src, capsys):
    refused(capsys, [src, "--out", src / "fp8"], 2, "lies inside", source=src, out=src / "fp8")
    refused(capsys, [src, "--out", src / "vae" / "x" / "fp8"], 2, "lies inside", source=src, out=src / "vae" / "x" / "fp8")


def test_links_are_resolved_before_comparing(src, tmp_path, capsys):
    fake_output(src)
    link = tmp_path / "link-to-src"
    link.symlink_to(src)
    refused(capsys, [src, "--out", link, "--overwrite"], 2, "part of the source", source=src, out=link)
    refused(capsys, [link, "--out", src, "--overwrite"], 2, "part of the source", source=src, out=src)


def test_folders_and_files_linked_in_from_outside_count_as_source(src, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(src / "vae", outside / "vae")
    (src / "vae").symlink_to(outside / "vae")
    blobs = fake_output(tmp_path / "blobs")
    weights = src / "text_encoder" / "model.safetensors"
    shutil.move(weights, blobs / "abc123")
    weights.symlink_to(blobs / "abc123")
    fake_output(outside)
    refused(capsys, [src, "--out", outside, "--overwrite"], 2, "holds", source=src, out=outside)
    refused(capsys, [src, "--out", outside / "vae" / "new"], 2, "lies inside", source=src, out=outside / "vae" / "new")
    refused(capsys, [src, "--out", blobs, "--overwrite"], 2, "holds", source=src, out=blobs)


def test_hardlinked_source_files_survive_overwrite(src1, tmp_path):
    """An earlier output holding a hard link to a source file: replacing it leaves the source file intact."""
    out = fake_output(tmp_path / "out")
    os.link(src1 / "vae" / "diffusion_pytorch_model.safetensors", out / "linked.safetensors")
    before = tree_hashes(src1)
    assert cli.main([str(src1), "--out", str(out), "--overwrite", "--device", "cpu"]) == 0
    assert tree_hashes(src1) == before and not (out / "linked.safetensors").exists()


@pytest.mark.parametrize("case", ["file", "file --overwrite", "parent is a file", "dangling link", "root"])
def test_out_that_is_not_a_folder_is_refused(src1, tmp_path, capsys, case):
    target = tmp_path / "target"
    if case.startswith("file"):
        target.write_text("not a folder")
        phrase, argv = "is a file", ["--overwrite"] if "overwrite" in case else []
    elif case == "parent is a file":
        target.write_text("not a folder")
        target, phrase, argv = target / "sub" / "out", "is a file, not a folder", []
    elif case == "dangling link":
        target.symlink_to(tmp_path / "nowhere")
        phrase, argv = "pointing nowhere", []
    else:
        target, phrase, argv = Path("/"), "--out / holds", ["--overwrite"]
    before = target.read_bytes() if target.is_file() else None
    refused(capsys, [src1, "--out", target, *argv], 2, phrase, source=src1, out=tmp_path / "unused")
    if before is not None:
        assert target.read_bytes() == before


# ------------------------------------------------------------------------- items 4 and 5: corrupt sources


def truncate(path: Path, missing: int | None = None) -> None:
    size = path.stat().st_size
    os.truncate(path, size - missing if missing is not None else size // 2)


def _t5(src):
    return first_shard(src / "text_encoder_3")


def _shard(src):
    return first_shard(src / "transformer")


def _clip(src):
    return src / "text_encoder" / "model.safetensors"


def _vae(src):
    return first_shard(src / "vae")


def _swap_offsets(header):
    names = [n for n in header if n != "__metadata__"]
    a, b = sorted(names, key=lambda n: header[n]["data_offsets"][0])[:2]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + (
        header[b]["data_offsets"][1] - header[b]["data_offsets"][0])]
    return header


def _first_tensor(header, **changes):
    name = next(n for n in header if n != "__metadata__")
    header[name].update(changes)
    return header


CORRUPT = {
    # name: (file to damage, damage, phrase in the message)
    "transformer missing 2 bytes": (_shard, lambda p: truncate(p, 2), "ends 2 bytes past the end of the file"),
    "T5 missing 64 bytes": (_t5, lambda p: truncate(p, 64), "ends 64 bytes past the end of the file"),
    "cut in half": (_t5, truncate, "past the end of the file"),
    "copied VAE missing 1 byte": (_vae, lambda p: truncate(p, 1), "past the end of the file"),
    "one byte too long": (_shard, lambda p: p.write_bytes(p.read_bytes() + b"\0"), "1 bytes longer"),
    "empty file": (_shard, lambda p: p.write_bytes(b""), "shorter than a safetensors header"),
    "absurd header length": (_t5, lambda p: p.write_bytes(struct.pack("<Q", 2**62) + p.read_bytes()[8:]), "header length"),
    "header length 1": (_t5, lambda p: p.write_bytes(struct.pack("<Q", 1) + p.read_bytes()[8:]), "header length"),
    "header not JSON": (_shard, lambda p: rewrite_header(p, lambda h: b"{not json at all" + b" " * 40), "not valid JSON"),
    "header not UTF-8": (_shard, lambda p: rewrite_header(p, lambda h: b"\xff\xfe{}"), "not valid JSON"),
    "deeply nested header": (_shard, lambda p: rewrite_header(p, lambda h: b"[" * 200_000), "not valid JSON"),
    "header an array": (_shard, lambda p: rewrite_header(p, lambda h: b"[1, 2, 3]"), "not an object"),
    "duplicate key": (_shard, lambda p: rewrite_header(p, lambda h: json.dumps(h).replace(
        "{", '{"x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "x": {}, ', 1).encode()), "appears twice"),
    "entry not an object": (_shard, lambda p: rewrite_header(p, lambda h: {**h, "junk": 5}), "not an object"),
    "unknown dtype": (_shard, lambda p: rewrite_header(p, lambda h: _first_tensor(h, dtype="F7")), "dtype 'F7'"),
    "negative shape": (_shard, lambda p: rewrite_header(p, lambda h: _first_tensor(h, shape=[-1])), "shape [-1]"),
    "size not dtype x shape": (_shard, lambda p: rewrite_header(p, lambda h: _first_tensor(h, shape=[1])), "needs 2 bytes"),
    "offsets past the end": (_shard, lambda p: rewrite_header(p, lambda h: _first_tensor(
        h, data_offsets=[10**12, 10**12 + 2], shape=[1])), "past the end of the file"),
    "offsets backwards": (_shard, lambda p: rewrite_header(p, lambda h: _first_tensor(h, data_offsets=[8, 4])), "data_offsets"),
    "overlapping tensors": (_clip, lambda p: rewrite_header(p, _swap_offsets), "overlaps"),
    "metadata not strings": (_shard, lambda p: rewrite_header(p, lambda h: {**h, "__metadata__": {"a": 1}}), "__metadata__"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_safetensors_are_refused_before_any_work(src, tmp_path, capsys, case):
    pick, damage, phrase = CORRUPT[case]
    path = pick(src)
    damage(path)
    out = tmp_path / "out"
    line = refused(capsys, [src, "--out", out, "--device", "cpu"], 2, phrase, str(path), source=src, out=out)
    assert "download or save it again" in line.lower()


def test_a_short_read_is_never_silent(src1, tmp_path):
    """The reader checks every read's byte count: a file shortened after it was checked is refused, not zero-filled."""
    path = src1 / "transformer" / "diffusion_pytorch_model.safetensors"
    reader = SafetensorsReader([path])
    truncate(path, 2)
    last = reader.keys()[-1]
    with pytest.raises(CheckpointError, match="could be read"):
        reader.read(last)


def _index(src) -> Path:
    return src / "transformer" / "diffusion_pytorch_model.safetensors.index.json"


def _edit_index(src, change):
    index = _index(src)
    index.write_text(json.dumps(change(json.loads(index.read_text()))))


def _map_one(data, shard):
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = shard
    return data


def _drop_one(data):
    data["weight_map"].pop(next(iter(data["weight_map"])))
    return data


def _duplicate_shard(src):
    shards = sorted((src / "transformer").glob("*.safetensors"))
    tensors = load_file(shards[1])
    tensors.update(dict(list(load_file(shards[0]).items())[:1]))  # one tensor of shard 1 also in shard 2
    save_file(tensors, shards[1], metadata={"format": "pt"})


INDEX_FAULTS = {
    "shard outside the folder": (lambda s: _edit_index(s, lambda d: _map_one(d, "../vae/diffusion_pytorch_model.safetensors")),
                                 "not a file in this folder"),
    "absolute shard path": (lambda s: _edit_index(s, lambda d: _map_one(d, "/etc/passwd")), "not a file in this folder"),
    "index not JSON": (lambda s: _index(s).write_text("{oops"), "not valid JSON"),
    "index an array": (lambda s: _index(s).write_text("[]"), "not an object"),
    "no weight_map": (lambda s: _index(s).write_text("{}"), "weight_map"),
    "tensor in the wrong shard": (lambda s: _edit_index(s, lambda d: _map_one(d, sorted(set(d["weight_map"].values()))[-1])),
                                  "but it is in"),
    "tensor not in the index": (lambda s: _edit_index(s, _drop_one), "does not name tensor"),
    "duplicate tensor across shards": (_duplicate_shard, "is also in"),
}


@pytest.mark.parametrize("case", INDEX_FAULTS)
def test_inconsistent_shard_indexes_are_refused(src, tmp_path, capsys, case):
    damage, phrase = INDEX_FAULTS[case]
    damage(src)
    out = tmp_path / "out"
    refused(capsys, [src, "--out", out, "--device", "cpu"], 2, phrase, source=src, out=out)


def _poison(path: Path, value: float) -> None:
    tensors = load_file(path)
    name = next(n for n, t in tensors.items() if t.is_floating_point() and t.numel() > 4)
    tensors[name].view(-1)[3] = value
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(("where", "value"), [("transformer", float("nan")), ("vae", float("inf"))])
def test_nan_or_inf_weights_are_refused_and_leave_nothing(src1, tmp_path, capsys, where, value):
    _poison(src1 / where / "diffusion_pytorch_model.safetensors", value)
    out = tmp_path / "out"
    refused(capsys, [src1, "--out", out, "--device", "cpu"], 2, "NaN or infinite", f"{where}/", source=src1, out=out)


def _write_index(src, text):
    (src / "model_index.json").write_text(text)


def _index_entry(src, name, value):
    data = json.loads((src / "model_index.json").read_text())
    data[name] = value
    _write_index(src, json.dumps(data))


def _loop(src):
    (src / "tokenizer" / "loop").symlink_to(src / "tokenizer")


def _to_parent(src):
    (src / "tokenizer" / "up").symlink_to(src)


SOURCE_FAULTS = {
    "model_index not JSON": (lambda s: _write_index(s, "{'single': 'quotes'}"), "not valid JSON"),
    "model_index an array": (lambda s: _write_index(s, "[1, 2]"), "not an object"),
    "component named ../evil": (lambda s: _index_entry(s, "../evil", ["diffusers", "AutoencoderKL"]), "plain folder name"),
    "entry not [library, class]": (lambda s: _index_entry(s, "vae", "AutoencoderKL"), "not [library, class]"),
    "config not JSON": (lambda s: (s / "transformer" / "config.json").write_text("{"), "not valid JSON"),
    "scheduler config not JSON": (lambda s: (s / "scheduler" / "scheduler_config.json").write_text("]"), "not valid JSON"),
    "tokenizer file not JSON": (lambda s: (s / "tokenizer" / "tokenizer.json").write_bytes(b"\xff"), "not valid JSON"),
    "class name not text": (lambda s: _index_entry(s, "_class_name", ["StableDiffusion3Pipeline"]), "not an SD3 pipeline"),
    "already quantized": (lambda s: (s / "transformer" / "config.json").write_text(json.dumps(
        {**json.loads((s / "transformer" / "config.json").read_text()), "quantization_config": {"quant_method": "quanto"}})),
        "already quantized"),
    "model card not YAML": (lambda s: (s / "README.md").write_text("---\nlicense: [unclosed\n---\n"), "metadata block"),
    "symbolic link loop": (_loop, "links back"),
    "link to the source root": (_to_parent, "links back"),
    "dangling link": (lambda s: (s / "vae" / "gone.json").symlink_to(s / "nowhere"), "pointing nowhere"),
    "a pipe among the files": (lambda s: os.mkfifo(s / "tokenizer" / "fifo"), "not a regular file"),
}


@pytest.mark.parametrize("case", SOURCE_FAULTS)
def test_malformed_pipelines_are_refused(src1, tmp_path, capsys, case):
    damage, phrase = SOURCE_FAULTS[case]
    damage(src1)
    out = tmp_path / "out"
    refused(capsys, [src1, "--out", out, "--device", "cpu"], 2, phrase, source=src1, out=out)
    assert not (tmp_path / "evil").exists()


# ------------------------------------------------------------- item 6: arguments checked before any weight is read


BAD_ARGUMENTS = {
    "verify size 17": (["--verify-size", "17"], "--verify-size 17: this pipeline takes multiples of 16"),
    "verify size 0": (["--verify-size", "0"], "--verify-size 0"),
    "verify size too large": (["--verify-size", "4096"], "from 16 to 1024"),
    "vae": (["--components", "vae"], "only the SD3 transformer and T5"),
    "clip": (["--components", "text_encoder"], "only the SD3 transformer and T5"),
    "no component": (["--components", ","], "names nothing to quantize"),
    "unknown component": (["--components", "unet"], "not in this pipeline"),
    "shard size abc": (["--max-shard-size", "abc"], "--max-shard-size 'abc' is not a size"),
    "shard size 0": (["--max-shard-size", "0"], "too small"),
    "shard size negative": (["--max-shard-size=-1GB"], "is not a size"),
    "shard size tiny": (["--max-shard-size", "1KB"], "too small"),
    "negative image count": (["--verify-images", "-1"], "--verify-images -1"),
    "many images": (["--verify-images", "1000"], "--verify-images 1000"),
    "zero steps": (["--verify-steps", "0"], "--verify-steps 0"),
    "typo in exclude": (["--exclude", "proj_uot"], "--exclude proj_uot"),
    "everything excluded": (["--components", "text_encoder_3", "--exclude", "encoder"], "no linear layer would be stored"),
    "private without push": (["--private"], "--push-to"),
    "bad base id": (["--base-id", "not a repo"], "--base-id"),
    "bad push id": (["--push-to", "me//x"], "--push-to"),
    "revision of a folder": (["--revision", "v1"], "applies to Hub repos"),
    "cuda without a GPU": (["--device", "cuda"], "no CUDA GPU"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_before_any_weight_is_read(src, tmp_path, capsys, monkeypatch, case):
    extra, phrase = BAD_ARGUMENTS[case]
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read before the arguments were checked")

    monkeypatch.setattr(SafetensorsReader, "read", no_reading)
    out = tmp_path / "out"
    refused(capsys, [src, "--out", out, *extra], 2, phrase, source=src, out=out)


def test_shard_size_that_would_write_too_many_files_is_refused(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "CONVERSION", replace(CONVERSION, max_shards=2))
    out = tmp_path / "out"
    refused(capsys, [src, "--out", out, "--max-shard-size", "100KB"], 2, "would split transformer into about",
            "use at least", source=src, out=out)


def test_out_is_required_without_dry_run(src, tmp_path, capsys):
    refused(capsys, [src], 2, "--out is required", source=src, out=tmp_path / "out")


# ------------------------------------------------------------------------------------ item 4: disks that fail


@pytest.fixture
def small_tmpfs(tmp_path):
    """Factory: a tmpfs of `size` mounted at a fresh folder (`ro` for read-only); needs root, else the test skips."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                               capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_read_only_output_location_is_refused(src1, tmp_path, capsys, small_tmpfs):
    if os.geteuid() == 0:
        folder = small_tmpfs("1m", read_only=True)
    else:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
    out = folder / "out"
    refused(capsys, [src1, "--out", out, "--device", "cpu"], 2, "choose an --out you can write to", source=src1, out=out)
    assert not out.exists() and not list(folder.iterdir())


def test_not_enough_space_is_refused_up_front(src1, capsys, small_tmpfs):
    out = small_tmpfs("300k") / "out"
    refused(capsys, [src1, "--out", out, "--device", "cpu"], 2, "are free there", source=src1, out=out)


def test_disk_filling_up_while_writing_leaves_nothing(src1, capsys, monkeypatch, small_tmpfs):
    monkeypatch.setattr(cli, "check_free_space", lambda out, needed: None)  # pretend it looked big enough
    folder = small_tmpfs("300k")
    out = folder / "out"
    refused(capsys, [src1, "--out", out, "--device", "cpu"], 1, "no space left on the device while writing",
            source=src1, out=out)
    assert not list(folder.iterdir())


def test_a_write_failing_with_enospc_leaves_nothing(src, tmp_path, capsys, monkeypatch):
    """The same on any machine: every file the converter writes through `open` fails once 100 KB are written."""
    written = [0]

    class FillingFile:
        def __init__(self, handle):
            self._handle = handle

        def write(self, data):
            written[0] += len(data)
            if written[0] > 100_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._handle.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

    def filling_open(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        return FillingFile(handle) if "w" in mode or "x" in mode else handle

    monkeypatch.setattr(checkpoint, "open", filling_open, raising=False)
    monkeypatch.setattr(quantize, "open", filling_open, raising=False)
    out = tmp_path / "out"
    refused(capsys, [src, "--out", out, "--device", "cpu"], 1, "no space left on the device while writing",
            source=src, out=out)


def test_an_unexpected_error_is_one_line_naming_the_step(src, tmp_path, capsys, monkeypatch):
    def broken(weight):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(quantize, "quantize_blockwise", broken)
    out = tmp_path / "out"
    refused(capsys, [src, "--out", out, "--device", "cpu"], 1, "unexpected ZeroDivisionError while writing text_encoder_3",
            "SD35FP8_DEBUG=1", source=src, out=out)
    monkeypatch.setenv("SD35FP8_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main([str(src), "--out", str(out), "--device", "cpu"])
    assert not out.exists() and not leftovers(out)


# -------------------------------------------------------------------------- item 7: signals and killed runs


CHILD = """
import sys, time
from pathlib import Path
import convert.checkpoint as checkpoint
real = checkpoint.write_safetensors
def write_then_wait(*args, **kwargs):  # the first shard is written, then the run waits for the signal
    real(*args, **kwargs)
    Path(sys.argv[1]).touch()
    time.sleep(300)
checkpoint.write_safetensors = write_then_wait
from convert.cli import main
sys.exit(main(sys.argv[2:]))
"""


def start_writing(source: Path, out: Path, tmp_path: Path) -> subprocess.Popen:
    """`python -m convert SOURCE --out OUT` in a child process, returned once it has written a weight file."""
    marker = tmp_path / "writing"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), str(source), "--out", str(out), "--device", "cpu"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() < deadline, "the child never started writing"
        time.sleep(0.2)
    assert leftovers(out) == [f".{out.name}.partial-{child.pid}"]
    return child


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_writing_cleans_up(src1, tmp_path, signum):
    out = tmp_path / "out"
    before = tree_hashes(src1)
    child = start_writing(src1, out, tmp_path)
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signum, err
    assert error_line(err).startswith(f"error: interrupted ({signal.Signals(signum).name}): nothing was written")
    assert not out.exists() and not leftovers(out)
    assert tree_hashes(src1) == before


def test_the_next_run_removes_what_a_killed_run_left(src1, tmp_path, capsys):
    out = tmp_path / "out"
    child = start_writing(src1, out, tmp_path)
    child.kill()
    child.communicate(timeout=60)
    [partial] = leftovers(out)
    assert list((tmp_path / partial).rglob("*.safetensors")), "the killed run had written a shard"
    assert cli.main([str(src1), "--out", str(out), "--device", "cpu"]) == 0
    assert f"removed {tmp_path / partial}, left by process {child.pid} which was killed" in capsys.readouterr().out
    assert not leftovers(out) and (out / REPORT).is_file()


def test_a_work_folder_of_a_running_conversion_is_left_alone(src1, tmp_path, capsys):
    out = tmp_path / "out"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        busy = tmp_path / f".out.partial-{sleeper.pid}"
        busy.mkdir()
        (busy / "shard.safetensors").write_bytes(b"in progress")
        line = refused(capsys, [src1, "--out", out, "--device", "cpu"], 2, f"another conversion (process {sleeper.pid})",
                       source=src1, out=tmp_path / "unused")
        assert str(busy) in line and (busy / "shard.safetensors").read_bytes() == b"in progress"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_earlier_output_a_killed_run_was_replacing_is_put_back(src1, tmp_path, capsys):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = fake_output(tmp_path / f".out.old-{dead.pid}")
    (old / "weights.txt").write_text("the earlier output")
    refused(capsys, [src1, "--out", out, "--device", "cpu"], 2, "already exists and is not empty", source=src1,
            out=tmp_path / "unused")
    assert (out / "weights.txt").read_text() == "the earlier output" and not leftovers(out)
