"""FFCV loader throughput against a torch ``DataLoader`` over the same JPEG folder (benchmark, not a test).

    python -m benchmarks.loader                        # synthetic folder: --images 1024 --size 256
    python -m benchmarks.loader --src /data/imagenet    # an ImageNet-style folder (<src>/train/<class>/*)

Both sides do the training transform of ``ds_ext.data.ffcv_imagenet``: JPEG decode, random-resized crop
(scale 0.08-1, aspect 3/4-4/3) to ``--res``, horizontal flip with p = 0.5, then the same ImageNet
normalisation to float32 channels-last batches of ``--batch-size``, with ``--workers`` workers (FFCV:
decoding threads; torch: DataLoader worker processes; ``--workers 0`` gives the torch loader no worker
process, FFCV one thread).

* FFCV reads a ``.beton`` written from the folder with ``--write-mode jpg`` at ``--jpeg-quality`` (every
  image stored as JPEG, longest side capped at ``--max-resolution``, default: no resizing for the synthetic
  images), through ``FFCVLoaders`` exactly as training does.
* torch: a map-style ``Dataset`` decoding each file with PIL, cropping/resizing with PIL's bilinear
  ``resize(box=...)`` (torchvision is not used: it is not importable on the CPU install) and flipping, then
  ``torch.utils.data.DataLoader``; the batch is normalised in the main process like the FFCV one.

Each loader runs one untimed warm-up epoch (FFCV compiles its pipeline with numba there; the time is
reported separately), then ``--epochs`` timed epochs; the table gives images/s and FFCV / torch.
The synthetic images are smooth random fields (a few random colour blobs upsampled), so their JPEG
sizes and decode costs are closer to photographs than white noise would be.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_folder(root: Path, images: int, size: int, classes: int = 10, seed: int = 0) -> Path:
    """``<root>/train/c<k>/<i>.JPEG``: ``images`` smooth random RGB images of ``size`` x ``size``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        d = root / "train" / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        noise = rng.integers(-12, 13, (size, size, 3))
        arr = np.clip(np.asarray(img).astype(np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i:06d}.JPEG", quality=90)
    return root


def rrc_box(height: int, width: int, rnd: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) of a random-resized crop: the usual rule (10 tries, then a centre fallback)."""
    area = height * width
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rnd.uniform(*scale)
        aspect = math.exp(rnd.uniform(*lr))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rnd.randint(0, height - h), rnd.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class JpegRRC(torch.utils.data.Dataset):
    """PIL decode + random-resized crop + flip -> uint8 ``[3, res, res]`` tensor and label."""

    def __init__(self, samples, res: int):
        self.samples, self.res = samples, res
        self.rnd = random.Random(0)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
            top, left, h, w = rrc_box(im.height, im.width, self.rnd)
            im = im.resize((self.res, self.res), Image.BILINEAR, box=(left, top, left + w, top + h))
            arr = np.array(im)  # a writable copy
        if self.rnd.random() < 0.5:
            arr = arr[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), label


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.rnd = random.Random(info.seed)


def _time_epochs(make_iter, epochs: int):
    """(warm-up seconds, images/s over the timed epochs)."""
    t0 = time.perf_counter()
    n = sum(x.shape[0] for x, _ in make_iter())
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for x, _ in make_iter():
            n += x.shape[0]
    return warm, n / (time.perf_counter() - t0)


def run(a) -> list:
    from ds_ext.data import ffcv_imagenet as fi

    fi.require_ffcv()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ds_ext_bench_loader_"))
    if a.src:
        src = Path(a.src)
    else:
        src = work / "jpegs"
        if not (src / "train").is_dir():
            print(f"[bench-loader] writing {a.images} synthetic {a.size}x{a.size} JPEGs to {src}", file=sys.stderr)
            make_folder(src, a.images, a.size)
    classes, samples = fi.scan_folder(src / "train")
    beton = work / "train_jpg.beton"
    if not beton.is_file():
        fi.write_beton(src, "train", beton, max_resolution=a.max_resolution or 1 << 15, jpeg_quality=a.jpeg_quality,
                       write_mode="jpg", num_workers=max(a.workers, 1))
    n = len(samples)
    opts = fi.FFCVImageNetOptions(train_file=str(beton), val_file=str(beton), num_classes=len(classes),
                                  train_resolution=a.res, val_resolution=a.res, threads=max(a.workers, 1))
    bundle = fi.ffcv_imagenet(opts, root="/", device="cpu")
    perm = np.random.default_rng(0).permutation(n).tolist()
    ffcv_warm, ffcv_ips = _time_epochs(lambda: bundle.loader("train", perm, a.batch_size), a.epochs)

    ds = JpegRRC(samples, a.res)
    mean = torch.tensor(fi.IMAGENET_MEAN).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(fi.IMAGENET_STD).view(1, 3, 1, 1)

    def torch_iter():
        dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, sampler=perm, num_workers=a.workers,
                                         drop_last=True, worker_init_fn=_seed_worker,
                                         persistent_workers=False)
        for x, y in dl:
            yield ((x.float() - mean) * inv_std).contiguous(memory_format=torch.channels_last), y

    torch_warm, torch_ips = _time_epochs(torch_iter, a.epochs)
    return [("torch DataLoader (PIL)", torch_warm, torch_ips, 1.0),
            ("FFCV Loader (.beton, jpg)", ffcv_warm, ffcv_ips, ffcv_ips / torch_ips)], n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.splitlines()[0])
    ap.add_argument("--src", help="ImageNet-style folder (<src>/train/<class>/*); default: a synthetic one")
    ap.add_argument("--images", type=int, default=1024, help="synthetic folder: number of images")
    ap.add_argument("--size", type=int, default=256, help="synthetic folder: image side in pixels")
    ap.add_argument("--res", type=int, default=224, help="crop side (output resolution)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--max-resolution", type=int, default=None, help=".beton longest side (default: keep)")
    ap.add_argument("--workdir", help="where the synthetic folder and .beton go (default: a new temp dir)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows, n = run(a)
    print(f"\nloader throughput: {n} images, batch {a.batch_size}, {a.workers} workers, crop {a.res}, "
          f"decode + RRC + flip + normalise, {a.epochs} timed epochs after 1 warm-up, {os.cpu_count()} CPUs")
    print(f"| {'loader':<28} | {'warm-up epoch s':>15} | {'images/s':>9} | {'ratio':>6} |")
    print(f"|{'-' * 30}|{'-' * 17}|{'-' * 11}|{'-' * 8}|")
    for name, warm, ips, ratio in rows:
        print(f"| {name:<28} | {warm:>15.2f} | {ips:>9.1f} | {ratio:>5.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
