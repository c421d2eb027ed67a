"""Conversion round trip and bad inputs, on tiny SD3 pipelines (CPU, offline)."""

import filecmp
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from convert import cli, quantize
from convert.checkpoint import SafetensorsReader, ShardedWriter
from convert.publish import PublishError, push
from sd35fp8.loading import load_pipeline

SIXTEEN_BIT = ["text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"]


def run_convert(*argv):
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def converted(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "tiny-fp8"
    code = run_convert(tiny_base, "--out", out, "--device", "cpu", "--max-shard-size", "200KB",
                       "--verify-images", 2, "--verify-size", 64, "--verify-steps", 2)
    assert code == 0
    return out


def test_output_is_a_complete_fp8_variant_repo(converted):
    assert (converted / "model_index.json").is_file()
    transformer = sorted(p.name for p in (converted / "transformer").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.fp8.json" in transformer
    shards = [n for n in transformer if re.fullmatch(r"diffusion_pytorch_model\.fp8-\d{5}-of-\d{5}\.safetensors", n)]
    assert len(shards) >= 2
    assert (converted / "text_encoder_3" / "model.fp8.safetensors").is_file()
    assert not list(converted.rglob("*.bin")) and not list(converted.rglob("*.partial*"))
    assert not list(converted.parent.glob(".*partial*"))


def test_fp8_data_is_really_e4m3(converted):
    index = json.loads((converted / "transformer" / "diffusion_pytorch_model.safetensors.index.fp8.json").read_text())
    shard = converted / "transformer" / index["weight_map"]["transformer_blocks.0.attn.to_q.weight._data"]
    with safe_open(shard, "pt") as f:
        assert f.get_tensor("transformer_blocks.0.attn.to_q.weight._data").dtype == torch.float8_e4m3fn
    with safe_open(converted / "text_encoder_3" / "model.fp8.safetensors", "pt") as f:
        assert f.get_tensor("encoder.block.0.layer.0.SelfAttention.q.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("encoder.block.0.layer.0.SelfAttention.q.weight_scale_inv").dtype == torch.float32


def test_sixteen_bit_components_are_byte_identical(tiny_base, converted):
    for name in SIXTEEN_BIT:
        comparison = filecmp.dircmp(tiny_base / name, converted / name)
        assert not comparison.left_only and not comparison.right_only, name
        _, mismatch, errors = filecmp.cmpfiles(tiny_base / name, converted / name, comparison.common_files, shallow=False)
        assert not mismatch and not errors, name
    assert filecmp.cmp(tiny_base / "model_index.json", converted / "model_index.json", shallow=False)


def test_model_card_snippet_runs_verbatim_in_stock_diffusers(converted, tmp_path, monkeypatch):
    card = (converted / "README.md").read_text()
    front = card.split("---")[1]
    for field in ("base_model:", "base_model_relation: quantized", "library_name: diffusers"):
        assert field in front
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'"{converted}"' in snippet and 'variant="fp8"' in snippet
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(snippet, namespace)  # noqa: S102 - the card's own snippet, run exactly as a user would
    from diffusers import StableDiffusion3Pipeline

    pipe = namespace["pipe"]
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q).__name__ == "QLinear"
    assert (tmp_path / "astronaut.png").is_file()
    image = torch.from_numpy(__import__("numpy").asarray(namespace["image"], dtype="float32"))
    assert torch.isfinite(image).all() and image.std() > 0


def test_verification_report_records_fidelity(converted):
    report = json.loads((converted / "fp8_conversion.json").read_text())
    assert report["verified"] is True
    assert report["verification"]["pipeline"]["image_finite"] is True
    images = report["verification"]["images"]
    assert len(images) == 2 and all(0.5 < i["ssim"] <= 1.0 and i["psnr"] > 15 for i in images)
    transformer = report["verification"]["components"]["transformer"]
    assert transformer["tensors_identical"] > 0 and transformer["probe_output_finite"]
    card = (converted / "README.md").read_text()
    assert "mean SSIM" in card and "compute capability 8.9" in card


def test_project_loader_runs_the_converted_repo(converted):
    loaded = load_pipeline(str(converted), "fp8", device="cpu", fp8_path="scaled_mm")
    assert loaded.fp8_path == "scaled_mm"
    assert loaded.component_bytes["transformer"] > 0


def test_no_t5_fp16_single_file_source(tiny_base_no_t5, tmp_path):
    out = tmp_path / "out"
    assert run_convert(tiny_base_no_t5, "--out", out, "--device", "cpu") == 0
    assert (out / "transformer" / "diffusion_pytorch_model.fp8.safetensors").is_file()
    assert not (out / "text_encoder_3").exists()
    with safe_open(out / "transformer" / "diffusion_pytorch_model.fp8.safetensors", "pt") as f:
        assert f.get_tensor("transformer_blocks.0.attn.to_q.weight._scale").dtype == torch.float16


def test_exclude_keeps_named_layers_16_bit(tiny_base_no_t5, tmp_path):
    out = tmp_path / "out"
    assert run_convert(tiny_base_no_t5, "--out", out, "--device", "cpu", "--exclude", "proj_out") == 0
    with safe_open(out / "transformer" / "diffusion_pytorch_model.fp8.safetensors", "pt") as f:
        keys = set(f.keys())
        assert "proj_out.weight" in keys and "proj_out.weight._data" not in keys
        assert f.get_tensor("proj_out.weight").dtype == torch.float16
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"] == ["proj_out"]
    assert load_pipeline(str(out), "fp8", device="cpu").fp8_path == "dequant"


def test_dry_run_prints_plan_and_writes_nothing(tiny_base, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_convert(tiny_base, "--out", out, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "transformer" in printed and "FP8 (" in printed and "copy 16-bit" in printed and "->" in printed
    assert not out.exists()


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        run_convert("--help")
    text = capsys.readouterr().out
    for option in ("--out", "--revision", "--components", "--exclude", "--push-to", "--private", "--create-pr",
                   "--overwrite", "--dry-run", "--verify-images", "--max-shard-size", "--device"):
        assert option in text


# ------------------------------------------------------------------------------------------- bad inputs


def _copy(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "src"))


def assert_fails(capsys, argv, *phrases, out=None):
    assert run_convert(*argv) == 2
    err = capsys.readouterr().err
    for phrase in phrases:
        assert phrase in err, err
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.partial*"))
    return err


def test_not_an_sd3_pipeline(tiny_base, tmp_path, capsys):
    src = _copy(tiny_base, tmp_path)
    index = json.loads((src / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (src / "model_index.json").write_text(json.dumps(index))
    assert_fails(capsys, [src, "--out", tmp_path / "o"], "not an SD3 pipeline", out=tmp_path / "o")


def test_missing_component_folder(tiny_base, tmp_path, capsys):
    src = _copy(tiny_base, tmp_path)
    shutil.rmtree(src / "vae")
    assert_fails(capsys, [src, "--out", tmp_path / "o"], "'vae'", "missing", out=tmp_path / "o")


def test_pickle_only_weights_are_refused(tiny_base_no_t5, tmp_path, capsys):
    src = _copy(tiny_base_no_t5, tmp_path)
    weights = src / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    assert_fails(capsys, [src, "--out", tmp_path / "o"], "pickle", "safetensors", out=tmp_path / "o")


def test_not_a_folder_nor_a_repo_id(tmp_path, capsys):
    assert_fails(capsys, ["not a repo!!", "--out", tmp_path / "o"], "neither an existing folder nor a valid Hub repo id")


def test_unknown_component(tiny_base, tmp_path, capsys):
    assert_fails(capsys, [tiny_base, "--out", tmp_path / "o", "--components", "unet"], "unet", out=tmp_path / "o")


def test_existing_output_is_kept_without_overwrite(tiny_base_no_t5, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_fails(capsys, [tiny_base_no_t5, "--out", out], "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    assert run_convert(tiny_base_no_t5, "--out", out, "--overwrite", "--device", "cpu") == 0
    assert not (out / "precious.txt").exists() and (out / "fp8_conversion.json").is_file()


def test_push_without_token_stops_before_any_work(tiny_base_no_t5, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    out = tmp_path / "o"
    assert_fails(capsys, [tiny_base_no_t5, "--out", out, "--push-to", "me/tiny-fp8", "--base-id", "me/tiny"],
                 "HF_TOKEN", "hf auth login", out=out)


def test_failed_verification_leaves_nothing_and_pushes_nothing(tiny_base_no_t5, tmp_path, capsys, monkeypatch):
    real_digest = quantize.tensor_digest
    calls = iter(range(10**6))
    monkeypatch.setattr(quantize, "tensor_digest", lambda t: "corrupt" if next(calls) == 7 else real_digest(t))
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_token_for_tests")
    pushed = []
    monkeypatch.setattr(cli, "push", lambda *a, **k: pushed.append(a))
    out = tmp_path / "o"
    assert_fails(capsys, [tiny_base_no_t5, "--out", out, "--device", "cpu", "--push-to", "me/x", "--base-id", "me/b"],
                 "reloads with different values", out=out)
    assert not pushed


def test_interrupted_run_leaves_no_folder(tiny_base_no_t5, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "verify_pipeline", interrupt)
    out = tmp_path / "o"
    assert run_convert(tiny_base_no_t5, "--out", out, "--device", "cpu") == 130
    assert not out.exists() and not list(tmp_path.glob(".o.partial*"))


def test_push_refuses_unverified_folder(tiny_base, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_token_for_tests")
    with pytest.raises(PublishError, match="did not pass verification"):
        push(tiny_base, "me/tiny-fp8")


# ------------------------------------------------------------------------------------------- streaming io


def test_reader_matches_safetensors_and_writer_names_shards(tiny_base, tmp_path):
    from safetensors.torch import load_file

    files = sorted((tiny_base / "transformer").glob("*.safetensors"))
    reader = SafetensorsReader(files)
    expected = {k: v for f in files for k, v in load_file(f).items()}
    assert set(reader.keys()) == set(expected)
    for name, tensor in reader:
        assert torch.equal(tensor, expected[name])
    writer = ShardedWriter(tmp_path, "diffusers", "fp8", max_shard_bytes=50_000)
    for name, tensor in reader:
        writer.add(name, tensor)
    written = writer.close()
    index = json.loads(written[-1].read_text())
    assert written[-1].name == "diffusion_pytorch_model.safetensors.index.fp8.json"
    assert set(index["weight_map"]) == set(expected)
    assert all(re.fullmatch(r"diffusion_pytorch_model\.fp8-\d{5}-of-\d{5}\.safetensors", p.name) for p in written[:-1])


def test_t5_stays_fp8_on_fp8_gpus_and_matches_stock_dequantized(converted, monkeypatch):
    """On a GPU the loader keeps T5 in FP8 (Fp8BlockLinear); stock transformers dequantizes it (config says so)."""
    from transformers import T5EncoderModel

    from sd35fp8 import loading
    from sd35fp8.fp8 import Fp8BlockLinear

    config = json.loads((converted / "text_encoder_3" / "config.json").read_text())
    assert config["quantization_config"]["dequantize"] is True
    index = json.loads((converted / "model_index.json").read_text())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # transformers keeps FP8 only where CUDA exists
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    t5 = loading._fp8_text_encoders(str(converted), index, torch.bfloat16, None)["text_encoder_3"]
    monkeypatch.undo()
    layers = [m for m in t5.modules() if isinstance(m, Fp8BlockLinear)]
    assert len(layers) == 12 and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    stock = T5EncoderModel.from_pretrained(converted / "text_encoder_3", variant="fp8", dtype=torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, 1]])
    ours, theirs = t5(ids).last_hidden_state.float(), stock(ids).last_hidden_state.float()
    assert ((ours - theirs).norm() / theirs.norm()) < 0.02
