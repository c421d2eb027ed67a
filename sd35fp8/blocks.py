"""SD3/SD3.5 joint blocks whose adaLN (LayerNorm + modulation, + the gated residual add) and the FP8 quantization
of its output run as one kernel.

In diffusers' `JointTransformerBlock` the normalized, modulated activation crosses from the block into the
attention processor and the MLP as a 16-bit tensor, and each FP8 layer then quantizes it again: under
torch.compile inductor fuses this into one reduction kernel per norm, but a looped three-pass one (83-109 us a call
on SD3.5 Large's image tokens on an H200, about 5x what the bytes need). `Fp8NormBlock` is the same block with a
forward that calls `sd35fp8.kernels.norm_quantize_rows` / `add_norm_quantize_rows` instead and hands the FP8 rows
to the layers as an `Fp8Activation` (H200, Large, compiled: 103.2 -> 101.0 ms a step; eager FP8 179 -> 150 ms
together with GELU kernel v2). Same weights, same modules, same arithmetic up to rounding (the sums run in float32
and are rounded once). Only blocks whose every consumer of a normalized activation is an FP8-GEMM layer are
converted, and only once `sd35fp8.attention.JointAttention` runs their attention. Where Triton cannot run (the CPU)
the same forward runs the torch reference of the kernels, which is what the CPU tests compare against diffusers'
block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX
from torch import nn

from . import kernels
from .attention import JointAttention
from .fp8 import FP8_GEMM_MODES, Fp8Activation, Fp8Linear, concat_linears


def _activation(data: torch.Tensor, row_scale: torch.Tensor, h: torch.Tensor) -> Fp8Activation:
    """The kernels' (B*T, C) rows and (B*T, 1) scales as an activation shaped like `h` (B, T, C)."""
    return Fp8Activation(data.view(h.shape), row_scale.view(*h.shape[:-1], 1), h.dtype)


