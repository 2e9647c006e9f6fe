#!/usr/bin/env python3
"""The Python twin of ``sketchx-core/src/sketch.rs`` and the reference fixtures for its tests.

``reference_preprocess(image, width, height, mode)`` does what ``Sketch::to_control`` does, with PIL and numpy:

1. decode to RGB8 (``decode_rgb``): alpha is composited over white with integer arithmetic,
   ``out = (c * a + 255 * (255 - a) + 127) // 255``; grayscale is replicated into R, G and B;
2. resize with ``PIL.Image.resize((width, height), Image.LANCZOS)`` (the Rust port is bit-exact with it);
3. ``mode == "scribble"``: if the mean of ``(R + G + B) / 3`` is >= 127.5 (dark strokes on a light background) a
   pixel is a stroke (255, 255, 255) where its darkest channel is < 127, as in ControlNet's scribble demo
   (``detected_map[np.min(img, axis=2) < 127] = 255``); otherwise (light strokes on dark) where its brightest
   channel is > 128; every other pixel is (0, 0, 0). ``mode == "none"``: the resize only.

``generate(fixtures_dir)`` writes small reference cases to ``<fixtures_dir>/sketch/``:

* ``lanczos.txt`` + ``lanczos_*.png``: PIL LANCZOS resizes of RGB8 images (up, down, mixed, odd sizes, identity);
* ``preprocess.txt`` + ``pre_*.png``: full ``reference_preprocess`` results for black-on-white, white-on-black,
  coloured, grayscale, grayscale+alpha, palette+transparency and RGBA transparent-background sketches;
* ``to_u8.f32`` / ``to_u8.u8``: diffusers' float -> u8 conversion (``torch.clamp(x / 2 + 0.5, 0, 1)``, then numpy's
  ``(x * 255).round().astype("uint8")``) on tricky values (ties, NaN, infinities, signed zeros, subnormals);
* ``bomb_header.png``: a tiny PNG whose header claims 60000x60000 pixels;
* ``zero_width.bmp``, ``zero_size.gif``: a BMP with a 0-pixel width, a GIF of 0x0 pixels;
* ``sketch.jpg`` + ``sketch_jpg_pil.png``: a small JPEG (to truncate) and PIL's decoding of it.

Usage: ``python tools/fixturegen/sketch.py tests/fixtures`` (needs Pillow, numpy and torch).
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------------------------
# The twin
# ---------------------------------------------------------------------------------------------------------------


def composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8 with sketchx's integer rule."""
    rgba = rgba.astype(np.uint32)
    a = rgba[..., 3:4]
    return ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def decode_rgb(image) -> np.ndarray:
    """Decodes like ``Sketch::decode``: a path, bytes, a PIL image or an (H, W, 3|4) uint8 array -> (H, W, 3) uint8.

    8-bit images only (16-bit PNGs are rounded with ``(v + 128) // 257`` in Rust; PIL drops the low byte).
    Lossless formats match exactly; JPEG decoders may differ by a unit in the last place.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError("expected an (H, W, 3|4) uint8 array")
        return composite_over_white(image) if image.shape[2] == 4 else image.copy()
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    image.load()
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        return composite_over_white(np.asarray(image.convert("RGBA")))
    return np.asarray(image.convert("RGB")).copy()


def target_size(src_w: int, src_h: int, width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """Twin of ``Sketch::target_size`` (exact integer rounding, halves up)."""

    def round_to(num, den, step):
        return (2 * num + step * den) // (2 * step * den) * step

    if width is not None and height is not None:
        return width, height
    if width is not None:
        return width, min(max(round_to(width * src_h, src_w, 8), 64), 2048)
    if height is not None:
        return min(max(round_to(height * src_w, src_h, 8), 64), 2048), height
    short = min(src_w, src_h)
    return tuple(min(max(round_to(512 * s, short, 64), 64), 1024) for s in (src_w, src_h))


def scribble_threshold(rgb: np.ndarray) -> np.ndarray:
    """White strokes on black, with polarity detection (see the module docstring)."""
    total = int(rgb.astype(np.uint64).sum())
    pixels = rgb.shape[0] * rgb.shape[1]
    if 2 * total >= 765 * pixels:
        stroke = rgb.min(axis=2) < 127
    else:
        stroke = rgb.max(axis=2) > 128
    out = np.zeros_like(rgb)
    out[stroke] = 255
    return out


def reference_preprocess(image, width: int | None = None, height: int | None = None,
                         mode: str = "scribble") -> Image.Image:
    """Twin of ``Sketch::decode`` + ``Sketch::to_control``; returns the RGB control image as a PIL image.

    ``image``: a path, bytes, a PIL image or an (H, W, 3|4) uint8 array. ``width``/``height`` default to
    ``target_size``'s rule.
    """
    rgb = decode_rgb(image)
    h, w = rgb.shape[:2]
    width, height = target_size(w, h, width, height)
    resized = np.asarray(Image.fromarray(rgb, "RGB").resize((width, height), Image.LANCZOS))
    if mode == "scribble":
        resized = scribble_threshold(resized)
    elif mode != "none":
        raise ValueError(f"unknown preprocessing mode {mode!r}")
    return Image.fromarray(np.ascontiguousarray(resized), "RGB")


def diffusers_to_u8(values: np.ndarray) -> np.ndarray:
    """diffusers' postprocess: ``(x / 2 + 0.5).clamp(0, 1)`` in torch, ``(x * 255).round().astype("uint8")``."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    y = (t / 2 + 0.5).clamp(0, 1).numpy()
    with np.errstate(invalid="ignore"):
        return (y * 255).round().astype("uint8")


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------

