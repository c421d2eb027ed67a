"""Everything FP8: how weights are quantized and stored, and how FP8 layers compute at run time.

Storage (what `convert` writes, what stock diffusers reads):
  * diffusers components (the SD3 transformer) use optimum-quanto `qfloat8`: E4M3 data with one scale per
    output channel, serialized through diffusers' `QuantoConfig`. diffusers marks `QuantoConfig` deprecated, so
    every use of quanto lives in this module (its quantizer, its layer type, and the private diffusers helper
    that picks the layers quanto converts: `replace_with_quanto_layers`, which the converter calls).
  * transformers components (the T5 encoder) cannot use quanto: transformers refuses to serialize quanto
    models and silently leaves random weights when it meets a quanto checkpoint. They are stored in
    transformers' own fine-grained FP8 layout (E4M3 data + `weight_scale_inv`, 128x128 blocks) marked
    `dequantize: true`: stock transformers then expands them to 16-bit at load on every machine (its FP8
    kernels need the `kernels` package and a download, which fail offline). `load_pipeline` instead keeps
    them FP8 on the GPU and expands each layer right before its matmul (`Fp8BlockLinear`).

Compute (what `load_pipeline` does with a quanto transformer):
  * "scaled_mm": FP8 tensor cores through `torch._scaled_mm`, activations quantized per row on the fly,
    weights used as stored (no 16-bit copy). Needs compute capability >= 8.9 (Ada, Hopper, Blackwell) and a
    cuBLAS that takes row-wise scales: `probe_scaled_mm` checks that on the actual GPU at load.
  * "scaled_mm_tensorwise": for GPUs whose `_scaled_mm` refuses row-wise scales: the same row-wise FP8
    activations, a GEMM with unit tensor-wise scales writing bf16, and both scales (per activation row, per weight
    channel) applied to its output in float32 (one multiply, fused into the next kernel under torch.compile).
  * "dequant": weight-only; each layer's weight is expanded to 16-bit right before its matmul.
  * "quanto": leave quanto's own modules in place (what a stock-diffusers user runs).

`Fp8Linear.from_linear` quantizes a 16-bit linear layer with exactly quanto's qfloat8 arithmetic (what
`convert` writes), so a model quantized in memory computes bit for bit what the converted checkpoint does.
`fuse_projections` concatenates linear layers that read the same input (attention's q/k/v) into one layer:
exact for FP8 too, because the scales are per output row. `fuse_gelu_quantize` moves each MLP's GELU into its
second FP8 layer, which on CUDA computes GELU and the activation quantization in one Triton kernel (`kernels`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import error_summary
from .settings import T5_BLOCK

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
FP8_PATHS = ("scaled_mm", "scaled_mm_tensorwise", "dequant", "quanto")
FP8_PATH_LABELS = {
    "scaled_mm": "FP8 tensor cores (torch._scaled_mm, row-wise scales)",
    "scaled_mm_tensorwise": "FP8 tensor cores (torch._scaled_mm with unit tensor-wise scales, the row and channel "
                            "scales applied to its output; this GPU refused row-wise scales)",
    "dequant": "FP8 weights, dequantized to 16-bit per layer (no FP8 tensor cores)",
    "quanto": "optimum-quanto weight-only kernels",
}
LAYER_MODES = ("scaled_mm", "scaled_mm_tensorwise", "dequant")
FP8_GEMM_MODES = ("scaled_mm", "scaled_mm_tensorwise")  # the modes that run FP8 GEMMs on row-quantized activations


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


def replace_with_quanto_layers(model: nn.Module, exclude: list[str] | None = None) -> list[str]:
    """In a meta `model`, replace the linear layers diffusers' QuantoConfig converts, by diffusers' own rule (its
    private `_replace_with_quanto_layers`, plus the model's `_keep_in_fp32_modules`); returns their names."""
    from diffusers.quantizers.quanto.utils import _replace_with_quanto_layers

    keep = list(exclude or []) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    _replace_with_quanto_layers(model, diffusers_quant_config(exclude), keep)
    return [name for name, module in model.named_modules() if is_quanto_linear(module)]


def is_quanto_linear(module: nn.Module) -> bool:
    from optimum.quanto import QLinear

    return isinstance(module, QLinear)


def quantize_weight_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 data and per-row scales of a 16-bit weight, with quanto qfloat8's arithmetic (absmax / 448 in the
    weight's dtype, divide, clamp, cast): what `convert` stores."""
    scale = weight.abs().amax(dim=1, keepdim=True) / FP8_MAX
    data = torch.clamp(weight / scale, min=-FP8_MAX, max=FP8_MAX).to(FP8_DTYPE)
    return data, scale


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
    """The 16-bit (or `dtype`) weight that E4M3 `data` and its per-block `weight_scale_inv` stand for.

    Where the blocks tile the weight exactly (T5's layers) each block is scaled by broadcasting, without building
    the full-size scale matrix the general case needs (two `repeat_interleave` copies of the weight's size per call:
    `Fp8BlockLinear` calls this for every layer of every prompt). Both give the same values."""
    rows, cols = data.shape
    if rows % block[0] == 0 and cols % block[1] == 0:
        tiles = data.view(rows // block[0], block[0], cols // block[1], block[1]).to(dtype)
        return (tiles * scale_inv.to(dtype)[:, None, :, None]).view(rows, cols)
    scale = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return data.to(dtype) * scale[:rows, :cols].to(dtype)


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


_PROBES: dict[str, dict[str, str]] = {}


def probe_scaled_mm(device: torch.device | str, *, refresh: bool = False) -> dict[str, str]:
    """Which FP8 GEMM scalings this device's `torch._scaled_mm` runs correctly, each with and without fast
    accumulation: {"rowwise", "tensorwise", "rowwise_fast_accum", "tensorwise_fast_accum"} -> "ok" or
    "refused: <reason>". One small matmul each, checked against the dequantized product; cached per device."""
    key = str(torch.device(device))
    if key in _PROBES and not refresh:
        return _PROBES[key]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=generator).to(device, torch.bfloat16)
    weight = (torch.randn(48, 64, generator=generator) * 0.05).to(torch.bfloat16)
    data, scale = quantize_weight_rows(weight)
    expected = x.float() @ (data.float() * scale.float()).t().to(device)
    result = {}
    for name, mode, fast in (("rowwise", "scaled_mm", False), ("tensorwise", "scaled_mm_tensorwise", False),
                             ("rowwise_fast_accum", "scaled_mm", True),
                             ("tensorwise_fast_accum", "scaled_mm_tensorwise", True)):
        layer = Fp8Linear(data, scale, None, mode).to(device)
        layer.fast_accum = fast
        try:
            out = layer(x).float()
            error = float((out - expected).norm() / expected.norm())
            result[name] = "ok" if error < 0.1 else f"refused: wrong result (relative error {error:.3f})"
        except Exception as failure:  # noqa: BLE001 - any refusal means: do not use this scaling here
            result[name] = f"refused: {error_summary(failure)}"
    _PROBES[key] = result
    return result


def select_fp8_path(device: torch.device | str) -> str:
    """The fastest FP8 compute path this device runs correctly (probed once on the device)."""
    if not fp8_tensor_cores_available(device):
        return "dequant"
    probe = probe_scaled_mm(device)
    if probe["rowwise"] == "ok":
        return "scaled_mm"
    return "scaled_mm_tensorwise" if probe["tensorwise"] == "ok" else "dequant"


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _quantize_rows_eager(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (rows / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| in two stages (per row, then over rows): compiled with a symbolic size, a one-stage global amax became
    one slow single-program reduction on the H200 (0.19 ms for 43 MB)."""
    return x.abs().amax(dim=-1).amax() if x.dim() > 1 else x.abs().amax()


_FUSED: dict[str, object] = {}


def _fused(name: str, fn):
    """`fn` compiled into one kernel on CUDA (eager on the CPU, and inlined when an outer compile traces it)."""
    if name not in _FUSED:
        _FUSED[name] = torch.compile(fn, dynamic=True)
    return _FUSED[name]


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 rows and their float32 scales; on CUDA one fused kernel instead of about seven."""
    if rows.device.type != "cuda" or _tracing():
        return _quantize_rows_eager(rows)
    return _fused("rows", _quantize_rows_eager)(rows)


def _scale_output_eager(out: torch.Tensor, row_scale: torch.Tensor, channel_scale: torch.Tensor,
                        bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    scaled = out.float() * row_scale * channel_scale
    return (scaled if bias is None else scaled + bias.float()).to(dtype)


def scale_output(out: torch.Tensor, row_scale: torch.Tensor, channel_scale: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """`out * row_scale * channel_scale (+ bias)` in float32, rounded once to `dtype`: what a GEMM with row-wise
    scales computes in its epilogue; one fused kernel on CUDA."""
    if out.device.type != "cuda" or _tracing():
        return _scale_output_eager(out, row_scale, channel_scale, bias, dtype)
    return _fused("output", _scale_output_eager)(out, row_scale, channel_scale, bias, dtype)


class Fp8Activation(NamedTuple):
    """An activation already quantized for an FP8 layer: E4M3 rows (..., in_features), float32 scales (..., 1), and
    the 16-bit dtype the layer computes in (what `sd35fp8.blocks` hands the attention and MLP layers)."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def dequantize_activation(x: Fp8Activation) -> torch.Tensor:
    """The 16-bit tensor an `Fp8Activation` stands for."""
    return (x.data.float() * x.scale).to(x.dtype)


class Fp8Linear(nn.Module):
    """A linear layer holding E4M3 weights with one float32 scale per output channel."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, mode: str):
        super().__init__()
        if mode not in LAYER_MODES:
            raise ValueError(f"unknown Fp8Linear mode {mode!r}")
        self.mode = mode
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(FP8_DTYPE))
        self.register_buffer("weight_scale", scale.reshape(1, -1).to(torch.float32))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.input_gelu = False  # apply tanh-GELU to the input first (set by `fuse_gelu_quantize`)
        self.row_kernel = False  # quantize (B, T, C) inputs with `kernels.quantize_rows` (set by `use_row_kernel`)
        self.fast_accum = False  # FP8 GEMMs without cuBLAS's periodic float32 promotion (set by `use_fast_accum`)
        if mode != "dequant" and not self.scaled_mm_shape_ok:
            self.mode = "dequant"

    @property
    def scaled_mm_shape_ok(self) -> bool:
        """FP8 GEMMs need both dimensions of the weight to be multiples of 16."""
        return self.in_features % 16 == 0 and self.out_features % 16 == 0

    @classmethod
    def from_quanto(cls, module: nn.Module, mode: str) -> Fp8Linear:
        qweight = module.weight
        return cls(qweight._data, qweight._scale, module.bias, mode)

    @classmethod
    def from_linear(cls, module: nn.Linear, mode: str) -> Fp8Linear:
        """Quantize a 16-bit linear layer exactly as `convert` (quanto qfloat8) does."""
        data, scale = quantize_weight_rows(module.weight.detach())
        return cls(data, scale, module.bias, mode)

    @classmethod
    def concat(cls, layers: list[Fp8Linear]) -> Fp8Linear:
        """One layer computing `layers` side by side (their outputs concatenated): exact, scales are per row."""
        if len({layer.in_features for layer in layers}) != 1:
            raise ValueError("only layers reading the same input can be fused")
        biases = [layer.bias for layer in layers]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            biases = [torch.zeros(l.out_features, dtype=next(b for b in biases if b is not None).dtype,
                                  device=l.weight.device) if b is None else b for b, l in zip(biases, layers)]
        modes = {layer.mode for layer in layers}
        mode = "dequant" if "dequant" in modes else modes.pop()
        return cls(torch.cat([layer.weight for layer in layers]), torch.cat([layer.weight_scale for layer in layers], 1),
                   None if biases[0] is None else torch.cat([b.detach() for b in biases]), mode)

    def set_mode(self, mode: str) -> None:
        if mode not in LAYER_MODES:
            raise ValueError(f"unknown Fp8Linear mode {mode!r}")
        self.mode = mode if mode == "dequant" or self.scaled_mm_shape_ok else "dequant"

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if isinstance(x, Fp8Activation):  # quantized by the kernel that produced it (`sd35fp8.blocks`)
            if self.mode in FP8_GEMM_MODES:
                return self._fp8_mm(x.data.reshape(-1, self.in_features), x.scale.reshape(-1, 1), bias,
                                    x.data.shape[:-1], x.dtype)
            x = dequantize_activation(x)
        if self.row_kernel and self.mode in FP8_GEMM_MODES and kernels.rows_supported(x):
            return self._fp8_mm(*kernels.quantize_rows(x), bias, x.shape[:-1], x.dtype)  # read in place, one pass
        rows = x.reshape(-1, self.in_features)
        if self.input_gelu and self.mode in FP8_GEMM_MODES and kernels.supports(rows):
            x_fp8, x_scale = kernels.gelu_quantize_rows(rows)  # GELU + quantization in one pass
            return self._fp8_mm(x_fp8, x_scale, bias, x.shape[:-1], x.dtype)
        if self.input_gelu:
            x = F.gelu(x, approximate="tanh")
            rows = x.reshape(-1, self.in_features)
        if self.mode == "dequant":
            weight = self.weight.to(x.dtype) * self.weight_scale.reshape(-1, 1).to(x.dtype)
            return F.linear(x, weight, bias)
        return self._fp8_mm(*quantize_rows(rows), bias, x.shape[:-1], x.dtype)

    def _fp8_mm(self, x_fp8: torch.Tensor, x_scale: torch.Tensor, bias: torch.Tensor | None,
                leading: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The FP8 GEMM of row-quantized activations: with row-wise scales in cuBLAS's epilogue ("scaled_mm"), or
        with unit tensor-wise scales and both scales applied to its output ("scaled_mm_tensorwise"; the GEMM writes
        bf16: unscaled products of E4M3 values exceed fp16's range)."""
        if self.mode == "scaled_mm":
            out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                   bias=bias, out_dtype=dtype, use_fast_accum=self.fast_accum)
        else:
            one = x_scale.new_ones(())
            out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                   use_fast_accum=self.fast_accum)
            out = scale_output(out, x_scale, self.weight_scale, bias, dtype)
        return out.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"
                + (", input_gelu=True" if self.input_gelu else ""))



class Fp8BlockLinear(nn.Module):
    """A linear layer holding E4M3 weights with one scale per 128x128 block; expands them per call (T5), on CUDA
    with `kernels.dequantize_blocks` where it runs and agrees with torch on the device (`kernels.check`), the same
    values in one pass instead of two kernels."""

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None, block: tuple[int, int]):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block = block
        self.register_buffer("weight", weight.to(FP8_DTYPE))
        grid = (-(-self.out_features // block[0]), -(-self.in_features // block[1]))
        self.register_buffer("weight_scale_inv", scale_inv.to(torch.float32).reshape(grid))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if block_kernel_runs(self.weight, self.block):
            weight = kernels.dequantize_blocks(self.weight, self.weight_scale_inv, *self.block, x.dtype)
        else:
            weight = dequantize_blockwise(self.weight, self.weight_scale_inv, self.block, x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def block_kernel_runs(weight: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether `Fp8BlockLinear` expands this weight with the Triton kernel (checked once per device)."""
    return kernels.blocks_supported(weight, block) and kernels.check(weight.device, "blocks") is None


def describe_block_fp8(models: list[nn.Module], device: torch.device) -> str | None:
    """How the `Fp8BlockLinear` layers of `models` (T5) expand their weights on `device`, for the app; None if none."""
    layers = [m for model in models for m in model.modules() if isinstance(m, Fp8BlockLinear)]
    if not layers:
        return None
    reason = kernels.check(device, "blocks")
    tiled = sum(kernels.blocks_tile((m.out_features, m.in_features), m.block) for m in layers)
    if reason is None and tiled:
        rest = f" ({len(layers) - tiled} in torch: their blocks do not tile them)" if tiled < len(layers) else ""
        return f"{tiled} FP8 text-encoder layers expanded per call by one Triton kernel{rest}"
    return f"{len(layers)} FP8 text-encoder layers expanded per call in torch ({reason or 'blocks do not tile them'})"


def _replace_module(model: nn.Module, name: str, replacement: nn.Module | None) -> None:
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


def block_quantize_linears(model: nn.Module, names: list[str], block: tuple[int, int] = T5_BLOCK) -> int:
    """Quantize the named 16-bit linear layers of a transformers model in place to `Fp8BlockLinear` (what `convert`
    writes for T5, kept FP8 as `load_pipeline` keeps it on a GPU); returns the count."""
    for name in names:
        module = model.get_submodule(name)
        data, scale_inv = quantize_blockwise(module.weight.detach().float(), block)
        _replace_module(model, name, Fp8BlockLinear(data, scale_inv, module.bias, block))
    return len(names)


def convert_linear_names(model: nn.Module, exclude: list[str] | None = None) -> list[str]:
    """The `nn.Linear` layers `convert` quantizes in a diffusers model: diffusers' QuantoConfig rule, i.e. every
    `nn.Linear` whose own name is not in `exclude` or the model's `_keep_in_fp32_modules`."""
    keep = set(exclude or []) | set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rpartition(".")[2] not in keep]


def quantize_linears(model: nn.Module, mode: str, exclude: list[str] | None = None) -> int:
    """Quantize, in memory, the layers `convert` would, straight to `Fp8Linear` computing along `mode`; returns the
    count. The result equals converting, reloading and `apply_fp8_path` (tested bit for bit on the tiny model)."""
    names = convert_linear_names(model, exclude)
    for name in names:
        _replace_module(model, name, Fp8Linear.from_linear(model.get_submodule(name), mode))
    return len(names)


def apply_fp8_path(model: nn.Module, path: str) -> int:
    """Make the model's FP8 layers compute along `path`; returns how many layers were swapped or switched.

    Quanto layers become `Fp8Linear`; existing `Fp8Linear` layers switch mode. Layers whose shapes the FP8
    matmul cannot take (dimensions not multiples of 16) use "dequant". Path "quanto" leaves the model as it is.
    """
    if path not in FP8_PATHS:
        raise ValueError(f"unknown FP8 path {path!r}; choose one of {', '.join(FP8_PATHS)}")
    if path == "quanto":
        return 0
    swaps = [(name, module) for name, module in model.named_modules() if is_quanto_linear(module)]
    for name, module in swaps:
        _replace_module(model, name, Fp8Linear.from_quanto(module, path))
    switched = [module for module in model.modules() if isinstance(module, Fp8Linear) and module.mode != path]
    for module in switched:
        module.set_mode(path)
    return len(swaps) + len(switched)


def fp8_path_of(model: nn.Module) -> str | None:
    """Which FP8 compute path `model` runs ("scaled_mm", "scaled_mm_tensorwise", "dequant", "quanto"), or None if
    it has no FP8 layers."""
    modes = {m.mode for m in model.modules() if isinstance(m, Fp8Linear)}
    for mode in FP8_GEMM_MODES:
        if mode in modes:
            return mode
    if modes:
        return "dequant"
    return "quanto" if any(is_quanto_linear(m) for m in model.modules()) else None


# ---------------------------------------------------------------------------------------------- fusion


def concat_linears(layers: list[nn.Module]) -> nn.Module:
    """One layer computing `layers` (all `Fp8Linear` or all `nn.Linear`, one input size) side by side."""
    if all(isinstance(layer, Fp8Linear) for layer in layers):
        return Fp8Linear.concat(layers)
    if all(type(layer) is nn.Linear for layer in layers):
        first = layers[0]
        fused = nn.Linear(first.in_features, sum(l.out_features for l in layers), bias=first.bias is not None,
                          device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([l.weight for l in layers]))
            if first.bias is not None:
                fused.bias.copy_(torch.cat([l.bias for l in layers]))
        return fused.requires_grad_(False)
    raise TypeError(f"cannot fuse {sorted({type(l).__name__ for l in layers})}")


def fuse_projections(model: nn.Module) -> int:
    """Fuse each attention's q/k/v projections (and the context's add_q/k/v) into one layer reading the input once.

    Works on 16-bit `nn.Linear` and `Fp8Linear` layers (not quanto's); the originals are dropped, so memory does
    not grow. Sets `fused_projections` on each attention; returns how many attentions were fused. The attention
    processor of `sd35fp8.attention` runs both layouts (diffusers' FusedJointAttnProcessor2_0 skips SD3.5's q/k
    RMS norms, so it is not used).
    """
    from diffusers.models.attention_processor import Attention

    count = 0
    for attention in [m for m in model.modules() if isinstance(m, Attention)]:
        if getattr(attention, "to_qkv", None) is not None:
            continue
        groups = (("to_qkv", ("to_q", "to_k", "to_v")), ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))
        fused_any = False
        for fused_name, names in groups:
            layers = [getattr(attention, name, None) for name in names]
            if any(layer is None for layer in layers):
                continue
            if any(is_quanto_linear(layer) for layer in layers):
                return count
            setattr(attention, fused_name, concat_linears(layers))
            for name in names:
                setattr(attention, name, None)
            fused_any = True
        if fused_any:
            attention.fused_projections = True
            count += 1
    return count


def projections_fused(model: nn.Module) -> int:
    """How many attentions of `model` run fused projections."""
    from diffusers.models.attention_processor import Attention

    return sum(1 for m in model.modules() if isinstance(m, Attention) and getattr(m, "to_qkv", None) is not None)


def fuse_gelu_quantize(model: nn.Module) -> int:
    """Let each MLP's second FP8 layer apply the tanh-GELU itself, so on CUDA GELU and the activation quantization
    run as one kernel (`sd35fp8.kernels.gelu_quantize_rows`); elsewhere the layer applies `F.gelu` first (the same
    arithmetic as before). Returns how many MLPs were rewired; `gelu_fused(model)` counts them later."""
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward

    count = 0
    for mlp in [m for m in model.modules() if isinstance(m, FeedForward)]:
        first, last = mlp.net[0], mlp.net[-1]
        if isinstance(first, GELU) and first.approximate == "tanh" and isinstance(first.proj, Fp8Linear) \
                and isinstance(last, Fp8Linear):
            mlp.net[0] = first.proj
            last.input_gelu = True
            count += 1
    return count


def gelu_fused(model: nn.Module) -> int:
    """How many FP8 layers of `model` apply the GELU of their input themselves (`fuse_gelu_quantize`)."""
    return sum(1 for m in model.modules() if isinstance(m, Fp8Linear) and m.input_gelu)


def use_row_kernel(model: nn.Module) -> int:
    """Let each attention's FP8 output projections (`to_out[0]`, `to_add_out`) quantize their input with the
    one-pass Triton kernel (`sd35fp8.kernels.quantize_rows`), reading the attention output's image and context
    halves in place; elsewhere (the CPU, other inputs) they quantize as before. Returns how many layers."""
    from diffusers.models.attention_processor import Attention

    count = 0
    for attention in [m for m in model.modules() if isinstance(m, Attention)]:
        for layer in (attention.to_out[0] if attention.to_out is not None else None,
                      getattr(attention, "to_add_out", None)):
            if isinstance(layer, Fp8Linear):
                layer.row_kernel = True
                count += 1
    return count


def row_kernel_layers(model: nn.Module) -> int:
    """How many FP8 layers of `model` quantize their input with the row kernel (`use_row_kernel`)."""
    return sum(1 for m in model.modules() if isinstance(m, Fp8Linear) and m.row_kernel)


FAST_ACCUM_PROBES = {"scaled_mm": "rowwise_fast_accum", "scaled_mm_tensorwise": "tensorwise_fast_accum"}


def use_fast_accum(model: nn.Module) -> int:
    """Let every FP8-GEMM layer of `model` accumulate in the tensor cores' own FP8 accumulator, without the periodic
    promotion to float32 that cuBLAS inserts by default (`torch._scaled_mm(use_fast_accum=True)`, what torchao's
    row-wise FP8 inference uses by default). Returns how many layers. Callers check `probe_scaled_mm`'s
    `FAST_ACCUM_PROBES[mode]` on the device first."""
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear) and m.mode in FP8_GEMM_MODES]
    for layer in layers:
        layer.fast_accum = True
    return len(layers)


def fast_accum_layers(model: nn.Module) -> int:
    """How many FP8 layers of `model` accumulate without float32 promotion (`use_fast_accum`)."""
    return sum(1 for m in model.modules() if isinstance(m, Fp8Linear) and m.fast_accum)
