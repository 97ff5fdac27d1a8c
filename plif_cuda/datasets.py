"""Readers for the PLIF paper's datasets, from local files only (nothing is ever downloaded).

- ``load_digits``: scikit-learn's bundled 8x8 digits (no files needed).
- ``load_mnist`` / ``load_fashion_mnist``: the standard IDX files, gzipped or not.
- ``load_cifar10``: the standard python pickle batches (``cifar-10-batches-py``).
- ``NMNISTFrames``: N-MNIST's binary event files, integrated into T frames per sample.

Images come back as float tensors in [0, 1], ``[N, C, H, W]``, with int64 labels.
A missing file raises ``DatasetNotFoundError`` saying where to put which files.
"""
from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "nmnist")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where the reader looks; the message says what to put where."""


# ---------------------------------------------------------------- digits


def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's 8x8 digits (1797 images), split per class into train and test.

    Returns ``((x_train, y_train), (x_test, y_test))``; the split depends only on ``seed``.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for label in labels.unique():
        idx = torch.nonzero(labels == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = round(len(idx) * test_fraction)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx, test_idx = torch.cat(train_idx), torch.cat(test_idx)
    return (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


def read_idx(path) -> np.ndarray:
    """One IDX file (the MNIST format), gzipped or not, as a numpy array."""
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({count * dtype.itemsize} bytes), "
            f"but the file holds {len(data) - header} bytes of data"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_file(folders, name: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_idx_dataset(data_dir, folder_name: str, title: str):
    data_dir = Path(data_dir)
    # Also the layout torchvision leaves behind (<name>/raw), so existing copies work as they are.
    folders = [data_dir / folder_name, data_dir / folder_name / "raw", data_dir]
    splits = {}
    missing = []
    for split, names in _IDX_FILES.items():
        paths = [_find_file(folders, name) for name in names]
        missing += [name for name, path in zip(names, paths) if path is None]
        splits[split] = paths
    if missing:
        raise DatasetNotFoundError(
            f"{title} not found: put the four IDX files {', '.join(n for pair in _IDX_FILES.values() for n in pair)} "
            f"(gzipped .gz or not) in {data_dir / folder_name}/ ; missing: {', '.join(missing)}. "
            "Nothing is downloaded."
        )
    result = []
    for split in ("train", "test"):
        image_path, label_path = splits[split]
        images = read_idx(image_path)
        labels = read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{image_path} / {label_path}: expected images [N, H, W] and labels [N], "
                f"got {images.shape} and {labels.shape}"
            )
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        result.append((x, torch.from_numpy(labels.astype(np.int64))))
    return tuple(result)


def load_mnist(data_dir):
    """MNIST from ``<data_dir>/MNIST/`` (IDX files). Returns ``((x_train, y_train), (x_test, y_test))``."""
    return _load_idx_dataset(data_dir, "MNIST", "MNIST")


def load_fashion_mnist(data_dir):
    """Fashion-MNIST from ``<data_dir>/FashionMNIST/`` (IDX files, the same names as MNIST's)."""
    return _load_idx_dataset(data_dir, "FashionMNIST", "Fashion-MNIST")


# ---------------------------------------------------------------- CIFAR-10

CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST = ("test_batch",)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing that could run other code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")


def read_cifar10_batch(path):
    """One CIFAR-10 python batch: ``(images uint8 [N, 3, 32, 32], labels int64 [N])``."""
    path = Path(path)
    with io.BytesIO(path.read_bytes()) as stream:
        batch = _ArrayOnlyUnpickler(stream, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: a CIFAR-10 batch has 'data' and 'labels', got keys {sorted(batch)}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir):
    """CIFAR-10 from ``<data_dir>/cifar-10-batches-py/`` (the python version of the dataset)."""
    folder = Path(data_dir) / CIFAR10_FOLDER
    missing = [name for name in _CIFAR10_TRAIN + _CIFAR10_TEST if not (folder / name).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: extract the python version (cifar-10-python.tar.gz) so that "
            f"{folder}/ holds data_batch_1 ... data_batch_5 and test_batch; missing: {', '.join(missing)}. "
            "Nothing is downloaded."
        )
    result = []
    for names in (_CIFAR10_TRAIN, _CIFAR10_TEST):
        batches = [read_cifar10_batch(folder / name) for name in names]
        images = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        result.append((torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels)))
    return tuple(result)


