"""The tiny-shapes model: data and detector agree, training runs, and the shipped model keeps its fidelity in FP8.

The fidelity tests run on the trained model shipped in `sd35fp8/models/tiny-shapes`, converted once (module
fixture) through `python -m convert` and loaded through the project's loader: FP8 images must stay close to
the 16-bit ones (SSIM) and read back as the same captions (caption accuracy by the analytic detector).
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from convert.cli import main as convert_main
from sd35fp8.errors import BadInput, run_command
from sd35fp8.loading import load_pipeline
from sd35fp8.metrics import ssim
from sd35fp8.tiny import SHAPES_GUIDANCE, SHAPES_STEPS
from shapes import data, detector, train
from shapes.model import ModelConfig, build_pipeline

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "sd35fp8" / "models" / "tiny-shapes"
SETTINGS = dict(num_inference_steps=SHAPES_STEPS, guidance_scale=SHAPES_GUIDANCE, height=128, width=128)


def test_captions_parse_back_and_hold_out_is_never_trained_on():
    rng = random.Random(0)
    for scene in data.batch(rng, 300, "train"):
        assert data.parse_caption(scene.caption) == scene.spec
        assert data.split(scene.spec) == "train"
    specs = data.eval_specs(200)
    assert len({s.caption for s in specs}) == 200
    assert all(data.split(s) == "heldout" for s in specs)
    assert sum(len(s.objects) == 1 and s.objects[0] in data.HELD_OUT_PAIRS for s in specs) == 120
    assert data.parse_caption("An orange circle on the left on a blue background.") == data.Spec(
        "blue", (("orange", "circle"),), None, "left")
    assert data.parse_caption("a cat on a mat") is None


def test_caption_space_is_enumerated_exactly():
    specs = data.all_specs("train")
    assert len(specs) == len(set(specs)) and all(data.split(s) == "train" for s in specs)
    assert not set(specs) & set(data.all_specs("heldout"))
    rng = random.Random(3)
    drawn = data.batch(rng, 3000, "train")
    assert {scene.spec for scene in drawn} <= set(specs)
    captions = data.all_captions("train")  # what training warms the tokenizer cache with
    assert {data.variant(scene.caption, rng) for scene in drawn} <= captions
    assert len(captions) == 25168 and "A orange square on a blue background." in captions


def test_rendering_is_deterministic():
    scenes = data.batch(random.Random(5), 8)
    assert torch.equal(data.render(scenes, 64), data.render(data.batch(random.Random(5), 8), 64))


@pytest.mark.parametrize("resolution", [64, 128, 256])
def test_detector_reads_rendered_ground_truth(resolution):
    rng = random.Random(resolution)
    count = {64: 150, 128: 150, 256: 40}[resolution]
    scenes = data.batch(rng, count // 2) + [data.layout(s, rng) for s in data.eval_specs(count - count // 2)]
    images = data.to_uint8(data.render(scenes, resolution))
    correct = [detector.score(scene.spec, image)["correct"] for scene, image in zip(scenes, images)]
    assert sum(correct) / len(correct) >= (0.97 if resolution == 64 else 0.99)


def test_detector_rejects_wrong_captions():
    scene = data.layout(data.Spec("blue", (("red", "circle"),)), random.Random(0))
    image = data.to_uint8(data.render([scene], 128))[0]
    assert detector.score(scene.spec, image)["correct"]
    for wrong in (data.Spec("green", (("red", "circle"),)), data.Spec("blue", (("yellow", "circle"),)),
                  data.Spec("blue", (("red", "square"),)), data.Spec("blue", (("red", "circle"),), "small"),
                  data.Spec("blue", (("red", "circle"),), None, "left"),
                  data.Spec("blue", (("red", "circle"), ("red", "square")))):
        assert not detector.score(wrong, image)["correct"], wrong


def test_training_two_iterations_writes_a_loadable_pipeline(tmp_path):
    out = tmp_path / "pipe"
    args = ["--out", str(out), "--config", "tiny", "--iterations", "2", "--vae-iterations", "2", "--batch", "2",
            "--vae-batch", "2", "--resolutions", "64", "--device", "cpu", "--checkpoint-dir", str(tmp_path / "ck"),
            "--train-text-encoders"]
    assert train.main(args) == 0
    for name in ("README.md", "loss_curve.png", "training_log.json", "model_index.json"):
        assert (out / name).is_file(), name
    log = json.loads((out / "training_log.json").read_text())
    assert log["iterations_done"] == 2 and log["vae_iterations_done"] == 2
    pipe = StableDiffusion3Pipeline.from_pretrained(out)  # stock diffusers, no dtype given
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert np.isfinite(image).all()
    # The checkpoint written alongside rebuilds the same pipeline.
    assert train.main(["--from-checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "again")]) == 0
    for part in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_3/model.safetensors"):
        assert (out / part).read_bytes() == (tmp_path / "again" / part).read_bytes()
    # Training goes on from a pipeline folder (e.g. the shipped model), keeping its VAE.
    more = tmp_path / "more"
    assert train.main(["--out", str(more), "--config", "tiny", "--init-from", str(out), "--vae-iterations", "0",
                       "--iterations", "1", "--batch", "2", "--resolutions", "64", "--device", "cpu"]) == 0
    assert (more / "vae/diffusion_pytorch_model.safetensors").read_bytes() == (out / "vae/diffusion_pytorch_model.safetensors").read_bytes()
    assert json.loads((more / "training_log.json").read_text())["init_from"]["iterations"] == 2


def test_training_stopped_and_continued_equals_one_run(tmp_path):
    common = ["--config", "tiny", "--iterations", "3", "--vae-iterations", "1", "--batch", "2", "--vae-batch", "2",
              "--resolutions", "64", "--device", "cpu"]
    assert train.main(["--out", str(tmp_path / "one"), *common]) == 0
    state, resumed = tmp_path / "state", tmp_path / "resumed"
    for _ in range(2):  # stops after one transformer iteration each time, keeping the full state
        assert train.main(["--out", str(resumed), *common, "--state-dir", str(state), "--stop-after", "0"]) == 0
        assert (state / "state.json").is_file() and not resumed.exists()
    with pytest.raises(BadInput, match="other settings .*batch"):
        train.main(["--out", str(resumed), *common, "--batch", "4", "--state-dir", str(state)])
    assert train.main(["--out", str(resumed), *common, "--state-dir", str(state)]) == 0
    assert not (state / "state.json").exists()  # spent
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (resumed / part).read_bytes() == (tmp_path / "one" / part).read_bytes(), part
    log = json.loads((resumed / "training_log.json").read_text())
    assert log["iterations_done"] == 3 and len(log["segments"]) == 3
    assert [step for step, *_ in log["transformer_loss"]] == [1]  # one log entry per logged step, none repeated
    assert run_command(lambda: train.main(["--out", str(resumed), "--stop-after", "5"])) == 2  # no --state-dir


def test_training_time_limit_decides_the_iterations_unless_they_are_given():
    def settings(*extra):
        return train.settings_from(train.build_parser().parse_args(["--out", "x", *extra]))

    assert settings().iterations == train.TrainSettings.iterations
    limited = settings("--time-limit", "900")  # not capped by the default count
    assert limited.iterations == limited.vae_iterations == train.UNBOUNDED
    assert settings("--time-limit", "900", "--iterations", "50").iterations == 50


def test_training_kernels_are_strictly_deterministic_and_the_card_says_which_mode_ran():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        train.set_kernels(torch.device("cpu"), deterministic=True)
        assert train.kernel_mode() == "deterministic"  # strict: an op without a deterministic kernel raises
        train.set_kernels(torch.device("cpu"), deterministic=False)
        assert train.kernel_mode() == "non-deterministic"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    old_log = {"device": "NVIDIA H200", "settings": {"deterministic": True, "lr": 6e-4}, "seconds": 1.0}  # no "kernels" yet
    assert train.training_runs(old_log)[0]["kernels"] == "warn-only"
    assert "warnings only" in train._runs_table(train.training_runs(old_log))
    assert "deterministic kernels" in train._runs_table(train.training_runs({**old_log, "kernels": "deterministic"}))


def test_training_prompt_encoder_matches_the_pipeline():
    pipe = build_pipeline(ModelConfig.tiny())
    captions = ["a red circle on a blue background", "", "A small orange square on the left on a black background.",
                "a purple zebra"]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False)
        mine, mine_pooled = train.PromptEncoder(pipe)(captions, torch.device("cpu"))
        warmed = train.PromptEncoder(pipe)
        warmed.warm(captions, chunk=3)  # batched tokenization, the path a timed run takes
        assert set(warmed.cache) == set(captions)
        from_warm, from_warm_pooled = warmed(captions, torch.device("cpu"))
        frozen = train.PromptEncoder(pipe)
        frozen.freeze(captions, torch.device("cpu"), chunk=3)  # frozen encoders: every caption encoded once
        from_table, from_table_pooled = frozen(captions[::-1], torch.device("cpu"))
        lazy = train.PromptEncoder(pipe)
        lazy.freeze(captions + ["a blue square on a red background"], torch.device("cpu"), upfront=False)
        lazy(captions[:2], torch.device("cpu"))  # encoded when first asked for
        from_lazy, from_lazy_pooled = lazy(captions[::-1], torch.device("cpu"))
        assert lazy.filled == set(captions)
    assert torch.equal(embeds, mine) and torch.equal(pooled, mine_pooled)
    assert torch.equal(embeds, from_warm) and torch.equal(pooled, from_warm_pooled)
    assert torch.allclose(embeds.flip(0), from_table, atol=1e-6) and torch.allclose(pooled.flip(0), from_table_pooled, atol=1e-6)
    assert torch.allclose(embeds.flip(0), from_lazy, atol=1e-6) and torch.allclose(pooled.flip(0), from_lazy_pooled, atol=1e-6)


def test_training_leaves_the_text_encoders_as_seeded_by_default(tmp_path):
    out = tmp_path / "frozen"
    assert train.main(["--out", str(out), "--config", "tiny", "--iterations", "2", "--vae-iterations", "1",
                       "--batch", "2", "--vae-batch", "2", "--resolutions", "64", "--device", "cpu"]) == 0
    seeded = build_pipeline(ModelConfig.tiny())
    trained = StableDiffusion3Pipeline.from_pretrained(out)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        for key, value in getattr(seeded, name).state_dict().items():
            assert torch.equal(getattr(trained, name).state_dict()[key].float(), value.to(train.storage_dtype(name)).float()), (name, key)
    assert not json.loads((out / "training_log.json").read_text())["cuda_graphs"]  # CUDA only


# ------------------------------------------------------------------------------------ the shipped model


def test_shipped_model_is_small_and_documented():
    files = [f for f in SHIPPED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25e6
    assert (SHIPPED / "README.md").is_file() and (SHIPPED / "loss_curve.png").is_file()
    assert StableDiffusion3Pipeline.load_config(SHIPPED)["_class_name"] == "StableDiffusion3Pipeline"


@pytest.fixture(scope="module")
def shipped_fp8(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-shapes") / "fp8"
    assert convert_main([str(SHIPPED), "--out", str(out), "--verify-size", "128", "--verify-steps", "2", "--device", "cpu"]) == 0
    return out


FIXED = data.eval_specs(200)[::5]  # the fixed set: 40 unseen colour/shape pairs and unseen two-object captions


def _render(pipe, specs, seed=0):
    generator = torch.Generator("cpu").manual_seed(seed)
    images = pipe(prompt=[s.caption for s in specs], generator=generator, output_type="pil", **SETTINGS).images
    return images


@pytest.fixture(scope="module")
def shipped_images(shipped_fp8):
    """40 images from the 16-bit weights and from their FP8 conversion, both computed in float32: what differs is the
    weights (bf16 arithmetic on a CPU without native bf16 made this fixture take 487 s instead of about a minute)."""
    base = load_pipeline(str(SHIPPED), "bf16", device="cpu", dtype=torch.float32)
    fp8 = load_pipeline(str(shipped_fp8), "fp8", device="cpu", fp8_path="dequant", dtype=torch.float32)
    assert fp8.fp8_path == "dequant"
    return _render(base.pipe, FIXED), _render(fp8.pipe, FIXED)


def test_fp8_images_match_16bit(shipped_images):
    base, fp8 = shipped_images
    values = [ssim(a, b) for a, b in zip(base, fp8)]
    print("SSIM FP8 vs 16-bit:", [round(v, 3) for v in values])
    assert min(values) >= 0.9, values


def test_fp8_caption_accuracy_within_5_points_of_16bit(shipped_images):
    base, fp8 = shipped_images
    scores = [[detector.score(s, im) for s, im in zip(FIXED, images)] for images in (base, fp8)]
    for attribute in ("correct", "shapes"):  # caption accuracy, and the attribute the model gets wrong most often
        accuracy = [100 * sum(r[attribute] for r in rows) / len(rows) for rows in scores]
        print(attribute, accuracy)
        assert abs(accuracy[1] - accuracy[0]) <= 5, (attribute, accuracy)


def test_stock_diffusers_runs_the_fp8_variant(shipped_fp8):
    pipe = StableDiffusion3Pipeline.from_pretrained(shipped_fp8, variant="fp8", dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a blue background", generator=torch.Generator("cpu").manual_seed(0),
                 **SETTINGS).images[0]
    assert detector.score(data.Spec("blue", (("red", "circle"),)), image)["correct"]
