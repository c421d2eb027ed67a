"""The core package: FP8 layers, the loader, request validation, image metrics."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sd35fp8.fp8 import Fp8Linear, apply_fp8_path, dequantize_blockwise, fp8_path_of, quantize_blockwise, \
    quanto_quantize
from sd35fp8.generate import Stopped, generate
from sd35fp8.loading import LoadError, check_loaded, load_pipeline, load_transformer, with_transformer
from sd35fp8.request import GenerationRequest, InvalidRequest, parse_setting
from sd35fp8.metrics import difference_heatmap, psnr, relative_error, ssim
from sd35fp8.tiny import SHAPES_GUIDANCE


def requires_sm89(test):
    """Skip unless a GPU with FP8 tensor cores is present (never on CI; the benchmarks cover it)."""
    from sd35fp8.fp8 import fp8_tensor_cores_available

    return pytest.mark.skipif(not fp8_tensor_cores_available(), reason="needs a GPU of compute capability >= 8.9")(test)


def quantized_linear(in_features=64, out_features=48, bias=True):
    torch.manual_seed(0)
    reference = nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16))
    model.load_state_dict(nn.Sequential(reference).state_dict())
    quanto_quantize(model)
    return reference, model


@pytest.mark.parametrize("mode", ["scaled_mm", "dequant"])
def test_fp8_linear_matches_16_bit_within_fp8_error(mode):
    reference, model = quantized_linear()
    assert apply_fp8_path(model, mode) == 1
    assert isinstance(model[0], Fp8Linear) and model[0].weight.dtype == torch.float8_e4m3fn
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    out = model(x)
    assert out.shape == (3, 7, 48) and out.dtype == torch.bfloat16
    assert relative_error(out, reference(x)) < 0.05


def test_scaled_mm_and_dequant_agree():
    _, a = quantized_linear()
    _, b = quantized_linear()
    apply_fp8_path(a, "scaled_mm")
    apply_fp8_path(b, "dequant")
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    assert relative_error(a(x), b(x)) < 0.05
    assert fp8_path_of(a) == "scaled_mm" and fp8_path_of(b) == "dequant"


def test_layers_the_fp8_matmul_cannot_take_fall_back_to_dequant():
    _, model = quantized_linear(in_features=40, out_features=24)
    apply_fp8_path(model, "scaled_mm")
    assert model[0].mode == "dequant"


def test_quanto_path_leaves_quanto_modules():
    _, model = quantized_linear()
    assert apply_fp8_path(model, "quanto") == 0 and fp8_path_of(model) == "quanto"
    with pytest.raises(ValueError, match="unknown FP8 path"):
        apply_fp8_path(model, "int4")


def test_blockwise_quantization_round_trip():
    weight = torch.randn(200, 300) * torch.logspace(-3, 1, 200)[:, None]
    data, scale = quantize_blockwise(weight)
    assert data.dtype == torch.float8_e4m3fn and scale.shape == (2, 3)
    restored = data.float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    assert relative_error(restored, weight) < 0.05
    assert torch.equal(dequantize_blockwise(data, scale), restored)  # partial blocks: the general path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_blockwise_dequantization_of_whole_blocks_equals_the_general_formula(dtype):
    weight = torch.randn(256, 384) * torch.logspace(-3, 1, 256)[:, None]
    data, scale = quantize_blockwise(weight)
    general = data.to(dtype) * scale.repeat_interleave(128, 0).repeat_interleave(128, 1).to(dtype)
    assert torch.equal(dequantize_blockwise(data, scale, dtype=dtype), general)


@requires_sm89
def test_scaled_mm_on_fp8_tensor_cores():
    reference, model = quantized_linear(256, 512)
    model, reference = model.cuda(), reference.cuda()
    apply_fp8_path(model, "scaled_mm")
    x = torch.randn(64, 256, dtype=torch.bfloat16, device="cuda")
    assert relative_error(model(x), reference(x)) < 0.05


def test_fp8_and_16_bit_pipelines_share_everything_but_the_transformer():
    fp8 = load_pipeline("shapes", "fp8", device="cpu")  # the trained built-in model: SSIM compares learned images
    assert fp8.fp8_path == "dequant"  # no FP8 tensor cores on a CPU
    base = with_transformer(fp8, load_transformer("shapes", "bf16"), "bf16")
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        assert getattr(base.pipe, name) is getattr(fp8.pipe, name)
    assert base.pipe.transformer is not fp8.pipe.transformer and base.fp8_path is None
    request = GenerationRequest("a red circle on a blue background", steps=2, width=128, height=128, seed=1,
                                guidance=SHAPES_GUIDANCE)
    a, b = generate(fp8, request), generate(base, request)
    assert a.ok and b.ok and a.image.size == (128, 128)
    assert ssim(a.image, b.image) > 0.95
    steps = []
    generate(fp8, request, on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 2), (2, 2)]


def test_fp8_load_of_a_16_bit_folder_says_to_convert(tiny_base):
    with pytest.raises(LoadError, match="python -m convert"):
        load_pipeline(str(tiny_base), "fp8", device="cpu")


def test_unknown_precision_and_bad_folder():
    with pytest.raises(ValueError, match="precision"):
        load_pipeline("tiny", "int3")
    with pytest.raises(LoadError, match="could not load"):
        load_pipeline("/nonexistent/folder", "bf16", device="cpu")


def test_meta_tensors_are_caught():
    loaded = load_pipeline("tiny", "bf16", device="cpu")
    loaded.pipe.vae.decoder.conv_out.weight = nn.Parameter(torch.empty(3, 16, 3, 3, device="meta"))
    with pytest.raises(LoadError, match="meta"):
        check_loaded(loaded.pipe)


@pytest.mark.parametrize("change, phrase", [
    (dict(prompt=""), "empty"),
    (dict(prompt="x" * 10_000), "limit"),
    (dict(width=100), "multiple of 16"),
    (dict(height=4096), "multiple of 16"),
    (dict(steps=0), "Steps"),
    (dict(guidance=99.0), "Guidance"),
    (dict(seed=-1), "Seed"),
])
def test_bad_requests_are_refused_clearly(change, phrase):
    settings = dict(prompt="a cat", width=64, height=64, steps=2) | change
    with pytest.raises(InvalidRequest, match=phrase):
        GenerationRequest(**settings)


@pytest.mark.parametrize("name, raw, phrase", [
    ("seed", "1.5", "Seed must be a whole number, not '1.5'"),
    ("seed", 1.5, "Seed must be a whole number, not 1.5"),
    ("seed", 10**400, "Seed 1000000000"),  # named, shortened, and no float overflow
    ("seed", "1e400", "Seed must be a finite number"),
    ("steps", None, "Steps is missing"),
    ("steps", True, "Steps must be a number"),
    ("guidance", "nan", "Guidance must be a finite number"),
    ("width", "100", "Width 100 is not allowed: use a multiple of 16 from 64 to 512"),
])
def test_raw_settings_are_parsed_strictly_and_named(name, raw, phrase):
    with pytest.raises(InvalidRequest, match=phrase.replace("(", r"\(")):
        parse_setting(name, raw, max_size=512)


def test_raw_settings_that_are_fine():
    assert parse_setting("seed", "12") == 12 and parse_setting("seed", 12.0) == 12
    assert parse_setting("guidance", "4.5") == 4.5 and parse_setting("width", 512, max_size=512) == 512


def test_generation_stops_between_steps_when_asked():
    loaded = load_pipeline("tiny", "bf16", device="cpu")
    done = []
    with pytest.raises(Stopped, match="cancelled"):
        generate(loaded, GenerationRequest("a cat", steps=5, width=64, height=64), on_step=lambda d, t: done.append(d),
                 should_stop=lambda: "cancelled" if len(done) >= 2 else None)
    assert done == [1, 2]


def test_parameters_text_is_a1111_style():
    text = GenerationRequest("a cat", negative_prompt="blurry", seed=7, steps=4, width=64, height=80).parameters_text
    assert text.startswith("a cat\nNegative prompt: blurry\nSteps: 4,") and "Seed: 7" in text and "Size: 64x80" in text


def test_metrics():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noisy = Image.fromarray(np.clip(np.asarray(image) + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8))
    assert ssim(image, image) == pytest.approx(1.0) and psnr(image, image) == float("inf")
    assert 0 < ssim(image, noisy) < 0.99 and 15 < psnr(image, noisy) < 30
    heatmap = difference_heatmap(image, noisy)
    assert heatmap.size == (64, 64) and np.asarray(difference_heatmap(image, image)).max() == 0
    # SSIM's separable blur equals the textbook one: each local mean as one 11x11 Gaussian window, pixel by pixel
    x, y = (np.asarray(i, dtype=np.float64) / 255.0 for i in (image, noisy))
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()

    def mean(t):
        return np.array([[[(t[r:r + 11, c:c + 11, ch] * window).sum() for ch in range(3)] for c in range(54)]
                         for r in range(54)])

    mx, my = mean(x), mean(y)
    vx, vy, cov = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    textbook = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert ssim(image, noisy) == pytest.approx(textbook.mean(), abs=1e-12)
