"""A real browser (Debian's chromium, driven by Playwright) uses the app as a person would.

Screenshots go to a temporary folder; with UPDATE_SCREENSHOTS=1 they refresh docs/app-generate.png,
docs/app-compare.png and docs/app-gpu.png (the pictures README shows).
"""

from __future__ import annotations

import io
import os
import re
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlencode

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (apt-get install chromium)", allow_module_level=True)

from PIL import Image  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from sd35fp8.gpu import GpuSampler  # noqa: E402
from space.runtime import Models  # noqa: E402
from space.ui import build_demo, launch_kwargs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")
DOCS = Path(__file__).resolve().parent.parent / "docs"
SHOTS = DOCS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else Path(tempfile.mkdtemp(prefix="shots-"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# A comparison on the CPU runs the 16-bit reference in bf16, which CPUs without native bf16 (AVX512-BF16 / AMX)
# compute ~8x slower than float32: one took 59.9 s on a 2-core AMD EPYC. The wait is behaviour, not timing.
TIMEOUT_MS = 240_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGpuNVML:
    """Just enough NVML for the live panel: a warm GPU whose readings drift, and an energy counter."""

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.calls = 0

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return "Fake GPU (test double)"

    def nvmlDeviceGetTemperature(self, handle, sensor):
        self.calls += 1
        return 55 + self.calls % 7

    def nvmlDeviceGetPowerUsage(self, handle):
        return 200_000 + (self.calls % 5) * 10_000

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 350_000

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=self.calls % 100, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=6 * 2**30, total=24 * 2**30, free=18 * 2**30)

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return 1800

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return 0x20  # software thermal slowdown

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return 1_000_000 + self.calls * 250


@pytest.fixture(scope="module")
def app_browser_models():
    return Models.load("shapes")  # the app's default: the screenshots show what a first visitor sees


def _launch(models, sampler=None):
    demo = build_demo(models, sampler=sampler)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def app_browser_url(app_browser_models):
    demo, url = _launch(app_browser_models)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def app_page():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        yield page
        browser.close()


def _screenshot(page, name: str) -> None:
    """Full-page screenshot (into docs/ with UPDATE_SCREENSHOTS=1), reduced to a 256-colour palette to stay small."""
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True)))
    shot.convert("RGB").quantize(colors=256).save(SHOTS / name, optimize=True)


def _table_row(page, first_cell: str) -> dict[str, str]:
    """The visible row of the figures table that starts with `first_cell`, as {header: text}."""
    headers = [h.strip() for h in page.locator("#table thead th:visible").all_inner_texts()]
    for row in page.locator("#table .virtual-row").all():  # gradio 6 draws body rows as divs
        cells = [c.strip() for c in row.locator(".body-cell").all_inner_texts()]
        if cells and cells[0] == first_cell:
            return dict(zip(headers[-len(cells):], cells))
    raise AssertionError(f"no row {first_cell!r} in the table")


def _field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input[type=text]").first


def _number(page, elem_id: str):
    return page.locator(f"#{elem_id} input[type=number]").first


