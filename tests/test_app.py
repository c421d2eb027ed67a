"""The app launched in-process on the tiny model, driven through gradio_client like any API user."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from PIL import Image  # noqa: E402

from sd35fp8.errors import BadInput  # noqa: E402
from sd35fp8.generate import OutOfMemory  # noqa: E402
from sd35fp8.hub import base_model_of  # noqa: E402
from sd35fp8.request import GenerationRequest  # noqa: E402
from space.runtime import TINY_DEFAULTS, Models, defaults_for, resolve_base  # noqa: E402
from space.ui import build_demo, launch_kwargs  # noqa: E402

# gradio's own queue code trips pandas 3 deprecation warnings; they are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")

PROMPT = "a photo of a cat"
GOOD = dict(prompt=PROMPT, negative="", seed=42, randomize=False, steps=3, guidance=4.5, width=128, height=96)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_models():
    return Models.load("tiny")


@pytest.fixture(scope="module")
def app_url(app_models):
    demo = build_demo(app_models)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def app_client(app_url):
    return Client(app_url, verbose=False)


def generate(client, **overrides):
    args = {**GOOD, "precision": "fp8", **overrides}
    return client.predict(*args.values(), api_name="/generate")


def test_named_endpoints(app_client):
    assert {"/generate", "/compare", "/gpu_stats"} <= set(app_client.view_api(print_info=False, return_format="dict")["named_endpoints"])


def test_generate_png_with_parameters(app_client):
    path, seed, info, link = generate(app_client)
    assert seed == 42
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (128, 96)
    expected = GenerationRequest(PROMPT, seed=42, steps=3, guidance=4.5, width=128, height=96).parameters_text
    assert image.text["parameters"] == expected
    assert image.text["precision"] == "fp8" and image.text["fp8_path"] == "dequant"
    assert "FP8 path: `dequant`" in info and "s/step" in info and "peak VRAM no GPU" in info
    assert link.startswith("http://127.0.0.1:") and "seed=42" in link and "prompt=a+photo+of+a+cat" in link


def test_generate_16bit_and_random_seed(app_client):
    path, seed, info, _ = generate(app_client, precision="bf16", randomize=True, seed=0, negative="blurry")
    assert info.startswith("**16-bit (BF16)**")
    assert 0 <= seed < 2**32
    text = Image.open(path).text
    assert f"Seed: {seed}," in text["parameters"] and "Negative prompt: blurry" in text["parameters"]
    assert text["precision"] == "bf16"


def test_truncated_prompt_is_warned_about(app_client):
    long_prompt = " ".join(["a photo of a cat"] * 25)  # 100 words: over CLIP's 77 tokens, under 2000 characters
    path, _, info, _ = generate(app_client, prompt=long_prompt)
    assert "CLIP reads only the first 77" in info
    assert Image.open(path).text["parameters"].startswith(long_prompt)


def test_compare_table(app_client):
    fp8, ref, slider, heatmap, table, info, seed, link = app_client.predict(*GOOD.values(), api_name="/compare")
    assert Image.open(fp8).size == Image.open(ref).size == Image.open(heatmap).size == (128, 96)
    assert list(slider) == [fp8, ref] or len(slider) == 2
    headers, rows = table["headers"], table["data"]
    for column in ("Latency (s)", "s/step", "Peak VRAM (GiB)", "Energy (J)", "Avg power (W)", "Peak temp (°C)",
                   "Mean temp (°C)", "SSIM", "PSNR (dB)"):
        assert column in headers
    fp8_row = dict(zip(headers, rows[0]))
    assert fp8_row["Precision"].startswith("FP8")
    assert 0.0 < float(fp8_row["SSIM"]) <= 1.0
    assert float(fp8_row["PSNR (dB)"]) > 10
    assert float(fp8_row["Latency (s)"]) > 0
    for row in rows:
        cells = dict(zip(headers, row))
        for column in ("Peak VRAM (GiB)", "Energy (J)", "Avg power (W)", "Peak temp (°C)", "Mean temp (°C)"):
            assert cells[column] == "no GPU"
    assert "SSIM" in info and "dequant" in info and seed == 42 and "tab=compare" in link


def test_gpu_stats_without_gpu(app_client):
    stats = app_client.predict(api_name="/gpu_stats")
    assert stats["available"] is False and stats["status"] == "no GPU"
    assert stats["reason"].startswith("no GPU")


@pytest.mark.parametrize("bad, message", [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "x" * 10_000}, "10000 characters"),
    ({"width": 100}, "Width 100"),
    ({"height": 4096}, "Height 4096"),
    ({"steps": 0}, "Steps 0"),
    ({"steps": 2.5}, "Steps must be a whole number"),
    ({"seed": -1}, "Seed -1"),
    ({"seed": 2**32}, "Seed 4294967296"),
    ({"guidance": 99}, "Guidance 99"),
    ({"precision": "int4"}, "int4"),
])
def test_bad_input_is_refused_then_app_still_works(app_client, bad, message):
    with pytest.raises(AppError, match=message):
        generate(app_client, **bad)
    path, *_ = generate(app_client)
    assert Image.open(path).size == (128, 96)


def test_bad_input_compare(app_client):
    with pytest.raises(AppError, match="Width 100"):
        app_client.predict(*{**GOOD, "width": 100}.values(), api_name="/compare")


def test_out_of_memory_is_reported_then_next_request_works(app_client, app_models, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise OutOfMemory("The GPU ran out of memory at 128x96, batch 1. Lower the size.")

    monkeypatch.setattr(app_models, "run", out_of_memory)
    with pytest.raises(AppError, match="ran out of memory"):
        generate(app_client)
    monkeypatch.undo()
    assert generate(app_client)[1] == 42


def test_failed_fp8_image_falls_back_to_16bit(app_client, app_models, monkeypatch):
    original = app_models.run

    def nan_fp8(precision, request, **kwargs):
        result = original(precision, request, **kwargs)
        return dataclasses.replace(result, finite=False) if precision == "fp8" else result

    monkeypatch.setattr(app_models, "run", nan_fp8)
    path, _, info, _ = generate(app_client)
    assert "non-finite" in info and "showing the 16-bit result" in info and "dequant" in info
    assert Image.open(path).text["precision"] == "bf16"


def test_swap_mode_gives_the_same_images(app_models, monkeypatch):
    """With the idle transformer parked on the CPU (small GPUs), each run moves its own transformer in first."""
    request = GenerationRequest(PROMPT, seed=7, steps=2, width=64, height=64)
    expected = {p: app_models.run(p, request).image.tobytes() for p in ("fp8", "bf16")}
    monkeypatch.setattr(app_models, "swap", True)
    for precision in ("bf16", "fp8", "fp8", "bf16"):
        assert app_models.run(precision, request).image.tobytes() == expected[precision]
        assert app_models._last == precision
    assert app_models.precisions == ["fp8", "bf16"]
    assert "idle transformer waits on the CPU" not in app_models.placement()  # CPU: nothing to park


def test_defaults_and_base_resolution(tmp_path):
    assert defaults_for("tiny") == TINY_DEFAULTS
    assert defaults_for("me/sd3.5-large-turbo-fp8").steps == 4
    assert defaults_for("me/sd3.5-large-turbo-fp8").guidance == 0.0
    assert defaults_for("me/sd3.5-medium-fp8").steps == 28
    (tmp_path / "README.md").write_text("---\nbase_model: stabilityai/stable-diffusion-3.5-medium\n---\n# card\n")
    assert base_model_of(str(tmp_path))[0] == "stabilityai/stable-diffusion-3.5-medium"
    assert resolve_base(str(tmp_path), None)[0] == "stabilityai/stable-diffusion-3.5-medium"
    assert resolve_base(str(tmp_path), "other/base")[0] == "other/base"
    (tmp_path / "no-card").mkdir()
    assert base_model_of(str(tmp_path / "no-card")) == (None, f"{tmp_path / 'no-card'} has no README.md (model card)")
    with pytest.raises(BadInput, match="neither a folder nor a Hub repo id"):  # a mistyped path is reported
        base_model_of(str(tmp_path / "missing"))
    assert resolve_base("tiny", None)[0] == "tiny"


def test_cli_serves_a_converted_fp8_folder(tmp_path):
    """`python app.py --model DIR` on a folder written by `python -m convert`: the 16-bit reference comes from the
    model card's base_model, the load summary is printed, the page is served and /compare works."""
    from convert.cli import main as convert_main
    from sd35fp8.tiny import save_tiny_pipeline

    base, variant = tmp_path / "base", tmp_path / "fp8"
    save_tiny_pipeline(base)
    assert convert_main([str(base), "--out", str(variant)]) in (0, None)
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "MODEL_ID": str(variant), "PORT": str(port)}
    root = Path(__file__).resolve().parent.parent
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1"], cwd=root, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Running on local URL" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        text = log.read_text()
        assert f"16-bit reference: {base} (`base_model` in {variant}'s model card)" in text
        assert "FP8 compute path: dequant" in text and "transformer" in text and "loaded in" in text
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        table = client.predict(*{**GOOD, "steps": 2}.values(), api_name="/compare")[4]
        assert float(dict(zip(table["headers"], table["data"][0]))["SSIM"]) > 0
    finally:
        process.terminate()
        process.wait(timeout=30)


