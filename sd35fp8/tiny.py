"""The built-in tiny models: a random SD3 pipeline built offline from configs, and the trained tiny-shapes one.

* "tiny" (`build_tiny_pipeline`): random weights, for the tests. The shapes follow SD3.5's architecture
  (16 latent channels, joint attention, CLIP-L + CLIP-G + optional T5) at a size that runs in well under a
  second per image on a CPU. Its images are noise by design.
* "shapes" (`load_shapes_pipeline`): the app's default model, shipped in `sd35fp8/models/tiny-shapes/` and
  trained by `python -m shapes.train` on synthetic coloured shapes (see its README.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

TINY_MODEL_NAME = "tiny-random-sd3 (built in, random weights)"
SHAPES_MODEL_NAME = "tiny-shapes (built in, trained on synthetic shapes)"
SHAPES_DIR = Path(__file__).resolve().parent / "models" / "tiny-shapes"
# tiny-shapes' sampling settings, chosen on training-split captions (the held-out ones never looked at) with an
# earlier model (5 runs, 2026-12-01): 96 captions, 12 steps, CPU: caption accuracy 92.7% at guidance 2.5, 90.6% at 3.0,
# 82.3% at 4.5, 70.8% at 7.0. The scheduler's shift stays at the 3.0 its config holds (shift 1 / 2 / 3 / 4.5: 90.6 /
# 91.7 / 92.7 / 91.7%).
SHAPES_STEPS = 12
SHAPES_GUIDANCE = 2.5
_WORDS = "a an the of and with in on cat dog photo painting portrait city night sky red blue green astronaut horse".split()


def _clip_tokenizer() -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in _WORDS:
        vocab[f"{word}</w>"] = len(vocab)
    for char in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-":
        vocab.setdefault(f"{char}</w>", len(vocab))
        vocab.setdefault(char, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -3.0) for word in _WORDS]
    pieces += [(char, -5.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=256)


def _clip(hidden: int, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config).eval()


def build_tiny_pipeline(with_t5: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0,
                        num_layers: int = 2) -> StableDiffusion3Pipeline:
    """Build a tiny SD3 pipeline (transformer with `num_layers` blocks, VAE, CLIP-L/G, optional T5) with seeded
    random weights."""
    clip_dim, t5_dim = 32, 64
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=t5_dim,
        caption_projection_dim=32, pooled_projection_dim=2 * clip_dim, pos_embed_max_size=64,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=64,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
    )
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        torch.manual_seed(seed + 4)
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=128, d_model=t5_dim, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )).eval()
        tokenizer_3 = _t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_clip(clip_dim, seed + 2), tokenizer=_clip_tokenizer(),
        text_encoder_2=_clip(clip_dim, seed + 3), tokenizer_2=_clip_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, dtype=dtype)  # diffusers' own .to() warns about a float32 list these models lack
    return pipe


def save_tiny_pipeline(path: str | Path, with_t5: bool = True, dtype: torch.dtype = torch.bfloat16,
                       max_shard_size: str | None = None) -> Path:
    """Write a tiny SD3 pipeline as a diffusers folder (safetensors), as a base repo would hold it."""
    path = Path(path)
    pipe = build_tiny_pipeline(with_t5=with_t5, dtype=dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    pipe.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def load_shapes_pipeline(dtype: torch.dtype = torch.bfloat16) -> StableDiffusion3Pipeline:
    """The shipped tiny-shapes pipeline, every component in `dtype`."""
    pipe = StableDiffusion3Pipeline.from_pretrained(SHAPES_DIR, dtype=dtype)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe
