"""Real offline data, full-dataset loaders on small data the tests make, partitions and batches."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from fl_sim.base.errors import DataUnavailableError
from fl_sim.data.partition import partition, round_batches, split_holdout
from fl_sim.data.sources import DATASETS, OFFLINE_NAMES, _read_idx_pair, load_dataset
from fl_sim.scenario import DataConfig

OFFLINE = {  # name: (train + test size, shape, classes)
    "mnist5k": (5000, (1, 28, 28), 10),
    "cifar10-sample": (20, (3, 32, 32), 10),
    "cifar100-sample": (20, (3, 32, 32), 100),
    "imagenet-sample": (20, (3, 224, 224), 1000),
    "mnist-sample": (20, (1, 28, 28), 10),
    "fashion-mnist-sample": (20, (1, 28, 28), 10),
    "lfw-sample": (200, (1, 25, 25), 2),
}


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_datasets_are_real_images_in_unit_range(name):
    size, shape, classes = OFFLINE[name]
    cfg = DataConfig(dataset=name, image_size=224 if name == "imagenet-sample" else None)
    splits = load_dataset(cfg)
    assert len(splits.train) + len(splits.test) == size
    assert splits.shape == shape and splits.num_classes == classes
    x, y = splits.train.batch(np.arange(min(8, len(splits.train))))
    assert x.dtype == torch.float32 and x.shape[1:] == shape
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05  # real content, not blank
    assert int(y.max()) < classes
    assert len(splits.normalization.mean) == shape[0]


def test_every_offline_dataset_is_listed_and_available():
    assert set(OFFLINE_NAMES) <= set(DATASETS.names())
    for name in OFFLINE_NAMES:
        assert DATASETS.get(name).offline and DATASETS.get(name).missing(None) is None, name


def test_mnist5k_labels_come_from_the_file():
    splits = load_dataset(DataConfig(dataset="mnist5k"))
    labels = np.concatenate([splits.train.labels, splits.test.labels])
    assert np.bincount(labels).tolist() == [500] * 10


def test_foolbox_labels_are_read_from_file_names():
    splits = load_dataset(DataConfig(dataset="cifar10-sample", test_fraction=0.05))
    labels = sorted(np.concatenate([splits.train.labels, splits.test.labels]).tolist())
    # cifar10_00_3.png ... cifar10_19_6.png: the 20 CIFAR-10 test labels
    assert labels == sorted([3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6])


def test_photos_are_large_real_colour_images():
    splits = load_dataset(DataConfig(dataset="photos", image_size=64))
    assert splits.shape == (3, 64, 64) and len(splits.train) == splits.num_classes == 10


def test_resize_and_channels_options():
    splits = load_dataset(DataConfig(dataset="mnist-sample", image_size=32, channels=3))
    assert splits.shape == (3, 32, 32) and len(splits.normalization.mean) == 3


def test_max_samples_is_a_seeded_subset():
    a = load_dataset(DataConfig(dataset="mnist5k", max_samples=100))
    b = load_dataset(DataConfig(dataset="mnist5k", max_samples=100))
    assert len(a.train) == 100 and np.array_equal(a.train.labels, b.train.labels)


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open(path, "wb") if compress else open(path, "wb")).write(data)


def test_debian_style_idx_files_are_read(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), np.array([0, 3, 9, 1, 2])
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, True)
    x, y = _read_idx_pair(tmp_path, "train")
    assert np.array_equal(x, images) and np.array_equal(y, labels)


def test_torchvision_mnist_loads_from_an_existing_root(tmp_path):
    """The real torchvision path on a tiny MNIST the test writes in torchvision's raw layout."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("t10k", 4)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), False)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, False)
    splits = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))
    assert (len(splits.train), len(splits.test), splits.shape) == (12, 4, (1, 28, 28))


def test_missing_full_dataset_names_offline_alternatives(tmp_path):
    with pytest.raises(DataUnavailableError, match="offline alternatives: mnist5k"):
        load_dataset(DataConfig(dataset="cifar100", root=str(tmp_path)))


@pytest.mark.parametrize("layout", ["flat", "train-val"])
def test_image_folder(tmp_path, layout):
    rng = np.random.default_rng(2)
    splits = ["train", "val"] if layout == "train-val" else [""]
    for split in splits:
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = load_dataset(DataConfig(dataset="folder", path=str(tmp_path), image_size=32, test_fraction=0.3))
    assert data.classes == ["cat", "dog"] and data.shape == (3, 32, 32)
    assert len(data.train) + len(data.test) == 6 * len(splits)
    x, _ = data.train.batch([0, 1])
    assert x.shape == (2, 3, 32, 32) and 0 <= float(x.min()) <= float(x.max()) <= 1


@pytest.mark.parametrize("scheme,alpha", [("iid", 1.0), ("dirichlet", 0.3), ("dirichlet", 100.0)])
def test_partitions_are_disjoint_complete_and_reproducible(scheme, alpha):
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    shards = partition(labels, 7, scheme, alpha, seed=3)
    flat = np.concatenate(shards)
    assert len(flat) == len(labels) and len(np.unique(flat)) == len(labels)  # disjoint and complete
    assert all(len(s) >= 2 for s in shards)
    again = partition(labels, 7, scheme, alpha, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    other = partition(labels, 7, scheme, alpha, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other, strict=True))


def test_dirichlet_skews_labels_and_iid_does_not():
    labels = np.repeat(np.arange(10), 100)

    def mean_classes(shards):
        return np.mean([(np.bincount(labels[s], minlength=10) > 5).sum() for s in shards])

    skewed, iid = partition(labels, 10, "dirichlet", 0.1, 0), partition(labels, 10, "iid", 1, 0)
    assert mean_classes(skewed) < 5 < mean_classes(iid)


def test_holdout_and_round_batches_are_reproducible():
    shard = np.arange(100, 140)
    train, held = split_holdout(shard, 0.25, seed=0, client=1)
    assert len(held) == 10 and set(train) | set(held) == set(shard) and not set(train) & set(held)
    a = round_batches(train, seed=0, client=1, server_round=2, batch_size=4, local_steps=3)
    b = round_batches(train, seed=0, client=1, server_round=2, batch_size=4, local_steps=3)
    c = round_batches(train, seed=0, client=1, server_round=3, batch_size=4, local_steps=3)
    assert [x.tolist() for x in a] == [x.tolist() for x in b] != [x.tolist() for x in c]
    assert all(len(set(x)) == 4 and set(x) <= set(train) for x in a)
    epochs = round_batches(train, seed=0, client=1, server_round=2, batch_size=8, local_epochs=2)
    assert sorted(np.concatenate(epochs).tolist()) == sorted(train.tolist() * 2)