# ------------------------------------------------------------------------------ API and links (issue 8)


def test_the_short_api_call_uses_the_page_defaults(app_client):
    path, seed, info, _ = app_client.predict("a fox", api_name="/generate")
    assert Image.open(path).size == (TINY_DEFAULTS.width, TINY_DEFAULTS.height)
    assert f"seed {seed}" in info
    assert app_client.predict("a fox", api_name="/compare")[4]["headers"][0] == "Precision"


@pytest.mark.parametrize("seed, message", [
    (1.5, "Seed must be a whole number, not 1.5"),
    (10**400, "Seed 1000000000"),
    ("abc", "Seed must be a number"),
])
def test_seeds_are_never_rounded_or_unnamed(app_client, seed, message):
    with pytest.raises(AppError, match=message):
        generate(app_client, seed=seed)


def test_an_overlong_link_loads_with_the_prompt_cut(app_url):
    import urllib.request

    from space.links import CUT_MARK

    with urllib.request.urlopen(app_url + "?seed=3&prompt=" + "a" * 100_000) as response:
        assert response.status == 200
        final = response.url
    assert f"{CUT_MARK}=1" in final and "seed=3" in final and len(final) < 3000


def _handlers(models, **settings):
    from sd35fp8.gpu import GpuSampler
    from sd35fp8.settings import AppSettings
    from space.handlers import Handlers, ImageStore
    from space.replicas import Replica, Replicas

    return Handlers(Replicas([Replica(models, GpuSampler())]), AppSettings(**settings), ImageStore(keep=5))


