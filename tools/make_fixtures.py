"""Regenerates every committed test fixture under tests/fixtures/ (CI never runs this; it needs torch).

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install -r tools/requirements-fixtures.txt
    /tmp/fx/bin/python tools/make_fixtures.py [tests/fixtures]

Order matters: the tokenizer files come first (the models' references tokenize with them), then the RNG and
scheduler references, the sketch references, the tiny models with diffusers' outputs, then the few-step fixtures
(fewstep.py: LoRAs, LCM UNet, TAESD, LCM/TCD/trailing references over the tiny models), bf16's yardstick and the
other model formats (formats.py: single files, original-layout ControlNets, VAE override, textual inversion,
img2img, preprocessors, bad input), then img2img for every scheduler (img2img.py: it reads the colour sketches
formats.py draws).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixturegen"))

import models  # noqa: E402
import sampling  # noqa: E402
import sketch  # noqa: E402
import tokenizer  # noqa: E402
import bf16  # noqa: E402  (after models: it reads the f32 references)
import fewstep  # noqa: E402  (after models: LoRAs, LCM, TAESD over the tiny models; also runnable alone)
import formats  # noqa: E402  (after models: it converts the tiny models and reads reference/e2e)
import img2img  # noqa: E402  (after formats: it reads sketches/house_colour*.png)


def main(out: str) -> None:
    for module in (tokenizer, sampling, sketch, models, fewstep, bf16, formats, img2img):
        print(f"== {module.__name__}", flush=True)
        module.generate(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
