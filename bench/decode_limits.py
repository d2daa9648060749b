"""What JPEG draft mode changes: decode time and features of large JPEGs, exact vs draft.

    python bench/decode_limits.py [--sizes 4096x4096,6000x4000,8000x6000] [--image-size 64,224]

stages.extract_features decodes a JPEG above DRAFT_ABOVE pixels at a reduced DCT scale (PIL draft:
1/2, 1/4 or 1/8, the smallest keeping the shorter side >= DRAFT_MARGIN x the decode size). This
script builds large JPEGs from the few natural photos on the machine (sklearn's china.jpg and
flower.jpg, upscaled, with sensor-like noise added so they hold fine detail) and a mosaic of demo
images (hard edges), and reports per image and size:

* decode seconds, exact (the whole image, then the bicubic resize) vs draft;
* the cosine distance between the packaged lite0 backbone's features of the two decodes, beside
  the distance a JPEG re-save (quality 95 -> 90 of the same pixels) makes, the yardstick of a
  change no one would call a different image.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sources() -> dict[str, np.ndarray]:
    from PIL import Image

    out = {}
    try:
        import sklearn.datasets as skd

        folder = Path(skd.__file__).parent / "images"
        for name in ("china.jpg", "flower.jpg"):
            if (folder / name).exists():
                out[name.split(".")[0]] = np.asarray(Image.open(folder / name).convert("RGB"))
    except ImportError:
        pass
    from sinet_cli.datasets import load_demo

    px = load_demo(noise="none").pixels[:64]
    tiles = [np.stack([p] * 3, -1) if p.ndim == 2 else p for p in px]
    rows = [np.concatenate(tiles[r * 8:(r + 1) * 8], axis=1) for r in range(8)]
    out["demo-mosaic"] = np.concatenate(rows, axis=0)
    return out


def large_jpeg(base: np.ndarray, w: int, h: int, rng: np.random.Generator, quality: int = 95) -> bytes:
    from PIL import Image

    img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    a = np.asarray(img, dtype=np.int16)
    a = np.clip(a + rng.normal(0, 6, a.shape).astype(np.int16), 0, 255).astype(np.uint8)  # fine detail
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096x4096,6000x4000,8000x6000")
    ap.add_argument("--image-size", default="64,224")
    args = ap.parse_args()
    import torch

    from sinet_cli.sideinfo import DEFAULT_BACKBONE, default_weights
    from stages import extract_features as fx

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    model, _ = fx.build_backbone(DEFAULT_BACKBONE, default_weights(DEFAULT_BACKBONE))
    rng = np.random.default_rng(0)
    exact = fx.Decode(draft_above=None)
    draft = fx.Decode(draft_above=0)
    print(f"{'image':<12} {'size':>10} {'px':>5} {'exact s':>8} {'draft s':>8} {'speed':>6} "
          f"{'cos dist draft':>15} {'cos dist re-save':>17}")
    for name, base in sources().items():
        for size in args.sizes.split(","):
            w, h = (int(x) for x in size.split("x"))
            data = large_jpeg(base, w, h, rng)
            from PIL import Image

            resaved = io.BytesIO()
            Image.open(io.BytesIO(data)).save(resaved, "JPEG", quality=90)
            for s in (int(x) for x in args.image_size.split(",")):
                pp = fx.Preprocess.for_model(model, s)
                times = {}
                pix = {}
                for label, dec, raw in (("exact", exact, data), ("draft", draft, data), ("resave", exact,
                                                                                          resaved.getvalue())):
                    t0 = time.perf_counter()
                    pix[label] = fx.decode_image(io.BytesIO(raw), pp.resize, pp.size, dec)
                    times[label] = time.perf_counter() - t0
                with torch.inference_mode():
                    f = {k: torch.nn.functional.normalize(model.forward_head(model.forward_features(
                        pp(v.unsqueeze(0))), pre_logits=True), dim=1)[0] for k, v in pix.items()}
                d_draft = 1 - float(f["exact"] @ f["draft"])
                d_resave = 1 - float(f["exact"] @ f["resave"])
                print(f"{name:<12} {size:>10} {s:>5} {times['exact']:>8.3f} {times['draft']:>8.3f} "
                      f"{times['exact'] / times['draft']:>5.1f}x {d_draft:>15.2e} {d_resave:>17.2e}", flush=True)


if __name__ == "__main__":
    main()