# ---------------------------------------------------------------- N-MNIST

NMNIST_SIZE = 34


def read_nmnist_events(path):
    """One N-MNIST binary file -> dict of numpy arrays ``x, y, p, t`` (t in microseconds).

    Each event is 40 bits: x (8), y (8), polarity (1), timestamp (23), big-endian.
    """
    path = Path(path)
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size % 5 != 0:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of 5-byte N-MNIST events")
    events = raw.reshape(-1, 5).astype(np.uint32)
    return {
        "x": events[:, 0].astype(np.int64),
        "y": events[:, 1].astype(np.int64),
        "p": (events[:, 2] >> 7).astype(np.int64),
        "t": (((events[:, 2] & 0x7F) << 16) | (events[:, 3] << 8) | events[:, 4]).astype(np.int64),
    }


def events_to_frames(events, T: int, height: int, width: int, split_by: str = "number") -> np.ndarray:
    """Integrate events into ``T`` frames ``[T, 2, height, width]`` of event counts per polarity.

    ``split_by="number"``: each frame gets the same number of events (the last ones get the
    remainder); ``"time"``: each frame covers the same time span.
    """
    if split_by not in ("number", "time"):
        raise ValueError(f"split_by must be 'number' or 'time', got {split_by!r}")
    x, y, p, t = events["x"], events["y"], events["p"], events["t"]
    inside = (x < width) & (y < height)
    x, y, p, t = x[inside], y[inside], p[inside], t[inside]
    n = len(t)
    frames = np.zeros((T, 2, height, width), dtype=np.float32)
    if n == 0:
        return frames
    if split_by == "number":
        frame_index = np.arange(n) * T // n
    else:
        t0, span = t.min(), t.max() - t.min() + 1
        frame_index = (t - t0) * T // span
    np.add.at(frames, (frame_index, p, y, x), 1.0)
    return frames


class NMNISTFrames(Dataset):
    """N-MNIST from ``<data_dir>/NMNIST/{Train,Test}/<digit>/*.bin``, as ``[T, 2, 34, 34]`` frames.

    Files are read and integrated when an item is asked for (the dataset is 70k small files).
    Frames hold event counts; ``binarize=True`` gives 1 where any event fell.
    """

    def __init__(self, data_dir, train: bool, T: int = 10, split_by: str = "number", binarize: bool = False):
        if split_by not in ("number", "time"):
            raise ValueError(f"split_by must be 'number' or 'time', got {split_by!r}")
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive int, got {T!r}")
        root = Path(data_dir) / "NMNIST" / ("Train" if train else "Test")
        self.files, self.labels = [], []
        for digit in range(10):
            files = sorted((root / str(digit)).glob("*.bin"))
            self.files += files
            self.labels += [digit] * len(files)
        if not self.files:
            raise DatasetNotFoundError(
                f"N-MNIST not found: extract Train.zip and Test.zip so that {Path(data_dir) / 'NMNIST'}/Train/0/*.bin "
                f"... Train/9/ and Test/0/ ... Test/9/ hold the binary event files; {root} has none. "
                "Nothing is downloaded."
            )
        self.T, self.split_by, self.binarize = T, split_by, binarize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        events = read_nmnist_events(self.files[index])
        frames = events_to_frames(events, self.T, NMNIST_SIZE, NMNIST_SIZE, self.split_by)
        if self.binarize:
            frames = (frames > 0).astype(np.float32)
        return torch.from_numpy(frames), self.labels[index]
