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
