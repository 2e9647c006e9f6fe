"""CLIP tokenizer fixtures for sketchx.

Builds the real CLIP BPE vocabulary (the one shipped in the `tokenizer/` folder of
`stable-diffusion-v1-5/stable-diffusion-v1-5`) from open_clip's `bpe_simple_vocab_16e6.txt.gz`,
the way the original CLIP code derives it, and records reference token ids from transformers'
`CLIPTokenizer` for a set of tricky prompts.

    python tools/fixturegen/tokenizer.py tests/fixtures

writes
    tests/fixtures/tiny-sd/tokenizer/{vocab.json,merges.txt,tokenizer_config.json,special_tokens_map.json}
    tests/fixtures/tokenizer/refs.json
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sys
import tempfile

MODEL_MAX_LENGTH = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# Number of merges CLIP uses: vocab size 49408 = 256 bytes * 2 + merges + 2 special tokens.
N_MERGES = 49152 - 256 - 2


def _bpe_path() -> str:
    # Locate the file without importing open_clip (its __init__ needs torchvision etc.).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed; it provides bpe_simple_vocab_16e6.txt.gz")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise RuntimeError(f"missing {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table (256 entries, byte order)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    # CLIP orders the base vocabulary as: printable bytes first (in the order above), then the rest.
    ordered = {b: table[b] for b in printable}
    ordered.update({b: table[b] for b in range(256) if b not in ordered})
    return ordered


def _special_token(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_clip_tokenizer(dst_dir: str, pad_token: str = EOS) -> str:
    """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `dst_dir`.

    With the default `pad_token` this matches SD1.5's `tokenizer/` folder; SD2-style repos use `"!"`.
    Returns `dst_dir`.
    """
    os.makedirs(dst_dir, exist_ok=True)
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    assert len(merges) == N_MERGES and all(len(m) == 2 for m in merges)

    base = list(_bytes_to_unicode().values())
    vocab_list = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    assert len(vocab) == len(vocab_list) == 49408, len(vocab)

    with open(os.path.join(dst_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(dst_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")

    special_tokens_map = {
        "bos_token": _special_token(BOS),
        "eos_token": _special_token(EOS),
        "pad_token": EOS if pad_token == EOS else pad_token,
        "unk_token": _special_token(EOS),
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **_special_token(BOS)},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **_special_token(EOS)},
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": pad_token,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **_special_token(EOS)},
    }
    with open(os.path.join(dst_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_tokens_map, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(dst_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # The folder must load with transformers like the real one does.
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(dst_dir)
    assert tok.model_max_length == MODEL_MAX_LENGTH, tok.model_max_length
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407, (tok.bos_token_id, tok.eos_token_id)
    assert tok.pad_token == pad_token, tok.pad_token
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    return dst_dir


LONG_PROMPT = (
    "a highly detailed matte painting of a futuristic city at sunset, towering glass skyscrapers, "
    "flying cars, neon signs, rain-soaked streets reflecting the lights, crowds of people with umbrellas, "
    "volumetric fog, cinematic lighting, ultra wide angle, trending on artstation, octane render, 8k, "
    "by greg rutkowski and alphonse mucha, intricate, elegant, sharp focus, illustration, concept art"
)

PROMPTS: list[str] = [
    "",
    " ",
    "   \t\n  ",
    "a photo of a cat",
    "A PHOTO of a CaT",
    "  leading and trailing spaces  ",
    "don't stop, it's fine, we'll see, they're here, I've been, I'm ok, he'd go",
    "DON'T IT'S WE'LL",
    "rock 'n' roll 'quoted' ''double''",
    "wow!!!???... really?!",
    "#hashtag @mention $100 50% a&b (x) [y] {z} <a> ~tilde~ `code` ^caret^ |pipe| \\back/slash",
    "1234567 items cost 3.14 or 1,000,000 dollars in 2024",
    "café naïve Ångström résumé coöperate",
    "Straße groß STRASSE",
    "Ελληνικά κείμενα ΣΟΦΟΣ",
    "Привет мир, как дела?",
    "一只在花园里的猫",
    "東京の桜、ひらがな カタカナ",
    "한국어 텍스트 고양이",
    "مرحبا بالعالم",
    "हिन्दी पाठ",
    "emoji 😀🎉 party",
    "family 👨‍👩‍👧‍👦 and thumbs 👍🏽👍🏿",
    "flags 🇯🇵🇺🇸 and ❤️ heart",
    "tabs\tand\nnewlines\r\nand    multiple   spaces",
    "control\x00chars\x07here\x1b[0m and\x7fdel",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic space",
    "cafe\u0301 nai\u0308ve A\u030angstro\u0308m",
    "ﬁne ligature and ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    LONG_PROMPT,
    "cat " * 100,
    "a cat<|endoftext|>a dog",
    "<|startoftext|>a cat<|endoftext|>",
    "<|ENDOFTEXT|> upper special",
    "<|endoftext|><|endoftext|>",
    "<b>bold</b> <i>italic</i> &amp; &lt;tag&gt;",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x" * 300,
    "İstanbul DİYARBAKIR ǅemal ΐ",
    "a_b-c.d/e:f;g",
    "masterpiece, best quality, (detailed:1.2), [[blurry]], <lora:foo:0.8>",
]


def _refs(tok, prompts: list[str]) -> list[dict]:
    cases = []
    for p in prompts:
        plain = tok(p).input_ids
        padded = tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        no_special = tok(p, add_special_tokens=False).input_ids
        cases.append({"prompt": p, "input_ids": plain, "input_ids_padded": padded, "ids_no_special": no_special})
    return cases


def generate(fixtures_dir: str) -> None:
    """Writes `fixtures_dir/tiny-sd/tokenizer/` and `fixtures_dir/tokenizer/refs.json`."""
    import transformers
    from transformers import CLIPTokenizer

    tok_dir = write_clip_tokenizer(os.path.join(fixtures_dir, "tiny-sd", "tokenizer"))
    tok = CLIPTokenizer.from_pretrained(tok_dir)

    with tempfile.TemporaryDirectory() as tmp:
        bang_dir = write_clip_tokenizer(tmp, pad_token="!")
        bang = CLIPTokenizer.from_pretrained(bang_dir)
        with open(os.path.join(bang_dir, "tokenizer_config.json"), encoding="utf-8") as f:
            bang_config = json.load(f)
        with open(os.path.join(bang_dir, "special_tokens_map.json"), encoding="utf-8") as f:
            bang_map = json.load(f)
        bang_cases = _refs(bang, PROMPTS)

    refs = {
        "generator": "tools/fixturegen/tokenizer.py",
        "transformers_version": transformers.__version__,
        "tokenizer_class": type(tok).__name__,
        "model_max_length": tok.model_max_length,
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "pad_id": tok.pad_token_id,
        "cases": _refs(tok, PROMPTS),
        "pad_bang": {
            "comment": "SD2-style tokenizer folder: same vocab.json/merges.txt, pad token '!'",
            "tokenizer_config": bang_config,
            "special_tokens_map": bang_map,
            "pad_id": bang.pad_token_id,
            "cases": bang_cases,
        },
    }
    out = os.path.join(fixtures_dir, "tokenizer")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "refs.json"), "w", encoding="utf-8") as f:
        json.dump(refs, f, indent=1, ensure_ascii=True)
        f.write("\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} FIXTURES_DIR")
    generate(sys.argv[1])
