"""The peers' workers of tools/bench_side_by_side.py (--peers openvino,sdcpp): OpenVINO and stable-diffusion.cpp,
each run in its own process under its own venv (made, with the converted weights, by tools/peers_setup.py).

Each worker prints one JSON line in the diffusers worker's format: per piece a list of seconds ("first_<piece>":
the warm-up run), "rss_after_load_mib", "peak_rss_mib" (ru_maxrss of the worker process), plus "notes" saying how
each figure was obtained where it differs from the diffusers worker.

OpenVINO (under --openvino-python): the IR of tools/peers_setup.py, each model reshaped to the static shapes of the
piece it times and compiled for "CPU" with INFERENCE_PRECISION_HINT f32 | bf16 (--dtype), INFERENCE_NUM_THREADS =
all cores, PERFORMANCE_HINT LATENCY. load = read + reshape + compile of text encoder, UNet, ControlNet and VAE
decoder for the step / vae shapes (no model cache); the job's shapes (batch 1 at guidance 1, the job's latent size)
are compiled after the step models are released, timed as "load_job". With --lora the UNet is unet_lora (the LoRA
fused in torch before conversion, at the scale given to peers_setup.py). job = CLIP tokenizer + text encoder, then
the denoising loop written here around the compiled ControlNet and UNet with diffusers' scheduler (--scheduler,
from the model's scheduler config; torch tensors for the scheduler's arithmetic), the VAE decoder and the
conversion to a PIL image: the same steps as diffusers' StableDiffusionControlNetPipeline.

stable-diffusion.cpp (under --sdcpp-python): stable_diffusion_cpp.StableDiffusion on sdcpp/sd15.<wtype>.safetensors
and sdcpp/controlnet.<wtype>.safetensors (or the f32 files with sd.cpp's wtype override for types not written as
files, e.g. q8_0: then the ControlNet stays f32), n_threads = all cores, vae_decode_only, no mmap. Its API only runs
whole generations, so:
  load  - the StableDiffusion constructor (sd.cpp applies the LoRA at the first generation: "first_job").
  job   - generate_image at --job-size, --job-steps (sd.cpp's sampler of the same name: lcm -> sample_method lcm,
          scheduler lcm; euler_a / euler -> the same with the discrete scheduler; ddim -> ddim_trailing; tcd),
          cfg_scale --guidance, the sketch as control image at strength 1.0, the LoRA as <lora:NAME:SCALE> in the
          prompt (sd.cpp reloads and re-applies a LoRA given again at every generation; "job_minus_lora" takes
          its own "lora ... applied, taking" time off).
  text  - sd.cpp's own timer of the job's "get_learned_condition" (divided by 2 when --guidance != 1: it then
          encodes the negative prompt too).
  vae   - sd.cpp's own timer of the job's "decode_first_stage" (one image at --job-size).
  step  - (t(N) - t(1)) / (N - 1) of two generations at --step-size with cfg 7.5 (so ControlNet + UNet on the
          conditional and the unconditional input: the work of the batch-2 step), N = --sdcpp-step-n (3), euler,
          without the LoRA tag (after an untimed generation that takes the LoRA off: it does not change the
          sizes); "step_sampling" is sd.cpp's own "sampling completed" time divided by N.
sd.cpp's own timers print two decimals.
"""
import ctypes
import json
import os
import re
import resource
import sys
import time

SDCPP_SAMPLERS = {"lcm": ("lcm", "lcm"), "euler_a": ("euler_a", "discrete"), "euler": ("euler", "discrete"),
                  "ddim": ("ddim_trailing", "discrete"), "tcd": ("tcd", "discrete")}
PROMPT = "a red sports car"
NEGATIVE = "lowres, bad anatomy, bad hands, cropped, worst quality"
TEXT = "a red sports car on a mountain road, highly detailed"


def rss_mib():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(f):
    t = time.perf_counter()
    r = f()
    return time.perf_counter() - t, r