def _norm_quantize(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> Fp8Activation:
    if kernels.norm_supports(h):
        return _activation(*kernels.norm_quantize_rows(h, shift, scale, eps), h)
    return _activation(*kernels.norm_quantize_reference(h, shift, scale, eps)[1:], h)


def _add_norm_quantize(h: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                       scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, Fp8Activation]:
    if kernels.norm_supports(h) and residual.is_contiguous():
        h, data, row_scale = kernels.add_norm_quantize_rows(h, residual, gate, shift, scale, eps)
    else:
        h, data, row_scale = kernels.norm_quantize_reference(h, shift, scale, eps, residual, gate)
    return h, _activation(data, row_scale, h)


class Fp8NormBlock(JointTransformerBlock):
    """`JointTransformerBlock` computing each adaLN + FP8 quantization in one kernel (see the module docstring)."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                joint_attention_kwargs: dict | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        kwargs = joint_attention_kwargs or {}
        eps = self.norm1.norm.eps
        silu = F.silu(temb)
        if hasattr(self, "modulation"):
            emb, context_emb = self.modulation(silu).split(self.modulation_widths, dim=1)
        else:
            emb, context_emb = self.norm1.linear(silu), self.norm1_context.linear(silu)
        if self.use_dual_attention:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = \
                emb.chunk(9, dim=1)
            attention2_input = _norm_quantize(hidden_states, shift_msa2, scale_msa2, eps)
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        attention_input = _norm_quantize(hidden_states, shift_msa, scale_msa, eps)

        context_norm = self.norm1_context
        if self.context_pre_only:  # AdaLayerNormContinuous: (scale, shift)
            c_scale_msa, c_shift_msa = context_emb.chunk(2, dim=1)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = context_emb.chunk(6, dim=1)
        context_input = _norm_quantize(encoder_hidden_states, c_shift_msa, c_scale_msa, context_norm.norm.eps)

        attn_output, context_attn_output = self.attn(hidden_states=attention_input,
                                                     encoder_hidden_states=context_input, **kwargs)
        residual, gate = attn_output, gate_msa
        if self.use_dual_attention:
            hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
            residual, gate = self.attn2(hidden_states=attention2_input, **kwargs), gate_msa2
        hidden_states, mlp_input = _add_norm_quantize(hidden_states, residual, gate, shift_mlp, scale_mlp,
                                                      self.norm2.eps)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(mlp_input)

        if self.context_pre_only:
            return None, hidden_states
        encoder_hidden_states, context_mlp_input = _add_norm_quantize(
            encoder_hidden_states, context_attn_output, c_gate_msa, c_shift_mlp, c_scale_mlp, self.norm2_context.eps)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(context_mlp_input)
        return encoder_hidden_states, hidden_states


def _plain_layer_norm(norm: nn.Module) -> bool:
    return isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine


def _first_mlp_layer(mlp: nn.Module | None) -> nn.Module | None:
    first = mlp.net[0] if mlp is not None else None
    return getattr(first, "proj", first)  # GELU(proj), or the projection itself once GELU is fused into the next


def _convertible(block: nn.Module, modulation: bool) -> bool:
    """A stock block whose norms the kernels compute and whose normalized activations feed FP8-GEMM layers (with
    `modulation`, its two adaLN projections of one type, to become one layer)."""
    if type(block) is not JointTransformerBlock or block._chunk_size is not None:
        return False
    norm1, context = block.norm1, block.norm1_context
    if not isinstance(norm1, (AdaLayerNormZero, SD35AdaLayerNormZeroX)) or getattr(norm1, "emb", None) is not None:
        return False  # (an AdaLayerNormZero embedding its own timestep is not SD3's)
    if not isinstance(context, AdaLayerNormContinuous if block.context_pre_only else AdaLayerNormZero):
        return False
    if modulation and {type(norm1.linear), type(context.linear)} not in ({Fp8Linear}, {nn.Linear}):
        return False
    norms = [norm1.norm, context.norm, block.norm2] + ([] if block.context_pre_only else [block.norm2_context])
    if not all(_plain_layer_norm(norm) for norm in norms):
        return False
    attentions = [block.attn] + ([block.attn2] if block.use_dual_attention else [])
    if not all(isinstance(attention.processor, JointAttention) for attention in attentions):
        return False  # diffusers' processors take 16-bit inputs only
    consumers = [_first_mlp_layer(block.ff)] + ([] if block.context_pre_only else [_first_mlp_layer(block.ff_context)])
    names = ("to_qkv", "to_q", "to_k", "to_v")
    consumers += [getattr(attention, name, None) for attention in attentions for name in names]
    consumers += [getattr(block.attn, name, None) for name in ("to_added_qkv", "add_q_proj", "add_k_proj", "add_v_proj")]
    used = [layer for layer in consumers if layer is not None]
    return all(isinstance(layer, Fp8Linear) and layer.mode in FP8_GEMM_MODES for layer in used)


def fuse_norm_quantize(model: nn.Module, modulation: bool = True) -> int:
    """Turn every convertible `JointTransformerBlock` of an SD3 transformer into an `Fp8NormBlock` (in place: same
    object and modules); with `modulation`, the two adaLN projections of SiLU(temb), `norm1.linear` and
    `norm1_context.linear`, become one layer `modulation` (one GEMM reading the input once, exact as the q/k/v
    fusion is). Returns how many blocks. Apply it after the FP8 path and projection fusion are chosen."""
    count = 0
    for block in getattr(model, "transformer_blocks", []):
        if _convertible(block, modulation):
            if modulation:
                linears = [block.norm1.linear, block.norm1_context.linear]
                block.modulation = concat_linears(linears)
                block.modulation_widths = [layer.out_features for layer in linears]
                block.norm1.linear = block.norm1_context.linear = None  # (the forward no longer calls the norms)
            block.__class__ = Fp8NormBlock
            count += 1
    return count


def modulation_fused(model: nn.Module) -> int:
    """How many blocks of `model` compute both adaLN projections in one GEMM (`fuse_norm_quantize`)."""
    return sum(1 for block in getattr(model, "transformer_blocks", []) if hasattr(block, "modulation"))


def norm_fused(model: nn.Module) -> int:
    """How many blocks of `model` run the fused adaLN + FP8 quantization (`fuse_norm_quantize`)."""
    return sum(1 for block in getattr(model, "transformer_blocks", []) if isinstance(block, Fp8NormBlock))