# (input w, h, output w, h); the identity case checks PIL's copy path.
LANCZOS_CASES = [
    (37, 23, 61, 45),  # up both
    (61, 45, 37, 23),  # down both
    (50, 40, 50, 77),  # vertical only, up
    (50, 40, 19, 40),  # horizontal only, down
    (33, 33, 33, 33),  # identity
    (64, 48, 17, 95),  # down x, up y
    (17, 95, 64, 48),  # up x, down y
    (1, 1, 7, 5),  # from a single pixel
    (45, 31, 1, 1),  # to a single pixel
    (97, 13, 96, 14),  # nearly identity
    (120, 90, 512, 384),  # sketch upscale (4:3)
    (300, 211, 64, 47),  # sketch strong downscale (wide support)
    (3, 200, 128, 9),  # extreme aspect ratios
    # Pillow 13 runs the vertical pass first when not both sides grow and 2 * dw > dh (see pil_vertical_first).
    (60, 80, 50, 20),  # both down, vertical first
    (50, 50, 40, 30),  # boundary 2 * dw == dh: horizontal first
    (50, 50, 40, 29),  # just past it: vertical first
    (40, 30, 90, 70),  # both up: always horizontal first
]


def _random_rgb(rng, w, h, kind):
    if kind == "noise":
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    # smooth gradient + noise + hard black/white edges: exercises clipping (ringing beyond 0..255)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 2 * 255], axis=-1)
    noise = rng.normal(0, 20, (h, w, 3))
    img = np.clip(base + noise, 0, 255).astype(np.uint8)
    img[h // 3: h // 3 + max(h // 10, 1), :, :] = 0
    img[:, w // 2: w // 2 + max(w // 12, 1), :] = 255
    return img


def _sketch_rgb(w, h, fg, bg, mode="RGB", width=3):
    im = Image.new(mode, (w * 2, h * 2), bg)
    dr = ImageDraw.Draw(im)
    W, H = w * 2, h * 2
    dr.rectangle([W * 0.2, H * 0.45, W * 0.7, H * 0.9], outline=fg, width=width * 2)
    dr.line([W * 0.15, H * 0.5, W * 0.45, H * 0.15, W * 0.75, H * 0.5], fill=fg, width=width * 2)
    dr.ellipse([W * 0.72, H * 0.06, W * 0.95, H * 0.32], outline=fg, width=width)
    dr.line([W * 0.05, H * 0.95, W * 0.95, H * 0.93], fill=fg, width=width)
    # Downsample with LANCZOS so strokes get anti-aliased edges (values near the 127/128 thresholds).
    return im.resize((w, h), Image.LANCZOS)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_header_png(width=60000, height=60000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * 16), 9)  # one short row: the rest is "missing"
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _zero_width_bmp(height=4) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, 0, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def _zero_size_gif() -> bytes:
    """A GIF whose logical screen and only frame are 0x0 pixels."""
    screen = struct.pack("<HHBBB", 0, 0, 0x80, 0, 0) + bytes([0, 0, 0, 255, 255, 255])
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 0, 0, 0) + bytes([2, 2, 0x44, 0x01, 0])
    return b"GIF89a" + screen + frame + b"\x3b"


def _to_u8_values(rng) -> np.ndarray:
    f = np.float32
    special = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1e-45, -1e-45, 1e-38, -1e-38, 3.4e38, -3.4e38,
               np.inf, -np.inf, np.nan, -np.nan, 1.0000001, -1.0000001, 0.99999994, -0.99999994]
    vals = [f(v) for v in special]
    # Exact ties: x with (x / 2 + 0.5) * 255 == k + 0.5 in float32.
    for k in range(255):
        y = f((k + 0.5) / 255)
        for cand in (y, np.nextafter(y, f(0)), np.nextafter(y, f(1))):
            x = f((cand - f(0.5)) * f(2))
            yy = f(f(x / f(2)) + f(0.5))
            if f(yy * f(255)) == f(k + 0.5):
                vals.append(x)
            vals.append(np.nextafter(x, f(-2)))
            vals.append(np.nextafter(x, f(2)))
    vals.extend(rng.normal(0, 0.7, 2000).astype(np.float32))
    vals.extend(rng.uniform(-1.2, 1.2, 2000).astype(np.float32))
    return np.array(vals, dtype=np.float32)


