"""Prompt encoding outside the denoising loop: an LRU cache of prompt embeddings and on-demand text encoders.

* `PromptCache`: embeddings of recent texts (the three encoders' output for one prompt or negative prompt),
  bounded by entries and bytes, kept on the CPU. A repeated prompt skips the text encoders, a new prompt with a
  negative prompt seen before runs them once (CFG needs both sides);
  the FP16-vs-FP8 comparison encodes once for both pipelines because they share the encoders and the cache.
* `OnDemandEncoders`: the 16 GB placement. The two small CLIP encoders stay on the GPU; so do as many of T5's
  first blocks as `keep_bytes` allows (what the card leaves free: `loading.on_demand_keep_bytes`). The rest of T5
  (4.7 GB in FP8 in all) keeps its weights in pinned CPU memory and streams them to the GPU block by block while it
  encodes, the copy of the next block overlapping the compute of this one; each streamed block's GPU copy is
  dropped once it has run (nothing is copied back). During denoising only the transformer, the VAE, the CLIP
  encoders and the kept T5 blocks hold VRAM.
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


def text_encoders_of(pipe) -> dict[str, nn.Module]:
    """The pipeline's text encoders by component name (those it has)."""
    return {name: getattr(pipe, name) for name in ENCODER_NAMES if getattr(pipe, name, None) is not None}


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


ALIGN = 256  # bytes: where each tensor starts inside a unit's packed buffer


class _Unit:
    """The stem or one block of a streamed encoder: every tensor it owns packed into one CPU buffer (pinned for
    CUDA), so placing it on the GPU is one large asynchronous copy; `masters` are views into that buffer."""

    def __init__(self, tensors: list[torch.Tensor], slots: list[tuple[nn.Module, str, str, int]], pin: bool):
        self.layout, offset = [], 0
        for tensor in tensors:
            self.layout.append((offset, tensor.dtype, tensor.shape))
            offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
        self.nbytes = offset
        self.host = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
        self.masters = self.views(self.host)
        for master, tensor in zip(self.masters, tensors):
            master.copy_(tensor.detach())
        self.slots = slots  # (owner, kind, name, index into masters): where each tensor goes in the modules

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[offset:offset + shape.numel() * dtype.itemsize].view(dtype).view(shape)
                for offset, dtype, shape in self.layout]


