"""Everything FP8: how weights are quantized and stored, and how FP8 layers compute at run time.

Storage (what `convert` writes, what stock diffusers reads):
  * diffusers components (the SD3 transformer) use optimum-quanto `qfloat8`: E4M3 data with one scale per
    output channel, serialized through diffusers' `QuantoConfig`. This module is the only place that
    touches quanto, because diffusers marks `QuantoConfig` deprecated.
  * transformers components (the T5 encoder) cannot use quanto: transformers refuses to serialize quanto
    models and silently leaves random weights when it meets a quanto checkpoint. They are stored in
    transformers' own fine-grained FP8 layout (E4M3 data + `weight_scale_inv`, 128x128 blocks) marked
    `dequantize: true`: stock transformers then expands them to 16-bit at load on every machine (its FP8
    kernels need the `kernels` package and a download, which fail offline). `load_pipeline` instead keeps
    them FP8 on the GPU and expands each layer right before its matmul (`Fp8BlockLinear`).

Compute (what `load_pipeline` does with a quanto transformer):
  * "scaled_mm": FP8 tensor cores through `torch._scaled_mm`, activations quantized per row on the fly,
    weights used as stored (no 16-bit copy). Needs compute capability >= 8.9 (Ada, Hopper, Blackwell).
  * "dequant": weight-only; each layer's weight is expanded to 16-bit right before its matmul.
  * "quanto": leave quanto's own modules in place (what a stock-diffusers user runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .settings import T5_BLOCK

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
FP8_PATHS = ("scaled_mm", "dequant", "quanto")
FP8_PATH_LABELS = {
    "scaled_mm": "FP8 tensor cores (torch._scaled_mm, row-wise scales)",
    "dequant": "FP8 weights, dequantized to 16-bit per layer (no FP8 tensor cores)",
    "quanto": "optimum-quanto weight-only kernels",
}


# ---------------------------------------------------------------------------------------------- storage


def diffusers_quant_config(exclude: list[str] | None = None):
    """The diffusers quantization config that marks a component as quanto FP8."""
    from diffusers import QuantoConfig

    return QuantoConfig(weights_dtype="float8", modules_to_not_convert=list(exclude) if exclude else None)


def quanto_quantize(model: nn.Module, exclude: list[str] | None = None) -> nn.Module:
    """Quantize `model`'s linear layers in place to quanto qfloat8 (per-output-channel E4M3) and freeze them."""
    from optimum.quanto import freeze, qfloat8, quantize

    quantize(model, weights=qfloat8, exclude=list(exclude) if exclude else None)
    freeze(model)
    return model


def quanto_linear_state(linear: nn.Linear) -> dict[str, torch.Tensor]:
    """State dict of one linear layer once quanto has quantized it, exactly as diffusers serializes it."""
    holder = nn.Sequential(linear)
    quanto_quantize(holder)
    return {name.removeprefix("0."): tensor.contiguous() for name, tensor in holder.state_dict().items()}


def is_quanto_linear(module: nn.Module) -> bool:
    from optimum.quanto import QLinear

    return isinstance(module, QLinear)


