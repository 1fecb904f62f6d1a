#!/usr/bin/env python3
"""Photo-like test images, made with numpy and Pillow (deterministic: seeded).

  photo_like(w, h, seed)   an RGB image with what photographs have for a JPEG codec and a resizer: smooth colour
                           fields, hard-edged shapes, fine texture and sensor noise. Saved at quality 88 it gives
                           JPEGs of about 48 KB at 640x480, 160 KB at 1280x960 and 620 KB at 3000x2000.

Run as a script it writes the set the fidelity test (tests/fidelity.rs) compares the exact and fast
preprocessing on, with a manifest.json describing each file:

  .venv/bin/python dev/make_test_photos.py --out target/test-photos

57 JPEGs of many sizes and aspect ratios (small ones that cannot be scaled down, 1/2, 1/4 and 1/8 candidates,
3000x2000, panoramas and tall strips), gray ones, 4:2:0, 4:2:2 and 4:4:4 chroma, progressive ones, qualities
from 60 to 98, one CMYK JPEG, and PNG and WebP files (which both modes decode alike).
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        for _ in range(6):
            fx, fy, ph = rng.uniform(0.5, 6) / w, rng.uniform(0.5, 6) / h, rng.uniform(0, 6.28)
            # sin(a + b) as products of a row and a column: cheap on large images.
            a, b = 2 * np.pi * fx * x, 2 * np.pi * fy * y + ph
            img[..., c] += rng.uniform(10, 40) * (np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b))
        img[..., c] += rng.uniform(80, 170)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.2) * min(w, h)
        x0, x1, y0, y1 = (max(0, int(cx - r)), min(w, int(cx + r) + 1), max(0, int(cy - r)), min(h, int(cy + r) + 1))
        colour = rng.uniform(0, 255, 3)
        if x0 >= x1 or y0 >= y1:
            continue
        mask = ((x[:, x0:x1] - cx) ** 2 + (y[y0:y1] - cy) ** 2) < r * r
        box = img[y0:y1, x0:x1]
        box[mask] = box[mask] * 0.4 + colour * 0.6
    # Texture whose grain grows slowly with the image, as a photo's detail does with its resolution.
    b = max(2, round(4 * (w * h / (640 * 480)) ** 0.25))
    tex = rng.standard_normal((h // b + 1, w // b + 1), dtype=np.float32)
    tex = np.repeat(np.repeat(tex, b, axis=0), b, axis=1)[:h, :w]
    img += 7 * tex[..., None]
    img += 3 * rng.standard_normal(img.shape, dtype=np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))


# (width, height): small ones (no DCT scaling possible), sizes at the 1/2, 1/4 and 1/8 thresholds, photos,
# panoramas and tall strips.
SIZES = [
    (200, 150), (224, 224), (300, 400), (447, 600), (448, 448), (500, 375), (640, 480), (480, 640), (800, 600),
    (900, 900), (1024, 768), (768, 1024), (1280, 960), (1280, 720), (720, 1280), (1600, 1200), (1792, 1792),
    (2000, 1500), (3000, 2000), (2000, 3000), (1800, 600), (600, 1800), (2400, 500), (500, 2400), (3000, 250),
]
# Pillow's subsampling values: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0.
SUBSAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    files = []

    def save(img: Image.Image, name: str, **info) -> None:
        path = args.out / name
        fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[name.rsplit(".", 1)[1]]
        kwargs = {}
        if fmt == "JPEG":
            kwargs = {"quality": info["quality"], "subsampling": info.get("subsampling", 2),
                      "progressive": info.get("progressive", False)}
            info["subsampling"] = "gray" if img.mode == "L" else SUBSAMPLING[kwargs["subsampling"]]
        elif fmt == "WEBP":
            kwargs = {"quality": 90}
        img.save(path, fmt, **kwargs)
        files.append({"file": name, "format": fmt.lower(), "width": img.width, "height": img.height,
                      "mode": img.mode, **info})

    seed = 0
    for i, (w, h) in enumerate(SIZES):
        # Two of each, but one of the largest (they take the time to make).
        for variant in range(1 if w * h > 2_500_000 else 2):
            seed += 1
            img = photo_like(w, h, seed)
            quality = int(rng.choice([60, 75, 88, 95, 98]))
            sub = int(rng.choice([0, 1, 2]))
            progressive = bool((i + variant) % 3 == 0)
            save(img, f"photo_{w}x{h}_{variant}.jpg", quality=quality, subsampling=sub, progressive=progressive)
    for w, h in [(640, 480), (1600, 1200), (333, 500), (1500, 1000), (500, 2400), (2400, 500)]:
        seed += 1
        save(photo_like(w, h, seed).convert("L"), f"gray_{w}x{h}.jpg", quality=88, progressive=(w == 1600))
    for w, h in [(1024, 768), (1400, 1050)]:
        seed += 1
        save(photo_like(w, h, seed), f"q88_444_{w}x{h}.jpg", quality=88, subsampling=0)
        save(photo_like(w, h, seed + 100), f"q88_prog_{w}x{h}.jpg", quality=88, subsampling=2, progressive=True)
    seed += 1
    save(photo_like(900, 600, seed).convert("CMYK"), "cmyk_900x600.jpg", quality=90)
    for w, h in [(800, 600), (640, 1000), (1200, 900)]:
        seed += 1
        save(photo_like(w, h, seed), f"photo_{w}x{h}.png")
    seed += 1
    save(photo_like(1000, 750, seed), "photo_1000x750.webp")
    (args.out / "manifest.json").write_text(json.dumps({"images": files}, indent=1) + "\n")
    jpegs = sum(f["format"] == "jpeg" for f in files)
    print(f"wrote {len(files)} images ({jpegs} JPEGs) to {args.out}")


if __name__ == "__main__":
    main()