def test_link_problems_are_shown_on_the_page(app_models):
    from types import SimpleNamespace

    params = {"prompt": "x" * 3000, "seed": "1.5", "steps": "abc", "width": "128", "tab": "nowhere", "cut": "1"}
    updates = dict(zip(("prompt", "negative", "seed", "randomize", "steps", "guidance", "width", "height",
                        "precision", "tabs", "link_note", "settings_box"),
                       _handlers(app_models).prefill(SimpleNamespace(query_params=params))))
    assert updates["prompt"] == "x" * 2000 and updates["width"] == 128
    note = updates["link_note"]["value"] if isinstance(updates["link_note"], dict) else updates["link_note"].value
    for words in ("cut to the first 2000", "ignored seed", "whole number", "ignored steps", "ignored tab"):
        assert words in note.replace("\\", ""), words


def test_a_job_past_its_time_limit_is_stopped_and_the_app_goes_on(app_models):
    import threading

    import gradio as gr

    handlers = _handlers(app_models, job_timeout_s=1e-6)
    raw = ("a cat", "", 1, False, 3, 4.5, 64, 64)
    with pytest.raises(gr.Error, match="time limit of 0 s"):
        handlers._generate(raw, "fp8", "", lambda *a, **k: None, stop=threading.Event())
    assert _handlers(app_models)._generate(raw, "fp8", "", lambda *a, **k: None, stop=threading.Event())[1] == 1


def test_cancelling_a_job_stops_it_at_its_next_step(app_client, app_models, monkeypatch):
    import threading

    from sd35fp8.generate import Stopped

    steps_run, stopped = [], threading.Event()

    def slow_run(precision, request, on_step=None, should_stop=None, **kwargs):
        for step in range(600):  # 60 s unless stopped
            time.sleep(0.1)
            steps_run.append(step)
            reason = should_stop()
            if reason:
                stopped.set()
                raise Stopped(reason)
        raise AssertionError("never stopped")

    monkeypatch.setattr(app_models, "run", slow_run)
    job = app_client.submit(*{**GOOD, "precision": "fp8"}.values(), api_name="/generate")
    deadline = time.monotonic() + 30
    while not steps_run:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job.cancel()
    assert stopped.wait(10), "the cancelled job kept running"
    assert len(steps_run) < 100
    monkeypatch.undo()
    assert generate(app_client)[1] == 42  # the queue is free again


def test_zerogpu_loads_without_torch_compile_and_sizes_each_lease(monkeypatch):
    from sd35fp8.settings import AppSettings

    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    settings = AppSettings()
    models = Models.load("tiny", compile="on", settings=settings)
    assert models.fp8.pieces["compile"] == "off" and models.reference.pieces["compile"] == "off"
    small = models.gpu_seconds(["fp8"], GenerationRequest(PROMPT, steps=4, width=64, height=64), settings)
    large = models.gpu_seconds(["fp8", "bf16"], GenerationRequest(PROMPT, steps=50, width=1024, height=1024), settings)
    assert settings.zerogpu_margin_s <= small < large <= settings.zerogpu_max_s
    assert "FP8 speed pieces:" in "\n".join(models.summary_lines())
    assert settings.zerogpu_ahead_of_time and not AppSettings(compile="off").zerogpu_ahead_of_time
    monkeypatch.delenv("SPACES_ZERO_GPU")
    assert not settings.zerogpu_ahead_of_time  # not on ZeroGPU: torch.compile, no ahead-of-time step


def test_the_default_model_is_the_trained_built_in_one():
    from sd35fp8.settings import AppSettings

    assert AppSettings().model == "shapes"
    models = Models.load()
    assert models.built_in == "shapes" and models.defaults.steps == 12
    assert "trained on synthetic shapes" in models.fp8.label and models.precisions == ["fp8", "bf16"]
    assert all(word in models.defaults.examples[0] for word in ("red", "circle", "blue"))


def test_a_missing_built_in_model_is_one_clear_error(monkeypatch, tmp_path):
    from sd35fp8 import loading

    monkeypatch.setattr(loading, "SHAPES_DIR", tmp_path / "nowhere")
    with pytest.raises(loading.LoadError, match="not installed here.*--model"):
        loading.load_pipeline("shapes")
