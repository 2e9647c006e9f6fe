#!/usr/bin/env python3
"""Draw the example sketches in examples/sketches/: dark strokes on white, like a drawing app exports.

Each sketch is drawn at 4x with round-capped polylines and downsampled with LANCZOS, which gives the
anti-aliased strokes a tablet drawing app produces. Deterministic: re-running rewrites identical files.

    python tools/draw_sketches.py [--out examples/sketches]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw

SS = 4  # supersampling factor
INK = (24, 24, 28)


class Pen:
    """Polyline drawing in output-pixel coordinates on a supersampled canvas."""

    def __init__(self, width: int, height: int, stroke: float = 4.0):
        self.size = (width, height)
        self.img = Image.new("RGB", (width * SS, height * SS), "white")
        self.draw = ImageDraw.Draw(self.img)
        self.stroke = stroke

    def line(self, points, stroke: float | None = None, closed: bool = False):
        w = int(round((stroke or self.stroke) * SS))
        pts = [(x * SS, y * SS) for x, y in points]
        if closed:
            pts = pts + [pts[0]]
        self.draw.line(pts, fill=INK, width=w, joint="curve")
        r = w / 2
        for x, y in (pts[0], pts[-1]):
            self.draw.ellipse((x - r, y - r, x + r, y + r), fill=INK)

    def ellipse(self, cx, cy, rx, ry, start=0.0, end=360.0, stroke=None, n=96):
        a0, a1 = math.radians(start), math.radians(end)
        pts = [
            (cx + rx * math.cos(a0 + (a1 - a0) * i / n), cy + ry * math.sin(a0 + (a1 - a0) * i / n))
            for i in range(n + 1)
        ]
        self.line(pts, stroke)

    def curve(self, p0, p1, p2, stroke=None, n=48):
        """Quadratic Bezier."""
        pts = []
        for i in range(n + 1):
            t = i / n
            pts.append(
                (
                    (1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * p1[0] + t * t * p2[0],
                    (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * p1[1] + t * t * p2[1],
                )
            )
        self.line(pts, stroke)

    def image(self) -> Image.Image:
        return self.img.resize(self.size, Image.LANCZOS)


def car() -> Image.Image:
    p = Pen(640, 448)
    # body
    p.line([(60, 300), (60, 250), (120, 235), (190, 170), (420, 165), (500, 230), (585, 245), (590, 300)])
    p.line([(60, 300), (125, 300)])
    p.line([(215, 300), (430, 300)])
    p.line([(520, 300), (590, 300)])
    # windows
    p.line([(205, 182), (300, 180), (300, 232), (150, 236)], closed=True, stroke=3)
    p.line([(318, 180), (410, 178), (470, 230), (318, 232)], closed=True, stroke=3)
    # wheels
    for cx in (170, 475):
        p.ellipse(cx, 305, 45, 45)
        p.ellipse(cx, 305, 18, 18, stroke=3)
    # details
    p.line([(250, 250), (275, 250)], stroke=3)
    p.line([(360, 250), (385, 250)], stroke=3)
    p.ellipse(565, 262, 10, 7, stroke=3)
    p.line([(40, 352), (600, 352)], stroke=2.5)
    return p.image()


def house() -> Image.Image:
    p = Pen(512, 512)
    p.line([(110, 230), (256, 110), (402, 230)])
    p.line([(130, 215), (130, 420), (382, 420), (382, 215)])
    p.line([(320, 160), (320, 115), (350, 115), (350, 185)])
    # door and windows
    p.line([(225, 420), (225, 320), (287, 320), (287, 420)])
    p.ellipse(275, 372, 4, 4, stroke=3)
    for x0 in (155, 305):
        p.line([(x0, 255), (x0 + 55, 255), (x0 + 55, 305), (x0, 305)], closed=True, stroke=3)
        p.line([(x0 + 27, 255), (x0 + 27, 305)], stroke=2.5)
        p.line([(x0, 280), (x0 + 55, 280)], stroke=2.5)
    # ground, sun, path
    p.line([(40, 420), (472, 420)], stroke=3)
    p.ellipse(430, 70, 28, 28, stroke=3)
    p.curve((256, 422), (230, 460), (250, 500), stroke=2.5)
    p.curve((287, 422), (300, 462), (330, 500), stroke=2.5)
    return p.image()


def cat_face() -> Image.Image:
    p = Pen(512, 512)
    p.ellipse(256, 290, 165, 140)
    # ears
    p.line([(120, 215), (135, 85), (215, 160)])
    p.line([(392, 215), (377, 85), (297, 160)])
    p.line([(145, 180), (150, 120), (190, 158)], stroke=2.5)
    p.line([(367, 180), (362, 120), (322, 158)], stroke=2.5)
    # eyes
    for cx in (195, 317):
        p.ellipse(cx, 260, 30, 22)
        p.ellipse(cx, 260, 7, 18, stroke=5)
    # nose and mouth
    p.line([(244, 318), (268, 318), (256, 332)], closed=True, stroke=3)
    p.curve((256, 332), (250, 365), (222, 360), stroke=3)
    p.curve((256, 332), (262, 365), (290, 360), stroke=3)
    # whiskers
    for dy in (-10, 8, 26):
        p.curve((205, 335 + dy), (150, 325 + dy * 1.4), (80, 325 + dy * 2.2), stroke=2.5)
        p.curve((307, 335 + dy), (362, 325 + dy * 1.4), (432, 325 + dy * 2.2), stroke=2.5)
    return p.image()


def tree() -> Image.Image:
    p = Pen(448, 576)
    # trunk
    p.line([(205, 520), (212, 380), (190, 330)])
    p.line([(250, 520), (242, 380), (268, 330)])
    p.line([(212, 400), (175, 360)], stroke=3)
    # crown: a cloud of arcs
    lobes = [(224, 170, 80), (150, 220, 62), (300, 220, 62), (170, 290, 58), (280, 290, 58), (224, 110, 55)]
    for cx, cy, r in lobes:
        p.ellipse(cx, cy, r, r * 0.85, start=150, end=390)
    # roots and ground
    p.curve((205, 520), (190, 535), (160, 540), stroke=3)
    p.curve((250, 520), (265, 535), (295, 540), stroke=3)
    p.line([(40, 545), (408, 545)], stroke=2.5)
    # a few leaves
    for x, y in ((120, 420), (330, 450), (360, 400)):
        p.ellipse(x, y, 10, 5, stroke=2.5)
    return p.image()


SKETCHES = {"car": car, "house": house, "cat_face": cat_face, "tree": tree}


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=root / "examples" / "sketches")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, fn in SKETCHES.items():
        img = fn()
        path = args.out / f"{name}.png"
        img.save(path, optimize=True)
        print(f"{path} {img.size[0]}x{img.size[1]} {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
