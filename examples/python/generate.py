#!/usr/bin/env python3
"""The README's main job from Python: turn a sketch into images. Same flags as the Rust example
(`cargo run --release --example generate -- ...`):

    python examples/python/generate.py --sketch examples/sketches/car.png --prompt "a red sports car"

Prints the path of every image it writes (OUT/seed<N>_<i>.png); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import sketchx


def parse_args(argv: "list[str] | None" = None) -> argparse.Namespace:
    # Every default, range and name comes from the Rust core, through the module.
    d, r, n = sketchx.DEFAULTS, sketchx.RANGES, sketchx.NAMES

    def span(field: str) -> str:
        return "{}..={}".format(*r[field])

    p = argparse.ArgumentParser(description="Sketch in, images out.")
    p.add_argument("--sketch", required=True, help="the sketch image (PNG, JPEG, WebP, BMP or GIF)")
    p.add_argument("--prompt", default=d["prompt"], help="what the image should show; empty: guess mode")
    p.add_argument("--negative-prompt", default=d["negative_prompt"],
                   help='what to avoid (default: the original service\'s; "" for none)')
    p.add_argument("--temperature", type=float, default=d["temperature"],
                   help=f"{span('temperature')} (ControlNet scale = 1.65 - temperature)")
    p.add_argument("--guidance-scale", type=float, default=d["guidance_scale"],
                   help=f"{span('guidance_scale')} (<= 1 turns it off)")
    p.add_argument("--num-images", type=int, default=d["num_images"], help=span("num_images"))
    p.add_argument("--steps", type=int, default=d["steps"], help=span("steps"))
    p.add_argument("--seed", type=int, default=d["seed"], help="torch-compatible seed; random when absent")
    p.add_argument("--width", type=int, default=d["width"],
                   help="multiple of 8; default: from the sketch (short side 512)")
    p.add_argument("--height", type=int, default=d["height"], help="multiple of 8; default: from the sketch")
    p.add_argument("--scheduler", default=d["scheduler"], help=", ".join(n["scheduler"]))
    p.add_argument("--preprocess", default=d["preprocess"], help=", ".join(n["preprocess"]))
    p.add_argument("--canny-low-threshold", type=int, default=d["canny_low_threshold"],
                   help=f"{span('canny_low_threshold')}, lower threshold of --preprocess canny")
    p.add_argument("--canny-high-threshold", type=int, default=d["canny_high_threshold"],
                   help=f"{span('canny_high_threshold')}, upper threshold of --preprocess canny")
    p.add_argument("--start-image", default=d["start_image"], metavar="PATH|sketch",
                   help="img2img: start from this image, or from the sketch's own colours with 'sketch'")
    p.add_argument("--strength", type=float, default=d["strength"],
                   help=f"{span('strength')}: with --start-image, how far it is noised")
    p.add_argument("--clip-skip", type=int, default=d["clip_skip"],
                   help=f"{span('clip_skip')}: diffusers' clip_skip (A1111's clip skip N is N - 1; the negative "
                   "prompt always uses the last layer)")
    p.add_argument("--embedding", action="append", default=list(d["embeddings"]), metavar="PATH[:TOKEN]",
                   help="a textual inversion embedding (A1111 .pt / .safetensors, diffusers learned_embeds) and "
                   "the token written in prompts (default: the file's own); repeatable, loaded in order")
    p.add_argument("--model", default=d["model"], help="Stable Diffusion 1.5: Hub repo id or directory")
    p.add_argument("--controlnet", default=d["controlnet"], help="ControlNet: Hub repo id or directory")
    p.add_argument("--out", default=d["output_dir"], help="output directory (created if missing)")
    p.add_argument("--device", default=d["device"], help=", ".join(n["device"]))
    p.add_argument("--dtype", default=d["dtype"],
                   help=", ".join(n["dtype"]) + "; default: f32 on the CPU, f16 on GPUs")
    p.add_argument("--vae-tiling", action="store_true", default=d["vae_tiling"],
                   help="decode in overlapping tiles (diffusers' vae.enable_tiling()): less memory for large images")
    return p.parse_args(argv)


def main(argv: "list[str] | None" = None) -> int:
    args = parse_args(argv)
    try:
        print(f"loading {args.model} + {args.controlnet} ...", file=sys.stderr)
        t0 = time.monotonic()
        with sketchx.Pipeline(
            args.model,
            args.controlnet,
            device=args.device,
            dtype=args.dtype,
            output_dir=args.out,
            cleanup_interval_secs=None,
            vae_tiling=args.vae_tiling,
            embeddings=args.embedding,
        ) as pipe:
            print(f"models loaded in {time.monotonic() - t0:.1f}s", file=sys.stderr)
            t1 = time.monotonic()
            job = pipe.submit(
                args.sketch,
                args.prompt,
                negative_prompt=args.negative_prompt,
                temperature=args.temperature,
                guidance_scale=args.guidance_scale,
                num_images=args.num_images,
                steps=args.steps,
                seed=args.seed,
                width=args.width,
                height=args.height,
                scheduler=args.scheduler,
                preprocess=args.preprocess,
                canny_low_threshold=args.canny_low_threshold,
                canny_high_threshold=args.canny_high_threshold,
                start_image=args.start_image,
                strength=args.strength,
                clip_skip=args.clip_skip,
            )
            while True:
                try:
                    st = pipe.wait(job, timeout=0.5)
                    break
                except TimeoutError:
                    st = pipe.poll(job)
                    if sys.stderr.isatty():
                        print(f"\r{st.width}x{st.height} step {st.step}/{st.total_steps} {st.progress:5.1f}%",
                              end="", file=sys.stderr)
            if sys.stderr.isatty():
                print(file=sys.stderr)
            if st.status != "completed":
                print(f"error: {st.message}", file=sys.stderr)
                return 1
            print(f"generated {len(st.images)} image(s) of {st.width}x{st.height} in "
                  f"{time.monotonic() - t1:.1f}s (seed {st.seed})", file=sys.stderr)
            # Name the files like the Rust example; they then no longer belong to the pipeline's retention.
            for i, path in enumerate(st.images):
                final = os.path.join(args.out, f"seed{st.seed}_{i}.png")
                os.replace(path, final)
                print(final)
    except sketchx.SketchxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
