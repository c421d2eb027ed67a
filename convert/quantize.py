"""Quantize one component folder to the FP8 variant, streaming tensor by tensor."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sd35fp8.fp8 import diffusers_quant_config, quantize_blockwise, quanto_linear_state, transformers_quant_config
from sd35fp8.loading import VARIANT

from .checkpoint import SafetensorsReader, ShardedWriter, release_freed_memory_promptly, weight_files
from .source import Component


@dataclass
class ComponentPlan:
    """What converting one component will do: which linear layers become FP8, bytes before and after."""

    component: Component
    quantized_layers: list[str]
    bytes_before: int
    bytes_after: int

    @property
    def quantize(self) -> bool:
        return bool(self.quantized_layers)


@dataclass
class ComponentResult:
    plan: ComponentPlan
    files: list[Path]
    bytes_after: int
    digests: dict[str, str] = field(default_factory=dict)


def _meta_model(component: Component) -> nn.Module:
    config = json.loads((component.folder / "config.json").read_text())
    if component.library == "diffusers":
        import diffusers

        with torch.device("meta"):
            return getattr(diffusers, component.class_name).from_config(config)
    import transformers

    model_class = getattr(transformers, component.class_name)
    with torch.device("meta"):
        return model_class(model_class.config_class.from_dict(config))


def _convert_to_fp8_layers(model: nn.Module, component: Component, exclude: list[str]) -> list[str]:
    """Replace, in the meta `model`, the linear layers that the loading library will treat as FP8, decided by that
    library's own rules; returns their names."""
    if component.library == "diffusers":
        from diffusers.quantizers.quanto.utils import _replace_with_quanto_layers
        from optimum.quanto import QLinear

        keep = list(exclude) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
        _replace_with_quanto_layers(model, diffusers_quant_config(exclude), keep)
        return [name for name, module in model.named_modules() if isinstance(module, QLinear)]
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import FP8Linear, replace_with_fp8_linear
    from transformers.quantizers.base import HfQuantizer

    skip = HfQuantizer.get_modules_to_not_convert(model, list(exclude) or None, model._keep_in_fp32_modules)
    stored = {k: v for k, v in transformers_quant_config(exclude).items() if k not in ("quant_method", "dequantize")}
    config = FineGrainedFP8Config(**stored, dequantize=False)
    replace_with_fp8_linear(model, modules_to_not_convert=skip, quantization_config=config, pre_quantized=True)
    return [name for name, module in model.named_modules() if isinstance(module, FP8Linear)]


def plan_component(component: Component, quantize: bool, exclude: list[str]) -> ComponentPlan:
    """Plan one component's conversion from its config and weight size alone (no tensor is read)."""
    if not component.is_model:
        return ComponentPlan(component, [], 0, 0)
    before = component.weight_bytes
    if not quantize:
        return ComponentPlan(component, [], before, before)
    model = _meta_model(component)
    element = before / max(1, sum(t.numel() for t in model.state_dict().values()))  # bytes per element, about 2
    layers = _convert_to_fp8_layers(model, component, exclude)
    shapes = [(model.get_submodule(layer).out_features, model.get_submodule(layer).in_features) for layer in layers]
    fp8_elements, scale_rows = sum(rows * cols for rows, cols in shapes), sum(rows for rows, _ in shapes)
    after = before - fp8_elements * (element - 1) + scale_rows * element  # FP8 data + about one scale per row
    return ComponentPlan(component, layers, before, int(after))


def tensor_digest(tensor: torch.Tensor) -> str:
    """A short hash of a tensor's bytes, to prove a reloaded tensor is the one written."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).hexdigest()


def _quantized_tensors(library: str, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    layer = name.removesuffix(".weight")
    if library == "diffusers":
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        linear.weight.data = weight
        return {f"{layer}.{key}": tensor for key, tensor in quanto_linear_state(linear).items()}
    data, scale_inv = quantize_blockwise(weight)
    return {name: data, f"{layer}.weight_scale_inv": scale_inv}


def write_component(plan: ComponentPlan, out_folder: Path, exclude: list[str], max_shard_bytes: int,
                    progress: tqdm | None = None) -> ComponentResult:
    """Write one component into `out_folder`: FP8 variant files if planned, else a byte-identical copy."""
    component = plan.component
    if not plan.quantize:
        shutil.copytree(component.folder, out_folder, dirs_exist_ok=True)
        if progress is not None:
            progress.update(plan.bytes_before)
        return ComponentResult(plan, sorted(out_folder.iterdir()), plan.bytes_before)
    read = 0
    release_freed_memory_promptly()
    out_folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((component.folder / "config.json").read_text())
    config["quantization_config"] = (
        diffusers_quant_config(exclude).to_dict() if component.library == "diffusers" else transformers_quant_config(exclude)
    )
    (out_folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    reader = SafetensorsReader(weight_files(component.folder, component.library))
    writer = ShardedWriter(out_folder, component.library, VARIANT, max_shard_bytes)
    fp8_weights = {f"{layer}.weight" for layer in plan.quantized_layers}
    digests = {}
    for name in reader.keys():
        tensor = reader.read(name)
        tensors = _quantized_tensors(component.library, name, tensor) if name in fp8_weights else {name: tensor}
        for key, value in tensors.items():
            writer.add(key, value)
            digests[key] = tensor_digest(value)
        if progress is not None:
            progress.update(reader.nbytes(name))
            read += reader.nbytes(name)
    files = writer.close()
    if progress is not None:
        progress.update(plan.bytes_before - read)  # the files' headers
    return ComponentResult(plan, files, writer.total_bytes, digests)
