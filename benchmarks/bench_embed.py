"""Embedding benchmark: encoder throughput per thread count, and ``quari embed`` end to end.

Measures, on this machine and in one run:

* the ``offline`` image encoder (EfficientNet-Lite0 + head, real weights) in images/s at 64, 112
  and 224 px with 1 and 2 torch threads (preprocessed batches of 32: the model alone);
* decode + preprocess (PIL) in images/s for one process, at the same sizes;
* the ``offline`` text tower (all-MiniLM-L6-v2) in captions/s with 1 and 2 threads;
* a ViT-B/32-sized transformers CLIP (random init, same cost as the real one) in images/s at
  224 px with 1 and 2 threads — to set ``hf:``'s default;
* ``quari embed`` end to end (offline encoder, 112 px) on a folder of 2,000 real JPEGs made from
  the photos bundled with scikit-image/scikit-learn (random crops, resizes, flips): wall time,
  images/s, and peak RSS of the embedding process and of its decode workers, for a few
  thread/worker settings. Each run is a fresh subprocess (model loading included).

Usage::

    python benchmarks/bench_embed.py           # ~6 min on 2 cores
    python benchmarks/bench_embed.py --quick   # small sizes, a smoke run

Writes ``benchmarks/results/bench_embed.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import machine, median_ms
from quari.encoders import EncoderConfig, collate
from quari.encoders.offline import FEATURE_DIM, TEXT_DIM, OfflineEncoder, OfflineHead

RESULTS = Path(__file__).resolve().parent / "results"


def rate(fn, items: int, repeats: int) -> float:
    """Median items/s of ``fn`` (one warm-up call)."""
    return items / (median_ms(fn, repeats) / 1e3)


def bundled_photos() -> list[Image.Image]:
    import skimage.data as d
    from sklearn.datasets import load_sample_images

    arrays = [d.astronaut(), d.chelsea(), d.coffee(), d.rocket(), d.stereo_motorcycle()[0],
              d.hubble_deep_field(), d.retina(), d.camera(), d.coins(), d.moon(),
              *load_sample_images().images]  # fmt: skip
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def make_folder(folder: Path, n: int, seed: int = 0) -> None:
    """n JPEGs: random crops (40–100 %), resizes (longer side 160–640 px) and flips."""
    rng = np.random.default_rng(seed)
    photos = bundled_photos()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        f = rng.uniform(0.4, 1.0)
        cw, ch = int(w * f), int(h * f)
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = img.crop((x, y, x + cw, y + ch))
        side = int(rng.integers(160, 641))
        crop.thumbnail((side, side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        sub = folder / f"{i // 500:02d}"  # a few subfolders: the folder source is recursive
        sub.mkdir(exist_ok=True)
        crop.save(sub / f"img_{i:05d}.jpg", quality=90)


def random_head(folder: Path, resolution: int) -> Path:
    rng = np.random.default_rng(0)
    OfflineHead(
        mean=np.zeros(FEATURE_DIM, np.float32),
        scale=np.ones(FEATURE_DIM, np.float32),
        weight=rng.standard_normal((FEATURE_DIM, TEXT_DIM)).astype(np.float32) * 0.03,
        bias=np.zeros(TEXT_DIM, np.float32),
        resolution=resolution,
        alpha=1.0,
        rows=0,
        loo_error=float("nan"),
        note="random head for benchmarking",
    ).save(folder)
    return folder


def bench_offline_images(tmp: Path, sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    images = bundled_photos()[:8] * 4  # 32 real photos
    for res in sizes:
        for threads in (1, 2):
            enc = OfflineEncoder(
                random_head(tmp / f"head{res}", res), EncoderConfig(threads=threads)
            )
            batch = collate([enc.preprocessor(im) for im in images])
            ips = rate(lambda e=enc, b=batch: e.encode_batch(b), len(images), repeats)
            rows.append({"resolution": res, "threads": threads, "images_per_s": round(ips, 1)})
            print(f"offline image encoder {res:>3} px, {threads} thread(s): {ips:7.1f} img/s")
        pre = rate(lambda e=enc: [e.preprocessor(im) for im in images], len(images), repeats)
        rows.append({"resolution": res, "preprocess_images_per_s": round(pre, 1)})
        print(f"  PIL resize + normalise of full-size photos at {res} px: {pre:7.1f} img/s")
    return rows


def bench_offline_text(tmp: Path, repeats: int) -> list[dict]:
    words = ["cat", "dog", "red car", "temple", "flower", "rocket", "cup"] * 10
    texts = [f"a photo of a {w} on a sunny day number {i}" for i, w in enumerate(words)]
    rows = []
    for threads in (1, 2):
        enc = OfflineEncoder(random_head(tmp / "head112", 112), EncoderConfig(threads=threads))
        cps = rate(lambda e=enc: e.encode_texts(texts), len(texts), repeats)
        rows.append({"threads": threads, "captions_per_s": round(cps, 1)})
        print(f"offline text tower (MiniLM), {threads} thread(s): {cps:7.1f} captions/s")
    return rows


def bench_clip_b32(repeats: int) -> list[dict]:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig()).eval()  # ViT-B/32 image tower, 224 px, 512-d
    x = torch.randn(16, 3, 224, 224)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            ips = rate(lambda: model.get_image_features(pixel_values=x), 16, repeats)
        rows.append({"threads": threads, "images_per_s": round(ips, 1)})
        print(f"CLIP ViT-B/32 image tower (random init), {threads} thread(s): {ips:7.1f} img/s")
    return rows


# Peak RSS from VmHWM: getrusage's ru_maxrss survives execve on Linux, so in a child it would
# report this (large) benchmark process's peak instead of its own.
CHILD = """
import json, resource, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
from quari.embed import EmbedConfig, embed
from quari.encoders import EncoderConfig
t0 = time.perf_counter()
r = embed(sys.argv[1], sys.argv[2], "offline:" + sys.argv[3],
          EmbedConfig(rows_per_shard=500, batch_size=int(sys.argv[6]), workers=int(sys.argv[4]),
                      progress=False),
          EncoderConfig(threads=int(sys.argv[5])))
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "embedded": r.embedded, "skipped": r.skipped,
    "encode_s": r.seconds,
    "peak_rss_mb": hwm(),
    "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def bench_end_to_end(tmp: Path, n: int, settings: list[tuple[int, int, int]]) -> list[dict]:
    folder = tmp / "images"
    t0 = time.perf_counter()
    make_folder(folder, n)
    print(f"made {n} JPEGs in {time.perf_counter() - t0:.1f} s")
    head = random_head(tmp / "head-e2e", 112)
    rows = []
    for workers, threads, batch in settings:
        out = tmp / f"set-w{workers}-t{threads}-b{batch}"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(folder),
                str(out),
                str(head),
                str(workers),
                str(threads),
                str(batch),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        total = time.perf_counter() - t0
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {
            "images": n,
            "workers": workers,
            "threads": threads,
            "batch_size": batch,
            "process_wall_s": round(total, 1),
            "embed_wall_s": round(res["wall_s"], 1),
            "images_per_s": round(n / res["wall_s"], 1),
            "peak_rss_mb": round(res["peak_rss_mb"]),
            "worker_peak_rss_mb": round(res["worker_peak_rss_mb"]),
            "embedded": res["embedded"],
        }
        rows.append(row)
        print(
            f"quari embed {n} JPEGs @112 px, workers {workers}, threads {threads}, batch {batch}: "
            f"{row['embed_wall_s']} s ({row['images_per_s']} img/s; process {total:.1f} s with "
            f"imports), peak RSS {row['peak_rss_mb']} MB (decode worker "
            f"{row['worker_peak_rss_mb']} MB incl. pages shared with the parent)"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_embed.json")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    n = 200 if args.quick else 2000
    # (workers, threads, batch size)
    settings = [(1, 1, 16)]
    if not args.quick:
        settings += [(1, 1, 32), (1, 1, 64), (1, 2, 16), (0, 1, 16)]
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        report = {
            "machine": machine(),
            "offline_image_encoder": bench_offline_images(tmp, [64, 112, 224], repeats),
            "offline_text_tower": bench_offline_text(tmp, repeats),
            "hf_clip_b32_image_tower": bench_clip_b32(repeats),
            "embed_end_to_end": bench_end_to_end(tmp, n, settings),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
