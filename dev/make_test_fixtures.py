#!/usr/bin/env python3
"""Writes the reference data the Rust tests compare against, computed with Hugging Face `transformers`.

For each model directory given (exported with --save-hf, so DIR/hf holds the same weights as DIR/model.pt):
  - images the tests send: JPEG, PNG, WebP, GIF, BMP; 1x1 up to 2000x1500; portrait and landscape; RGB,
    grayscale, RGBA and palette;
  - CLIPImageProcessor (PIL backend) pixel tensors for them (float32, little-endian, 3x224x224);
  - CLIPTokenizer ids for 60 varied strings (truncated to 77 tokens);
  - CLIPModel.get_image_features / get_text_features for those images and strings (fp32, CPU);
  - zero-shot classification of some of the images against label sets, as transformers'
    `zero-shot-image-classification` pipeline computes it (probabilities, in the order of the labels), with its
    default hypothesis template and with "{}" (labels used as they are, as the Azure endpoint does), and the
    cosine of each image with each prompt.
"""

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TEXTS = [
    "",
    " ",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "a   photo\tof\n\na    cat  ",
    "a diagram",
    "a dog",
    "Hello, world!",
    "It's a dog's life; isn't it?",
    "e-mail: someone@example.com, url: https://example.com/a?b=c&d=e",
    "1234567890",
    "3.14159 is pi, 2.71828 is e",
    "naïve café résumé",
    "Ünïcödé Çharacters ÀÉÎÕÜ",
    "日本語のテキスト",
    "中文文本测试",
    "한국어 텍스트",
    "Текст на русском языке",
    "نص عربي",
    "עברית",
    "ελληνικά γράμματα",
    "emoji 😀🎉🐱‍👤 party",
    "👍",
    "🇫🇷🇩🇪",
    "tab\tseparated\tvalues",
    "line one\nline two\r\nline three",
    "!!!???...,,,;;;:::",
    "(parentheses) [brackets] {braces} <angles>",
    "quotes \"double\" and 'single' and `back`",
    "#hashtag @mention $dollar %percent ^caret &amp *star",
    "under_score and hyphen-ated and slash/separated",
    "CamelCaseWordsTogether",
    "ALLCAPS SENTENCE WITH SOME WORDS",
    "mIxEd CaSe TeXt",
    "a photo of a cat. " * 20,
    "x" * 500,
    "word " * 100,
    "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism is long",
    "the quick brown fox jumps over the lazy dog",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "a red car parked next to a blue house",
    "an astronaut riding a horse on the moon",
    "a painting in the style of van gogh",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "'s 't 're 've 'm 'll 'd",
    "don't won't can't shouldn't",
    "   leading and trailing spaces   ",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth\u200bspace",
    "combining accents: e\u0301 a\u0300",
    "math: ∑ ∫ √ ∞ ≈ ≠",
    "arrows → ← ↑ ↓",
    "currency € £ ¥ ₹",
    "©®™ symbols",
    "a\u3000full-width\u3000space",
    "ｆｕｌｌｗｉｄｔｈ　ｌｅｔｔｅｒｓ",
    "1st 2nd 3rd 4th",
    "C++ and C# and F#",
    "the end",
]


