#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/seeds/<target>/) and libFuzzer dictionaries (fuzz/dicts/<target>.dict:
the keys, names and numbers the formats use), deterministically: small valid and nearly valid inputs of every kind
each target reads, so that the fuzzer starts from the formats' interesting paths instead of discovering JSON or PNG
from nothing. The committed files are this script's output (byte for byte, except the legacy and deflated
checkpoints, in which torch writes random storage keys); rerun it after changing it:

    python3 fuzz/make_seeds.py          # needs Pillow (the sketch images) and torch (the checkpoints)

The input layouts are those of fuzz/src/checks.rs: `sketch` is 4 control bytes + an image file, `tokenizer_files`
is vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json and a prompt separated by 0xFF bytes,
`lora` fits the synthetic base networks of checks.rs (LORA_BASE_UNET, LORA_BASE_TEXT_ENCODER).
"""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

from PIL import Image

FUZZ = Path(__file__).resolve().parent
REPO = FUZZ.parent
FIXTURES = REPO / "tests" / "fixtures"
SEEDS = FUZZ / "seeds"
DICTS = FUZZ / "dicts"

NUMBERS = ["0", "-1", "1", "2", "3", "0.5", "1e308", "-1e308", "1e-320", "NaN", "Infinity", "4294967296",
           "9223372036854775807", "9223372036854775808", "18446744073709551615", "18446744073709551616", "1.0"]
DTYPES = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
          "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]


def dictionary(target: str, words: list[str]) -> None:
    """A libFuzzer dictionary: one quoted token a line, bytes outside printable ASCII escaped."""
    DICTS.mkdir(parents=True, exist_ok=True)
    lines = []
    for w in sorted(set(words)):
        esc = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "".join(f"\\x{b:02x}" for b in c.encode())
                      for c in w)
        lines.append(f'"{esc}"')
    (DICTS / f"{target}.dict").write_text("\n".join(lines) + "\n")


def json_words(value: object) -> list[str]:
    """The keys and string values of a JSON document, quoted as JSON writes them."""
    words: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            words.append(json.dumps(k))
            words += json_words(v)
    elif isinstance(value, list):
        for v in value:
            words += json_words(v)
    elif isinstance(value, str):
        words.append(json.dumps(value))
    return words


def out(target: str, name: str, data: bytes) -> None:
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def safetensors(tensors: list[tuple[str, str, list[int], bytes]], metadata: dict | None = None) -> bytes:
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(t[3] for t in tensors)


def f32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def ramp(n: int, scale: float = 0.01) -> list[float]:
    return [((i % 13) - 6) * scale for i in range(n)]


# --- sketch ------------------------------------------------------------------------------------------------
def sketch_seeds() -> None:
    # Control bytes: max_side (u16 LE, mod 4096, + 1), max_pixels ((b + 1) << 14), output size and mode.
    roomy = bytes([0xFF, 0x0F, 0x3F, 0x27])
    tight = bytes([0x0F, 0x00, 0x00, 0x83])
    for p in sorted((FIXTURES / "sketches").glob("*.png")):
        out("sketch", p.stem + ".png", roomy + p.read_bytes())
    out("sketch", "bomb_header.png", roomy + (FIXTURES / "sketch" / "bomb_header.png").read_bytes())
    out("sketch", "tight_limits.png", tight + (FIXTURES / "sketches" / "house_black_on_white.png").read_bytes())

    base = Image.new("RGB", (13, 9), "white")
    for x in range(13):
        base.putpixel((x, x % 9), (10 * x, 0, 255 - 10 * x))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((13, 9)))

    def save(img: Image.Image, fmt: str, **kw) -> bytes:
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        return b.getvalue()

    images = {
        "gray.png": save(base.convert("L"), "PNG"),
        "gray_alpha.png": save(rgba.convert("LA"), "PNG"),
        "rgba.png": save(rgba, "PNG"),
        "palette.png": save(base.convert("P"), "PNG"),
        "gray16.png": save(base.convert("L").convert("I;16"), "PNG"),
        "bilevel.png": save(base.convert("1"), "PNG"),
        "optimized.png": save(base, "PNG", optimize=True),
        "rgb.jpg": save(base, "JPEG", quality=80),
        "gray.jpg": save(base.convert("L"), "JPEG"),
        "progressive.jpg": save(base, "JPEG", progressive=True),
        "lossless.webp": save(base, "WEBP", lossless=True),
        "lossy.webp": save(base, "WEBP", quality=50),
        "alpha.webp": save(rgba, "WEBP", lossless=True),
        "rgb.bmp": save(base, "BMP"),
        "bilevel.bmp": save(base.convert("1"), "BMP"),
        "palette.gif": save(base.convert("P"), "GIF"),
        "animated.gif": save(base.convert("P"), "GIF", save_all=True,
                             append_images=[base.convert("L").convert("P")], duration=10),
    }
    for name, data in images.items():
        out("sketch", name, roomy + data)
    out("sketch", "truncated.jpg", roomy + images["rgb.jpg"][: len(images["rgb.jpg"]) // 2])


# --- safetensors -------------------------------------------------------------------------------------------
def safetensors_seeds() -> None:
    for p in sorted((FIXTURES / "formats" / "bad").glob("*.safetensors")):
        if p.stat().st_size <= 16 << 10:
            out("safetensors", p.name, p.read_bytes())
    out("safetensors", "dtypes.safetensors", safetensors([
        ("a.f32", "F32", [2, 3], f32(ramp(6))),
        ("b.f16", "F16", [4], struct.pack("<4e", 1.0, -2.5, 65504.0, 6e-8)),
        ("c.bf16", "BF16", [2, 1], struct.pack("<2H", 0x3F80, 0x7FC1)),
        ("d.f64", "F64", [2], struct.pack("<2d", 0.1, -1e300)),
        ("e.u8", "U8", [3], bytes([0, 7, 255])),
        ("f.i64", "I64", [1], struct.pack("<q", -5)),
        ("g.f8", "F8_E4M3", [2], bytes([0x38, 0xFF])),
        ("h.bool", "BOOL", [2], bytes([0, 1])),
    ]))
    out("safetensors", "scalar_and_empty.safetensors", safetensors([
        ("alpha", "F32", [], f32([4.0])),
        ("empty", "F16", [0, 3], b""),
        ("w", "BF16", [1, 2], struct.pack("<2H", 0x3F80, 0x8000)),
    ], metadata={"format": "pt", "lora_adapter_metadata": "{}"}))
    out("safetensors", "special_floats.safetensors", safetensors([
        ("x", "F32", [6], f32([float("nan"), float("inf"), -float("inf"), 1e-45, -0.0, 3.4e38])),
    ]))
    out("safetensors", "empty_header.safetensors", struct.pack("<Q", 2) + b"{}")
    dictionary("safetensors", [json.dumps(d) for d in DTYPES] + NUMBERS
               + ['"__metadata__"', '"dtype"', '"shape"', '"data_offsets"', "[]", "{}", "\\u0000", "\\ud800"])
    dup = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    out("safetensors", "duplicate_names.safetensors", struct.pack("<Q", len(dup)) + dup + f32([1.0, 2.0]))


# --- configs -----------------------------------------------------------------------------------------------
def configs_seeds() -> None:
    seen: set[bytes] = set()
    words: list[str] = []
    for p in sorted(FIXTURES.rglob("*.json")):
        rel = p.relative_to(FIXTURES)
        if p.name not in ("config.json", "scheduler_config.json") or p.stat().st_size > 8 << 10:
            continue
        data = p.read_bytes()
        if data in seen:
            continue
        seen.add(data)
        target = "scheduler_config" if p.name == "scheduler_config.json" else "configs"
        out(target, "_".join(rel.parts), data)
        words += json_words(json.loads(data))
    out("scheduler_config", "trained_betas.json", json.dumps({
        "_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2, 0.3, 0.4], "num_train_timesteps": 4,
        "timestep_spacing": "trailing", "set_alpha_to_one": False, "_use_default_values": ["clip_sample"]}).encode())
    out("scheduler_config", "karras.json", json.dumps({
        "_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "final_sigmas_type": "sigma_min",
        "timestep_spacing": "leading", "steps_offset": 1}).encode())
    out("scheduler_config", "cosine_lcm.json", json.dumps({
        "_class_name": "LCMScheduler", "beta_schedule": "squaredcos_cap_v2", "original_inference_steps": 10,
        "num_train_timesteps": 100, "timestep_scaling": 10.0}).encode())
    scheduler_keys = ["num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                      "prediction_type", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr",
                      "set_alpha_to_one", "clip_sample", "clip_sample_range", "thresholding", "interpolation_type",
                      "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "sigma_min", "sigma_max",
                      "timestep_type", "final_sigmas_type", "original_inference_steps", "timestep_scaling",
                      "_use_default_values"]
    values = ["linear", "scaled_linear", "squaredcos_cap_v2", "epsilon", "v_prediction", "sample",
              "original_sample", "linspace", "leading", "trailing", "zero", "sigma_min", "discrete", "continuous"]
    dictionary("configs", words + NUMBERS + ["null", "true", "false", "[]", "{}"])
    dictionary("scheduler_config", [json.dumps(w) for w in scheduler_keys + values] + NUMBERS
               + ["null", "true", "false", "[]", "{}"])


# --- tokenizer_files and tokenizer_text -------------------------------------------------------------------
def bytes_to_unicode() -> list[str]:
    printable = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


def tokenizer_seeds() -> None:
    chars = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["h o", "ho u", "hou s", "hous e</w>", "c a", "ca r</w>", "' s</w>", "a n", "an d</w>"]
    for m in merges:
        a, b = m.split(" ")
        vocab.setdefault(a + b, len(vocab))
    for special in ["<|startoftext|>", "<|endoftext|>"]:
        vocab[special] = len(vocab)
    vocab_json = json.dumps(vocab, ensure_ascii=False).encode()
    merges_txt = ("#version: 0.2\n" + "\n".join(merges) + "\n").encode()
    config = json.dumps({
        "model_max_length": 16, "bos_token": {"content": "<|startoftext|>", "normalized": True},
        "added_tokens_decoder": {str(vocab["<|endoftext|>"]): {"content": "<|endoftext|>", "special": True}},
    }).encode()
    smap = json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
                       "unk_token": {"content": "<|endoftext|>", "normalized": False}}).encode()
    sep = b"\xff"
    out("tokenizer_files", "minimal", sep.join([vocab_json, merges_txt, b"", b"", b"a house"]))
    out("tokenizer_files", "configured", sep.join([vocab_json, merges_txt, config, smap,
                                                    "a HOUSE's car  <|endoftext|> é".encode()]))
    out("tokenizer_files", "bad_merge", sep.join([vocab_json, b"h o\nx y\n", b"", b"", b"h"]))

    prompts = {
        "plain": "a red sports car",
        "weights": "a (red:1.2) car, [blue] sky, masterpiece, best quality",
        "specials": "<|startoftext|>a house<|endoftext|> garden",
        "apostrophes": "it's the dog's toy, they've we'll I'd",
        "unicode": "Ünïcödé café 東京 🚗 ﬁ ǅ İstanbul Σας",
        "whitespace": "  tabs\tand\nnewlines\u00a0\u2003and\u3000spaces  ",
        "numbers": "1024x768 3.14 ٣ ⅷ ²",
        "long_word": "supercalifragilisticexpialidocious" * 4,
    }
    for name, text in prompts.items():
        out("tokenizer_text", name, text.encode())
    specials = ["<|startoftext|>", "<|endoftext|>", "</w>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
    dictionary("tokenizer_text", specials + ["\u00a0", "\u3000", "\u0130", "\u01c5", "\ufb01", "\u0301"])
    dictionary("tokenizer_files", specials + ["\xff", "#version: 0.2\n", "model_max_length",
                                               "added_tokens_decoder", "content", "special", "normalized",
                                               "bos_token", "eos_token", "unk_token", "pad_token"]
               + [json.dumps(w) for w in ["model_max_length", "added_tokens_decoder", "content", "special",
                                          "normalized", "bos_token", "eos_token", "unk_token", "pad_token"]]
               + NUMBERS)


# --- request -----------------------------------------------------------------------------------------------
def request_seeds() -> None:
    requests = {
        "service": {"prompt": "a red sports car", "temperature": "0.65", "guidance_scale": "7.5",
                    "num_images": "1", "steps": "30", "seed": "42"},
        "every_field": {"prompt": "a house", "negative_prompt": "", "temperature": "0.2", "guidance_scale": "1",
                        "num_images": "8", "steps": "4", "seed": "", "width": "512", "height": "768",
                        "scheduler": "TCD", "timestep_spacing": "trailing", "eta": "0.3", "vae": "tiny"},
        "numbers_as_json": {"steps": 25, "eta": 1.0, "width": 64, "seed": 18446744073709551615},
        "bad_number": {"steps": " 3x"},
        "bad_name": {"scheduler": "plms"},
        "img2img_and_preprocess": {"preprocess": "canny", "canny_low_threshold": "100",
                                   "canny_high_threshold": "200", "strength": "0.5", "clip_skip": "1"},
        "unknown_field": {"sampler": "k_euler"},
        "long_prompt": {"prompt": "x" * 16385},
        "nul": {"negative_prompt": "a\u0000b"},
    }
    for name, fields in requests.items():
        out("request", name + ".json", json.dumps(fields, ensure_ascii=False).encode())
    fields = ["prompt", "negative_prompt", "temperature", "guidance_scale", "num_images", "steps", "seed", "width",
              "height", "scheduler", "timestep_spacing", "eta", "vae", "preprocess", "canny_low_threshold",
              "canny_high_threshold", "strength", "clip_skip"]
    names = ["euler_a", "euler", "ddim", "lcm", "tcd", "linspace", "leading", "trailing", "full", "tiny", "scribble",
             "lineart", "canny", "none"]
    dictionary("request", [json.dumps(w) for w in fields + names] + NUMBERS + ["\\u0000", " ", "inf", "nan"])


# --- lora --------------------------------------------------------------------------------------------------
def lora_seeds() -> None:
    def pair(prefix: str, down: str, up: str, rank: int, fan_in: list[int], cout: int, tail: list[int]):
        n_down = rank
        for d in fan_in:
            n_down *= d
        return [(prefix + down, "F32", [rank] + fan_in, f32(ramp(n_down))),
                (prefix + up, "F32", [cout, rank] + tail, f32(ramp(cout * rank)))]

    kohya = []
    kohya += pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", ".lora_down.weight",
                  ".lora_up.weight", 2, [8], 8, [])
    kohya += [("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha", "F32", [],
               f32([1.0]))]
    kohya += pair("lora_unet_down_blocks_0_resnets_0_conv1", ".lora_down.weight", ".lora_up.weight", 2,
                  [8, 3, 3], 8, [1, 1])
    kohya += pair("lora_unet_down_blocks_0_attentions_0_proj_in", ".lora_down.weight", ".lora_up.weight", 1,
                  [8, 1, 1], 8, [1, 1])
    kohya += pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", ".lora_down.weight", ".lora_up.weight",
                  4, [12], 12, [])
    out("lora", "kohya.safetensors", safetensors(kohya, metadata={"ss_network_module": "networks.lora"}))
    out("lora", "kohya_collision.safetensors", safetensors(
        pair("lora_unet_mid_block_a_b", ".lora_down.weight", ".lora_up.weight", 1, [4], 4, [])))

    peft = []
    peft += pair("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", ".lora_A.weight",
                 ".lora_B.weight", 2, [8], 8, [])
    peft += pair("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", ".lora_A.weight",
                 ".lora_B.weight", 4, [12], 8, [])
    peft += pair("text_encoder.text_model.encoder.layers.0.mlp.fc1", ".lora_A.weight", ".lora_B.weight", 2,
                 [12], 24, [])
    meta = {"unet.lora_alpha": 4, "unet.r": 2, "unet.rank_pattern": {"attn2.to_k": 4},
            "unet.alpha_pattern": {"to_k": 8.0}, "unet.use_rslora": True, "text_encoder.lora_alpha": 2.0}
    out("lora", "peft.safetensors", safetensors(peft, metadata={"lora_adapter_metadata": json.dumps(meta)}))
    out("lora", "peft_nometa.safetensors", safetensors(peft[:2]))

    old = []
    old += pair("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora", ".down.weight",
                ".up.weight", 2, [8], 8, [])
    old += pair("unet.time_embedding.linear_1", ".lora.down.weight", ".lora.up.weight", 1, [8], 16, [])
    old += pair("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", ".lora_linear_layer.down.weight",
                ".lora_linear_layer.up.weight", 2, [12], 12, [])
    out("lora", "old_diffusers.safetensors", safetensors(old))
    modules = ["conv_in", "time_embedding.linear_1", "down_blocks.0.resnets.0.conv1",
               "down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.a_b", "mid_block.a.b",
               "text_model.embeddings.token_embedding", "text_model.encoder.layers.0.self_attn.q_proj",
               "text_model.encoder.layers.0.mlp.fc1", "attn1.processor.to_q", "to_out", "to_k"]
    modules += [m.replace(".", "_") for m in modules]
    affixes = ["lora_unet_", "lora_te_", "lora_te_text_model_", "unet.", "text_encoder.", "text_model.",
               ".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight",
               ".lora.down.weight", ".lora.up.weight", ".lora_linear_layer.down.weight",
               ".lora_linear_layer.up.weight", "_lora.down.weight", "_lora.up.weight", ".processor.",
               "lora_te1_", "text_encoder_2.", "lora_unet_input_blocks_", "__metadata__", "lora_adapter_metadata",
               "unet.lora_alpha", "unet.r", "unet.alpha_pattern", "unet.rank_pattern", "unet.use_rslora",
               "unet.use_dora", "text_encoder.lora_alpha", "dtype", "shape", "data_offsets"]
    dictionary("lora", modules + affixes + DTYPES + NUMBERS)
    out("lora", "embedding.safetensors", safetensors(
        pair("text_encoder.text_model.embeddings.token_embedding", ".lora_A.weight", ".lora_B.weight", 2, [12],
             16, [])))


# --- pickle ------------------------------------------------------------------------------------------------
def pickle_seeds() -> None:
    import pickle as pk
    import zipfile
    from collections import OrderedDict

    import torch

    torch.manual_seed(0)
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8
    tensors = OrderedDict([
        ("a.weight", base.clone()),
        ("a.half", base.half()[:, :2].contiguous()),
        ("a.bf16", base.bfloat16().flatten()[:5].clone()),
        ("a.long", torch.tensor([1, -2, 3])),
        ("a.bool", torch.tensor([True, False])),
        ("a.transposed", base.t()),  # a strided view
        ("a.slice", base.flatten()[3:9]),  # an offset into a shared storage
        ("a.scalar", torch.tensor(2.5)),
        ("a.param", torch.nn.Parameter(torch.ones(2, 2))),
    ])

    def saved(obj: object, **kw) -> bytes:
        b = io.BytesIO()
        torch.save(obj, b, **kw)
        return b.getvalue()

    out("pickle", "state_dict.pt", saved(tensors))
    out("pickle", "legacy.pt", saved(tensors, _use_new_zipfile_serialization=False))
    out("pickle", "training.ckpt", saved({"epoch": 3, "global_step": 10, "state_dict": {"state_dict": tensors},
                                         "callbacks": {"x": [1.5, "y", None, (1, 2)]}}))
    out("pickle", "textual_inversion.pt", saved({"string_to_param": {"*": torch.ones(2, 4)},
                                                 "name": "style", "step": 7}))
    zipped = saved({"w": torch.ones(8, 8, dtype=torch.float16)})
    with zipfile.ZipFile(io.BytesIO(zipped)) as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            z.writestr(name, data)
    out("pickle", "deflated.pt", b.getvalue())
    out("pickle", "bare_protocol2.pkl", pk.dumps({"a": [1, 2.5, "x", b"y", True, None], "b": (1 << 70,)}, 2))
    out("pickle", "bare_protocol0.pkl", pk.dumps({"a": [1, "x"], "b": {"c": 1.5}}, 0))
    out("pickle", "bare_protocol5.pkl", pk.dumps({"a": frozenset({1}), "b": bytearray(b"zz")}, 5))
    for p in sorted((FIXTURES / "formats" / "bad").glob("*.ckpt")):
        out("pickle", p.name, p.read_bytes())
    globals_ = ["torch._utils\n_rebuild_tensor_v2\n", "collections\nOrderedDict\n", "torch\nFloatStorage\n",
                "torch\nHalfStorage\n", "torch\nBFloat16Storage\n", "torch\nLongStorage\n",
                "torch._utils\n_rebuild_parameter\n", "builtins\nset\n", "os\nsystem\n", "storage",
                "archive/data.pkl", "archive/data/0", "archive/byteorder", "little", "big", "state_dict"]
    dictionary("pickle", globals_ + ["PK\x03\x04", "PK\x01\x02", "PK\x05\x06", "PK\x06\x06", "\x80\x02",
                                     "\x80\x05", "\x95", "\x8c", "\x93", "R", "b", "c", "\x94", "h", "q",
                                     "}", "]", ")", "(", "u", "e", "t", "\x85", "\x86", "\x87", "Q", "."])


def main() -> None:
    for d in (SEEDS, DICTS):
        if d.exists():
            shutil.rmtree(d)
    sketch_seeds()
    safetensors_seeds()
    configs_seeds()
    tokenizer_seeds()
    request_seeds()
    lora_seeds()
    pickle_seeds()
    for d in sorted(SEEDS.iterdir()):
        files = list(d.iterdir())
        print(f"{d.name}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")


if __name__ == "__main__":
    main()
