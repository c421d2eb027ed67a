"""GPU checks of the loader's FP8 paths on a converted tiny pipeline, plus an Fp8Linear micro-benchmark.

    python bench/gpu_smoke.py --out-json bench/results/gpu_smoke.json

1. convert a tiny pipeline with `--device cuda`; 2. run the model card's stock-diffusers snippet on the GPU;
3. `load_pipeline(..., "fp8")` (auto path, FP8 T5 kept FP8) and `compile=True`, each generating a finite image;
4. time one linear layer of SD3.5 Large's shapes: bf16, FP8 with unfused and fused activation quantization.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sd35fp8 import fp8  # noqa: E402
from sd35fp8.fp8 import Fp8BlockLinear, apply_fp8_path, quanto_quantize  # noqa: E402
from sd35fp8.generate import GenerationRequest, generate  # noqa: E402
from sd35fp8.loading import load_pipeline  # noqa: E402
from sd35fp8.metrics import relative_error, ssim  # noqa: E402
from sd35fp8.tiny import save_tiny_pipeline  # noqa: E402


def pipeline_checks(work: Path) -> dict:
    base = save_tiny_pipeline(work / "tiny")
    out = work / "tiny-fp8"
    subprocess.run([sys.executable, "-m", "convert", str(base), "--out", str(out), "--device", "cuda"], check=True, cwd=ROOT)
    snippet = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    namespace: dict = {}
    exec(snippet, namespace)  # the card's snippet, verbatim
    stock_finite = bool(torch.isfinite(torch.tensor(__import__("numpy").asarray(namespace["image"]), dtype=torch.float32)).all())
    request = GenerationRequest("a cat", steps=4, width=128, height=128, seed=1)
    loaded = load_pipeline(str(out), "fp8", device="cuda")
    t5_fp8 = sum(isinstance(m, Fp8BlockLinear) for m in loaded.pipe.text_encoder_3.modules())
    fp8_result = generate(loaded, request)
    base_result = generate(load_pipeline(str(base), "bf16", device="cuda"), request)
    compiled = load_pipeline(str(out), "fp8", device="cuda", compile=True)
    compiled_result = generate(compiled, request)
    return {
        "stock_snippet_on_gpu_finite": stock_finite,
        "fp8_path": loaded.fp8_path,
        "t5_fp8_block_layers": t5_fp8,
        "fp8_image_ok": fp8_result.ok,
        "compiled_image_ok": compiled_result.ok,
        "ssim_fp8_vs_bf16": ssim(fp8_result.image, base_result.image),
        "ssim_compiled_vs_eager_fp8": ssim(compiled_result.image, fp8_result.image),
    }


def linear_bench(tokens: int = 2 * 4429, features: int = 2432, hidden: int = 4 * 2432) -> dict:
    """One MLP up-projection of SD3.5 Large at 1024² with CFG: bf16 vs FP8 unfused vs FP8 fused quantization."""
    from triton.testing import do_bench

    torch.manual_seed(0)
    reference = nn.Linear(features, hidden, dtype=torch.bfloat16, device="cuda")
    model = nn.Sequential(nn.Linear(features, hidden, dtype=torch.bfloat16))
    model[0].load_state_dict(reference.state_dict())
    quanto_quantize(model)
    apply_fp8_path(model, "scaled_mm")
    model = model.cuda()
    x = torch.randn(tokens, features, dtype=torch.bfloat16, device="cuda")
    flops = 2 * tokens * features * hidden
    with torch.no_grad():
        bf16_ms = do_bench(lambda: reference(x), return_mode="median")
        fused_ms = do_bench(lambda: model(x), return_mode="median")
        error = relative_error(model(x), reference(x))
        original = fp8.quantize_rows
        fp8.quantize_rows = fp8._quantize_rows_eager
        try:
            unfused_ms = do_bench(lambda: model(x), return_mode="median")
        finally:
            fp8.quantize_rows = original
    return {
        "shape": {"tokens": tokens, "in": features, "out": hidden},
        "bf16_ms": bf16_ms, "fp8_unfused_quant_ms": unfused_ms, "fp8_fused_quant_ms": fused_ms,
        "bf16_tflops": flops / bf16_ms / 1e9, "fp8_fused_tflops": flops / fused_ms / 1e9,
        "relative_error_vs_bf16": error,
    }


def main() -> None:
    from bench.gpu_benchmark import disable_quanto_cuda_extension

    disable_quanto_cuda_extension()  # quanto's Marlin JIT build takes minutes; see bench/NOTES.md
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-json", type=Path, required=True)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "weights": "tiny, random"}
    report["linear"] = linear_bench()
    print(json.dumps(report["linear"], indent=2), flush=True)
    with tempfile.TemporaryDirectory() as work:
        report["pipeline"] = pipeline_checks(Path(work))
    print(json.dumps(report["pipeline"], indent=2))
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
