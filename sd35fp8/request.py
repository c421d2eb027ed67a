"""The settings of one generation, checked in one place for every caller (API, page links, benchmarks).

`GenerationRequest` checks typed values; `parse_setting` / `request_from_raw` turn raw values (text from a
link, JSON numbers from the API) into them. Every problem is an `InvalidRequest` that names the setting and
the allowed values, from `sd35fp8.settings.LIMITS`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .errors import BadInput
from .settings import LIMITS


class InvalidRequest(BadInput):
    """A generation setting is missing, malformed or out of range; the message names it and the allowed values."""


# name -> (label, kind, bounds); the bounds of width/height also depend on the model (see `max_size`).
SETTINGS = {
    "seed": ("Seed", int, LIMITS.seed),
    "steps": ("Steps", int, LIMITS.steps),
    "guidance": ("Guidance", float, LIMITS.guidance),
    "width": ("Width", int, LIMITS.size),
    "height": ("Height", int, LIMITS.size),
    "batch_size": ("Batch size", int, LIMITS.batch),
}


@dataclass(frozen=True)
class GenerationRequest:
    """Settings of one generation, checked on construction."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 28
    guidance: float = 4.5
    width: int = 1024
    height: int = 1024
    batch_size: int = 1

    def __post_init__(self):
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InvalidRequest(f"The {name.replace('_', ' ')} must be text.")
        if not self.prompt.strip():
            raise InvalidRequest("The prompt is empty: describe the image you want.")
        for name in ("prompt", "negative_prompt"):
            length = len(getattr(self, name))
            if length > LIMITS.prompt_chars:
                raise InvalidRequest(
                    f"The {name.replace('_', ' ')} has {length} characters; the limit is {LIMITS.prompt_chars} "
                    "(the text encoders read at most 77 + 256 tokens)."
                )
        for name in SETTINGS:
            check_setting(name, getattr(self, name))

    @property
    def parameters_text(self) -> str:
        """The A1111-style `parameters` text other SD tools read from a PNG."""
        text = self.prompt
        if self.negative_prompt:
            text += f"\nNegative prompt: {self.negative_prompt}"
        return text + (
            f"\nSteps: {self.steps}, Sampler: FlowMatchEuler, CFG scale: {self.guidance}, "
            f"Seed: {self.seed}, Size: {self.width}x{self.height}"
        )


def check_setting(name: str, value, max_size: int | None = None) -> None:
    """Raise InvalidRequest unless `value` is a valid `name` (a key of SETTINGS)."""
    label, kind, _ = SETTINGS[name]
    low, high = _bounds(name, max_size)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidRequest(f"{label} must be a whole number, not {value!r}.")
    if name in ("width", "height"):
        if not low <= value <= high or value % LIMITS.size_multiple:
            raise InvalidRequest(f"{label} {value} is not allowed: use a multiple of {LIMITS.size_multiple} "
                                 f"from {low} to {high}.")
    elif not low <= value <= high:
        raise InvalidRequest(f"{label} {value} is out of range: use {low} to {high}.")


def _bounds(name: str, max_size: int | None) -> tuple:
    low, high = SETTINGS[name][2]
    return (low, min(high, max_size)) if name in ("width", "height") and max_size is not None else (low, high)


def parse_setting(name: str, raw, max_size: int | None = None):
    """The value of setting `name` that `raw` (a number, or text from a link or form) stands for, checked."""
    label, kind, _ = SETTINGS[name]
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise InvalidRequest(f"{label} is missing.")
    if isinstance(raw, bool):
        raise InvalidRequest(f"{label} must be a number, not {raw!r}.")
    if isinstance(raw, (int, float)):
        number = raw
    else:
        text = str(raw).strip()
        try:
            number = int(text) if kind is int and text.lstrip("+-").isdigit() else float(text)
        except (TypeError, ValueError, OverflowError):
            raise InvalidRequest(f"{label} must be a number, not {_shown(raw)}.") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise InvalidRequest(f"{label} must be a finite number, not {_shown(raw)}.")
    if kind is int:
        if isinstance(number, float):
            if number != int(number):
                raise InvalidRequest(f"{label} must be a whole number, not {_shown(raw)}.")
            number = int(number)
    else:
        number = float(number)
    low, high = _bounds(name, max_size)
    if not low <= number <= high and abs(number) > 10**15:  # a 400-digit number is shown shortened
        raise InvalidRequest(f"{label} {_shown(raw)} is out of range: use {low} to {high}.")
    check_setting(name, number, max_size)
    return number


def _shown(raw, limit: int = 40) -> str:
    text = repr(raw) if isinstance(raw, str) else str(raw)
    return text if len(text) <= limit else text[:limit] + "…"


def request_from_raw(prompt, negative, seed, randomize, steps, guidance, width, height,
                     max_size: int | None = None, batch_size=1) -> GenerationRequest:
    """A checked request from raw API/form values; `randomize` draws a fresh seed instead of `seed`."""
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidRequest("The prompt must be text.")
    if negative is not None and not isinstance(negative, str):
        raise InvalidRequest("The negative prompt must be text.")
    chosen_seed = random.randint(0, LIMITS.max_seed) if randomize else parse_setting("seed", seed)
    return GenerationRequest(
        prompt=prompt or "", negative_prompt=negative or "", seed=chosen_seed,
        steps=parse_setting("steps", steps), guidance=parse_setting("guidance", guidance),
        width=parse_setting("width", width, max_size), height=parse_setting("height", height, max_size),
        batch_size=parse_setting("batch_size", batch_size),
    )
