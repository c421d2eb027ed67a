"""Speed pieces, checked for numerics on the CPU against the 16-bit layers: in-memory FP8 quantization equal to
convert's, fused projections, the GELU and adaLN + quantization kernels (Triton's interpreter, cubins built without
a GPU, the blocks that call them), tensor-wise FP8, the FP8 capability probe, FP8 attention, prompt cache, on-demand
text encoders, VAE tiling and ZeroGPU durations."""

import copy
import dataclasses
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import torch.nn.functional as F

from sd35fp8 import fp8, kernels
from sd35fp8.attention import JointAttention, attention_of, fp8_attention, set_attention
from sd35fp8.fp8 import Fp8Linear, apply_fp8_path, fuse_gelu_quantize, fuse_projections, gelu_fused, quantize_linears, \
    quanto_quantize
from sd35fp8.generate import generate
from sd35fp8.loading import load_pipeline, load_transformer, with_transformer
from sd35fp8.metrics import relative_error
from sd35fp8.prompts import OnDemandEncoders, PromptCache, PromptEmbeddings
from sd35fp8.request import GenerationRequest
from sd35fp8.tiny import build_tiny_pipeline


def tiny_transformer(dtype=torch.bfloat16):
    return build_tiny_pipeline(dtype=dtype).transformer


def step(transformer, tokens_side=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dtype = next(transformer.parameters()).dtype
    x = torch.randn(2, 16, tokens_side, tokens_side, generator=generator).to(dtype)
    text = torch.randn(2, 333, 64, generator=generator).to(dtype)
    pooled = torch.randn(2, 64, generator=generator).to(dtype)
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                           timestep=torch.tensor([500.0, 500.0]), return_dict=False)[0].float()


def test_in_memory_quantization_is_bit_identical_to_converts():
    reference = tiny_transformer()
    ours = copy.deepcopy(reference)
    meta = copy.deepcopy(reference).to("meta")
    assert set(fp8.replace_with_quanto_layers(meta)) == set(fp8.convert_linear_names(reference))
    quanto_quantize(reference)
    apply_fp8_path(reference, "dequant")
    count = quantize_linears(ours, "dequant")
    theirs = {n: m for n, m in reference.named_modules() if isinstance(m, Fp8Linear)}
    mine = {n: m for n, m in ours.named_modules() if isinstance(m, Fp8Linear)}
    assert count == len(mine) and set(mine) <= set(theirs)  # quanto's own quantize() also takes the conv layer
    for name, layer in mine.items():
        assert torch.equal(layer.weight.view(torch.uint8), theirs[name].weight.view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, theirs[name].weight_scale), name


@pytest.mark.parametrize("mode", ["scaled_mm", "scaled_mm_tensorwise", "dequant"])
def test_fused_projections_equal_separate_ones(mode):
    torch.manual_seed(0)
    layers = [Fp8Linear.from_linear(nn.Linear(64, 32, dtype=torch.bfloat16), mode) for _ in range(3)]
    fused = Fp8Linear.concat(layers)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    assert fused.mode == mode and fused.out_features == 96
    assert relative_error(fused(x), separate) < 1e-2


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_fused_transformer_matches_unfused_16_bit_layer(precision):
    reference = tiny_transformer()
    model = copy.deepcopy(reference)
    if precision == "fp8":
        quantize_linears(model, "scaled_mm")
    expected = step(model)
    assert fuse_projections(model) == 2  # two joint attentions in the tiny model
    set_attention(model, "sdpa")
    assert model.transformer_blocks[0].attn.to_q is None and model.transformer_blocks[0].attn.to_qkv is not None
    out = step(model)
    assert relative_error(out, expected) < 2e-2
    assert relative_error(out, step(reference)) < (2e-2 if precision == "bf16" else 0.1)


@pytest.mark.parametrize("mode", ["scaled_mm", "scaled_mm_tensorwise", "dequant"])
def test_gelu_moved_into_the_fp8_layer_computes_the_same_mlp(mode):
    model = tiny_transformer()
    quantize_linears(model, mode)
    expected = step(model)
    mlps = sum(1 for block in model.transformer_blocks for ff in (block.ff, block.ff_context) if ff is not None)
    assert fuse_gelu_quantize(model) == mlps == gelu_fused(model)
    assert isinstance(model.transformer_blocks[0].ff.net[0], Fp8Linear)  # the GELU module is gone
    assert torch.equal(step(model), expected)  # on the CPU the layer applies F.gelu itself: the same arithmetic


@pytest.mark.parametrize("mode", ["scaled_mm", "scaled_mm_tensorwise"])
def test_fp8_layer_feeds_the_fused_kernels_output_to_its_gemm(monkeypatch, mode):
    """Where the kernel runs (CUDA), the layer must use its FP8 rows and scales exactly as quantize_rows' output."""
    torch.manual_seed(2)
    layer = Fp8Linear.from_linear(nn.Linear(128, 64, dtype=torch.bfloat16), mode)
    x = torch.randn(3, 7, 128, dtype=torch.bfloat16)
    expected = layer(F.gelu(x, approximate="tanh"))
    calls = []
    monkeypatch.setattr(kernels, "supports", lambda rows: True)
    monkeypatch.setattr(kernels, "gelu_quantize_rows",
                        lambda rows: calls.append(rows.shape) or fp8.quantize_rows(F.gelu(rows, approximate="tanh")))
    layer.input_gelu = True
    assert torch.equal(layer(x), expected) and calls == [(21, 128)]


def test_fp8_attention_outputs_use_the_row_kernel_where_it_runs(monkeypatch):
    """`use_row_kernel` marks each attention's FP8 output projections; where the kernel runs (CUDA) they quantize
    their (B, T, C) input with it, in place (no reshape copy), and compute what the plain path computes."""
    model = tiny_transformer()
    quantize_linears(model, "scaled_mm")
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert fp8.use_row_kernel(model) == fp8.row_kernel_layers(model) == 2 * len(model.transformer_blocks) - 1
    layer = next(m for m in layers if m.row_kernel)
    x = torch.randn(2, 9, layer.in_features, dtype=torch.bfloat16)[:, 2:]  # a slice, like the attention's halves
    layer.row_kernel = False
    expected = layer(x)
    calls = []
    monkeypatch.setattr(kernels, "rows_supported", lambda rows: rows.dim() == 3)
    monkeypatch.setattr(kernels, "quantize_rows", lambda rows: calls.append(rows.stride()) or
                        fp8.quantize_rows(rows.reshape(-1, rows.shape[-1])), raising=False)
    layer.row_kernel = True
    assert torch.equal(layer(x), expected) and calls == [x.stride()]


@pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
def test_row_quantize_and_block_dequantize_kernels_arithmetic_in_tritons_interpreter():
    """The Triton kernel itself (with GELU, and without on a strided (B, T, C) slice), run by Triton's CPU interpreter (a fresh process: the interpreter is chosen when
    the kernel is defined). Its FP8 cast is the GPU's and is not emulated faithfully, so the kernel writes float32
    here: the values right before the cast, and the scales, against GELU + quantize_rows in torch. The interpreter
    cannot run the tanh.approx instruction either: tanh goes through a sigmoid here (compiled for the GPU above)."""
    code = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from sd35fp8 import kernels
        from sd35fp8.fp8 import FP8_MAX
        torch.manual_seed(0)
        x = (torch.randn(37, 1000) * 3).to(torch.bfloat16)
        x[3] = 0  # an all-zero row: the scale floor, no division by zero
        data, scale = torch.empty(x.shape), torch.empty(37, 1)
        kernels.launch_quantize_rows(x, data, scale, gelu=True, approx_tanh=False)
        gelu = F.gelu(x, approximate="tanh").float()
        expected_scale = (gelu.abs().amax(1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        expected = (gelu / expected_scale).clamp(-FP8_MAX, FP8_MAX)
        assert torch.equal(scale, expected_scale), (scale - expected_scale).abs().max()
        assert torch.all((data - expected).abs() <= 0.01 * expected.abs() + 0.01), (data - expected).abs().max()
        row_max = data.abs().amax(1)[torch.arange(37) != 3]
        assert torch.allclose(row_max, torch.full_like(row_max, FP8_MAX)) and data[3].eq(0).all()  # full E4M3 range
        # without GELU, on the image half of an attention output: a (B, T, C) slice whose batches are 30 rows apart
        x = (torch.randn(2, 30, 1000) * 3).to(torch.bfloat16)[:, :23]
        data, scale = torch.empty(46, 1000), torch.empty(46, 1)
        kernels.launch_quantize_rows(x, data, scale)
        rows = x.reshape(46, 1000).float()
        expected_scale = (rows.abs().amax(1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        assert torch.equal(scale, expected_scale), (scale - expected_scale).abs().max()
        expected = (rows / expected_scale).clamp(-FP8_MAX, FP8_MAX)
        assert torch.all((data - expected).abs() <= 1e-5 * expected.abs() + 1e-4), (data - expected).abs().max()
        # T5's weight expansion: 128 x 128 blocks in 64 x 128 tiles, float32 out (exact: no rounding to 16 bits)
        from sd35fp8.fp8 import dequantize_blockwise, quantize_blockwise
        weight, scale_inv = quantize_blockwise(torch.randn(256, 384) * torch.logspace(-3, 1, 256)[:, None])
        expanded = torch.empty(256, 384)
        kernels.launch_dequantize_blocks(weight, scale_inv, (128, 128), expanded)
        assert torch.equal(expanded, dequantize_blockwise(weight, scale_inv, (128, 128), torch.float32))
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
@pytest.mark.parametrize("capability", [89, 90, 120])  # Ada, Hopper, consumer Blackwell
def test_gelu_quantize_kernel_compiles_for_fp8_gpus(capability):
    """Triton builds the kernel to a cubin without a GPU: catches what only the GPU compiler would refuse (on the
    H200 a module constant read inside the kernel did), and checks the cast rounds to nearest."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    signature = {"x_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "n_cols": "i32", "tokens": "i32",
                 "x_batch_stride": "i32", "x_row_stride": "i32", "out_row_stride": "i32", "FP8_MAX": "constexpr",
                 "BLOCK_A": "constexpr", "BLOCK_B": "constexpr", "GELU": "constexpr", "APPROX_TANH": "constexpr"}
    for gelu in (True, False):  # gelu_quantize_rows, quantize_rows
        source = ASTSource(fn=kernels._quantize_rows_kernel, signature=signature,
                           constexprs={"FP8_MAX": kernels.FP8_MAX, "BLOCK_A": 2048, "BLOCK_B": 512, "GELU": gelu,
                                       "APPROX_TANH": True},
                           attrs={(i,): [["tt.divisibility", 16]] for i in range(4)})  # pointers, n_cols
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 8})
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"] and ("tanh.approx.f32" in ptx) == gelu
        assert "cvt.rn.satfinite.e4m3x2." in ptx  # the cast rounds to nearest
        # strides passed without Triton's divisibility hints (as inductor passes symbolic ones): 16-byte loads
        # (n_cols, 2432 or 9728 in SD3.5 Large, comes as a constant Triton sees divisible by 16)
        assert "ld.global.v4.b32" in ptx and not re.search(r"ld\.global\.(b16|u16)", ptx)


@pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_block_dequantize_kernel_compiles_with_wide_loads_and_rounds_to_nearest(dtype):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    signature = {"data_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "out_ptr": f"*{dtype}", "n_cols": "i32",
                 "scale_cols": "i32", "BLOCK_ROWS": "constexpr", "BLOCK_COLS": "constexpr", "TILE_ROWS": "constexpr",
                 "TILE_COLS": "constexpr"}
    source = ASTSource(fn=kernels._dequantize_blocks_kernel, signature=signature,
                       constexprs={"BLOCK_ROWS": 128, "BLOCK_COLS": 128, "TILE_ROWS": kernels.DEQUANT_TILE[0],
                                   "TILE_COLS": kernels.DEQUANT_TILE[1]},
                       attrs={(i,): [["tt.divisibility", 16]] for i in range(4)})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    assert re.search(r"ld\.global(\.\w+)*\.v[24]\.b32", ptx) and "st.global.v4.b32" in ptx  # 8-16 bytes a thread
    assert re.search(r"cvt\.rn(\.\w+)*\.f16x2\.f32|cvt\.rn\.(bf16|f16)\.f32", ptx)


def test_fp8_block_layers_expand_through_the_kernel_where_it_runs(monkeypatch):
    from transformers import T5Config, T5EncoderModel

    from sd35fp8.fp8 import Fp8BlockLinear, block_quantize_linears, describe_block_fp8

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=128, d_kv=32, d_ff=200, num_layers=1, num_heads=4,
                                  feed_forward_proj="gated-gelu")).eval()  # T5 v1.1's feed-forward, as in SD3.5
    names = [n for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith(".wo")]
    assert block_quantize_linears(t5, names) == 6  # what convert writes: T5 keeps `wo` 16-bit
    assert describe_block_fp8([t5], torch.device("cpu")) == \
        "6 FP8 text-encoder layers expanded per call in torch (the kernel runs on CUDA only)"
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        expected = t5(ids).last_hidden_state
    calls = []

    def kernel(data, scale_inv, rows, cols, dtype):  # stands in for the CUDA kernel: same values by contract
        calls.append((tuple(data.shape), rows, cols, dtype))
        return fp8.dequantize_blockwise(data, scale_inv, (rows, cols), dtype)

    monkeypatch.setattr(fp8, "block_kernel_runs", lambda weight, block: True)
    monkeypatch.setattr(kernels, "dequantize_blocks", kernel, raising=False)
    with torch.no_grad():
        assert torch.equal(t5(ids).last_hidden_state, expected)
    assert len(calls) == 6 and all(call[1:] == (128, 128, torch.float32) for call in calls)
    monkeypatch.setattr(kernels, "check", lambda device, kernel: None)
    assert describe_block_fp8([t5], torch.device("cuda")) == \
        "4 FP8 text-encoder layers expanded per call by one Triton kernel (2 in torch: their blocks do not tile them)"
    assert isinstance(t5.encoder.block[0].layer[1].DenseReluDense.wi_0, Fp8BlockLinear)


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_the_kernel_check_reports_instead_of_failing(monkeypatch, kernel):
    monkeypatch.setattr(kernels, "_CHECKS", {})
    assert kernels.check("cpu", kernel) == "the kernel runs on CUDA only"
    monkeypatch.setattr(kernels, "triton", None)
    monkeypatch.setattr(kernels, "_CHECKS", {})
    assert kernels.check("cuda:0", kernel) == "triton is not installed"


# ------------------------------------------------------------------ adaLN + quantization in one kernel (blocks.py)


def dual_attention_transformer():
    """SD3.5 Medium's layout in miniature: dual attention in the first block, q/k RMS norms, a context-pre-only last."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(5)
    return SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                 caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=64,
                                 dual_attention_layers=(0,), qk_norm="rms_norm").to(torch.bfloat16).eval()


def randomize_modulation(transformer):
    """Random weights give adaLN modulations near zero; larger ones make shift, scale and gate matter."""
    generator = torch.Generator().manual_seed(7)
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(".linear"):
            module.bias.data = (torch.randn(module.bias.shape, generator=generator) * 0.5).to(module.bias.dtype)
    return transformer


@pytest.mark.parametrize("build,mode,modulation", [(tiny_transformer, "scaled_mm", True),
                                                   (dual_attention_transformer, "scaled_mm", True),
                                                   (tiny_transformer, "scaled_mm_tensorwise", True),
                                                   (dual_attention_transformer, "scaled_mm", False)])
def test_fused_adaln_blocks_compute_what_diffusers_blocks_do(build, mode, modulation):
    from sd35fp8.blocks import Fp8NormBlock, fuse_norm_quantize, modulation_fused, norm_fused

    reference = randomize_modulation(build())
    model = copy.deepcopy(reference)
    quantize_linears(model, mode)
    fuse_projections(model)
    fuse_gelu_quantize(model)
    set_attention(model, "sdpa")
    expected, exact = step(model), step(reference)
    blocks = len(model.transformer_blocks)
    assert fuse_norm_quantize(model, modulation=modulation) == blocks == norm_fused(model)
    assert modulation_fused(model) == (blocks if modulation else 0)  # both adaLN projections in one GEMM
    assert all(isinstance(block, Fp8NormBlock) for block in model.transformer_blocks)
    assert any(block.use_dual_attention for block in model.transformer_blocks) == (build is dual_attention_transformer)
    assert model.transformer_blocks[-1].context_pre_only
    out = step(model)
    # the same FP8 arithmetic with the adaLN sums rounded once instead of per operation: as close to the 16-bit
    # model as diffusers' blocks are (measured 3.4% vs 3.4-3.6%), and a few E4M3 steps from their output
    assert relative_error(out, exact) < 1.05 * relative_error(expected, exact)
    assert relative_error(out, expected) < 4e-2


def test_fused_adaln_with_one_adaln_projection_kept_16_bit():
    """A block whose context adaLN projection stayed 16-bit (convert --exclude norm1_context) keeps its two
    projections apart: fused without the modulation GEMM, left alone with it."""
    from sd35fp8.blocks import fuse_norm_quantize, modulation_fused, norm_fused

    def build():
        model = tiny_transformer()
        quantize_linears(model, "scaled_mm")
        set_attention(model, "sdpa")
        block = model.transformer_blocks[0]
        layer = block.norm1_context.linear
        block.norm1_context.linear = nn.Linear(layer.in_features, layer.out_features, dtype=torch.bfloat16)
        return model

    model = build()
    expected = step(model)
    assert fuse_norm_quantize(model, modulation=False) == 2 == norm_fused(model) and modulation_fused(model) == 0
    assert relative_error(step(model), expected) < 4e-2
    model = build()
    assert fuse_norm_quantize(model, modulation=True) == 1 == modulation_fused(model)  # the other block only


def test_fused_adaln_needs_fp8_gemm_layers_and_our_processor():
    from sd35fp8.blocks import fuse_norm_quantize

    model = tiny_transformer()
    quantize_linears(model, "dequant")
    set_attention(model, "sdpa")
    assert fuse_norm_quantize(model) == 0
    model = tiny_transformer()
    quantize_linears(model, "scaled_mm")
    assert fuse_norm_quantize(model) == 0  # diffusers' own processor: 16-bit inputs only
    bf16 = tiny_transformer()
    set_attention(bf16, "sdpa")
    assert fuse_norm_quantize(bf16) == 0


@pytest.mark.parametrize("mode", ["scaled_mm", "dequant", "scaled_mm_tensorwise"])
def test_fp8_layers_take_an_already_quantized_activation(mode):
    torch.manual_seed(4)
    layer = Fp8Linear.from_linear(nn.Linear(64, 32, dtype=torch.bfloat16), mode)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    data, scale = fp8.quantize_rows(x.reshape(-1, 64))
    activation = fp8.Fp8Activation(data.view(2, 5, 64), scale.view(2, 5, 1), torch.bfloat16)
    out = layer(activation)
    assert out.shape == (2, 5, 32) and out.dtype == torch.bfloat16
    if mode != "dequant":
        assert torch.equal(out, layer(x))  # the layer would have quantized x to exactly these rows
    assert relative_error(out, layer(fp8.dequantize_activation(activation))) < 1e-2


def test_fused_adaln_blocks_compile_without_graph_breaks():
    """The FP8 rows travel from the norm to the projections as a NamedTuple: dynamo must trace it in one graph."""
    from sd35fp8.blocks import fuse_norm_quantize

    model = tiny_transformer()
    quantize_linears(model, "scaled_mm")
    fuse_projections(model)
    set_attention(model, "sdpa")
    fuse_norm_quantize(model)
    expected = step(model)
    torch._dynamo.reset()
    for block in model.transformer_blocks:
        block.compile(fullgraph=True, backend="aot_eager", dynamic=True)
    assert relative_error(step(model), expected) < 1e-3


NORM_KERNEL_CODE = """
    import torch
    from sd35fp8 import kernels
    from sd35fp8.fp8 import FP8_MAX
    torch.manual_seed(0)
    h, y = (torch.randn(2, 19, {cols}) * 3).to(torch.bfloat16), (torch.randn(2, 19, {cols}) * 2).to(torch.bfloat16)
    # chunks of one modulation, as the blocks pass them: rows 3 * cols apart, read in place
    shift, scale, gate = torch.randn(2, 3 * {cols}).to(torch.bfloat16).chunk(3, dim=1)
    assert shift.stride() == (3 * {cols}, 1)
    for residual, rows_per_program in ((None, 1), (y, 1), (None, 4), (y, 4)):  # 4: the last program half full
        data, row_scale, h_out = torch.empty(38, {cols}), torch.empty(38, 1), torch.empty_like(h)
        kernels.launch_norm_quantize_rows(h, shift, scale, 1e-6, data, row_scale, residual,
                                          None if residual is None else gate, h_out, rows_per_program=rows_per_program)
        normed_input = h
        if residual is not None:  # the new hidden state, within one bf16 step of the reference's
            new_h = kernels.norm_quantize_reference(h, shift, scale, 1e-6, residual, gate)[0].float()
            assert (h_out.float() - new_h).abs().le(new_h.abs() * 2 ** -7).all()
            normed_input = h_out  # from here on, the kernel's own rounding of it
        _, _, expected_scale = kernels.norm_quantize_reference(normed_input, shift, scale, 1e-6)
        normed = torch.nn.functional.layer_norm(normed_input.float(), ({cols},), eps=1e-6)
        modulated = (normed * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(torch.bfloat16).float()
        expected = (modulated.reshape(38, {cols}) / expected_scale).clamp(-FP8_MAX, FP8_MAX)
        assert torch.allclose(row_scale, expected_scale, rtol=1e-2), (row_scale - expected_scale).abs().max()
        assert torch.all((data - expected).abs() <= 0.02 * expected.abs() + 0.1), (data - expected).abs().max()
        assert torch.allclose(data.abs().amax(1), torch.full((38,), FP8_MAX), rtol=1e-2)  # the full E4M3 range
    print("ok")
"""


@pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
@pytest.mark.parametrize("cols", [192, 2432])  # the tiny-shapes model's width, SD3.5 Large's (2048 + 384)
def test_norm_quantize_kernel_arithmetic_in_tritons_interpreter(cols):
    """The norm kernels run by Triton's CPU interpreter (float32 output: the interpreter's FP8 cast is not the
    GPU's), with and without the gated residual, against `norm_quantize_reference`. The interpreter also rounds
    float32 -> bf16 toward zero (the GPU to nearest), hence tolerances of one bf16 step."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(NORM_KERNEL_CODE.format(cols=cols))], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
@pytest.mark.parametrize("capability", [89, 90, 120])
def test_norm_quantize_kernel_compiles_for_fp8_gpus(capability):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    pointers = {"h_ptr": "*bf16", "residual_ptr": "*bf16", "gate_ptr": "*bf16", "shift_ptr": "*bf16",
                "scale_ptr": "*bf16", "h_out_ptr": "*bf16", "out_ptr": "*fp8e4nv", "row_scale_ptr": "*fp32"}
    signature = {**pointers, "n_rows": "i32", "n_cols": "i32", "tokens": "i32", "eps": "fp32", "gate_stride": "i32",
                 "shift_stride": "i32", "scale_stride": "i32", "FP8_MAX": "constexpr", "ROWS": "constexpr",
                 "BLOCK_A": "constexpr", "BLOCK_B": "constexpr", "HAS_RESIDUAL": "constexpr"}
    source = ASTSource(fn=kernels._norm_quantize_rows_kernel, signature=signature,
                       constexprs={"FP8_MAX": kernels.FP8_MAX, "ROWS": 2, "BLOCK_A": 2048, "BLOCK_B": 512,
                                   "HAS_RESIDUAL": True})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 8})
    assert compiled.asm["cubin"] and "cvt.rn.satfinite.e4m3x2." in compiled.asm["ptx"]


def test_processor_applies_sd35_qk_norms_like_diffusers():
    """diffusers' FusedJointAttnProcessor2_0 skips q/k RMS norms; ours must match the unfused original."""
    model = tiny_transformer(torch.float32)
    for block in model.transformer_blocks:  # make the norms matter
        for norm in (block.attn.norm_q, block.attn.norm_k, block.attn.norm_added_q, block.attn.norm_added_k):
            if norm is not None:
                norm.weight.data.uniform_(0.2, 3.0)
    expected = step(model)
    set_attention(model, "sdpa")
    fuse_projections(model)
    assert relative_error(step(model), expected) < 1e-5


@pytest.mark.parametrize("mode", ["scaled_mm_tensorwise", "scaled_mm"])
def test_fp8_modes_match_the_16_bit_layer(mode):
    torch.manual_seed(1)
    linear = nn.Linear(128, 64, dtype=torch.bfloat16)
    layer = Fp8Linear.from_linear(linear, mode)
    x = torch.randn(3, 9, 128, dtype=torch.bfloat16)
    assert layer(x).shape == (3, 9, 64)
    assert relative_error(layer(x), linear(x)) < 0.05


def test_tensorwise_gemm_computes_what_the_row_wise_one_does():
    """GPUs refusing row-wise scales get the same row-quantized activations: only where the scales are applied (and one
    more bf16 rounding of the GEMM output) differs."""
    torch.manual_seed(6)
    linear = nn.Linear(256, 96, dtype=torch.bfloat16)
    rowwise, tensorwise = (Fp8Linear.from_linear(linear, mode) for mode in ("scaled_mm", "scaled_mm_tensorwise"))
    x = torch.randn(7, 256, dtype=torch.bfloat16) * torch.logspace(-2, 1, 7, dtype=torch.bfloat16)[:, None]
    assert relative_error(tensorwise(x), rowwise(x)) < 5e-3


def test_tensorwise_output_does_not_overflow_in_fp16():
    """Before the per-channel weight scale, a layer with small weights has outputs thousands of times too large:
    beyond fp16's 65504 here, so the GEMM must not write fp16."""
    torch.manual_seed(3)
    linear = nn.Linear(256, 32, dtype=torch.float16)
    linear.weight.data *= 1e-3  # weight scale ~1e-6: pre-scale outputs ~1e5
    x = torch.randn(4, 256, dtype=torch.float16) * 50
    out = Fp8Linear.from_linear(linear, "scaled_mm_tensorwise")(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert relative_error(out, linear(x)) < 0.05


def test_probe_falls_back_to_tensorwise_then_dequant(monkeypatch):
    real = torch._scaled_mm

    def no_rowwise(a, b, *, scale_a, scale_b, **kwargs):
        if scale_a.numel() > 1 or scale_b.numel() > 1:
            raise RuntimeError("Invalid scaling configuration (row-wise scales are not supported on this GPU)")
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kwargs)

    monkeypatch.setattr(fp8, "fp8_tensor_cores_available", lambda device=None: True)
    monkeypatch.setattr(fp8, "_PROBES", {})
    monkeypatch.setattr(torch, "_scaled_mm", no_rowwise)
    probe = fp8.probe_scaled_mm("cpu")
    assert probe["tensorwise"] == "ok" and probe["rowwise"].startswith("refused: RuntimeError")
    assert fp8.select_fp8_path("cpu") == "scaled_mm_tensorwise"
    loaded = load_pipeline("tiny", "fp8", device="cpu")
    assert loaded.fp8_path == "scaled_mm_tensorwise" and fp8.fp8_path_of(loaded.pipe.transformer) == loaded.fp8_path
    assert generate(loaded, GenerationRequest("a cat", steps=1, width=64, height=64)).ok

    def nothing(*args, **kwargs):
        raise RuntimeError("no FP8 GEMM here")

    monkeypatch.setattr(fp8, "_PROBES", {})
    monkeypatch.setattr(torch, "_scaled_mm", nothing)
    assert fp8.select_fp8_path("cpu") == "dequant"


def test_fp8_attention_matches_16_bit_attention():
    torch.manual_seed(2)
    batch, tokens, heads, dim = 2, 96, 2, 64
    norm = nn.RMSNorm(dim, eps=1e-6)
    norm.weight.data.uniform_(0.5, 2.0)
    q = norm(torch.randn(batch, tokens, heads, dim) * 3)
    k = norm(torch.randn(batch, tokens, heads, dim))
    v = torch.randn(batch, tokens, heads, dim) * 5
    from sd35fp8.attention import _rms_bound

    bound = _rms_bound([norm], dim)
    assert q.abs().max() <= bound and k.abs().max() <= bound
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out = fp8_attention(q, k, v, bound, bound, "reference")
    assert out.shape == expected.shape
    assert relative_error(out, expected) < 0.1  # four E4M3 roundings (q, k, P, v) and an E4M3 output


def test_fp8_attention_in_the_tiny_transformer_and_its_switch():
    model = tiny_transformer(torch.float32)
    set_attention(model, "sdpa")
    expected = step(model)
    set_attention(model, "fp8_reference")
    assert isinstance(model.transformer_blocks[0].attn.processor, JointAttention)
    assert relative_error(step(model), expected) < 0.1
    loaded = load_pipeline("tiny", "bf16", device="cpu", attention="fp8_reference")
    assert loaded.pieces["attention"] == "fp8_reference"
    assert load_pipeline("tiny", "bf16", device="cpu").pieces["attention"] == "sdpa"  # off by default


def test_triton_fp8_attention_backend_numerics_layout_and_fallback():
    from sd35fp8 import attention_kernel

    model = tiny_transformer(torch.float32)
    set_attention(model, "sdpa")
    expected = step(model)
    set_attention(model, "fp8_triton")  # off CUDA: the kernel's arithmetic in float32 torch
    assert attention_of(model) == "fp8_triton"
    assert relative_error(step(model), expected) < 0.1
    v = torch.randn(2, 200, 3, 64, dtype=torch.bfloat16) * 4  # 200 tokens: padded to 208, two groups of keys
    v[:, attention_kernel.V_GROUP:] *= 10
    v8_t, descale_v = attention_kernel.quantize_v_grouped(v)
    assert v8_t.shape == (2, 3, 64, 208) and v8_t.is_contiguous() and descale_v.shape == (2, 3, 2)
    for group, keys in enumerate((slice(0, 128), slice(128, 200))):  # each group scaled by its own amax
        amax = v[:, keys].float().abs().amax(dim=(1, 3))
        assert torch.equal(descale_v[..., group], amax / 448)
        v8 = (v[:, keys].float() * (448 / amax)[:, None, :, None]).to(torch.float8_e4m3fn)
        assert torch.equal(v8_t[..., keys].view(torch.uint8), v8.permute(0, 2, 3, 1).view(torch.uint8))
    assert v8_t[..., 200:].view(torch.uint8).eq(0).all()
    loaded = load_pipeline("tiny", "bf16", device="cpu", attention="fp8_triton")
    assert loaded.pieces["attention"] == "sdpa" and "needs a CUDA GPU" in loaded.pieces["attention_fallback"]


def test_triton_fp8_attention_with_the_qkv_kernel_glue(monkeypatch):
    """The fused-projection path of fp8_triton (q/k/v prepared by `attention_kernel.quantize_qkv`, then the FP8
    kernel), run on the CPU with both kernels replaced by their torch references: SD3.5-style q/k RMS norms, joint
    and dual (self-)attention blocks, against 16-bit attention and the unfused fp8_triton path."""
    from diffusers import SD3Transformer2DModel

    from sd35fp8 import attention as attention_module, attention_kernel as ak

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32,
                                  pooled_projection_dim=64, out_channels=16, qk_norm="rms_norm",
                                  dual_attention_layers=(0,)).to(torch.bfloat16).eval()
    for module in model.modules():
        if type(module).__name__ == "RMSNorm":
            module.weight.data.uniform_(0.5, 2.0)
    fuse_projections(model)
    set_attention(model, "sdpa")
    expected = step(model)
    set_attention(model, "fp8_triton")
    unfused = step(model)  # the CPU path: no quantize_qkv
    attentions = [m for m in model.modules() if hasattr(m, "fp8_qk_scales")]  # kept once, not in the state dict
    assert len(attentions) == 3 and not any(k.endswith("fp8_qk_scales") for k in model.state_dict())
    calls, given = [], []

    def quantize_qkv(qkv, context_qkv, norms, heads, scales):
        calls.append(context_qkv is not None)
        given.append(scales)
        return ak.quantize_qkv_reference(qkv, context_qkv, norms, heads, scales)

    def flash(q8, k8, v8, dq, dk, dv, attn_scale, v_transposed=False, config=None):
        assert v_transposed and v8.shape[-1] % 16 == 0 and v8.shape[-1] >= q8.shape[1]
        v_natural = v8[..., :q8.shape[1]].permute(0, 3, 1, 2)
        return ak.flash_attention_fp8_reference(q8, k8, v_natural, dq, dk, dv, attn_scale).to(torch.bfloat16)

    monkeypatch.setattr(attention_module, "triton_prepares", lambda x: True)
    monkeypatch.setattr(ak, "quantize_qkv", quantize_qkv)
    monkeypatch.setattr(ak, "flash_attention_fp8", flash)
    fused = step(model)
    assert sorted(set(calls)) == [False, True]  # joint attentions (with context) and the dual self-attention
    assert all(any(torch.equal(scales, a.fp8_qk_scales[:2]) for a in attentions) for scales in given)
    assert relative_error(fused, expected) < 0.1
    assert relative_error(fused, unfused) < 1e-3  # the references do the unfused path's arithmetic: same scales, same layout


def test_prompt_cache_bounds_and_lru():
    def embeddings(size):
        return PromptEmbeddings(torch.zeros(size, dtype=torch.uint8), torch.zeros(0), None, None)

    cache = PromptCache(max_entries=2, max_bytes=100)
    cache.put("a", embeddings(40))
    cache.put("b", embeddings(40))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", embeddings(40))  # over 100 bytes: b (least recent) goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    cache.put("d", embeddings(10))  # over 2 entries: a goes
    assert len(cache) == 2 and cache.get("a") is None and cache.bytes == 50
    cache.put("huge", embeddings(101))
    assert cache.get("huge") is None


def test_repeated_prompt_and_comparison_skip_the_text_encoders():
    fp8_pipe = load_pipeline("tiny", "fp8", device="cpu")
    base = with_transformer(fp8_pipe, load_transformer("tiny", "bf16"), "bf16")
    calls = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        getattr(fp8_pipe.pipe, name).register_forward_hook(lambda *a, name=name: calls.append(name))
    request = GenerationRequest("a red cat", steps=1, width=64, height=64, seed=3)
    first = generate(fp8_pipe, request)
    encoded = len(calls)
    assert encoded > 0 and not first.prompt_cache_hit
    second = generate(base, request)  # the other precision: same encoders, same cache
    third = generate(fp8_pipe, request)
    assert second.prompt_cache_hit and third.prompt_cache_hit and len(calls) == encoded
    assert np.array_equal(np.asarray(first.image), np.asarray(third.image))
    batch = generate(fp8_pipe, dataclasses.replace(request, batch_size=2))
    assert len(batch.images) == 2 and batch.prompt_cache_hit
    t5_calls = calls.count("text_encoder_3")
    fresh = generate(fp8_pipe, dataclasses.replace(request, prompt="a blue cat"))  # the same ("") negative prompt
    assert not fresh.prompt_cache_hit and calls.count("text_encoder_3") == t5_calls + 1  # only the new text encoded


def test_cached_embeddings_give_the_same_image_as_the_pipeline():
    loaded = load_pipeline("tiny", "bf16", device="cpu", prompt_cache=False)
    request = GenerationRequest("a photo of a dog", negative_prompt="blurry", steps=2, width=64, height=64, seed=5)
    ours = generate(loaded, request).image
    theirs = loaded.pipe(prompt=request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=2,
                         guidance_scale=request.guidance, width=64, height=64,
                         generator=torch.Generator("cpu").manual_seed(5), output_type="pil").images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_on_demand_encoders_stream_t5_block_by_block():
    pipe = build_tiny_pipeline()
    reference = pipe.encode_prompt("a cat", None, None, device="cpu", do_classifier_free_guidance=False)[0]
    clip_params = {n: p.data_ptr() for n, p in pipe.text_encoder.named_parameters()}
    placement = OnDemandEncoders(pipe, torch.device("cpu"), pin=False, hooks=True)  # copies to "cpu" stand in
    t5 = pipe.text_encoder_3
    masters = {name: p.data_ptr() for name, p in t5.named_parameters()}
    blocks = list(t5.encoder.block)
    seen = []  # per block: did it run on uploaded copies, and which other blocks held copies meanwhile
    for index, block in enumerate(blocks):
        def look(module, _args, index=index):  # runs after the placement's own pre-hook
            own = all(p.data_ptr() != masters[f"encoder.block.{index}.{n}"] for n, p in module.named_parameters())
            others = [i for i, b in enumerate(blocks) if i != index and
                      any(p.data_ptr() != masters[f"encoder.block.{i}.{n}"] for n, p in b.named_parameters())]
            seen.append((own, others))
        block.register_forward_pre_hook(look)
    out = pipe.encode_prompt("a cat", None, None, device="cpu", do_classifier_free_guidance=False)[0]
    assert torch.allclose(out, reference, atol=1e-5)
    assert seen == [(True, [])] * len(blocks)  # each block ran on its copy; the one before it was already dropped
    assert placement.uploads == 1 + len(blocks) and placement.most_units_placed == 3  # stem, this block, the next
    assert {n: p.data_ptr() for n, p in t5.named_parameters()} == masters  # all dropped after
    assert {n: p.data_ptr() for n, p in pipe.text_encoder.named_parameters()} == clip_params  # CLIP stays put
    assert "streamed to the GPU block by block" in placement.describe()
    placement.remove()


def test_on_demand_encoders_keep_the_first_t5_blocks_that_fit():
    from sd35fp8 import settings
    from sd35fp8.loading import module_bytes, on_demand_keep_bytes

    pipe = build_tiny_pipeline()
    reference = pipe.encode_prompt("a cat", None, None, device="cpu", do_classifier_free_guidance=False)[0]
    blocks = list(pipe.text_encoder_3.encoder.block)
    probe = OnDemandEncoders(build_tiny_pipeline(), torch.device("cpu"), pin=False, hooks=True)
    sizes = [unit.nbytes for unit in next(iter(probe.units.values()))]  # stem, block 0, block 1
    probe.remove()
    placement = OnDemandEncoders(pipe, torch.device("cpu"), pin=False, hooks=True, keep_bytes=sizes[0] + sizes[1])
    assert placement.kept_bytes() == sizes[0] + sizes[1] and len(placement.kept) == 2  # stem and block 0
    units = next(iter(placement.units.values()))
    assert units[0].host is None and units[1].host is None and units[2].host is not None  # kept: no CPU copy left
    for _ in range(2):  # every prompt copies only the blocks not kept
        out = pipe.encode_prompt("a cat", None, None, device="cpu", do_classifier_free_guidance=False)[0]
        assert torch.allclose(out, reference, atol=1e-5)
    assert placement.uploads == 2 * (len(blocks) - 1)
    assert "(2 of 3 pieces: stem, blocks) stays on the GPU" in placement.describe()
    placement.remove()
    # the budget: the card's memory less what the placement puts on it and the activations' headroom
    placed = sum(module_bytes(m) for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2))
    headroom = settings.SPEED.on_demand_headroom_bytes
    assert on_demand_keep_bytes(pipe, torch.device("cpu"), budget_bytes=placed + headroom + 123) == 123
    assert on_demand_keep_bytes(pipe, torch.device("cpu"), budget_bytes=placed) == 0
    assert on_demand_keep_bytes(pipe, torch.device("cpu")) == 0  # no GPU: nothing to keep


def test_vae_tiles_above_the_threshold(monkeypatch):
    from sd35fp8 import settings

    loaded = load_pipeline("tiny", "bf16", device="cpu")
    request = GenerationRequest("a cat", steps=1, width=64, height=64)
    assert not generate(loaded, request).vae_tiling
    monkeypatch.setattr(settings, "SPEED", dataclasses.replace(settings.SPEED, vae_tiling_above_pixels=64 * 64 - 1))
    result = generate(loaded, request)
    assert result.vae_tiling and result.ok


def test_gpu_duration_uses_measured_seconds_per_step():
    from sd35fp8.zerogpu import gpu_duration, seconds_per_step

    class Loaded:
        step_seconds = {}

    request = GenerationRequest("a cat", steps=28, width=1024, height=1024)
    unmeasured = gpu_duration(request, [Loaded()], margin_s=10, max_s=300)
    Loaded.step_seconds = {(1024, 1024, 1): 0.1}
    assert seconds_per_step(Loaded(), 1024, 1024, 1) == (0.1, True)
    measured = gpu_duration(request, [Loaded()], margin_s=10, max_s=300)
    assert measured == int(-(-(10 + 28 * 0.1 + 3.0) // 1)) and measured < unmeasured
    assert gpu_duration(request, [Loaded(), Loaded()], margin_s=10, max_s=300) > measured  # FP16 vs FP8: both
    scaled, exact = seconds_per_step(Loaded(), 2048, 2048, 1)
    assert not exact and scaled > 0.4
    assert gpu_duration(dataclasses.replace(request, steps=100, width=2048, height=2048), [Loaded()], margin_s=10,
                        max_s=60) == 60


def test_loaded_pipeline_reports_its_pieces():
    from sd35fp8.speed import describe_pieces

    loaded = load_pipeline("tiny", "fp8", device="cpu", fuse_projections=True, fuse_gelu=True)
    pieces = loaded.pieces
    assert pieces["fp8_path"] == "dequant" and pieces["fused_projections"] == 2 and pieces["attention"] == "sdpa"
    assert pieces["fused_gelu"] == 3  # two blocks' image MLPs and the first block's context MLP
    assert pieces["compile"] == "off" and pieces["cuda_graphs"] is False and pieces["text_encoders"] == "gpu"
    assert pieces["encoder_graphs"] == 0 and pieces["text_encoder_fp8"] is None  # CPU; T5 16-bit in the tiny model
    line = describe_pieces(pieces)
    assert "fused q/k/v in 2 attentions" in line and "GELU + FP8 quantization in one kernel in 3 MLPs" in line
    assert "prompt cache" in line
    assert generate(loaded, GenerationRequest("a cat", steps=1, width=64, height=64)).ok
    auto = load_pipeline("tiny", "fp8", device="cpu").pieces  # auto: both off on the CPU
    assert auto["fused_projections"] == 0 and auto["fused_gelu"] == 0


def test_prepare_transformer_fuses_adaln_where_asked_and_reports_it():
    from sd35fp8.speed import SpeedOptions, describe_pieces, prepare_transformer

    cpu = torch.device("cpu")
    transformer = tiny_transformer()
    quantize_linears(transformer, "scaled_mm")
    pieces = prepare_transformer(transformer, cpu, SpeedOptions(fuse_projections=True, fuse_norm=True).resolved(cpu))
    assert pieces["fused_norm"] == 2 and "fused_norm_fallback" not in pieces
    assert "adaLN + FP8 quantization in one kernel in 2 blocks" in describe_pieces(pieces)
    untouched = tiny_transformer()
    quantize_linears(untouched, "scaled_mm")
    assert prepare_transformer(untouched, cpu, SpeedOptions().resolved(cpu))["fused_norm"] == 0  # auto: off on CPU


def test_fast_accumulation_reaches_every_fp8_gemm_and_has_a_switch(monkeypatch):
    """`fast_accum` (auto: on CUDA) passes `use_fast_accum=True` to every FP8 GEMM of the prepared transformer,
    fused layers included; it is off on the CPU and when switched off, and compiled block code of one setting is
    kept apart from the other's."""
    from sd35fp8.speed import SpeedOptions, aot_fingerprint, describe_pieces, prepare_transformer

    cpu = torch.device("cpu")
    assert SpeedOptions().resolved("cuda").fast_accum is True and SpeedOptions().resolved(cpu).fast_accum is False
    assert SpeedOptions(fast_accum=False).resolved("cuda").fast_accum is False
    transformer = tiny_transformer()
    quantize_linears(transformer, "scaled_mm")
    before = aot_fingerprint(transformer, cpu)
    expected = step(transformer)
    pieces = prepare_transformer(transformer, cpu, SpeedOptions(fuse_projections=True, fuse_norm=True,
                                                                fast_accum=True).resolved(cpu))
    layers = [m for m in transformer.modules() if isinstance(m, Fp8Linear)]
    assert pieces["fast_accum"] == len(layers) and all(layer.fast_accum for layer in layers)
    assert "fast accumulation" in describe_pieces(pieces) and aot_fingerprint(transformer, cpu) != before
    seen = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: seen.append(k["use_fast_accum"]) or scaled_mm(*a, **k))
    assert relative_error(step(transformer), expected) < 0.02  # the CPU's GEMM ignores the flag
    assert seen and all(seen)
    plain = tiny_transformer()
    quantize_linears(plain, "scaled_mm")
    assert prepare_transformer(plain, cpu, SpeedOptions().resolved(cpu))["fast_accum"] == 0

    def refuses_fast_accum(*args, use_fast_accum=False, **kwargs):  # a GPU whose GEMMs refuse the flag
        if use_fast_accum:
            raise RuntimeError("fast accumulation is not supported here")
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", refuses_fast_accum)
    monkeypatch.setattr(fp8, "_PROBES", {})
    pieces = prepare_transformer(plain, cpu, SpeedOptions(fast_accum=True).resolved(cpu))
    assert pieces["fast_accum"] == 0 and "not supported here" in pieces["fast_accum_fallback"]
    assert fp8.probe_scaled_mm(cpu)["rowwise"] == "ok" and torch.isfinite(step(plain)).all()


def test_auto_attention_is_the_fp8_kernel_for_fp8_transformers_on_hopper_only(monkeypatch):
    """"auto" picks the Triton FP8 attention where it was measured faster (Hopper, SM 9.0) and only for FP8
    transformers (the 16-bit reference keeps 16-bit SDPA); other GPUs, the CPU and an explicit choice keep theirs."""
    from sd35fp8 import attention_kernel
    from sd35fp8.speed import SpeedOptions

    cuda = torch.device("cuda")
    monkeypatch.setattr(attention_kernel, "available", lambda: True)
    for capability, fp8, expected in (((9, 0), True, "fp8_triton"), ((9, 0), False, "sdpa"),
                                      ((8, 9), True, "sdpa"), ((10, 0), True, "sdpa"), ((12, 0), True, "sdpa")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert SpeedOptions().resolved(cuda, fp8_weights=fp8).attention == expected, (capability, fp8)
    assert SpeedOptions(attention="sdpa").resolved(cuda, fp8_weights=True).attention == "sdpa"
    assert SpeedOptions().resolved("cpu", fp8_weights=True).attention == "sdpa"
    monkeypatch.setattr(attention_kernel, "available", lambda: False)  # no Triton
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert SpeedOptions().resolved(cuda, fp8_weights=True).attention == "sdpa"


def test_auto_cuda_graphs_where_compiled_on_cuda_and_memory_is_not_tight(monkeypatch):
    from sd35fp8.speed import SpeedOptions

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert SpeedOptions(compile="regional").resolved(cuda).cuda_graphs is True
    auto = SpeedOptions(compile="auto").resolved(cuda, fp8_weights=True)
    assert auto.compile == "precompiled" and auto.cuda_graphs is True  # torch 2.13 saves compiled functions
    assert SpeedOptions(compile="auto").resolved("cpu").compile == "off"
    assert SpeedOptions(compile="full").resolved(cuda, fp8_weights=True).cuda_graphs is True
    assert SpeedOptions(compile="regional").resolved(cuda, memory_tight=True).cuda_graphs is False  # 16 GB, offload
    assert SpeedOptions(compile="aot").resolved(cuda).cuda_graphs is False
    assert SpeedOptions(compile=False).resolved(cuda).cuda_graphs is False  # eager: not measured
    assert SpeedOptions(compile="regional", cuda_graphs=False).resolved(cuda).cuda_graphs is False
    assert SpeedOptions(compile="regional", cuda_graphs=True).resolved(cuda, memory_tight=True).cuda_graphs is True
    assert SpeedOptions(compile="regional").resolved("cpu").cuda_graphs is False
    # the text encoders' graphs: on CUDA for both precisions, compiled or not, unless memory is tight
    assert SpeedOptions().resolved(cuda).encoder_graphs is True and SpeedOptions().resolved(cuda, True).encoder_graphs
    assert SpeedOptions().resolved(cuda, memory_tight=True).encoder_graphs is False
    assert SpeedOptions().resolved("cpu").encoder_graphs is False
    assert SpeedOptions(encoder_graphs=False).resolved(cuda).encoder_graphs is False
    from sd35fp8.loading import LoadedPipeline  # what with_transformer passes on: the first pipeline's placement

    assert LoadedPipeline(None, "x", "fp8", cuda, None, 0.0, offload=True).memory_tight
    assert LoadedPipeline(None, "x", "fp8", cuda, None, 0.0, encoders=object()).memory_tight
    assert not LoadedPipeline(None, "x", "fp8", cuda, None, 0.0).memory_tight


def test_unknown_speed_options_are_refused_by_name():
    with pytest.raises(TypeError, match="unknown speed option\\(s\\) fuse_everything; choose from .*fuse_norm"):
        load_pipeline("tiny", "fp8", device="cpu", fuse_everything=True)


def test_auto_compile_compiles_the_tensorwise_path_too():
    """compile=True/"auto" compiles the tensor-wise path like the row-wise one (it was kept eager until its
    compiled speed was measured: 95.1 ms a Large step on the H200, precompiled, against 252.6 ms eager)."""
    from sd35fp8.speed import SpeedOptions, prepare_transformer

    transformer = tiny_transformer()
    quantize_linears(transformer, "scaled_mm_tensorwise")
    pieces = prepare_transformer(transformer, torch.device("cpu"),
                                 SpeedOptions(compile=True, compile_backend="eager").resolved("cpu"))
    assert pieces["compile"].startswith("regional") and "compile_skipped" not in pieces


def test_fused_adaln_blocks_export_for_aot_inductor():
    """compile="aot" exports each block kind with torch.export: the fused block must export and compute the same."""
    from sd35fp8.blocks import fuse_norm_quantize
    from sd35fp8.compile import capture_block_calls

    model = tiny_transformer()
    quantize_linears(model, "scaled_mm")
    fuse_projections(model)
    set_attention(model, "sdpa")
    assert fuse_norm_quantize(model) == 2
    with capture_block_calls(model) as calls:
        step(model)
    for kind, (args, kwargs) in calls.items():
        block = model.transformer_blocks[0 if kind == "block" else -1]
        exported = torch.export.export(block, args, kwargs)
        ours, theirs = exported.module()(*args, **kwargs), block(*args, **kwargs)
        for got, want in zip(ours, theirs):
            assert (got is None and want is None) or torch.equal(got, want), kind


def test_aot_packages_of_fused_and_unfused_blocks_live_apart():
    """An AOTInductor package holds one block code: a transformer with other fusions must not load it."""
    from sd35fp8.blocks import fuse_norm_quantize
    from sd35fp8.speed import aot_fingerprint

    model = tiny_transformer()
    quantize_linears(model, "scaled_mm")
    set_attention(model, "sdpa")
    seen = {aot_fingerprint(model, torch.device("cpu"))}
    for fuse in (fuse_gelu_quantize, fuse_norm_quantize):
        assert fuse(model) > 0
        seen.add(aot_fingerprint(model, torch.device("cpu")))
    assert len(seen) == 3


def test_compiled_block_code_of_another_project_version_is_not_loaded(monkeypatch):
    """Saved compiled blocks embed the project's kernels: a changed kernel source gets a new folder (an older
    version's functions would otherwise keep running the old kernels)."""
    from sd35fp8 import speed

    model = tiny_transformer()
    before = speed.aot_fingerprint(model, torch.device("cpu"))
    assert speed.aot_fingerprint(model, torch.device("cpu")) == before  # stable (also across processes: file bytes)
    monkeypatch.setattr(speed, "_source_digest", lambda: "a later version")
    assert speed.aot_fingerprint(model, torch.device("cpu")) != before