def quantize_blockwise(weight: torch.Tensor, block: tuple[int, int] = T5_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 data and float32 `weight_scale_inv` per (rows x cols) block, transformers' fine-grained FP8 layout."""
    rows, cols = weight.shape
    nb_r, nb_c = -(-rows // block[0]), -(-cols // block[1])
    padded = weight.new_zeros(nb_r * block[0], nb_c * block[1], dtype=torch.float32)
    padded[:rows, :cols] = weight
    tiles = padded.view(nb_r, block[0], nb_c, block[1])
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    data = (tiles / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(FP8_DTYPE)
    return data.contiguous(), scale.contiguous()


def dequantize_blockwise(data: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = T5_BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16-bit (or `dtype`) weight that E4M3 `data` and its per-block `weight_scale_inv` stand for."""
    scale = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return data.to(dtype) * scale[: data.shape[0], : data.shape[1]].to(dtype)


def transformers_quant_config(exclude: list[str] | None = None) -> dict:
    """The `quantization_config` entry that tells transformers a checkpoint holds fine-grained FP8 weights."""
    return {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": list(T5_BLOCK),
        "modules_to_not_convert": list(exclude) if exclude else None,
        "dequantize": True,
    }


def keep_fp8_config(stored: dict):
    """A transformers config that loads a fine-grained FP8 checkpoint as FP8 (overriding the stored `dequantize`)."""
    from transformers import FineGrainedFP8Config

    return FineGrainedFP8Config(
        weight_block_size=tuple(stored.get("weight_block_size") or T5_BLOCK),
        modules_to_not_convert=stored.get("modules_to_not_convert"), dequantize=False,
    )


# ---------------------------------------------------------------------------------------------- compute


def fp8_tensor_cores_available(device: torch.device | str | None = None) -> bool:
    """True on CUDA GPUs of compute capability >= 8.9, which have FP8 tensor cores."""
    if not torch.cuda.is_available():
        return False
    device = torch.device(device or "cuda")
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def select_fp8_path(device: torch.device | str) -> str:
    """The fastest FP8 compute path this device supports."""
    return "scaled_mm" if fp8_tensor_cores_available(device) else "dequant"


def _quantize_rows_eager(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (rows / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


_quantize_rows_fused = None


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 rows and their float32 scales; on CUDA one fused kernel instead of about seven."""
    global _quantize_rows_fused
    if rows.device.type != "cuda":
        return _quantize_rows_eager(rows)
    if _quantize_rows_fused is None:
        _quantize_rows_fused = torch.compile(_quantize_rows_eager, dynamic=True)
    return _quantize_rows_fused(rows)


class Fp8Linear(nn.Module):
    """A linear layer holding E4M3 weights with one float32 scale per output channel."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, mode: str):
        super().__init__()
        if mode not in ("scaled_mm", "dequant"):
            raise ValueError(f"unknown Fp8Linear mode {mode!r}")
        self.mode = mode
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(FP8_DTYPE))
        self.register_buffer("weight_scale", scale.reshape(1, -1).to(torch.float32))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_quanto(cls, module: nn.Module, mode: str) -> Fp8Linear:
        qweight = module.weight
        return cls(qweight._data, qweight._scale, module.bias, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dequant":
            weight = self.weight.to(x.dtype) * self.weight_scale.reshape(-1, 1).to(x.dtype)
            return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))
        x_fp8, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(
            x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
            bias=None if self.bias is None else self.bias.to(x.dtype), out_dtype=x.dtype,
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


class Fp8BlockLinear(nn.Module):
    """A linear layer holding E4M3 weights with one scale per 128x128 block; expands them per call (T5)."""

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None, block: tuple[int, int]):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block = block
        self.register_buffer("weight", weight.to(FP8_DTYPE))
        grid = (-(-self.out_features // block[0]), -(-self.in_features // block[1]))
        self.register_buffer("weight_scale_inv", scale_inv.to(torch.float32).reshape(grid))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_blockwise(self.weight, self.weight_scale_inv, self.block, x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def _replace_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def apply_block_fp8(model: nn.Module) -> int:
    """Swap transformers' FP8 linear layers for `Fp8BlockLinear` (no kernel download needed); returns the count."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    swaps = [(name, module) for name, module in model.named_modules() if isinstance(module, FP8Linear)]
    for name, module in swaps:
        block = tuple(module.block_size or (module.out_features, module.in_features))
        _replace_module(model, name, Fp8BlockLinear(module.weight.data, module.weight_scale_inv.data, module.bias, block))
    return len(swaps)


def _scaled_mm_shape_ok(module: nn.Module) -> bool:
    out_features, in_features = module.weight.shape
    return in_features % 16 == 0 and out_features % 16 == 0


def apply_fp8_path(model: nn.Module, path: str) -> int:
    """Swap quanto linear layers for `Fp8Linear` computing along `path`; returns how many were swapped.

    Layers whose shapes the FP8 matmul cannot take (dimensions not multiples of 16) use "dequant".
    Path "quanto" leaves the model as it is.
    """
    if path not in FP8_PATHS:
        raise ValueError(f"unknown FP8 path {path!r}; choose one of {', '.join(FP8_PATHS)}")
    if path == "quanto":
        return 0
    swaps = [(name, module) for name, module in model.named_modules() if is_quanto_linear(module)]
    for name, module in swaps:
        mode = path if path != "scaled_mm" or _scaled_mm_shape_ok(module) else "dequant"
        _replace_module(model, name, Fp8Linear.from_quanto(module, mode))
    return len(swaps)


def fp8_path_of(model: nn.Module) -> str | None:
    """Which FP8 compute path `model` runs ("scaled_mm", "dequant", "quanto"), or None if it has no FP8 layers."""
    modes = {m.mode for m in model.modules() if isinstance(m, Fp8Linear)}
    if "scaled_mm" in modes:
        return "scaled_mm"
    if modes:
        return "dequant"
    return "quanto" if any(is_quanto_linear(m) for m in model.modules()) else None
