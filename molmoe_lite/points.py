"""Parse Molmo's pointing answers into pixel coordinates.

Molmo answers "point at ..." questions with tags such as
``<point x="61.5" y="40.2" alt="dog">dog</point>`` or
``<points x1="10" y1="20" x2="30.5" y2="44" alt="cups">cups</points>``, with
coordinates in percent of the image width and height. ``parse_points`` finds every
such tag in a text and scales the coordinates to pixels of the given image size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TAG = re.compile(r"<(points?)\b([^>]*)>(.*?)</\1>", re.DOTALL)
_ATTR = re.compile(r'(\w+)\s*=\s*"([^"]*)"')
_INDEXED = re.compile(r"^([xy])(\d+)$")


@dataclass(frozen=True)
class Point:
    """One pointed location in pixels, with the label Molmo gave it."""

    x: float
    y: float
    label: str


def _to_float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def parse_points(text: str, width: float = 100.0, height: float = 100.0) -> list[Point]:
    """Every point in ``text``, scaled from percent to a ``width`` x ``height`` image.

    With the default size of 100 x 100 the coordinates stay in percent. Malformed
    coordinates (not numbers, or outside 0..100) are skipped rather than guessed.
    """
    points: list[Point] = []
    for match in _TAG.finditer(text):
        attrs = dict(_ATTR.findall(match.group(2)))
        label = attrs.get("alt") or match.group(3).strip()
        pairs: list[tuple[str, str]] = []
        if match.group(1) == "point":
            if "x" in attrs and "y" in attrs:
                pairs.append((attrs["x"], attrs["y"]))
        else:
            indexed: dict[int, dict[str, str]] = {}
            for key, value in attrs.items():
                m = _INDEXED.match(key)
                if m:
                    indexed.setdefault(int(m.group(2)), {})[m.group(1)] = value
            for i in sorted(indexed):
                if "x" in indexed[i] and "y" in indexed[i]:
                    pairs.append((indexed[i]["x"], indexed[i]["y"]))
        for xs, ys in pairs:
            x, y = _to_float(xs), _to_float(ys)
            if x is None or y is None or not (0 <= x <= 100 and 0 <= y <= 100):
                continue
            points.append(Point(x * width / 100.0, y * height / 100.0, label))
    return points


def draw_points(image, points: list[Point], path, radius: int | None = None) -> None:
    """Save ``image`` (a PIL image) with a marked circle and label at every point."""
    from PIL import ImageDraw

    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    r = radius or max(4, round(min(canvas.size) / 60))
    for p in points:
        box = [p.x - r, p.y - r, p.x + r, p.y + r]
        draw.ellipse(box, outline=(255, 255, 255), width=max(2, r // 3) + 2)
        draw.ellipse(box, outline=(230, 30, 30), width=max(2, r // 3))
        if p.label:
            draw.text((p.x + r + 2, p.y - r), p.label, fill=(230, 30, 30))
    canvas.save(path)
