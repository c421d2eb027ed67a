"""The tiny-shapes SD3 pipeline: stock diffusers / transformers classes at a size a 2-core CPU runs in seconds.

`ModelConfig` holds every size; `build_pipeline(config)` builds the untrained pipeline (seeded, so the same
config always gives the same weights), with tokenizers made in code from the data set's vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from .data import VOCABULARY

# Extra words a user might type; they get their own tokens (the model learns nothing about them, but they do
# not fall apart into characters).
EXTRA_WORDS = ("big", "tiny", "little", "centre", "center", "middle", "picture", "image", "photo", "of", "with",
               "in", "at", "shape", "colour", "color", "an", "the")
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"


def _words() -> list[str]:
    words = []
    for word in (*VOCABULARY, *EXTRA_WORDS):
        if word not in words:
            words.append(word)
    return words


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A word-level CLIP tokenizer (CLIP lower-cases its input); unknown words fall apart into characters."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in _words():
        vocab[f"{word}</w>"] = len(vocab)
    for char in CHARS.lower():
        vocab.setdefault(f"{char}</w>", len(vocab))
        vocab.setdefault(char, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 256) -> T5Tokenizer:
    """A word-level T5 (unigram) tokenizer; words also in title case (a caption's first word may be)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for word in _words():
        pieces.append((f"▁{word}", -3.0))
        if word[0].isalpha() and f"▁{word.capitalize()}" not in dict(pieces):
            pieces.append((f"▁{word.capitalize()}", -3.0))
    pieces += [(char, -5.0) for char in CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


@dataclass(frozen=True)
class ModelConfig:
    """Every size of the pipeline. The defaults are the shipped model."""

    # transformer
    layers: int = 6
    heads: int = 3
    head_dim: int = 64
    pos_embed_max_size: int = 32  # patches per side: 32 * 2 * 8 = 512 px; trained at 64, 128 and 256
    # VAE (4 blocks: 8x downsampling, 16 latent channels as in SD3)
    vae_channels: tuple[int, ...] = (32, 64, 96, 96)
    vae_layers_per_block: int = 1
    vae_groups: int = 16
    # text encoders
    clip_dim: int = 64
    clip_layers: int = 2
    t5_dim: int = 128
    t5_ff: int = 256
    t5_layers: int = 2
    t5_heads: int = 4
    # sampling defaults written into the scheduler config
    shift: float = 3.0
    native_size: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.t5_dim < 2 * self.clip_dim:
            raise ValueError("t5_dim must be at least 2 * clip_dim (SD3 pads the CLIP embeddings to T5's width)")
        if len(self.vae_channels) != 4:
            raise ValueError("the VAE needs 4 blocks (SD3's 8x downsampling)")

    @classmethod
    def small(cls) -> ModelConfig:
        """A small config for quick CPU trials of the training recipe (minutes, not hours)."""
        return cls(layers=2, heads=2, head_dim=32, vae_channels=(16, 32, 32, 32), vae_groups=8, clip_dim=32,
                   t5_dim=64, t5_ff=128, t5_heads=2)

    @classmethod
    def tiny(cls) -> ModelConfig:
        """A very small config for tests (seconds on a CPU)."""
        return cls(layers=1, heads=2, head_dim=16, vae_channels=(8, 8, 16, 16), vae_groups=4, clip_dim=16,
                   clip_layers=1, t5_dim=32, t5_ff=64, t5_layers=1, t5_heads=2)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        values = dict(values)
        values["vae_channels"] = tuple(values["vae_channels"])
        return cls(**values)


def _clip(config: ModelConfig, vocab_size: int, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=config.clip_dim, intermediate_size=4 * config.clip_dim,
        projection_dim=config.clip_dim, num_hidden_layers=config.clip_layers, num_attention_heads=max(1, config.clip_dim // 32),
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu",
    )).eval()


def build_pipeline(config: ModelConfig = ModelConfig()) -> StableDiffusion3Pipeline:
    """The untrained pipeline for `config` (float32, seeded weights)."""
    tokenizer, tokenizer_3 = clip_tokenizer(), t5_tokenizer()
    seed = config.seed
    latent = config.native_size // 8
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=16, out_channels=16, num_layers=config.layers,
        attention_head_dim=config.head_dim, num_attention_heads=config.heads, joint_attention_dim=config.t5_dim,
        caption_projection_dim=config.heads * config.head_dim, pooled_projection_dim=2 * config.clip_dim,
        pos_embed_max_size=config.pos_embed_max_size, qk_norm="rms_norm",
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=config.vae_layers_per_block, norm_num_groups=config.vae_groups, sample_size=config.native_size,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0, force_upcast=False,
    )
    torch.manual_seed(seed + 4)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=config.t5_dim, d_kv=config.t5_dim // config.t5_heads, d_ff=config.t5_ff,
        num_layers=config.t5_layers, num_heads=config.t5_heads, relative_attention_num_buckets=32,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=config.shift),
        text_encoder=_clip(config, len(tokenizer), seed + 2), tokenizer=tokenizer,
        text_encoder_2=_clip(config, len(tokenizer), seed + 3), tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    return pipe


def trainable_modules(pipe: StableDiffusion3Pipeline) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
