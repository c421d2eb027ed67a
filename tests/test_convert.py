"""Conversion round trip and bad inputs, on tiny SD3 pipelines (CPU, offline)."""

import filecmp
import json
import re
import shutil
from pathlib import Path

import numpy
import pytest
import torch
from safetensors import safe_open

from convert import cli, verify
from convert.checkpoint import SafetensorsReader, ShardedWriter, parse_size, write_safetensors
from convert.publish import PublishError, push
from sd35fp8.errors import BadInput
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
    assert_fails(capsys, [tiny_base_no_t5, "--out", out, "--overwrite"], "only replaces a folder written by this tool")
    assert (out / "precious.txt").read_text() == "keep me"


def test_overwrite_replaces_an_earlier_output(tiny_base_no_t5, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_convert(tiny_base_no_t5, "--out", out, "--device", "cpu") == 0
    (out / "stale.txt").write_text("from the earlier run")
    assert_fails(capsys, [tiny_base_no_t5, "--out", out], "--overwrite")
    assert run_convert(tiny_base_no_t5, "--out", out, "--overwrite", "--device", "cpu") == 0
    assert not (out / "stale.txt").exists() and (out / "fp8_conversion.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no work folder or old output left


def test_push_without_token_stops_before_any_work(tiny_base_no_t5, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    out = tmp_path / "o"
    assert_fails(capsys, [tiny_base_no_t5, "--out", out, "--push-to", "me/tiny-fp8", "--base-id", "me/tiny"],
                 "HF_TOKEN", "hf auth login", out=out)


def test_failed_verification_leaves_nothing_and_pushes_nothing(tiny_base_no_t5, tmp_path, capsys, monkeypatch):
    real_reload = verify._reload

    def reload_with_one_tensor_changed(*args, **kwargs):
        model = real_reload(*args, **kwargs)
        with torch.no_grad():
            model.proj_out.bias.add_(1)
        return model

    monkeypatch.setattr(verify, "_reload", reload_with_one_tensor_changed)
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_token_for_tests")
    pushed = []
    monkeypatch.setattr(cli, "push", lambda *a, **k: pushed.append(a))
    out = tmp_path / "o"
    assert run_convert(tiny_base_no_t5, "--out", out, "--device", "cpu", "--push-to", "me/x", "--base-id", "me/b") == 1
    err = capsys.readouterr().err
    assert "error: transformer: 'proj_out.bias' reloads with different values" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".o.*"))
    assert not pushed


def test_interrupted_run_leaves_no_folder(tiny_base_no_t5, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "verify_pipeline", interrupt)
    out = tmp_path / "o"
    assert run_convert(tiny_base_no_t5, "--out", out, "--device", "cpu") == 130
    assert "error: interrupted (SIGINT): nothing was written" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


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


def test_writer_round_trips_every_dtype_through_stock_safetensors(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16), "f32": torch.randn(7), "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.zeros(0, 3), "i64": torch.arange(5), "strided": torch.randn(4, 6)[:, ::2],
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors)

    def same(a, b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                         b.contiguous().reshape(-1).view(torch.uint8))

    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(tensors) and f.metadata() == {"format": "pt"}
        assert all(same(f.get_tensor(name), tensor) for name, tensor in tensors.items())
    assert all(same(tensor, tensors[name]) for name, tensor in SafetensorsReader([path]))
    with pytest.raises(FileExistsError):  # never writes over a file
        write_safetensors(path, tensors)


@pytest.mark.parametrize(("text", "size"), [("5GB", 5 * 10**9), ("200KB", 200_000), ("1.5 MiB", 1_572_864),
                                            ("2gib", 2 * 2**30), ("100000", 100_000)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["abc", "", "0", "-5", "-5GB", "1KB", "99999", "1e9", "5 TB", "GB", "nan"])
def test_parse_size_refuses_nonsense_and_tiny_sizes(text):
    with pytest.raises(BadInput, match=r"^--max-shard-size"):
        parse_size(text)


# ------------------------------------------------------------------------------- stock diffusers, any dtype

SOURCES = {"fp16": (torch.float16, None), "bf16": (torch.bfloat16, None), "fp32": (torch.float32, None),
           "mixed": (torch.bfloat16, torch.float16)}  # mixed: T5 stored fp16, the rest bf16
REQUESTED = ["bfloat16", "float16", "float32"]


@pytest.fixture(scope="module")
def converted_from(tiny_source, tmp_path_factory):
    """Factory: the converted variant of a tiny source of one of the SOURCES kinds (converted once)."""
    outputs = {}

    def convert(kind):
        if kind not in outputs:
            out = tmp_path_factory.mktemp("variants") / "fp8"
            assert run_convert(tiny_source(*SOURCES[kind]), "--out", out, "--device", "cpu") == 0
            outputs[kind] = out
        return outputs[kind]

    return convert


def card_snippet(folder: Path, dtype: str = "bfloat16", steps: str = "num_inference_steps=2, height=64, width=64") -> str:
    """The model card's load snippet, with the dtype (and, for speed, the steps and size) changed as a user would."""
    snippet = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    assert "dtype = torch.bfloat16" in snippet and "num_inference_steps=28" in snippet
    return snippet.replace("dtype = torch.bfloat16", f"dtype = torch.{dtype}").replace("num_inference_steps=28", steps)


@pytest.mark.parametrize("kind", SOURCES)
def test_card_snippet_loads_in_stock_diffusers_for_every_source_and_dtype(converted_from, kind, tmp_path, monkeypatch):
    """The card's snippet works for fp16, bf16, fp32 and mixed sources and bf16/fp16/fp32 requests (issue 8, item 2)."""
    out = converted_from(kind)
    monkeypatch.chdir(tmp_path)
    for dtype in REQUESTED:
        namespace = {}
        exec(card_snippet(out, dtype), namespace)  # noqa: S102 - the card's own snippet, as a user runs it
        assert {p.dtype for p in namespace["pipe"].text_encoder_3.parameters()} == {getattr(torch, dtype)}, dtype
        image = numpy.asarray(namespace["image"], dtype="float32")
        assert numpy.isfinite(image).all() and image.std() > 0, dtype


@pytest.mark.parametrize("kind", SOURCES)
def test_readme_one_liner_works_for_every_source(converted_from, kind):
    """README's own snippet (no dtype line for T5) works as written, in the card's dtype, whatever the source stored."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(converted_from(kind)), variant="fp8", dtype=torch.bfloat16)
    assert {p.dtype for p in pipe.text_encoder_3.parameters()} == {torch.bfloat16}
    images = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert numpy.isfinite(images).all()


@pytest.mark.parametrize("gpu", [False, True], ids=["dequantized", "kept-fp8"])
def test_project_loader_t5_computes_in_the_dtype_asked(converted_from, monkeypatch, gpu):
    """`_fp8_text_encoders` gives a T5 computing in the dtype asked for, from an fp16 source, whether transformers
    keeps it FP8 (SM >= 8.9) or dequantizes it (CPU, older GPUs)."""
    from sd35fp8 import loading

    out = converted_from("fp16")
    index = json.loads((out / "model_index.json").read_text())
    if gpu:  # transformers keeps FP8 only where CUDA exists
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t5 = loading._fp8_text_encoders(str(out), index, dtype, None)["text_encoder_3"]
        wanted = {dtype, torch.float32} if dtype == torch.float16 else {dtype}  # T5 keeps `wo` fp32 under fp16
        assert {p.dtype for p in t5.parameters()} <= wanted, dtype
        assert t5(torch.tensor([[5, 6, 7, 1]])).last_hidden_state.isfinite().all()


def test_verification_loads_as_the_card_says(converted):
    report = json.loads((converted / "fp8_conversion.json").read_text())["verification"]["pipeline"]
    assert report["dtype"] == "bfloat16" and report["steps"] == 2 and report["size"] == 64
    assert 'variant="fp8"' in card_snippet(converted)
    assert "stock diffusers exactly as above (`dtype=torch.bfloat16`)" in (converted / "README.md").read_text()


def test_card_of_a_pipeline_without_t5_names_it_absent(tiny_base_no_t5, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_convert(tiny_base_no_t5, "--out", out, "--device", "cpu") == 0
    snippet = card_snippet(out)
    assert "text_encoder_3=None, tokenizer_3=None" in snippet and "text_encoder_3.to" not in snippet
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})  # noqa: S102


def test_verification_sizes_follow_the_model(tmp_path, capsys):
    """A transformer with a small positional embedding: verification picks sizes it takes (issue 8, item 3)."""
    from diffusers import SD3Transformer2DModel

    from sd35fp8.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(with_t5=False, dtype=torch.bfloat16)
    pipe.transformer = SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=4,
    ).to(torch.bfloat16).eval()
    pipe.save_pretrained(tmp_path / "src")  # takes 16 to 64 px: patch 2 x VAE scale 8, up to 4 patches
    out = tmp_path / "out"
    assert_fails(capsys, [tmp_path / "src", "--out", out, "--verify-size", 128], "--verify-size 128",
                 "multiples of 16 from 16 to 64", out=out)
    assert run_convert(tmp_path / "src", "--out", out, "--device", "cpu", "--verify-images", 1, "--verify-steps", 1) == 0
    report = json.loads((out / "fp8_conversion.json").read_text())["verification"]
    assert report["pipeline"]["size"] == 64 and len(report["images"]) == 1
    assert "64x64 image in 2 steps (about" in capsys.readouterr().out
