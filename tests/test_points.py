"""Parsing Molmo's <point>/<points> answers into pixel coordinates."""

import pytest

from molmoe_lite.points import Point, parse_points


def test_single_point_scaled_to_pixels():
    text = 'Here: <point x="25.0" y="50" alt="a dog">a dog</point>.'
    assert parse_points(text, width=640, height=480) == [Point(160.0, 240.0, "a dog")]


def test_multiple_points_in_index_order():
    text = '<points x1="10" y1="20" x3="90" y3="80" x2="50.5" y2="40" alt="cups">cups</points>'
    pts = parse_points(text, width=200, height=100)
    assert [(p.x, p.y) for p in pts] == [(20.0, 20.0), (101.0, 40.0), (180.0, 80.0)]
    assert {p.label for p in pts} == {"cups"}


def test_label_falls_back_to_tag_text_and_percent_by_default():
    assert parse_points('<point x="1" y="2">cat</point>') == [Point(1.0, 2.0, "cat")]


@pytest.mark.parametrize(
    "text",
    [
        "no tags at all",
        '<point x="abc" y="2">bad number</point>',
        '<point x="120" y="2">outside the image</point>',
        '<point y="2">missing x</point>',
        '<point x="1" y="2">unclosed',
    ],
    ids=["no-tag", "not-a-number", "out-of-range", "missing-x", "unclosed"],
)
def test_malformed_tags_are_skipped(text):
    assert parse_points(text, 100, 100) == []


def test_draw_points_marks_the_pixels(tmp_path):
    from PIL import Image

    from molmoe_lite.points import draw_points

    img = Image.new("RGB", (200, 100), (0, 0, 0))
    out = tmp_path / "marked.png"
    draw_points(img, [Point(50.0, 50.0, "a")], out, radius=6)
    marked = Image.open(out).convert("RGB")
    assert marked.size == (200, 100)
    ring = [marked.getpixel((50 + dx, 50)) for dx in (-6, 6)]
    assert all(px != (0, 0, 0) for px in ring)
    assert marked.getpixel((150, 90)) == (0, 0, 0)