class OnDemandEncoders:
    """The 16 GB placement of a pipeline's text encoders. The small ones (`resident`, CLIP-L and CLIP-G: 1.6 GB for
    SD3.5) stay on `device`; each other encoder (T5) keeps its weights in pinned CPU memory, one packed buffer per
    block, and streams them to `device` block by block while it encodes: its stem (embeddings, final norm) when it
    starts, block i + 1 on a side CUDA stream while block i computes, and each block's GPU copy is dropped as soon
    as the block has run (nothing is copied back). So T5 holds its stem plus two blocks of VRAM, and its copy can
    hide behind its compute. `keep_bytes`: the first units (stem, block 0, 1, ...) that fit in this many bytes are
    copied to `device` once and stay there, so a new prompt copies only the rest. Hooks do it all, so the pipeline's
    own `encode_prompt` runs unchanged."""

    def __init__(self, pipe, device: torch.device, pin: bool = True, hooks: bool | None = None,
                 resident: tuple[str, ...] = ("text_encoder", "text_encoder_2"), keep_bytes: int = 0):
        self.device = torch.device(device)
        self.modules = list(text_encoders_of(pipe).values())
        self.resident = [getattr(pipe, name) for name in resident if getattr(pipe, name, None) is not None]
        self.streamed = [module for module in self.modules if all(module is not r for r in self.resident)]
        cuda = self.device.type == "cuda"
        self.copy_stream = None  # the side stream of the copies, made at the first encode (ZeroGPU lends the GPU then)
        self.units: dict[int, list[_Unit]] = {}  # per streamed encoder: stem, block 0, block 1, ...
        self.pending: dict[tuple[int, int], tuple[list[torch.Tensor], object]] = {}  # copies under way: views, event
        self.hooks = []
        self.uploads = 0  # blocks (and stems) copied to the device
        self.most_units_placed = self.units_placed = 0  # streamed stems + blocks on the device (or on their way)
        self.kept: dict[tuple[int, int], list[torch.Tensor]] = {}  # (encoder, unit) -> its views on the device
        for module in self.resident:
            module.to(self.device)
        for module in self.streamed:
            module.to("cpu")
            blocks = _repeated_layers(module)
            owner_unit = {id(owner): 1 + index for index, block in enumerate(blocks) for owner in block.modules()}
            found: list[tuple[list, list]] = [([], []) for _ in range(1 + len(blocks))]  # tensors, slots
            home: dict[int, tuple[int, int]] = {}  # id(tensor) -> (unit, index): tied weights stay tied
            for owner in module.modules():
                for kind in ("_parameters", "_buffers"):
                    for name, tensor in getattr(owner, kind).items():
                        if tensor is None:
                            continue
                        if id(tensor) not in home:
                            unit = owner_unit.get(id(owner), 0)
                            home[id(tensor)] = (unit, len(found[unit][0]))
                            found[unit][0].append(tensor)
                        unit, index = home[id(tensor)]
                        found[unit][1].append((owner, kind, name, index))
            units = []
            while found:  # one unit at a time: each source tensor is freed once its unit's buffer holds it
                tensors, slots = found.pop(0)
                unit = _Unit(tensors, slots, pin and cuda)
                for owner, kind, name, index in unit.slots:
                    self._set(owner, kind, name, unit.masters[index])
                units.append(unit)
                del tensors
            self.units[id(module)] = units
            for index, unit in enumerate(units):  # the first units that fit stay on the device for good
                if unit.nbytes > keep_bytes - self.kept_bytes():
                    break
                self.kept[(id(module), index)] = unit.views(unit.host.to(self.device))
                self._to_kept(module, index)
                unit.host = unit.masters = None  # its CPU copy is never used again: give the pinned memory back
            if hooks or (hooks is None and cuda):
                self.hooks.append(module.register_forward_pre_hook(self._start))
                self.hooks.append(module.register_forward_hook(self._finish, always_call=True))
                for index, block in enumerate(blocks, start=1):
                    self.hooks.append(block.register_forward_pre_hook(self._block_hook(module, index, True)))
                    self.hooks.append(block.register_forward_hook(self._block_hook(module, index, False),
                                                                  always_call=True))

    @staticmethod
    def _set(owner: nn.Module, kind: str, name: str, tensor: torch.Tensor) -> None:
        if kind == "_parameters":
            owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[name] = tensor

    def _to_kept(self, module: nn.Module, index: int) -> None:
        for owner, kind, name, slot in self.units[id(module)][index].slots:
            self._set(owner, kind, name, self.kept[(id(module), index)][slot])

    def kept_bytes(self) -> int:
        return sum(self.units[key[0]][key[1]].nbytes for key in self.kept)

    def _prefetch(self, module: nn.Module, index: int) -> None:
        """Start copying one unit's weights to the device (on the side stream: it overlaps the current compute)."""
        units = self.units[id(module)]
        if index >= len(units) or (id(module), index) in self.pending or (id(module), index) in self.kept:
            return
        unit = units[index]
        flat = torch.empty_like(unit.host, device=self.device)  # allocated on the compute stream: freed in order
        event = None
        if self.device.type == "cuda":
            if self.copy_stream is None:
                self.copy_stream = torch.cuda.Stream(self.device)
            # the copy may reuse memory of blocks dropped earlier: wait for the compute that read it
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                flat.copy_(unit.host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
        else:
            flat.copy_(unit.host)
        self.pending[(id(module), index)] = (unit.views(flat), event)
        self.uploads += 1
        self._count()

    def _place(self, module: nn.Module, index: int) -> None:
        if (id(module), index) in self.kept:
            return
        self._prefetch(module, index)  # no-op when already under way
        placed, event = self.pending.pop((id(module), index))
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        for owner, kind, name, slot in self.units[id(module)][index].slots:
            self._set(owner, kind, name, placed[slot])
        self.units_placed += 1
        self._count()

    def _count(self) -> None:
        self.most_units_placed = max(self.most_units_placed, self.units_placed + len(self.pending))

    def _to_masters(self, unit: _Unit) -> None:
        for owner, kind, name, slot in unit.slots:
            self._set(owner, kind, name, unit.masters[slot])

    def _drop(self, module: nn.Module, index: int) -> None:
        if (id(module), index) in self.kept:
            return
        self._to_masters(self.units[id(module)][index])
        self.units_placed -= 1

    def _start(self, module, _args):
        self._place(module, 0)
        self._prefetch(module, 1)

    def _block_hook(self, module: nn.Module, index: int, before: bool):
        def hook(_block, _args, _output=None):
            if before:
                self._place(module, index)
                self._prefetch(module, index + 1)
            else:
                self._drop(module, index)
        return hook

    def _finish(self, module, _args, _output):
        """Back to the CPU masters (the kept units: their device copies), including whatever an exception left placed
        or under way."""
        for index, unit in enumerate(self.units[id(module)]):
            if (id(module), index) in self.kept:
                self._to_kept(module, index)
            else:
                self._to_masters(unit)
        self.pending = {key: value for key, value in self.pending.items() if key[0] != id(module)}
        self.units_placed = 0

    def bytes(self) -> int:
        """Bytes of the streamed encoders' weights, the kept units' included."""
        return sum(unit.nbytes for units in self.units.values() for unit in units)

    def pinned(self) -> bool:
        return all(unit.host.is_pinned() for units in self.units.values() for unit in units if unit.host is not None)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def describe(self) -> str:
        memory = "pinned CPU memory" if self.pinned() and self.device.type == "cuda" else "CPU memory"
        units = sum(len(units) for units in self.units.values())
        kept = (f"; {self.kept_bytes() / 1e9:.2f} GB of it ({len(self.kept)} of {units} pieces: stem, blocks) "
                "stays on the GPU" if self.kept else "")
        return (f"text encoders on demand ({self.bytes() / 1e9:.2f} GB in {memory}, streamed to the GPU block by "
                f"block while encoding{kept}; {len(self.resident)} small ones stay on the GPU)")


def _repeated_layers(module: nn.Module) -> list[nn.Module]:
    """The encoder's stack of layers: its `nn.ModuleList` holding the most parameters (T5's `encoder.block`,
    CLIP's `text_model.encoder.layers`); empty when it has none (then the whole encoder is one unit)."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def prompt_key(pipe, text: str) -> tuple:
    """The cache key of one text's embeddings: the pipeline's encoders, the text, the T5 length."""
    encoders = tuple(id(getattr(pipe, name, None)) for name in ENCODER_NAMES)
    return encoders, text, MAX_SEQUENCE_LENGTH


def _encode(pipe, device, text: str) -> PromptEmbeddings:
    """One text through the three encoders. diffusers encodes a negative prompt with the same calls as a prompt,
    so this gives either side of a CFG pair."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=text, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)
    return PromptEmbeddings(embeds, pooled, None, None)


def encode(pipe, device, prompt: str, negative_prompt: str | None, cfg: bool, *,
           cache: PromptCache | None = None) -> tuple[PromptEmbeddings, bool, float]:
    """Embeddings for one prompt (and, with `cfg`, its negative prompt: "" when None) on `device`:
    (embeddings, cache hit, seconds). `cache` holds each text on its own, so a new prompt with the usual negative
    prompt runs the encoders once, not twice; the hit is True when neither text needed the encoders."""
    started = time.perf_counter()
    sides, hit = [], True
    for text in [prompt] + ([negative_prompt or ""] if cfg else []):
        key = prompt_key(pipe, text)
        cached = cache.get(key) if cache is not None else None
        if cached is None:
            hit = False
            cached = _encode(pipe, device, text)
            if cache is not None:
                cache.put(key, cached.to("cpu"))
        sides.append(cached.to(device))
    negative = sides[1] if cfg else PromptEmbeddings(None, None, None, None)
    embeddings = PromptEmbeddings(sides[0].prompt_embeds, sides[0].pooled_prompt_embeds,
                                  negative.prompt_embeds, negative.pooled_prompt_embeds)
    if device.type == "cuda" and not hit:
        torch.cuda.synchronize(device)
    return embeddings, hit, time.perf_counter() - started
