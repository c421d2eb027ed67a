"""Write a random-weight, full-size diffusers component folder (sharded bf16 safetensors) from a config, streaming.

The weights are RANDOM (normal * 0.02; norm scales one, norm shifts zero; the patch embedding's sin-cos
position table as diffusers computes it). They stand in for a real checkpoint in memory and speed benchmarks
only: they have the real names, shapes, dtypes, shard layout and byte count, and nothing learned.

The model is built on the meta device to learn names and shapes, the safetensors header of every shard is
computed up front, and each tensor is generated and written on its own, so this script holds one tensor at a
time (the largest, SD3.5 Large's position table, is 180 MB) whatever the model size.

    python -m bench.make_random_checkpoint --config bench/configs/sd35_large --out bench/work/sd35_large_random

`--config` is a folder of component folders, each with a config.json (e.g. `transformer/config.json`); the
output gets the same component folders plus a minimal `model_index.json` (an SD3 pipeline with just those
components), which is what `convert.source.inspect_folder` needs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from convert.checkpoint import parse_size

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
STEM = "diffusion_pytorch_model"
PIPELINE_CLASS = "StableDiffusion3Pipeline"
STD = 0.02


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    owner: str  # class name of the module holding the tensor

    def nbytes(self, dtype: torch.dtype) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * dtype.itemsize


def meta_model(config: dict) -> nn.Module:
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, config["_class_name"]).from_config(config)


def entries(model: nn.Module) -> list[Entry]:
    """Every tensor of the state dict, in state-dict order, with the class of the module that holds it."""
    owners = {}
    for module_name, module in model.named_modules():
        for tensor_name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            owners[f"{module_name}.{tensor_name}" if module_name else tensor_name] = type(module).__name__
    return [Entry(name, tuple(t.shape), owners.get(name, "?")) for name, t in model.state_dict().items()]


def plan_shards(items: list[Entry], dtype: torch.dtype, max_shard_bytes: int) -> list[list[Entry]]:
    """Greedy split in state-dict order, as diffusers' save_pretrained does."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in items:
        nbytes = entry.nbytes(dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _sincos_position_table(model: nn.Module, config: dict) -> torch.Tensor | None:
    """diffusers' PatchEmbed table, computed for real (it is not learned, so random would be less realistic)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    embed = getattr(model, "pos_embed", None)
    if embed is None or getattr(embed, "pos_embed_max_size", None) is None:
        return None
    table = get_2d_sincos_pos_embed(
        embed.pos_embed.shape[-1], embed.pos_embed_max_size, base_size=embed.base_size,
        interpolation_scale=embed.interpolation_scale, output_type="pt",
    )
    return table.float().unsqueeze(0)


def make_tensor(entry: Entry, dtype: torch.dtype, generator: torch.Generator, special: dict) -> torch.Tensor:
    if entry.name in special:
        return special[entry.name].to(dtype).reshape(entry.shape)
    leaf = entry.name.rsplit(".", 1)[-1]
    if "Norm" in entry.owner and leaf == "weight":  # LayerNorm / RMSNorm scale
        return torch.ones(entry.shape, dtype=dtype)
    if "Norm" in entry.owner and leaf == "bias":
        return torch.zeros(entry.shape, dtype=dtype)
    tensor = torch.randn(entry.shape, generator=generator, dtype=torch.float32)
    return tensor.mul_(STD).to(dtype)


def write_shard(path: Path, shard: list[Entry], dtype: torch.dtype, generator: torch.Generator, special: dict) -> None:
    header, offset = {}, 0
    for entry in shard:
        nbytes = entry.nbytes(dtype)
        header[entry.name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for entry in shard:
            tensor = make_tensor(entry, dtype, generator, special).contiguous()
            handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor


def write_component(config_file: Path, out_folder: Path, dtype: torch.dtype, max_shard_bytes: int, seed: int) -> dict:
    config = json.loads(config_file.read_text())
    model = meta_model(config)
    items = entries(model)
    special = {}
    table = _sincos_position_table(model, config)
    if table is not None:
        special["pos_embed.pos_embed"] = table
    shards = plan_shards(items, dtype, max_shard_bytes)
    out_folder.mkdir(parents=True, exist_ok=True)
    (out_folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generator = torch.Generator().manual_seed(seed)
    count = len(shards)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        name = f"{STEM}.safetensors" if count == 1 else f"{STEM}-{number:05d}-of-{count:05d}.safetensors"
        started = time.perf_counter()
        write_shard(out_folder / name, shard, dtype, generator, special)
        size = sum(e.nbytes(dtype) for e in shard)
        total += size
        weight_map.update(dict.fromkeys((e.name for e in shard), name))
        print(f"  {out_folder.name}/{name}: {len(shard)} tensors, {size / 1e9:.2f} GB "
              f"in {time.perf_counter() - started:.1f} s", flush=True)
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_folder / f"{STEM}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    parameters = sum(p.numel() for p in model.parameters())
    return {"class_name": config["_class_name"], "parameters": parameters, "tensors": len(items),
            "bytes": total, "shards": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.make_random_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True,
                        help="folder of component folders holding config.json, e.g. bench/configs/sd35_large")
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write (under bench/work/ or /tmp)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="weight dtype (default: %(default)s)")
    parser.add_argument("--max-shard-size", default="10GB", help="largest shard (default: %(default)s, like the Hub repo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)

    components = sorted(p.parent for p in args.config.glob("*/config.json"))
    if not components:
        parser.error(f"{args.config} holds no */config.json")
    if args.out.exists():
        if not args.overwrite:
            parser.error(f"{args.out} exists; pass --overwrite to replace it")
        shutil.rmtree(args.out)
    dtype, max_shard = DTYPES[args.dtype], parse_size(args.max_shard_size)
    started = time.perf_counter()
    model_index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": None, "_note": "RANDOM WEIGHTS, benchmark only"}
    summary = {}
    for number, folder in enumerate(components):
        print(f"{folder.name}: writing random {args.dtype} weights", flush=True)
        summary[folder.name] = write_component(folder / "config.json", args.out / folder.name, dtype, max_shard,
                                               args.seed + number)
        config = json.loads((folder / "config.json").read_text())
        model_index[folder.name] = ["diffusers", config["_class_name"]]
        model_index["_diffusers_version"] = config.get("_diffusers_version")
    (args.out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    for name, info in summary.items():
        print(f"{name}: {info['class_name']}, {info['parameters'] / 1e9:.3f} B parameters, {info['tensors']} tensors, "
              f"{info['bytes'] / 1e9:.2f} GB in {info['shards']} shard(s)")
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s (random weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
