"""Quantize one component folder to the FP8 variant, streaming tensor by tensor; copy the others byte for byte."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sd35fp8.fp8 import (diffusers_quant_config, quantize_blockwise, quanto_linear_state, replace_with_quanto_layers,
                         transformers_quant_config)
from sd35fp8.loading import VARIANT
from sd35fp8.settings import CONVERSION

from .checkpoint import (
    DTYPE_NAMES, CheckpointError, SafetensorsReader, ShardedWriter, read_header_bytes, release_freed_memory_promptly,
    weight_files,
)
from .source import Component

# The components that can be stored as FP8, by class: the SD3 transformer (quanto) and T5 (transformers' FP8).
# CLIP-L/G and the VAE always stay 16-bit: published guidance says they degrade under FP8.
QUANTIZABLE = {"SD3Transformer2DModel": "diffusers", "T5EncoderModel": "transformers"}


@dataclass
class ComponentPlan:
    """What converting one component will do: which linear layers become FP8, bytes before and after."""

    component: Component
    quantized_layers: list[str]
    bytes_before: int
    bytes_after: int
    linear_layers: list[str] = field(default_factory=list)  # every linear layer, FP8 or not (quantized plans only)

    @property
    def quantize(self) -> bool:
        return bool(self.quantized_layers)


@dataclass
class ComponentResult:
    plan: ComponentPlan
    files: list[Path]
    bytes_after: int
    digests: dict[str, str] = field(default_factory=dict)


def can_quantize(component: Component) -> bool:
    """True for the components this tool stores as FP8 (the SD3 transformer and T5)."""
    return QUANTIZABLE.get(component.class_name) == component.library


def _meta_model(component: Component) -> nn.Module:
    config = component.config()
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
        return replace_with_quanto_layers(model, exclude)
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
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    layers = _convert_to_fp8_layers(model, component, exclude)
    shapes = [(model.get_submodule(layer).out_features, model.get_submodule(layer).in_features) for layer in layers]
    fp8_elements, scale_rows = sum(rows * cols for rows, cols in shapes), sum(rows for rows, _ in shapes)
    after = before - fp8_elements * (element - 1) + scale_rows * element  # FP8 data + about one scale per row
    return ComponentPlan(component, layers, before, int(after), linears)


def unused_excludes(plans: list[ComponentPlan], exclude: list[str]) -> list[str]:
    """The `--exclude` names that keep no linear layer of any quantized component 16-bit (typos)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    def keeps(plan: ComponentPlan, name: str) -> bool:
        kept = set(plan.linear_layers) - set(plan.quantized_layers)
        if plan.component.library == "diffusers":  # diffusers matches the layer's own name, at any depth
            return any(layer.rsplit(".", 1)[-1] == name for layer in kept)
        return any(not should_convert_module(layer, [name]) for layer in kept)

    quantized = [plan for plan in plans if plan.quantize or plan.linear_layers]
    return [name for name in exclude if not any(keeps(plan, name) for plan in quantized)]


def tensor_digest(tensor: torch.Tensor) -> str:
    """A short hash of a tensor's bytes, to prove a reloaded tensor is the one written."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).hexdigest()


def _check_finite(tensor: torch.Tensor, path: Path, name: str) -> None:
    if tensor.dtype.is_floating_point and tensor.element_size() >= 2 and not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{path}: tensor {name!r} ({DTYPE_NAMES[tensor.dtype]} {list(tensor.shape)}) holds {bad} "
                              "NaN or infinite values. The source is damaged (its own 16-bit pipeline would make NaN "
                              "images too): download or save it again.")


def _quantized_tensors(library: str, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    layer = name.removesuffix(".weight")
    if library == "diffusers":
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        linear.weight.data = weight
        return {f"{layer}.{key}": tensor for key, tensor in quanto_linear_state(linear).items()}
    data, scale_inv = quantize_blockwise(weight)
    return {name: data, f"{layer}.weight_scale_inv": scale_inv}


def _stored_16_bit(library: str, tensor: torch.Tensor) -> torch.Tensor:
    """How a tensor that stays 16-bit is written: as is, except T5's, which are written in the card's dtype.

    transformers (5.23) loads a fine-grained-FP8 checkpoint's other tensors in the dtype they were written in,
    whatever dtype the pipeline asks for; written in the card's dtype, the card's load line works for any source.
    """
    if library == "transformers" and tensor.dtype.is_floating_point:
        return tensor.to(CONVERSION.variant_dtype)
    return tensor


def copy_checked(source: Path, target: Path, progress: tqdm | None = None) -> None:
    """Copy a safetensors file byte for byte, reading it tensor by tensor (every read checked, every float finite)."""
    reader = SafetensorsReader([source])
    with open(target, "xb") as handle:
        handle.write(read_header_bytes(source))
        for name, tensor in reader:
            _check_finite(tensor, source, name)
            if tensor.numel():
                handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            if progress is not None:
                progress.update(tensor.numel() * tensor.element_size())


def _copy_component(plan: ComponentPlan, out_folder: Path, progress: tqdm | None) -> list[Path]:
    component = plan.component
    written = []
    for relative in component.files:
        source, target = component.folder / relative, out_folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".safetensors":
            copy_checked(source, target, progress)
        else:
            shutil.copyfile(source, target)
        written.append(target)
    return written


def write_component(plan: ComponentPlan, out_folder: Path, exclude: list[str], max_shard_bytes: int,
                    progress: tqdm | None = None) -> ComponentResult:
    """Write one component into `out_folder`: FP8 variant files if planned, else a byte-identical copy."""
    component = plan.component
    out_folder.mkdir(parents=True, exist_ok=True)
    if not plan.quantize:
        return ComponentResult(plan, _copy_component(plan, out_folder, progress), plan.bytes_before)
    release_freed_memory_promptly()
    config = component.config()
    if component.library == "diffusers":
        config["quantization_config"] = diffusers_quant_config(exclude).to_dict()
    else:
        config["quantization_config"] = transformers_quant_config(exclude)
        config["dtype"] = str(CONVERSION.variant_dtype).removeprefix("torch.")
    (out_folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files = weight_files(component.folder, component.library)
    reader = SafetensorsReader(files)
    writer = ShardedWriter(out_folder, component.library, VARIANT, max_shard_bytes)
    fp8_weights = {f"{layer}.weight" for layer in plan.quantized_layers}
    digests = {}
    for name in reader.keys():
        tensor = reader.read(name)
        _check_finite(tensor, reader.file_of(name), name)
        if name in fp8_weights:
            tensors = _quantized_tensors(component.library, name, tensor)
        else:
            tensors = {name: _stored_16_bit(component.library, tensor)}
        for key, value in tensors.items():
            writer.add(key, value)
            digests[key] = tensor_digest(value)
        if progress is not None:
            progress.update(reader.nbytes(name))
    return ComponentResult(plan, writer.close(), writer.total_bytes, digests)
