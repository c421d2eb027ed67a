"""An analytic detector that reads an image back into what a caption of `shapes.data`'s grammar says.

Background: the palette colour of the image corners. Objects: connected regions that differ from the
background (specks under 0.4% of the image ignored), each with the palette colour of its median pixel and
a shape from how much of its bounding box it fills (square ~1, circle ~0.79, upright triangle ~0.5, which
also has far less of its area in the top half of its box than in the bottom half). `score(spec, image)`
checks an image against a caption: background, number of objects, each colour and shape (left to right),
and for one object its size class and position.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .data import COLOURS, Spec

_NAMES = list(COLOURS)
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
FOREGROUND_DISTANCE = 45.0  # RGB distance from the background colour above which a pixel is foreground
MIN_AREA = 0.004  # smallest object, as a fraction of the image area
SQUARE_FILL, CIRCLE_FILL = 0.89, 0.64  # fill-ratio thresholds: >= square, >= circle, below: triangle
TRIANGLE_TOP_BOTTOM = 0.6  # a triangle has ~1/3 as many pixels in its box's top half as in its bottom half

# Object width classes (fraction of the image width) that `score` accepts, by (size word, positioned?).
WIDTH_CLASSES = {
    (None, False): (0.27, 0.63), ("small", False): (0.08, 0.27), ("large", False): (0.63, 0.90),
    (None, True): (0.24, 0.38), ("small", True): (0.08, 0.24), ("large", True): (0.38, 0.55),
}
PAIR_WIDTH = (0.16, 0.44)


@dataclass
class DetectedObject:
    colour: str
    shape: str
    cx: float  # bounding-box centre, fraction of width
    cy: float
    width: float  # mean of the box's width and height, fraction of the image width
    fill: float  # object pixels / bounding-box pixels
    top_bottom: float  # pixels in the top half of the box / pixels in the bottom half
    area: float  # fraction of the image


@dataclass
class Detection:
    background: str
    objects: list[DetectedObject] = field(default_factory=list)  # left to right


def nearest_colour(rgb) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=1)))]


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.asarray(array, dtype=np.float32) * (255.0 if array.max() <= 1.0 else 1.0), 0, 255)
    return array.astype(np.float32)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of flat pixel indices."""
    height, width = mask.shape
    flat = mask.ravel().copy()
    components = []
    for start in np.flatnonzero(flat):
        if not flat[start]:
            continue
        flat[start] = False
        queue, members = deque([start]), [start]
        while queue:
            index = queue.popleft()
            row, col = divmod(index, width)
            for neighbour, inside in ((index - width, row > 0), (index + width, row < height - 1),
                                      (index - 1, col > 0), (index + 1, col < width - 1)):
                if inside and flat[neighbour]:
                    flat[neighbour] = False
                    queue.append(neighbour)
                    members.append(neighbour)
        components.append(np.array(members))
    return components