def test_generate_compare_gpu_and_permalink(app_browser_url, app_page):
    page = app_page
    SHOTS.mkdir(exist_ok=True)
    page.goto(app_browser_url)

    # The page says plainly what the built-in model is and what it understands.
    expect(page.locator("#tiny-notice")).to_contain_text("trained on synthetic shapes")
    expect(page.locator("#title")).to_contain_text("FP8 path")

    # Generate: set a size under "Advanced settings", type a prompt, press Enter.
    page.get_by_text("Advanced settings").click()
    _number(page, "width").fill("128")
    _number(page, "width").press("Tab")
    _number(page, "height").fill("128")
    _number(page, "height").press("Tab")
    _field(page, "prompt").fill("a red circle on a blue background")
    _field(page, "prompt").press("Enter")
    info = page.locator("#result-info")
    expect(info).to_contain_text("s/step")
    expect(info).to_contain_text("FP8 path: dequant")
    expect(info).to_contain_text("peak VRAM no GPU")
    image = page.locator("#result-image img")
    expect(image).to_have_attribute("src", re.compile(r"\.png"))
    assert page.evaluate("(img) => img.naturalWidth", image.element_handle()) == 128
    link = _field(page, "permalink").input_value()
    assert link.startswith(app_browser_url + "?") and "prompt=a+red+circle" in link
    seed = int(_number(page, "seed").input_value())
    assert f"seed={seed}" in link
    _screenshot(page, "app-generate.png")

    # Compare the same settings in both precisions.
    page.locator("#compare-btn").click()
    expect(page.locator("#compare-info")).to_contain_text("PSNR")
    expect(page.locator("#table")).to_contain_text("FP8 (dequant)")
    row = _table_row(page, "FP8 (dequant)")
    assert 0 < float(row["SSIM"]) <= 1 and float(row["PSNR (dB)"]) > 10
    for column in ("Peak VRAM (GiB)", "Energy (J)", "Avg power (W)", "Peak temp (°C)", "Mean temp (°C)"):
        assert row[column] == "no GPU"
    for elem_id in ("fp8-image", "ref-image", "heatmap"):
        expect(page.locator(f"#{elem_id} img")).to_be_visible()
    expect(page.locator("#slider img").first).to_be_visible()
    ssim_text = page.locator("#compare-info").inner_text()
    assert 0 < float(re.search(r"SSIM (\d\.\d+)", ssim_text).group(1)) <= 1
    _screenshot(page, "app-compare.png")

    # GPU panel: this machine has none, and says so.
    page.get_by_role("tab", name="GPU").click()
    expect(page.locator("#gpu-status")).to_contain_text("No NVIDIA GPU")
    _screenshot(page, "app-gpu.png")

    # Bad input gets a clear error, and the page keeps working.
    _field(page, "prompt").fill("")
    page.locator("#generate-btn").click()
    expect(page.get_by_text("The prompt is empty").first).to_be_visible()

    # A permalink fills every setting.
    query = urlencode({"prompt": "a red dog", "negative": "blurry", "seed": 1234, "steps": 3, "guidance": 2.5,
                       "width": 160, "height": 96, "precision": "bf16"})
    page.goto(app_browser_url + "?" + query)
    expect(page.locator("#link-note")).to_contain_text("Settings loaded from the link")
    expect(_field(page, "prompt")).to_have_value("a red dog")
    expect(_field(page, "negative")).to_have_value("blurry")
    expect(_number(page, "seed")).to_have_value("1234")
    expect(page.locator("#randomize input[type=checkbox]")).not_to_be_checked()
    expect(_number(page, "steps")).to_have_value("3")
    expect(_number(page, "guidance")).to_have_value("2.5")
    expect(_number(page, "width")).to_have_value("160")
    expect(_number(page, "height")).to_have_value("96")
    expect(page.locator("#precision input[value=bf16]")).to_be_checked()

    # ... and generating from it reproduces the linked image's settings.
    page.locator("#generate-btn").click()
    expect(info).to_contain_text("16-bit (BF16)")
    expect(info).to_contain_text("seed 1234")
    assert "seed=1234" in _field(page, "permalink").input_value()


def test_live_gpu_panel_with_a_fake_gpu(app_browser_models, app_page):
    """The panel refreshes every second from the sampler; generation figures come from the same sampler."""
    sampler = GpuSampler(nvml=FakeGpuNVML(), history_interval=0.2)
    demo, url = _launch(app_browser_models, sampler)
    try:
        page = app_page
        page.goto(url)
        page.get_by_role("tab", name="GPU").click()
        status = page.locator("#gpu-status")
        expect(status).to_contain_text("Fake GPU (test double)")
        expect(status).to_contain_text("/ 350 W limit")
        expect(status).to_contain_text("6.0 / 24.0 GiB")
        expect(status).to_contain_text("1800 MHz")
        expect(status).to_contain_text("throttling: thermal")
        # The timer keeps polling: the rolling history grows and the plots draw it.
        page.wait_for_function("() => document.querySelectorAll('.gpu-plot canvas, .gpu-plot svg').length >= 4")
        before = len(sampler.history())
        page.wait_for_timeout(2500)
        assert len(sampler.history()) > before

        _field(page, "prompt").fill("a cat")
        page.locator("#compare-btn").click()
        expect(page.locator("#compare-info")).to_contain_text("PSNR")
        expect(page.locator("#table")).to_contain_text("FP8 (dequant)")
        row = _table_row(page, "FP8 (dequant)")
        assert row["Peak VRAM (GiB)"] == "no GPU"  # the model itself still runs on the CPU
        for column in ("Energy (J)", "Avg power (W)", "Peak temp (°C)", "Mean temp (°C)"):
            float(row[column])  # figures from the (fake) GPU sampler, not "no GPU"
    finally:
        demo.close()
