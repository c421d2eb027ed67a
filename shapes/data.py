"""The procedural data set: coloured shapes on a plain background, with exact captions.

Grammar (every caption the model is trained on has one of these forms):

    a [small|large] <colour> <shape> [on the left|right|top|bottom] on a <colour> background
    a <colour> <shape> and a <colour> <shape> on a <colour> background

("an" before "orange"; the parser and the training variants accept "a orange" too.)

Colours: red, green, blue, yellow, orange, purple, white, black. Shapes: circle, square, triangle (apex up).
Layout: with no position the object is centred and 30-60% of the image wide ("small" 14-24%, "large" 66-80%);
with a position it sits in that third of the image (26-36% wide, "small" 14-22%, "large" 40-46%); two objects
stand side by side, the first named on the left, each 24-36% wide. Everything is drawn analytically
(anti-aliased signed distances) in torch, so rendering is exact, deterministic and runs on the GPU.

Hold-out: single-object captions whose (colour, shape) pair is in `HELD_OUT_PAIRS`, and every caption whose
CRC-32 is divisible by 10, are never trained on (`split(spec) == "heldout"`); `eval_specs` draws from them.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import torch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 165, 65),
    "blue": (35, 70, 220),
    "yellow": (245, 222, 40),
    "orange": (250, 130, 20),
    "purple": (130, 40, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZE_WORDS = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
HELD_OUT_PAIRS = frozenset({("orange", "circle"), ("green", "square"), ("purple", "triangle"), ("white", "square")})
VOCABULARY = ("a", "an", "and", "on", "the", "background", *COLOURS, *SHAPES, *SIZE_WORDS, *POSITIONS)

# Width of an object as a fraction of the image width, by (size word, positioned?).
SIZE_RANGES = {
    (None, False): (0.30, 0.60), ("small", False): (0.14, 0.24), ("large", False): (0.66, 0.80),
    (None, True): (0.26, 0.36), ("small", True): (0.14, 0.22), ("large", True): (0.40, 0.46),
}
PAIR_SIZE_RANGE = (0.24, 0.36)
PAIR_CENTRES = (0.28, 0.72)
POSITION_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
CENTRE_JITTER = 0.04


@dataclass(frozen=True)
class Spec:
    """What a caption says: the background, one or two (colour, shape) objects, and for one object its size
    word and position (None when the caption gives none)."""

    background: str
    objects: tuple[tuple[str, str], ...]
    size: str | None = None
    position: str | None = None

    def __post_init__(self):
        if self.background not in COLOURS or not 1 <= len(self.objects) <= 2:
            raise ValueError(f"bad spec {self}")
        for colour, shape in self.objects:
            if colour not in COLOURS or shape not in SHAPES or colour == self.background:
                raise ValueError(f"bad spec {self}")
        if len(self.objects) == 2 and (self.size or self.position):
            raise ValueError("two-object captions carry no size or position")
        if self.size not in (None, *SIZE_WORDS) or self.position not in (None, *POSITIONS):
            raise ValueError(f"bad spec {self}")

    @property
    def caption(self) -> str:
        if len(self.objects) == 2:
            (c1, s1), (c2, s2) = self.objects
            return f"{_a(c1)} {c1} {s1} and {_a(c2)} {c2} {s2} on {_a(self.background)} {self.background} background"
        colour, shape = self.objects[0]
        words = [_a(self.size or colour)] + ([self.size] if self.size else []) + [colour, shape]
        if self.position:
            words += ["on", "the", self.position]
        return " ".join(words + ["on", _a(self.background), self.background, "background"])


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Item:
    """One drawn object: colour, shape, centre (fractions of width/height) and width (fraction of width)."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    spec: Spec
    items: tuple[Item, ...]

    @property
    def caption(self) -> str:
        return self.spec.caption