def pattern(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth gradients and shapes with a little noise: structured like a photo, reproducible."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    fx, fy = x / max(w - 1, 1), y / max(h - 1, 1)
    r = 128 + 100 * np.sin(6.0 * fx + seed) * np.cos(4.0 * fy)
    g = 255 * fy * (1 - fx) + 40 * np.sin(20 * fx * fy + seed)
    b = 255 * ((fx - 0.5) ** 2 + (fy - 0.5) ** 2 < 0.1) * 0.8 + 30
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_images():
    specs = []
    specs.append(("landscape_640x480.jpg", encode(Image.fromarray(pattern(640, 480, 1)), "JPEG", quality=90)))
    specs.append(("portrait_480x640.png", encode(Image.fromarray(pattern(480, 640, 2)), "PNG")))
    specs.append(("pixel_1x1.png", encode(Image.fromarray(pattern(1, 1, 3)), "PNG")))
    specs.append(("large_2000x1500.jpg", encode(Image.fromarray(pattern(2000, 1500, 4)), "JPEG", quality=85)))
    specs.append(("gray_300x300.png", encode(Image.fromarray(pattern(300, 300, 5)).convert("L"), "PNG")))
    rgba = Image.fromarray(pattern(257, 199, 6)).convert("RGBA")
    rgba.putalpha(Image.fromarray(pattern(257, 199, 7)[:, :, 0]))
    specs.append(("rgba_257x199.png", encode(rgba, "PNG")))
    specs.append(("palette_150x400.png", encode(Image.fromarray(pattern(150, 400, 8)).convert("P"), "PNG")))
    specs.append(("exact_224x224.jpg", encode(Image.fromarray(pattern(224, 224, 9)), "JPEG", quality=95)))
    specs.append(("gray_333x500.jpg", encode(Image.fromarray(pattern(333, 500, 10)).convert("L"), "JPEG", quality=90)))
    specs.append(("thin_1000x50.png", encode(Image.fromarray(pattern(1000, 50, 11)), "PNG")))
    specs.append(("webp_320x240.webp", encode(Image.fromarray(pattern(320, 240, 12)), "WEBP", lossless=True)))
    specs.append(("gif_200x120.gif", encode(Image.fromarray(pattern(200, 120, 13)).convert("P"), "GIF")))
    specs.append(("bmp_97x131.bmp", encode(Image.fromarray(pattern(97, 131, 14)), "BMP")))
    # Extreme aspect ratios (only the crop window of a very long resized side is computed) and a progressive JPEG.
    specs.append(("tall_5x2000.png", encode(Image.fromarray(pattern(5, 2000, 15)), "PNG")))
    specs.append(("wide_2400x3.png", encode(Image.fromarray(pattern(2400, 3, 16)), "PNG")))
    specs.append(("needle_1x700.gif", encode(Image.fromarray(pattern(1, 700, 17)).convert("P"), "GIF")))
    specs.append(
        ("progressive_500x375.jpg", encode(Image.fromarray(pattern(500, 375, 18)), "JPEG", quality=88, progressive=True))
    )
    return specs


# Zero-shot cases: images (fixture files), labels, and the hypothesis template (None: the pipeline's default).
# Labels hold no commas, so the Azure flavour can send them comma-separated. No image with transparency: the
# pipeline's load_image() drops the alpha channel (convert("RGB")), where CLIPImageProcessor, the Azure endpoint
# and clipserve composite it onto white.
ZERO_SHOT = [
    {"images": ["landscape_640x480.jpg", "portrait_480x640.png", "gray_300x300.png"],
     "labels": ["cat", "dog", "car"], "template": None},
    {"images": ["exact_224x224.jpg", "progressive_500x375.jpg"],
     "labels": ["a diagram", "a dog", "a cat", "naïve café", "日本語のテキスト", "an astronaut riding a horse"],
     "template": None},
    {"images": ["landscape_640x480.jpg", "webp_320x240.webp"],
     "labels": ["water_bottle", "milk_bottle", "carton", "can"], "template": "{}"},
    {"images": ["palette_150x400.png"], "labels": ["a red car", "a red car", "a blue house"],
     "template": "a picture of {}, maybe"},
    {"images": ["bmp_97x131.bmp"], "labels": ["only one label"], "template": None},
]


def zero_shot(hf: Path, processor, images_by_name) -> list:
    """The pipeline's answer for each case, with the probabilities put back in the order of the labels."""
    from transformers import CLIPModel, CLIPTokenizer, pipeline

    tokenizer = CLIPTokenizer.from_pretrained(str(hf))
    model = CLIPModel.from_pretrained(str(hf), torch_dtype=torch.float32).eval()
    classifier = pipeline("zero-shot-image-classification", model=model, tokenizer=tokenizer,
                          image_processor=processor, device="cpu")
    default_template = "This is a photo of {}."  # the pipeline's default, as its preprocess() declares it
    cases = []
    for case in ZERO_SHOT:
        kwargs = {} if case["template"] is None else {"hypothesis_template": case["template"]}
        template = case["template"] or default_template
        prompts = [template.format(label) for label in case["labels"]]
        enc = tokenizer(prompts, padding=True, return_tensors="pt")
        probs, cosines = [], []
        for name in case["images"]:
            answer = classifier(images_by_name[name], candidate_labels=case["labels"], **kwargs)
            by_label = {}
            for entry in answer:  # sorted by score; a repeated label has the same score each time
                by_label.setdefault(entry["label"], []).append(entry["score"])
            probs.append([by_label[label].pop() for label in case["labels"]])
            pixel_values = processor(images=images_by_name[name], return_tensors="pt")["pixel_values"]
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixel_values)
            cosines.append((out.logits_per_image[0] / model.logit_scale.exp()).tolist())
        cases.append({**case, "prompts": prompts, "probs": probs, "cosines": cosines,
                      "logit_scale": float(model.logit_scale.item())})
    return cases


def features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", action="append", default=[], help="NAME=DIR of an export made with --save-hf")
    args = ap.parse_args()

    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    out = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "pixels").mkdir(parents=True, exist_ok=True)
    processor = CLIPImageProcessorPil()  # transformers' CLIPImageProcessor with the PIL backend, CLIP defaults
    images = []
    pil_images = []
    images_by_name = {}
    for name, data in make_images():
        (out / "images" / name).write_bytes(data)
        img = Image.open(io.BytesIO(data))
        pil_images.append(img)
        images_by_name[name] = img
        pixels = processor(images=img, return_tensors="np")["pixel_values"][0].astype("<f4")
        assert pixels.shape == (3, 224, 224), pixels.shape
        (out / "pixels" / (name + ".f32")).write_bytes(pixels.tobytes())
        images.append({"file": name, "width": img.width, "height": img.height, "mode": img.mode, "format": img.format})

    fixture = {"images": images, "texts": TEXTS, "models": {}}
    torch.set_grad_enabled(False)
    for spec in args.model:
        name, folder = spec.split("=", 1)
        hf = Path(folder) / "hf"
        tokenizer = CLIPTokenizer.from_pretrained(str(hf))
        model = CLIPModel.from_pretrained(str(hf), torch_dtype=torch.float32).eval()
        ids = [tokenizer(t, truncation=True, max_length=77)["input_ids"] for t in TEXTS]
        pixel_values = processor(images=pil_images, return_tensors="pt")["pixel_values"]
        enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_features = features(model.get_image_features(pixel_values=pixel_values))
        text_features = features(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
        fixture["models"][name] = {
            "dir": str(Path(folder).resolve()),
            "token_ids": ids,
            "image_features": image_features.tolist(),
            "text_features": text_features.tolist(),
            "zero_shot": zero_shot(hf, processor, images_by_name),
        }
    (out / "fixtures.json").write_text(json.dumps(fixture))
    print(f"wrote {len(images)} images, {len(TEXTS)} texts, models {list(fixture['models'])} to {out}")


if __name__ == "__main__":
    main()
