"""Shared fixtures: tiny SD3 pipelines written to disk, built offline."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

from sd35fp8.tiny import save_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny bf16 SD3 pipeline folder with T5, its larger components written as sharded safetensors."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("base") / "tiny-sd3", dtype=torch.bfloat16, max_shard_size="100KB")


@pytest.fixture(scope="session")
def tiny_base_no_t5(tmp_path_factory):
    """A tiny fp16 SD3 pipeline folder without T5, single-file weights."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("base") / "tiny-sd3-no-t5", with_t5=False, dtype=torch.float16)


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    """Factory: a tiny SD3 pipeline folder stored in `dtype` (T5 in `t5_dtype` if given), written once per session."""
    from sd35fp8.tiny import build_tiny_pipeline

    made = {}

    def make(dtype=torch.bfloat16, t5_dtype=None):
        key = (dtype, t5_dtype)
        if key not in made:
            pipe = build_tiny_pipeline(dtype=dtype)
            if t5_dtype is not None:
                torch.nn.Module.to(pipe.text_encoder_3, dtype=t5_dtype)
            name = f"tiny-{str(dtype)[6:]}" + (f"-t5-{str(t5_dtype)[6:]}" if t5_dtype else "")
            made[key] = tmp_path_factory.mktemp("source") / name
            pipe.save_pretrained(made[key])
        return made[key]

    return make