def parse_caption(text: str) -> Spec | None:
    """The spec a caption of the grammar describes (case, punctuation and extra spaces ignored), else None."""
    words = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text.lower()).split()
    words = ["a" if word == "an" else word for word in words]
    if len(words) < 6 or words[-4:-2] != ["on", "a"] or words[-1] != "background" or words[0] != "a":
        return None
    background, body = words[-2], words[1:-4]
    try:
        if "and" in body:
            i = body.index("and")
            first, second = body[:i], body[i + 1:]
            if len(first) != 2 or len(second) != 3 or second[0] != "a":
                return None
            return Spec(background, ((first[0], first[1]), (second[1], second[2])))
        size = position = None
        if len(body) >= 4 and body[-3:-1] == ["on", "the"]:
            position, body = body[-1], body[:-3]
        if len(body) == 3:
            size, body = body[0], body[1:]
        if len(body) != 2:
            return None
        return Spec(background, ((body[0], body[1]),), size, position)
    except ValueError:
        return None


def split(spec: Spec) -> str:
    """"train" or "heldout" (never trained on)."""
    if len(spec.objects) == 1 and spec.objects[0] in HELD_OUT_PAIRS:
        return "heldout"
    return "heldout" if zlib.crc32(spec.caption.encode()) % 10 == 0 else "train"


def random_spec(rng: random.Random, two_objects: float = 0.3) -> Spec:
    """A spec drawn from the whole grammar (either split)."""
    if rng.random() < two_objects:
        first = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        second = first
        while second == first:
            second = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        background = rng.choice([c for c in COLOURS if c not in (first[0], second[0])])
        return Spec(background, (first, second))
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    background = rng.choice([c for c in COLOURS if c != colour])
    size = rng.choice((None, None, "small", "large"))
    position = rng.choice((None,) * 4 + POSITIONS)
    return Spec(background, ((colour, shape),), size, position)


def sample_spec(rng: random.Random, which: str = "train", two_objects: float = 0.3) -> Spec:
    """A spec of split `which` ("train" or "heldout")."""
    while True:
        spec = random_spec(rng, two_objects)
        if which == "heldout" and len(spec.objects) == 1 and rng.random() < 0.7:
            colour, shape = rng.choice(sorted(HELD_OUT_PAIRS))  # mostly the unseen pairs, not just unseen strings
            if colour == spec.background:
                continue
            spec = Spec(spec.background, ((colour, shape),), spec.size, spec.position)
        if split(spec) == which:
            return spec


def layout(spec: Spec, rng: random.Random) -> Scene:
    """Place the objects of `spec` (random within the ranges the grammar promises)."""
    def jitter() -> float:
        return rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)

    if len(spec.objects) == 2:
        items = tuple(
            Item(colour, shape, centre + jitter(), 0.5 + jitter(), rng.uniform(*PAIR_SIZE_RANGE))
            for (colour, shape), centre in zip(spec.objects, PAIR_CENTRES)
        )
        return Scene(spec, items)
    colour, shape = spec.objects[0]
    size = rng.uniform(*SIZE_RANGES[(spec.size, spec.position is not None)])
    cx, cy = POSITION_CENTRES.get(spec.position, (0.5, 0.5))
    if spec.position is None:
        cx, cy = 0.5 + jitter() / 2, 0.5 + jitter() / 2
    else:
        cx, cy = cx + jitter(), cy + jitter()
    return Scene(spec, (Item(colour, shape, cx, cy, size),))


def variant(caption: str, rng: random.Random) -> str:
    """The caption as a user might type it: sometimes capitalised, sometimes with a full stop."""
    if rng.random() < 0.2:
        caption = caption[0].upper() + caption[1:]
    if rng.random() < 0.2:
        caption += "."
    if rng.random() < 0.15:
        caption = _a_orange(caption)
    return caption


def _a_orange(caption: str) -> str:
    return caption.replace("an orange", "a orange").replace("An orange", "A orange")


def variants(caption: str) -> set[str]:
    """Every string `variant(caption, rng)` can return."""
    forms = {caption, caption[0].upper() + caption[1:]}
    forms |= {form + "." for form in forms}
    return forms | {_a_orange(form) for form in forms}


def all_specs(which: str = "train") -> list[Spec]:
    """Every spec of the grammar in split `which` (the layouts within each are random, the specs are finite)."""
    specs = []
    for background in COLOURS:
        objects = [(c, s) for c in COLOURS if c != background for s in SHAPES]
        specs += [Spec(background, (obj,), size, position) for obj in objects
                  for size in (None, *SIZE_WORDS) for position in (None, *POSITIONS)]
        specs += [Spec(background, (first, second)) for first in objects for second in objects if first != second]
    return [spec for spec in specs if split(spec) == which]


def all_captions(which: str = "train") -> set[str]:
    """Every caption string of split `which`, as `variant` may write it (what training can ever draw)."""
    return set().union(*(variants(spec.caption) for spec in all_specs(which)))


_SHAPE_IDS = {shape: i for i, shape in enumerate(SHAPES)}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; on CUDA copied from pinned memory without waiting for the GPU's queue (a plain
    copy from pageable memory synchronizes, so a training loop could not run ahead of the GPU)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def render(scenes: list[Scene], resolution: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Images of `scenes` as a (N, 3, R, R) float tensor in [0, 1], anti-aliased over one pixel.

    Everything the scenes say goes to the device in one copy (from pinned memory on CUDA, so the copy does not
    wait for the GPU to finish its queue): training renders a batch per iteration."""
    n, device = len(scenes), torch.device(device)
    names = list(COLOURS)
    # per scene: background, then per object slot: present, cx, cy, half width, shape id, colour id
    rows = []
    for scene in scenes:
        row = [names.index(scene.spec.background)]
        for slot in range(2):
            item = scene.items[slot] if len(scene.items) > slot else None
            row += ([1.0, item.cx, item.cy, item.size / 2, _SHAPE_IDS[item.shape], names.index(item.colour)]
                    if item else [0.0, 0.5, 0.5, 0.0, 0, 0])
        rows.append(row)
    table = to_device(torch.tensor(rows, dtype=torch.float32), device)
    palette = to_device(torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0, device)
    image = palette[table[:, 0].long()][:, :, None, None].expand(n, 3, resolution, resolution).clone()
    coords = (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) / resolution
    y, x = coords[None, :, None], coords[None, None, :]
    for slot in range(2):
        present, cx, cy, half, shape, colour = (table[:, 1 + 6 * slot + k] for k in range(6))
        cx, cy, half, shape = cx[:, None, None], cy[:, None, None], half[:, None, None], shape.long()[:, None, None]
        dx, dy = x - cx, y - cy
        circle = torch.sqrt(dx * dx + dy * dy) - half
        square = torch.maximum(dx.abs(), dy.abs()) - half
        # Upright triangle: apex (0, -h), base from (-h, h) to (h, h); the base's edge and two slanted edges.
        slant = (2 * dx.abs() - dy - half) / 5**0.5
        triangle = torch.maximum(dy - half, slant)
        distance = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))
        alpha = (0.5 - distance * resolution).clamp(0.0, 1.0)[:, None] * present[:, None, None, None]
        image = image * (1 - alpha) + palette[colour.long()][:, :, None, None] * alpha
    return image


def batch(rng: random.Random, count: int, which: str = "train", two_objects: float = 0.3) -> list[Scene]:
    """`count` random scenes of split `which`."""
    return [layout(sample_spec(rng, which, two_objects), rng) for _ in range(count)]


def eval_specs(count: int = 200, seed: int = 1234) -> list[Spec]:
    """`count` distinct held-out specs: about 60% single objects of the unseen pairs, 40% unseen two-object captions."""
    rng = random.Random(seed)
    specs, seen = [], set()
    singles = round(count * 0.6)
    while len(specs) < count:
        want_two = len(specs) >= singles
        spec = sample_spec(rng, "heldout", two_objects=1.0 if want_two else 0.0)
        if want_two != (len(spec.objects) == 2) or spec.caption in seen:
            continue
        if not want_two and spec.objects[0] not in HELD_OUT_PAIRS:
            continue
        seen.add(spec.caption)
        specs.append(spec)
    return specs


def to_uint8(images: torch.Tensor) -> list:
    """(N, 3, H, W) [0, 1] tensor -> list of (H, W, 3) uint8 numpy arrays."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(array)
