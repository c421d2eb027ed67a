"""Prompt encoding outside the denoising loop: an LRU cache of prompt embeddings and on-demand text encoders.

* `PromptCache`: embeddings of recent prompts (the three encoders' output for a prompt, its negative prompt and
  the CFG setting), bounded by entries and bytes, kept on the CPU. A repeated prompt skips the text encoders;
  the FP16-vs-FP8 comparison encodes once for both pipelines because they share the encoders and the cache.
* `OnDemandEncoders`: text encoders whose weights stay in (pinned) CPU memory and are copied to the GPU one
  encoder at a time, only while that encoder runs; their GPU copies are dropped right after (nothing is copied
  back). This is the 16 GB placement: during denoising only the transformer and the VAE hold VRAM.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
MAX_SEQUENCE_LENGTH = 256


@dataclass(frozen=True)
class PromptEmbeddings:
    """What the pipeline takes instead of prompt strings (batch 1; `expand` repeats them per image)."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.prompt_embeds, self.pooled_prompt_embeds, self.negative_prompt_embeds,
                            self.negative_pooled_prompt_embeds) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device) -> PromptEmbeddings:
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return PromptEmbeddings(move(self.prompt_embeds), move(self.pooled_prompt_embeds),
                                move(self.negative_prompt_embeds), move(self.negative_pooled_prompt_embeds))

    def pipeline_kwargs(self, images: int) -> dict:
        def repeat(t):
            return None if t is None else t.repeat(images, *([1] * (t.dim() - 1)))

        return {"prompt_embeds": repeat(self.prompt_embeds), "pooled_prompt_embeds": repeat(self.pooled_prompt_embeds),
                "negative_prompt_embeds": repeat(self.negative_prompt_embeds),
                "negative_pooled_prompt_embeds": repeat(self.negative_pooled_prompt_embeds)}


class PromptCache:
    """Least-recently-used prompt embeddings, at most `max_entries` and `max_bytes`; thread-safe."""

    def __init__(self, max_entries: int = 32, max_bytes: int = 256 * 2**20):
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("prompt cache bounds must be >= 0")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: OrderedDict[tuple, PromptEmbeddings] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: tuple) -> PromptEmbeddings | None:
        with self.lock:
            value = self.entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: PromptEmbeddings) -> None:
        size = value.nbytes
        with self.lock:
            if key in self.entries:
                self.bytes -= self.entries.pop(key).nbytes
            if size > self.max_bytes or self.max_entries == 0:
                return
            self.entries[key] = value
            self.bytes += size
            while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
                _, dropped = self.entries.popitem(last=False)
                self.bytes -= dropped.nbytes

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self) -> str:
        return f"LRU, {len(self)}/{self.max_entries} prompts, {self.bytes / 2**20:.1f}/{self.max_bytes / 2**20:.0f} MiB"


class OnDemandEncoders:
    """Keep a pipeline's text encoders in (pinned) CPU memory; each one's weights are copied to `device` by a
    forward pre-hook when it runs and dropped by a forward hook when it returns, so the pipeline's own
    `encode_prompt` works unchanged and at most one encoder holds VRAM at a time."""

    def __init__(self, pipe, device: torch.device, pin: bool = True, hooks: bool | None = None):
        self.device = torch.device(device)
        self.modules = [getattr(pipe, name) for name in ENCODER_NAMES if getattr(pipe, name, None) is not None]
        self.slots: dict[int, list[tuple[nn.Module, str, str, torch.Tensor]]] = {}
        self.hooks = []
        self.uploads = 0
        for module in self.modules:
            module.to("cpu")
            masters: dict[int, torch.Tensor] = {}
            slots = []
            for owner in module.modules():
                for kind in ("_parameters", "_buffers"):
                    for name, tensor in getattr(owner, kind).items():
                        if tensor is None:
                            continue
                        if id(tensor) not in masters:  # tied weights stay tied
                            data = tensor.detach()
                            if pin and self.device.type == "cuda" and not data.is_pinned():
                                data = data.pin_memory()
                            masters[id(tensor)] = data
                        slots.append((owner, kind, name, masters[id(tensor)]))
            for owner, kind, name, master in slots:
                self._set(owner, kind, name, master)
            self.slots[id(module)] = slots
            if hooks or (hooks is None and self.device.type == "cuda"):
                self.hooks.append(module.register_forward_pre_hook(self._upload))
                self.hooks.append(module.register_forward_hook(self._drop, always_call=True))

    @staticmethod
    def _set(owner: nn.Module, kind: str, name: str, tensor: torch.Tensor) -> None:
        if kind == "_parameters":
            owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[name] = tensor

    def _upload(self, module, _args):
        placed: dict[int, torch.Tensor] = {}
        for owner, kind, name, master in self.slots[id(module)]:
            if id(master) not in placed:
                placed[id(master)] = master.to(self.device, non_blocking=True, copy=True)
            self._set(owner, kind, name, placed[id(master)])
        self.uploads += 1

    def _drop(self, module, _args, _output):
        for owner, kind, name, master in self.slots[id(module)]:
            self._set(owner, kind, name, master)

    def bytes(self) -> int:
        seen = {id(m): m for slots in self.slots.values() for *_, m in slots}
        return sum(t.numel() * t.element_size() for t in seen.values())

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def describe(self) -> str:
        return f"text encoders on demand ({self.bytes() / 1e9:.2f} GB in CPU memory, one on the GPU while it encodes)"


def prompt_key(pipe, prompt: str, negative_prompt: str | None, cfg: bool) -> tuple:
    encoders = tuple(id(getattr(pipe, name, None)) for name in ENCODER_NAMES)
    return encoders, prompt, negative_prompt or "", bool(cfg), MAX_SEQUENCE_LENGTH


def _encode(pipe, device, prompt: str, negative_prompt: str | None, cfg: bool) -> PromptEmbeddings:
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=cfg, negative_prompt=negative_prompt or None,
            max_sequence_length=MAX_SEQUENCE_LENGTH)
    return PromptEmbeddings(pe, ppe, npe if cfg else None, nppe if cfg else None)


def encode(pipe, device, prompt: str, negative_prompt: str | None, cfg: bool, *,
           cache: PromptCache | None = None) -> tuple[PromptEmbeddings, bool, float]:
    """Embeddings for one prompt on `device`, from `cache` when it has them: (embeddings, cache hit, seconds)."""
    started = time.perf_counter()
    key = prompt_key(pipe, prompt, negative_prompt, cfg)
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        return cached.to(device), True, time.perf_counter() - started
    embeddings = _encode(pipe, device, prompt, negative_prompt, cfg)
    if cache is not None:
        cache.put(key, embeddings.to("cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return embeddings, False, time.perf_counter() - started