def detect(image) -> Detection:
    """Read the background colour and the objects of an RGB image (PIL image or HxWx3 array)."""
    pixels = _as_array(image)
    height, width, _ = pixels.shape
    k = max(2, height // 16)
    corners = [pixels[:k, :k], pixels[:k, -k:], pixels[-k:, :k], pixels[-k:, -k:]]
    names = [nearest_colour(np.median(c.reshape(-1, 3), axis=0)) for c in corners]
    background = max(set(names), key=names.count)
    bg_rgb = np.median(np.concatenate([c.reshape(-1, 3) for c, n in zip(corners, names) if n == background]), axis=0)
    distance = np.linalg.norm(pixels - bg_rgb, axis=2)
    objects = []
    for members in _components(distance > FOREGROUND_DISTANCE):
        if len(members) < MIN_AREA * height * width:
            continue
        rows, cols = np.divmod(members, width)
        core = distance.ravel()[members] > 2 * FOREGROUND_DISTANCE
        colour_pixels = pixels.reshape(-1, 3)[members[core] if core.sum() >= 4 else members]
        colour = nearest_colour(np.median(colour_pixels, axis=0))
        # The shape: pixels of the region's box nearer the object's colour than the background's.
        r0, r1, c0, c1 = max(rows.min() - 1, 0), min(rows.max() + 2, height), max(cols.min() - 1, 0), min(cols.max() + 2, width)
        box = pixels[r0:r1, c0:c1]
        obj_rgb = _PALETTE[_NAMES.index(colour)]
        inside = np.linalg.norm(box - obj_rgb, axis=2) < np.linalg.norm(box - bg_rgb, axis=2)
        region = np.zeros((height, width), dtype=bool)
        region.ravel()[members] = True
        inside &= region[r0:r1, c0:c1] | _dilate(region)[r0:r1, c0:c1]
        if inside.sum() < MIN_AREA * height * width:
            continue
        ys, xs = np.nonzero(inside)
        top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        box_h, box_w = bottom - top, right - left
        fill = inside.sum() / float(box_h * box_w)
        middle = top + box_h / 2
        upper, lower = (ys + 0.5 < middle).sum(), (ys + 0.5 >= middle).sum()
        top_bottom = upper / max(lower, 1)
        if fill >= SQUARE_FILL:
            shape = "square"
        elif fill >= CIRCLE_FILL and top_bottom >= TRIANGLE_TOP_BOTTOM:
            shape = "circle"
        else:
            shape = "triangle"
        objects.append(DetectedObject(
            colour, shape, cx=(c0 + (left + right) / 2) / width, cy=(r0 + (top + bottom) / 2) / height,
            width=(box_w / width + box_h / height) / 2, fill=float(fill), top_bottom=float(top_bottom),
            area=inside.sum() / float(height * width),
        ))
    objects.sort(key=lambda o: o.cx)
    return Detection(background, objects)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _position_ok(position: str | None, obj: DetectedObject) -> bool:
    if position is None:
        return abs(obj.cx - 0.5) < 0.12 and abs(obj.cy - 0.5) < 0.12
    if position in ("left", "right"):
        horizontal = obj.cx < 0.42 if position == "left" else obj.cx > 0.58
        return horizontal and abs(obj.cy - 0.5) < 0.15
    vertical = obj.cy < 0.42 if position == "top" else obj.cy > 0.58
    return vertical and abs(obj.cx - 0.5) < 0.15


def score(spec: Spec, image) -> dict:
    """Check `image` against `spec`: each attribute True/False, and "correct" when all are."""
    found = detect(image)
    result = {"background": found.background == spec.background, "count": len(found.objects) == len(spec.objects)}
    pairs = list(zip(spec.objects, found.objects)) if result["count"] else []
    result["colours"] = bool(pairs) and all(obj.colour == colour for (colour, _), obj in pairs)
    result["shapes"] = bool(pairs) and all(obj.shape == shape for (_, shape), obj in pairs)
    if len(spec.objects) == 1:
        obj = found.objects[0] if result["count"] else None
        low, high = WIDTH_CLASSES[(spec.size, spec.position is not None)]
        result["size"] = obj is not None and low <= obj.width < high
        result["position"] = obj is not None and _position_ok(spec.position, obj)
    else:
        result["size"] = bool(pairs) and all(PAIR_WIDTH[0] <= obj.width < PAIR_WIDTH[1] for _, obj in pairs)
        result["position"] = bool(pairs) and found.objects[0].cx < 0.5 < found.objects[1].cx
    result["correct"] = all(result.values())
    return result


def describe(detection: Detection) -> str:
    """The detection as a caption-like sentence (for reports)."""
    parts = [f"{o.colour} {o.shape} (w={o.width:.2f} at {o.cx:.2f},{o.cy:.2f} fill={o.fill:.2f})" for o in detection.objects]
    return f"{' and '.join(parts) or 'nothing'} on {detection.background}"