def lora_spec(spec):
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def sketch(a, size):
    from PIL import Image

    sk = Image.open(os.path.join(a.repo, "examples/sketches/car.png")).convert("RGB")
    return sk.resize((size, size), Image.LANCZOS)


def residual_shapes(config, b, lat):
    """The ControlNet's 12 down residuals and the mid residual for latents of lat x lat (SD1.5 layout)."""
    ch, lpb = config["block_out_channels"], config["layers_per_block"]
    shapes, h = [(b, ch[0], lat, lat)], lat
    for i, c in enumerate(ch):
        shapes += [(b, c, h, h)] * lpb
        if i < len(ch) - 1:
            h //= 2
            shapes.append((b, c, h, h))
    return shapes, (b, ch[-1], h, h)


# ---------------------------------------------------------------------------------------------------------------
# OpenVINO
# ---------------------------------------------------------------------------------------------------------------


def openvino_worker(a):
    import diffusers
    import numpy as np
    import openvino as ov
    import torch
    from transformers import CLIPTokenizer

    torch.set_num_threads(os.cpu_count())
    from bench_side_by_side import SCHEDULERS

    core = ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": a.dtype, "INFERENCE_NUM_THREADS": os.cpu_count(),
           "PERFORMANCE_HINT": "LATENCY"}
    d = os.path.join(a.peers_dir, "openvino")
    unet_name = "unet_lora" if a.lora else "unet"
    with open(os.path.join(a.model, "unet", "config.json")) as f:
        ucfg = json.load(f)
    pieces = a.pieces.split(",")
    out = {"notes": {"precision_hint": a.dtype, "unet": unet_name, "openvino": ov.get_version(),
                     "job_loop": "denoising loop in Python around the compiled models, diffusers' "
                                 + SCHEDULERS[a.scheduler]}}

    def compile(name, shapes):
        m = core.read_model(os.path.join(d, name + ".xml"))
        m.reshape({i: ov.PartialShape(list(s)) for i, s in enumerate(shapes)})
        return core.compile_model(m, "CPU", cfg)

    def denoiser_shapes(b, lat):
        res, mid = residual_shapes(ucfg, b, lat)
        common = [(b, 4, lat, lat), (1,), (b, 77, ucfg["cross_attention_dim"])]
        return common + [(b, 3, lat * 8, lat * 8)], common + res + [mid]

    def load(b, lat, vae_lat):
        cn_s, unet_s = denoiser_shapes(b, lat)
        return {"tokenizer": CLIPTokenizer.from_pretrained(os.path.join(a.model, "tokenizer")),
                "text": compile("text_encoder", [(1, 77)]), "controlnet": compile("controlnet", cn_s),
                "unet": compile(unet_name, unet_s), "vae": compile("vae_decoder", [(1, 4, vae_lat, vae_lat)])}

    step_lat, vae_lat = a.step_size // 8, a.vae_size // 8
    t, m = timed(lambda: load(2, step_lat, vae_lat))
    rss_loaded = rss_mib()
    if "load" in pieces:
        v = [t]
        for _ in range(1, a.runs):
            del m
            t, m = timed(lambda: load(2, step_lat, vae_lat))
            v.append(t)
        out["load"] = v

    def repeat(name, f):
        out["first_" + name] = [timed(f)[0]]
        out[name] = [timed(f)[0] for _ in range(a.runs)]
        print(f"openvino {name}: {out[name]}", file=sys.stderr)

    def encode(text):
        ids = m["tokenizer"](text, padding="max_length", max_length=m["tokenizer"].model_max_length,
                             truncation=True, return_tensors="np").input_ids.astype(np.int64)
        return m["text"]([ids])[0]

    def denoise(lat, t, ctx, cond):
        r = m["controlnet"]([lat, t, ctx, cond])
        return m["unet"]([lat, t, ctx] + [r[i] for i in range(13)])[0]

    if "text" in pieces:
        repeat("text", lambda: encode(TEXT))
    if "step" in pieces:
        g = np.random.default_rng(0)
        lat = g.standard_normal((2, 4, step_lat, step_lat), dtype=np.float32)
        ctx = g.standard_normal((2, 77, ucfg["cross_attention_dim"]), dtype=np.float32)
        cond = g.random((2, 3, a.step_size, a.step_size), dtype=np.float32)
        t500 = np.array([500.0], dtype=np.float32)
        repeat("step", lambda: denoise(lat, t500, ctx, cond))
    if "vae" in pieces:
        z = np.random.default_rng(0).standard_normal((1, 4, vae_lat, vae_lat), dtype=np.float32)
        repeat("vae", lambda: m["vae"]([z / 0.18215])[0])
    if "job" in pieces:
        cfg_on = a.guidance > 1.0
        b, jl = (2 if cfg_on else 1), a.job_size // 8
        del m["unet"], m["controlnet"]
        if a.job_size != a.vae_size:
            del m["vae"]

        def load_job():
            cn_s, unet_s = denoiser_shapes(b, jl)
            m["controlnet"], m["unet"] = compile("controlnet", cn_s), compile(unet_name, unet_s)
            if "vae" not in m:
                m["vae"] = compile("vae_decoder", [(1, 4, jl, jl)])
        out["load_job"] = [timed(load_job)[0]]
        sched = getattr(diffusers, SCHEDULERS[a.scheduler]).from_pretrained(os.path.join(a.model, "scheduler"))
        sk = np.asarray(sketch(a, a.job_size), dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
        cond = np.ascontiguousarray(np.concatenate([sk] * b))

        def job():
            from PIL import Image

            ctx = encode(PROMPT)
            if cfg_on:
                ctx = np.concatenate([encode(NEGATIVE), ctx])
            g = torch.Generator().manual_seed(42)
            sched.set_timesteps(a.job_steps)
            latents = torch.randn(1, 4, jl, jl, generator=g) * sched.init_noise_sigma
            for t in sched.timesteps:
                x = sched.scale_model_input(torch.cat([latents] * b), t)
                eps = torch.from_numpy(denoise(x.numpy(), np.array([float(t)], dtype=np.float32), ctx, cond))
                if cfg_on:
                    u, c = eps.chunk(2)
                    eps = u + a.guidance * (c - u)
                latents = sched.step(eps, t, latents, generator=g, return_dict=False)[0]
            img = m["vae"]([(latents / 0.18215).numpy()])[0]
            img = np.clip(img[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1)
            return Image.fromarray((img * 255).round().astype(np.uint8))
        repeat("job", job)
        if a.save_images:
            job().save(os.path.join(a.save_images, f"openvino_{a.dtype}.png"))
    out["rss_after_load_mib"] = rss_loaded
    out["peak_rss_mib"] = peak_mib()
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------------------------
# stable-diffusion.cpp
# ---------------------------------------------------------------------------------------------------------------


def sdcpp_worker(a):
    import stable_diffusion_cpp as sdc
    from stable_diffusion_cpp import StableDiffusion

    log = []

    @sdc.sd_log_callback
    def on_log(level, text, data):
        log.append(text.decode("utf-8", errors="replace"))
        if a.verbose:
            print(log[-1], end="", file=sys.stderr)

    sdc.sd_set_log_callback(on_log, ctypes.c_void_p(0))  # replaces the package's printing callback

    def timer(lines, what):
        v = [float(x) for ln in lines for x in re.findall(re.escape(what) + r", taking ([0-9.]+)s", ln)]
        return sum(v) if v else None

    wt = a.sdcpp_wtype or a.dtype
    d = os.path.join(a.peers_dir, "sdcpp")
    ckpt, cn = (os.path.join(d, f"{n}.{wt}.safetensors") for n in ("sd15", "controlnet"))
    override = "default"
    if not os.path.exists(ckpt):  # a type with no file: sd.cpp converts the f32 weights when loading
        ckpt, cn, override = os.path.join(d, "sd15.f32.safetensors"), os.path.join(d, "controlnet.f32.safetensors"), wt
    pieces = a.pieces.split(",")
    sample_method, scheduler = SDCPP_SAMPLERS[a.scheduler]
    lora_tag = ""
    if a.lora:
        path, scale = lora_spec(a.lora)
        lora_tag = f" <lora:{os.path.splitext(os.path.basename(path))[0]}:{scale}>"
    out = {"notes": {"weights": os.path.basename(ckpt), "wtype_override": override, "sampler": [sample_method, scheduler],
                     "commit": sdc.sd_commit().decode(), "system_info": sdc.sd_get_system_info().decode().strip(),
                     "text": "sd.cpp's get_learned_condition timer in the job", "vae": "sd.cpp's decode_first_stage "
                     f"timer in the job ({a.job_size}px)",
                     "step": f"(t(N) - t(1)) / (N - 1), N = {a.sdcpp_step_n}, {a.step_size}px, cfg 7.5, euler"}}

    def load():
        return StableDiffusion(model_path=ckpt, control_net_path=cn, lora_model_dir=os.path.join(d, "lora"),
                               vae_decode_only=True, n_threads=os.cpu_count(), wtype=override, verbose=False)

    t, sd = timed(load)
    rss_loaded = rss_mib()
    if "load" in pieces:
        v = [t]
        for _ in range(1, a.runs):
            sd.close()
            del sd
            t, sd = timed(load)
            v.append(t)
        out["load"] = v

    def generate(size, steps, cfg, method, sched, image, tag=lora_tag):
        start = len(log)
        t, imgs = timed(lambda: sd.generate_image(
            prompt=PROMPT + tag, negative_prompt=NEGATIVE, width=size, height=size, cfg_scale=cfg,
            sample_method=method, scheduler=sched, sample_steps=steps, seed=42, control_image=image,
            control_strength=1.0))
        return t, log[start:], imgs

    if any(p in pieces for p in ("text", "vae", "job")):
        sk = sketch(a, a.job_size)
        for i in range(a.runs + 1):
            t, lines, imgs = generate(a.job_size, a.job_steps, a.guidance, sample_method, scheduler, sk)
            lora = sum(float(x) for ln in lines for x in re.findall(r"lora '.*' applied, taking ([0-9.]+)s", ln))
            text = timer(lines, "get_learned_condition completed")
            rec = {"job": t, "text": text / (2 if a.guidance != 1.0 else 1) if text is not None else None,
                   "vae": timer(lines, "decode_first_stage completed"), "lora_apply": lora,
                   "job_minus_lora": t - lora, "job_sampling": timer(lines, "sampling completed")}
            for k, v in rec.items():
                if v is not None:
                    out.setdefault(("first_" if i == 0 else "") + k, []).append(v)
            print(f"sd.cpp job {i}: {rec}", file=sys.stderr)
        if a.save_images:
            imgs[0].save(os.path.join(a.save_images, f"sdcpp_{wt}.png"))
    if "step" in pieces:
        sk = sketch(a, a.step_size)
        n = a.sdcpp_step_n
        # Without the LoRA: sd.cpp reloads and re-applies a LoRA named again at every generation (tens of seconds
        # here), which would swamp the difference; the warm-up takes it off the weights (the same sizes).
        run = lambda k: generate(a.step_size, k, 7.5, "euler", "discrete", sk, tag="")
        run(1)  # warm-up at this size
        out["step"], out["step_sampling"] = [], []
        for _ in range(a.runs):
            t1, _, _ = run(1)
            tn, lines, _ = run(n)
            out["step"].append((tn - t1) / (n - 1))
            s = timer(lines, "sampling completed")
            if s is not None:
                out["step_sampling"].append(s / n)
        print(f"sd.cpp step: {out['step']} (sampling timer: {out['step_sampling']})", file=sys.stderr)
    out["rss_after_load_mib"] = rss_loaded
    out["peak_rss_mib"] = peak_mib()
    print(json.dumps(out))
