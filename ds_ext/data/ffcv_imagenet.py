"""ImageNet through FFCV (``.beton`` files): a writer CLI and the ``ffcv_imagenet`` data set.

Design notes (the reasons behind each choice, measurements, deviations): ``docs/dev/notes/ffcv-imagenet.md``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from pydantic import Field

from ..registry import DATASETS, Options
from .base import DataBundle
from .files import data_root, needs_files, option_file

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
DEFAULT_CROP_RATIO = 224 / 256
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
FIELDS = ("image", "label")  # the writer's field names, in this order
SYSTEM_PACKAGES = ("libopencv-dev", "libturbojpeg0-dev", "pkg-config")


class BetonMismatch(ValueError):
    """A ``.beton`` file exists but is not what this data set reads."""


# ---------------------------------------------------------------------------------------------------
# ffcv import (lazy: importing ds_ext never needs ffcv)

def _quiet_numba_finalizer() -> None:
    """Drop numba's harmless ``KeyError`` from a dead Dispatcher's finalizer (see the module docstring)."""
    if getattr(sys.unraisablehook, "_ds_ext_numba_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        tb = unraisable.exc_traceback
        if unraisable.exc_type is KeyError and tb is not None:
            while tb.tb_next is not None:
                tb = tb.tb_next
            code = tb.tb_frame.f_code
            path = code.co_filename.replace("\\", "/")
            if code.co_name == "finalizer" and path.endswith("numba/core/dispatcher.py"):
                return
        previous(unraisable)

    hook._ds_ext_numba_filter = True
    sys.unraisablehook = hook


def require_ffcv():
    """Import ffcv (1.0.2) or raise an ImportError that says what is missing and how to install it."""
    try:
        import ffcv  # noqa: F401
        from ffcv.loader import Loader  # noqa: F401  (loads the compiled _libffcv, cv2, numba)
    except ImportError as e:  # includes a _libffcv built against system libraries that are gone
        missing = getattr(e, "name", None) or str(e)
        raise ImportError(
            f"the ffcv_imagenet data set needs ffcv 1.0.2, which is not usable here ({missing!r} failed to "
            f"import: {e}).\n  install it with: bash run/setup.sh   (as root it also installs the Debian "
            f"packages ffcv builds against: {' '.join(SYSTEM_PACKAGES)})\n  or by hand: sudo apt-get install "
            f"{' '.join(SYSTEM_PACKAGES)} && pip install 'ffcv==1.0.2' pillow") from e
    _quiet_numba_finalizer()
    import ffcv
    return ffcv


# ---------------------------------------------------------------------------------------------------
# writer

def writer_command(split: str, out, src: str = "<imagenet dir with train/ and val/>", max_resolution: int = 500,
                   jpeg_quality: int = 90, write_mode: str = "proportion", compress_probability: float = 0.5) -> str:
    """The exact shell command that writes ``out`` (quoted where needed)."""
    args = ["python", "-m", "ds_ext.data.ffcv_imagenet", "write", "--split", split, "--src", str(src),
            "--out", str(out), "--max-resolution", str(max_resolution), "--jpeg-quality", str(jpeg_quality)]
    if write_mode != "proportion" or compress_probability != 0.5:
        args += ["--write-mode", write_mode]
        if write_mode == "proportion":
            args += ["--compress-probability", str(compress_probability)]
    return " ".join(shlex.quote(a) if not a.startswith("<") else a for a in args)


def scan_folder(split_dir: Path) -> Tuple[List[str], List[Tuple[Path, int]]]:
    """``(classes, [(file, class index)])`` of an ImageFolder-style tree, classes and files sorted."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: no such directory (expected <src>/<split>/<class>/*.JPEG)")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{split_dir}: no class folders (expected {split_dir}/<class>/*.JPEG)")
    samples = []
    for ci, c in enumerate(classes):
        for f in sorted((split_dir / c).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((f, ci))
    if not samples:
        raise FileNotFoundError(f"{split_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return classes, samples


class ImageFolderRGB:
    """Indexable ``(uint8 HxWx3 RGB array, class index)`` over ``scan_folder`` output (decoded with PIL)."""

    def __init__(self, samples: Sequence[Tuple[Path, int]]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")), label


def write_beton(src, split: str, out, max_resolution: int = 500, jpeg_quality: int = 90,
                write_mode: str = "proportion", compress_probability: float = 0.5, num_workers: int = -1,
                chunk_size: int = 100) -> int:
    """Write ``<src>/<split>`` to ``out`` with fields ``image`` (RGBImageField) and ``label`` (IntField),
    samples in sorted (class, file) order; FFCV's writer shows a tqdm progress bar. Returns the count."""
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    classes, samples = scan_folder(Path(src) / split)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                               compress_probability=compress_probability),
        "label": IntField(),
    }
    workers = num_workers if num_workers > 0 else (os.cpu_count() or 1)
    print(f"[ffcv_imagenet] {split}: {len(samples)} images in {len(classes)} classes from {Path(src) / split} "
          f"-> {out} (max side {max_resolution}, {write_mode}, jpeg q{jpeg_quality}, {workers} workers)",
          file=sys.stderr)
    tmp = out.with_name(out.name + ".partial")
    DatasetWriter(str(tmp), fields, num_workers=workers).from_indexed_dataset(
        ImageFolderRGB(samples), chunksize=chunk_size)
    os.replace(tmp, out)  # a crashed write never leaves a file that looks complete
    return len(samples)


# ---------------------------------------------------------------------------------------------------
# reading

class BetonSplit(torch.utils.data.Dataset):
    """One validated ``.beton`` split: its length and labels (what orders and checks need). Batches come
    from ``FFCVLoaders``, not ``__getitem__``."""

    def __init__(self, path: Path, split: str, command: str, num_classes: Optional[int]):
        ffcv = require_ffcv()
        from ffcv.fields import IntField, RGBImageField
        from ffcv.reader import Reader

        self.path, self.split = path, split
        fix = f"  write it with: {command}"
        if not path.is_file():
            raise FileNotFoundError(f"ffcv_imagenet: missing {split} file {path}\n{fix}")
        try:
            reader = Reader(str(path))
        except Exception as e:  # wrong format version, truncated file, unknown field type
            raise BetonMismatch(f"ffcv_imagenet: {path} is not a readable ffcv {ffcv.__version__} .beton "
                                f"({type(e).__name__}: {e})\n{fix}") from e
        found = {name: type(h).__name__ for name, h in reader.handlers.items()}
        want = {"image": RGBImageField.__name__, "label": IntField.__name__}
        if found != want:
            raise BetonMismatch(f"ffcv_imagenet: {path} has fields {found}, expected {want}\n{fix}")
        if int(reader.num_samples) == 0:
            raise BetonMismatch(f"ffcv_imagenet: {path} holds no samples\n{fix}")
        labels = np.asarray(reader.metadata[reader.metadata.dtype.names[list(reader.handlers).index("label")]])
        if labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes):
            raise BetonMismatch(f"ffcv_imagenet: {path} has labels in [{labels.min()}, {labels.max()}], outside "
                                f"[0, {num_classes}) (num_classes)\n{fix}")
        self.labels = labels.astype(np.int64)
        image_meta = reader.metadata[reader.metadata.dtype.names[list(reader.handlers).index("image")]]
        self.max_side = int(max(image_meta["width"].max(), image_meta["height"].max()))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        raise TypeError(f"{self.path}: read .beton batches through DataBundle.loader(...), not item by item")


def _given_order_class():
    from ffcv.traversal_order.base import TraversalOrder

    class GivenOrder(TraversalOrder):
        """Visits exactly the indices last given to ``set_indices`` (see 'Order' in the module docstring)."""

        def __init__(self, indices):
            # TraversalOrder.__init__ needs the loader, which does not exist yet: bound in __call__.
            self.loader, self.seed, self.distributed, self.sampler = None, 0, False, None
            self.set_indices(indices)

        def set_indices(self, indices) -> None:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)

        def __call__(self, loader):  # ffcv 1.0.2 calls order(loader) on whatever passed its isinstance test
            self.loader = loader
            return self

        def sample_order(self, epoch: int):
            return self.indices

    return GivenOrder


class FFCVLoaders:
    """``DataBundle.loader_factory`` for the two splits: builds (and caches) one FFCV ``Loader`` per
    (split, batch size, number of indices, drop_last, threads) and yields normalised channels-last batches."""

    def __init__(self, splits: Dict[str, BetonSplit], opts: "FFCVImageNetOptions", device=None):
        self.splits, self.opts = splits, opts
        self.device = device
        self._cache: Dict[tuple, tuple] = {}

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _pipelines(self, split: str, device: torch.device):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

        o = self.opts
        if split == "train":
            r = o.train_resolution
            image = [RandomResizedCropRGBImageDecoder((r, r), scale=tuple(o.rrc_scale), ratio=tuple(o.rrc_ratio)),
                     RandomHorizontalFlip()]
        else:
            r = o.val_resolution
            image = [CenterCropRGBImageDecoder((r, r), ratio=o.val_crop_ratio)]
        image += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
        label = [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True)]
        return {"image": image, "label": label}

    def threads(self, num_workers: int) -> int:
        if self.opts.threads:
            return self.opts.threads
        if num_workers > 0:
            return num_workers
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        return max(1, (os.cpu_count() or 1) // max(local, 1))

    def __call__(self, split: str, indices: Sequence[int], batch_size: int, num_workers: int = 0,
                 drop_last: bool = True, seed: int = 0):
        from ffcv.loader import Loader

        ds = self.splits[split]
        idx = np.asarray(list(indices), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(ds)):
            raise IndexError(f"{ds.path}: indices outside [0, {len(ds)})")
        device = self._device()
        threads = self.threads(num_workers)
        key = (split, batch_size, idx.size, drop_last, threads, str(device))
        if key not in self._cache:
            order = _given_order_class()(idx)
            loader = Loader(str(ds.path), batch_size=batch_size, num_workers=threads, os_cache=self.opts.os_cache,
                            order=order, indices=idx, pipelines=self._pipelines(split, device),
                            drop_last=drop_last, batches_ahead=self.opts.batches_ahead, seed=seed)
            self._cache[key] = (loader, order)
        loader, order = self._cache[key]
        order.set_indices(idx)
        return _Batches(loader, device, self.opts.dtype)


class _Batches:
    """Iterates an FFCV loader, normalising images on their device; labels become int64 ``[B]``."""

    def __init__(self, loader, device: torch.device, dtype: str):
        self.loader = loader
        self.dtype = getattr(torch, dtype)
        self.mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.inv_std = (1.0 / torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device)).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            # x, y live in FFCV's reused buffers: both lines below make new tensors before the next batch.
            x = ((x.float() - self.mean) * self.inv_std).to(self.dtype)
            yield x, y.reshape(-1).to(torch.int64, copy=True)


# ---------------------------------------------------------------------------------------------------
# the data set

class FFCVImageNetOptions(Options):
    train_file: str = Field("ffcv/train_500_0.50_90.ffcv", description="training .beton, relative to data.root")
    val_file: str = Field("ffcv/val_500_0.50_90.ffcv", description="validation .beton, relative to data.root")
    num_classes: int = Field(1000, ge=1)
    train_resolution: int = Field(224, ge=8, description="side of the random-resized crop (QSR: res=224)")
    val_resolution: int = Field(224, ge=8, description="side of the centre crop")
    val_crop_ratio: float = Field(DEFAULT_CROP_RATIO, gt=0, le=1, description="centre crop / shorter side")
    rrc_scale: Tuple[float, float] = (0.08, 1.0)
    rrc_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    os_cache: bool = Field(True, description="let the OS page cache hold the file (QSR: in_memory=1)")
    batches_ahead: int = Field(3, ge=1)
    threads: Optional[int] = Field(None, ge=1, description="FFCV decoding threads per rank; default "
                                   "data.num_workers, or cores / local ranks when that is 0")
    # only used to print the writer command in errors
    write_max_resolution: int = 500
    write_jpeg_quality: int = 90
    write_compress_probability: float = 0.5


@DATASETS.register("ffcv_imagenet", FFCVImageNetOptions)
@needs_files(lambda o: [option_file(o, k) for k in ("train_file", "val_file")])
def ffcv_imagenet(options: FFCVImageNetOptions, root: Optional[str] = None, device=None) -> DataBundle:
    """ImageNet from FFCV .beton files (RRC + flip / centre crop, normalised on the device, channels-last)."""
    require_ffcv()
    o = options
    layout = f"{o.train_file} and {o.val_file} (.beton files)"
    base = data_root(root, "ffcv_imagenet", layout,
                     writer_command("train", f"<root>/{o.train_file}", max_resolution=o.write_max_resolution,
                                    jpeg_quality=o.write_jpeg_quality,
                                    compress_probability=o.write_compress_probability))
    splits = {}
    for split, name in (("train", o.train_file), ("val", o.val_file)):
        path = base / name
        cmd = writer_command(split, path, max_resolution=o.write_max_resolution, jpeg_quality=o.write_jpeg_quality,
                             compress_probability=o.write_compress_probability)
        splits[split] = BetonSplit(path, split, cmd, o.num_classes)
    return DataBundle(splits["train"], splits["val"], (3, o.train_resolution, o.train_resolution), o.num_classes,
                      loader_factory=FFCVLoaders(splits, o, device=device))



# ---------------------------------------------------------------------------------------------------
# CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_ext.data.ffcv_imagenet",
                                 description="Write an ImageNet-style folder split to an FFCV .beton file.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="<src>/<split>/<class>/*.JPEG -> .beton (fields: image, label)")
    w.add_argument("--split", required=True, help="sub-folder of --src to write (train or val)")
    w.add_argument("--src", required=True, help="folder holding <split>/<class>/*.JPEG")
    w.add_argument("--out", required=True, help="the .beton file to write")
    w.add_argument("--max-resolution", type=int, required=True, help="longest side after resizing (QSR: 500)")
    w.add_argument("--jpeg-quality", type=int, required=True, help="JPEG quality of compressed images (QSR: 90)")
    w.add_argument("--write-mode", default="proportion", choices=["proportion", "jpg", "raw", "smart"],
                   help="how FFCV stores images (default proportion: a random --compress-probability share as JPEG)")
    w.add_argument("--compress-probability", type=float, default=0.5, help="for --write-mode proportion (0.5)")
    w.add_argument("--num-workers", type=int, default=-1, help="writer processes (default: all cores)")
    w.add_argument("--chunk-size", type=int, default=100, help="images per work item")
    a = ap.parse_args(argv)
    try:
        n = write_beton(a.src, a.split, a.out, a.max_resolution, a.jpeg_quality, a.write_mode, a.compress_probability,
                        a.num_workers, a.chunk_size)
    except (FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[ffcv_imagenet] wrote {n} samples to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