def generate(fixtures_dir):
    """Writes the sketch fixtures under ``<fixtures_dir>/sketch``."""
    out = Path(fixtures_dir) / "sketch"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240607)

    lines = ["# input output_width output_height expected  (PIL Image.resize(..., Image.LANCZOS), RGB8)"]
    for i, (iw, ih, ow, oh) in enumerate(LANCZOS_CASES):
        if ow * oh > 100_000 or iw * ih > 50_000:  # big cases: sketch content keeps the files small
            im = _sketch_rgb(iw, ih, (10, 10, 10), (255, 255, 255))
        else:
            im = Image.fromarray(_random_rgb(rng, iw, ih, "noise" if i % 2 == 0 else "structured"), "RGB")
        res = im.resize((ow, oh), Image.LANCZOS)
        name = f"lanczos_{i:02}"
        im.save(out / f"{name}_in.png")
        res.save(out / f"{name}_out.png")
        lines.append(f"{name}_in.png {ow} {oh} {name}_out.png")
    (out / "lanczos.txt").write_text("\n".join(lines) + "\n")

    inputs = {}
    inputs["pre_black_on_white.png"] = _sketch_rgb(96, 80, (0, 0, 0), (255, 255, 255))
    inputs["pre_white_on_black.png"] = _sketch_rgb(96, 80, (255, 255, 255), (0, 0, 0))
    inputs["pre_blue_on_cream.png"] = _sketch_rgb(120, 90, (40, 60, 170), (250, 244, 225))
    inputs["pre_gray.png"] = _sketch_rgb(70, 110, 30, 235, mode="L")
    inputs["pre_gray_alpha.png"] = _sketch_rgb(64, 64, (20, 255), (255, 0), mode="LA")
    inputs["pre_transparent.png"] = _sketch_rgb(80, 120, (20, 20, 30, 255), (0, 0, 0, 0), mode="RGBA")
    # Transparent background whose hidden colour is black: a naive alpha drop would invert the polarity.
    inputs["pre_transparent_black_bg.png"] = _sketch_rgb(90, 70, (0, 0, 0, 255), (0, 0, 0, 0), mode="RGBA")
    pal = _sketch_rgb(72, 72, (0, 0, 0), (255, 255, 255)).quantize(8)
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])  # the background colour becomes transparent
    inputs["pre_palette_trns.png"] = pal
    for name, im in inputs.items():
        if name == "pre_palette_trns.png":
            im.save(out / name, transparency=im.info["transparency"])
        else:
            im.save(out / name)

    cases = [
        ("pre_black_on_white.png", 128, 96, "scribble"),
        ("pre_black_on_white.png", 40, 33, "scribble"),
        ("pre_black_on_white.png", 128, 96, "none"),
        ("pre_white_on_black.png", 128, 96, "scribble"),
        ("pre_white_on_black.png", 64, 64, "scribble"),
        ("pre_blue_on_cream.png", 160, 120, "scribble"),
        ("pre_gray.png", 64, 104, "scribble"),
        ("pre_gray_alpha.png", 64, 64, "scribble"),
        ("pre_transparent.png", 64, 96, "scribble"),
        ("pre_transparent.png", 64, 96, "none"),
        ("pre_transparent_black_bg.png", 96, 72, "scribble"),
        ("pre_palette_trns.png", 72, 80, "scribble"),
    ]
    lines = ["# input width height mode expected  (reference_preprocess)"]
    for i, (name, w, h, mode) in enumerate(cases):
        expected = f"pre_expected_{i:02}.png"
        reference_preprocess(out / name, w, h, mode).save(out / expected)
        lines.append(f"{name} {w} {h} {mode} {expected}")
    (out / "preprocess.txt").write_text("\n".join(lines) + "\n")

    vals = _to_u8_values(rng)
    vals.astype("<f4").tofile(out / "to_u8.f32")
    diffusers_to_u8(vals).tofile(out / "to_u8.u8")

    (out / "bomb_header.png").write_bytes(_bomb_header_png())
    (out / "zero_width.bmp").write_bytes(_zero_width_bmp())
    (out / "zero_size.gif").write_bytes(_zero_size_gif())
    _sketch_rgb(128, 96, (0, 0, 0), (255, 255, 255)).save(out / "sketch.jpg", quality=90)
    # PIL's (libjpeg's) decoding of it: JPEG decoders are not bit-identical, the test bounds the difference.
    Image.open(out / "sketch.jpg").convert("RGB").save(out / "sketch_jpg_pil.png")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: sketch.py FIXTURES_DIR")
    generate(sys.argv[1])
