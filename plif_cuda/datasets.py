"""Readers for the PLIF paper's datasets, from local files only (nothing is ever downloaded).

- ``load_digits``: scikit-learn's bundled 8x8 digits (no files needed).
- ``load_mnist`` / ``load_fashion_mnist``: the standard IDX files, gzipped or not; Fashion-MNIST
  by default from Debian's package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``).
- ``load_cifar10``: the standard python pickle batches (``cifar-10-batches-py``).
- ``NMNISTFrames``: N-MNIST's binary event files, integrated into T frames per sample.
- ``CIFAR10DVSFrames``: CIFAR10-DVS's jAER AEDAT 2.0 files (one folder per class), split 9:1 per class.
- ``DVS128GestureFrames``: DVS128 Gesture's AEDAT 3.1 trials, cut into gestures by their labels files.

Images come back as float tensors in [0, 1], ``[N, C, H, W]``, with int64 labels; the event
datasets give ``(frames [T, 2, H, W], label)`` items (``EventFrames``).
A missing file raises ``DatasetNotFoundError`` saying where to put which files.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "nmnist", "cifar10-dvs", "dvs128-gesture")


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
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as error:  # gzip's own errors name no file
            raise ValueError(f"{path}: truncated or corrupt gzip file ({error})") from error
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
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
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


FASHION_MNIST_APT_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _idx_spellings(name: str) -> tuple[str, str]:
    """The official name and the one some mirrors use, with a dot before ``idx`` (t10k-labels.idx1-ubyte)."""
    return name, name.replace("-idx", ".idx")


def _find_file(folders, name: str) -> Path | None:
    for folder in folders:
        for spelling in _idx_spellings(name):
            for candidate in (folder / spelling, folder / f"{spelling}.gz"):
                if candidate.is_file():
                    return candidate
    return None


def _load_idx_dataset(folders, destination: Path, title: str, hint: str = ""):
    """Reads the four IDX files, each from the first of ``folders`` that holds it."""
    splits = {}
    missing = []
    for split, names in _IDX_FILES.items():
        paths = [_find_file(folders, name) for name in names]
        missing += [name for name, path in zip(names, paths) if path is None]
        splits[split] = paths
    if missing:
        raise DatasetNotFoundError(
            f"{title} not found: put the four IDX files {', '.join(n for pair in _IDX_FILES.values() for n in pair)} "
            f"(gzipped .gz or not) in {destination}/ ; missing: {', '.join(missing)}. {hint}"
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


def _idx_folders(data_dir, folder_name: str) -> list[Path]:
    data_dir = Path(data_dir)
    # Also the layout torchvision leaves behind (<name>/raw), so existing copies work as they are.
    return [data_dir / folder_name, data_dir / folder_name / "raw", data_dir]


def load_mnist(data_dir):
    """MNIST from ``<data_dir>/MNIST/`` (IDX files). Returns ``((x_train, y_train), (x_test, y_test))``."""
    return _load_idx_dataset(_idx_folders(data_dir, "MNIST"), Path(data_dir) / "MNIST", "MNIST")


def load_fashion_mnist(data_dir=None):
    """Fashion-MNIST: the IDX files (the same names as MNIST's) from ``<data_dir>/FashionMNIST/``,
    its ``raw/`` or ``data_dir`` itself; by default from ``FASHION_MNIST_DEBIAN_DIR``, where
    Debian's package ``dataset-fashion-mnist`` installs them. Returns ``((x_train, y_train), (x_test, y_test))``.
    """
    if data_dir is None:
        return _load_idx_dataset(
            [FASHION_MNIST_DEBIAN_DIR],
            FASHION_MNIST_DEBIAN_DIR,
            "Fashion-MNIST",
            f"Install Debian's package: apt-get install {FASHION_MNIST_APT_PACKAGE} (it puts them there), "
            "or pass the folder that holds them as data_dir (examples/train.py: --data-dir). ",
        )
    return _load_idx_dataset(
        _idx_folders(data_dir, "FashionMNIST"),
        Path(data_dir) / "FashionMNIST",
        "Fashion-MNIST",
        f"Or leave the folder unset to read {FASHION_MNIST_DEBIAN_DIR}/, where "
        f"apt-get install {FASHION_MNIST_APT_PACKAGE} puts them. ",
    )


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


# ---------------------------------------------------------------- event frames


SPLIT_BY = ("number", "time")


def _check_split_by(split_by) -> None:
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")


def events_to_frames(events, T: int, height: int, width: int, split_by: str = "number") -> np.ndarray:
    """Integrate events into ``T`` frames ``[T, 2, height, width]`` of event counts per polarity.

    ``split_by="number"``: each frame gets ``n // T`` events in file order, the last one also the
    remainder (SpikingJelly's split, which the paper used); ``"time"``: each frame covers the same
    time span. Events outside ``height x width`` are dropped first.
    """
    _check_split_by(split_by)
    x, y, p, t = events["x"], events["y"], events["p"], events["t"]
    inside = (x < width) & (y < height)
    x, y, p, t = x[inside], y[inside], p[inside], t[inside]
    n = len(t)
    frames = np.zeros((T, 2, height, width), dtype=np.float32)
    if n == 0:
        return frames
    if split_by == "number":
        per_frame = n // T
        frame_index = np.full(n, T - 1) if per_frame == 0 else np.minimum(np.arange(n) // per_frame, T - 1)
    else:
        t0, span = t.min(), t.max() - t.min() + 1
        frame_index = (t - t0) * T // span
    np.add.at(frames, (frame_index, p, y, x), 1.0)
    return frames


class EventFrames(Dataset):
    """Base of the event datasets: a sample's events are read and integrated when it is asked for.

    Subclasses set ``size`` (the sensor side), ``num_classes``, ``self.labels`` and ``read_events``.
    Items are ``(frames [T, 2, size, size] float32, label)``; frames hold event counts, or with
    ``binarize=True`` 1 where any event fell.
    """

    size: int
    num_classes: int

    def __init__(self, T: int, split_by: str, binarize: bool):
        _check_split_by(split_by)
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive int, got {T!r}")
        self.T, self.split_by, self.binarize = T, split_by, binarize
        self.labels: list[int] = []

    def read_events(self, index: int) -> dict:
        """The events of sample ``index``: dict of numpy arrays ``x, y, p, t``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        frames = events_to_frames(self.read_events(index), self.T, self.size, self.size, self.split_by)
        if self.binarize:
            frames = (frames > 0).astype(np.float32)
        return torch.from_numpy(frames), self.labels[index]


def _missing_list(names, shown: int = 8) -> str:
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


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


class NMNISTFrames(EventFrames):
    """N-MNIST from ``<data_dir>/NMNIST/{Train,Test}/<digit>/*.bin``, as ``[T, 2, 34, 34]`` frames.

    Files are read and integrated when an item is asked for (the dataset is 70k small files).
    """

    size = NMNIST_SIZE
    num_classes = 10

    def __init__(self, data_dir, train: bool, T: int = 10, split_by: str = "number", binarize: bool = False):
        super().__init__(T, split_by, binarize)
        root = Path(data_dir) / "NMNIST" / ("Train" if train else "Test")
        self.files = []
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

    def read_events(self, index: int) -> dict:
        return read_nmnist_events(self.files[index])


# ---------------------------------------------------------------- CIFAR10-DVS (AEDAT 2.0)

DVS128_SIZE = 128
CIFAR10_DVS_FOLDER = "CIFAR10-DVS"
CIFAR10_DVS_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_DVS_TRAIN_FRACTION = 0.9


def _aedat2_events_offset(data: bytes, path: Path) -> int:
    """Where the events start: after the header lines, which all begin with '#'."""
    if data.startswith(b"#!AER-DAT") and not data.startswith(b"#!AER-DAT2."):
        version = data[len(b"#!AER-DAT") : data.find(b"\n")].strip().decode(errors="replace")
        raise ValueError(f"{path}: AEDAT version {version!r}; this reader takes AEDAT 2.0 (8-byte events)")
    offset = 0
    while data.startswith(b"#", offset):
        line_end = data.find(b"\n", offset)
        if line_end < 0:
            raise ValueError(f"{path}: the header line at byte {offset} has no end")
        offset = line_end + 1
    return offset


def read_aedat2_events(path):
    """One jAER AEDAT 2.0 file of a DVS128 (as CIFAR10-DVS ships) -> dict ``x, y, p, t`` (t in microseconds).

    After the '#' header lines, each event is a big-endian 32-bit address and 32-bit timestamp. The
    address holds the polarity in bit 0 and jAER's x in bits 1-7 and y in bits 8-14; the events are
    placed as SpikingJelly places them for CIFAR10-DVS (the frames the paper trained on):
    ``x = 127 - jAER y``, ``y = 127 - jAER x``, ``p = 1 - bit 0``. Events stay in file order.
    """
    path = Path(path)
    data = path.read_bytes()
    offset = _aedat2_events_offset(data, path)
    if (len(data) - offset) % 8 != 0:
        raise ValueError(
            f"{path}: {len(data) - offset} bytes after the header is not a whole number of 8-byte AEDAT 2.0 events"
        )
    words = np.frombuffer(data, dtype=">u4", offset=offset).reshape(-1, 2).astype(np.int64)
    address, timestamp = words[:, 0], words[:, 1]
    jaer_x = (address >> 1) & 0x7F
    jaer_y = (address >> 8) & 0x7F
    return {"x": 127 - jaer_y, "y": 127 - jaer_x, "p": 1 - (address & 1), "t": timestamp}


class CIFAR10DVSFrames(EventFrames):
    """CIFAR10-DVS from ``<data_dir>/CIFAR10-DVS/<class>/*.aedat``, as ``[T, 2, 128, 128]`` frames.

    The recordings come without a train/test split; as for the paper, each class is split 9:1: the
    first 90% of its files in name order (rounded up) train, the rest test (9000 / 1000 recordings).
    Labels follow ``CIFAR10_DVS_CLASSES`` (CIFAR-10's order).
    """

    size = DVS128_SIZE
    num_classes = len(CIFAR10_DVS_CLASSES)

    def __init__(self, data_dir, train: bool, T: int = 20, split_by: str = "number", binarize: bool = False):
        super().__init__(T, split_by, binarize)
        root = Path(data_dir) / CIFAR10_DVS_FOLDER
        self.files = []
        empty = []
        for label, name in enumerate(CIFAR10_DVS_CLASSES):
            files = sorted((root / name).glob("*.aedat"))
            if not files:
                empty.append(name)
            n_train = math.ceil(len(files) * CIFAR10_DVS_TRAIN_FRACTION)
            files = files[:n_train] if train else files[n_train:]
            self.files += files
            self.labels += [label] * len(files)
        if empty:
            raise DatasetNotFoundError(
                "CIFAR10-DVS not found: extract the ten class archives "
                f"({', '.join(f'{n}.zip' for n in CIFAR10_DVS_CLASSES)}) into {root}/ so that each "
                f"{root}/<class>/ holds that class's AEDAT 2.0 .aedat files; "
                f"no .aedat files in: {', '.join(empty)}. Nothing is downloaded."
            )

    def read_events(self, index: int) -> dict:
        return read_aedat2_events(self.files[index])


# ---------------------------------------------------------------- DVS128 Gesture (AEDAT 3.1)

DVS_GESTURE_FOLDER = "DvsGesture"
DVS_GESTURE_CLASSES = 11
DVS_GESTURE_TRIAL_LISTS = {True: "trials_to_train.txt", False: "trials_to_test.txt"}
# type, source, event size, timestamp offset, timestamp overflow, capacity, number, valid (little-endian)
_AEDAT3_PACKET_HEADER = struct.Struct("<hhiiiiii")
_AEDAT3_POLARITY = 1


def _aedat3_polarity_packets(data: bytes, path: Path) -> np.ndarray:
    """``[P, 3]`` int64: (byte offset of the events, event count, timestamp overflow) per polarity packet.

    A packet is its 28-byte header then ``capacity * size`` bytes, of which the first ``number``
    events count. Packets of other event types are skipped.
    """
    if not data.startswith(b"#!AER-DAT3."):
        raise ValueError(f"{path}: not an AEDAT 3.x file (it starts with {data[:16]!r})")
    marker = data.find(b"#!END-HEADER")
    if marker < 0:
        raise ValueError(f"{path}: the header has no '#!END-HEADER' line")
    offset = data.find(b"\n", marker) + 1
    if offset == 0:
        raise ValueError(f"{path}: the '#!END-HEADER' line has no end")
    packets = []
    while offset < len(data):
        if offset + _AEDAT3_PACKET_HEADER.size > len(data):
            raise ValueError(f"{path}: truncated packet header at byte {offset}")
        kind, _, size, ts_offset, overflow, capacity, number, _ = _AEDAT3_PACKET_HEADER.unpack_from(data, offset)
        events_offset = offset + _AEDAT3_PACKET_HEADER.size
        end = events_offset + capacity * size
        if size < 1 or not 0 <= number <= capacity or end > len(data):
            raise ValueError(
                f"{path}: bad packet at byte {offset} (event size {size}, number {number}, "
                f"capacity {capacity}; the file ends at byte {len(data)})"
            )
        if kind == _AEDAT3_POLARITY and number > 0:
            if size != 8 or ts_offset != 4:
                raise ValueError(
                    f"{path}: polarity packet at byte {offset} has {size}-byte events with the "
                    f"timestamp at byte {ts_offset}; AEDAT 3.1 polarity events are 8 bytes, "
                    "timestamp at byte 4"
                )
            packets.append((events_offset, number, overflow))
        offset = end
    return np.array(packets, dtype=np.int64).reshape(-1, 3)


def _aedat3_polarity_words(data: bytes, packets: np.ndarray, base: int = 0):
    """(32-bit event data, full timestamps) of every event in ``packets``; ``data`` starts at file byte ``base``."""
    if len(packets) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    words = (
        np.concatenate(
            [np.frombuffer(data, dtype="<u4", count=2 * n, offset=offset - base) for offset, n, _ in packets.tolist()]
        )
        .reshape(-1, 2)
        .astype(np.int64)
    )
    timestamp = words[:, 1] | (np.repeat(packets[:, 2], packets[:, 1]) << 31)
    return words[:, 0], timestamp


def _decode_aedat3_polarity(event_data: np.ndarray, timestamp: np.ndarray) -> dict:
    """Bit 0: valid (invalid events are dropped), bit 1: polarity, bits 2-16: y, bits 17-31: x."""
    valid = (event_data & 1) == 1
    event_data = event_data[valid]
    return {
        "x": (event_data >> 17) & 0x7FFF,
        "y": (event_data >> 2) & 0x7FFF,
        "p": (event_data >> 1) & 1,
        "t": timestamp[valid],
    }


def read_aedat3_events(path):
    """The valid polarity events of one AEDAT 3.1 file (as DVS128 Gesture ships) -> dict ``x, y, p, t``.

    ``t`` in microseconds, including the packets' timestamp overflow (``overflow << 31 | timestamp``).
    """
    path = Path(path)
    data = path.read_bytes()
    return _decode_aedat3_polarity(*_aedat3_polarity_words(data, _aedat3_polarity_packets(data, path)))


def read_dvs_gesture_labels(path) -> list[tuple[int, int, int]]:
    """A ``*_labels.csv`` -> ``[(label, start_usec, end_usec), ...]``, label = class - 1 (0..10)."""
    path = Path(path)
    lines = [line.strip() for line in path.read_text().splitlines()]
    if not lines or not lines[0].startswith("class"):
        raise ValueError(f"{path}: expected the header 'class,startTime_usec,endTime_usec'")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        try:
            gesture, start, end = (int(field) for field in line.split(","))
        except ValueError:
            raise ValueError(
                f"{path}, line {number}: expected three integers 'class,start,end', got {line!r}"
            ) from None
        if not 1 <= gesture <= DVS_GESTURE_CLASSES or start >= end:
            raise ValueError(
                f"{path}, line {number}: class must be 1..{DVS_GESTURE_CLASSES} and start < end, got {line!r}"
            )
        rows.append((gesture - 1, start, end))
    return rows


class DVS128GestureFrames(EventFrames):
    """DVS128 Gesture from ``<data_dir>/DvsGesture/`` (the extracted archive), as ``[T, 2, 128, 128]`` frames.

    ``trials_to_train.txt`` / ``trials_to_test.txt`` name the trials (``userNN_<lighting>.aedat``,
    AEDAT 3.1); each trial's ``userNN_<lighting>_labels.csv`` gives every gesture's class and time
    span. A sample is one gesture: the trial's events with ``start <= t < end``. Building the
    dataset reads every trial once to index its packets by time; an item then reads only the
    packets that overlap its gesture.
    """

    size = DVS128_SIZE
    num_classes = DVS_GESTURE_CLASSES

    def __init__(self, data_dir, train: bool, T: int = 20, split_by: str = "number", binarize: bool = False):
        super().__init__(T, split_by, binarize)
        root = Path(data_dir) / DVS_GESTURE_FOLDER
        trial_list = root / DVS_GESTURE_TRIAL_LISTS[train]
        if not trial_list.is_file():
            missing = [trial_list.name]
        else:
            trials = [line.strip() for line in trial_list.read_text().splitlines() if line.strip()]
            self.trials = [root / name for name in trials]
            self.label_files = [root / f"{Path(name).stem}_labels.csv" for name in trials]
            missing = [path.name for pair in zip(self.trials, self.label_files) for path in pair if not path.is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"DVS128 Gesture not found: extract DvsGesture.tar.gz so that {root}/ holds "
                f"{DVS_GESTURE_TRIAL_LISTS[True]}, {DVS_GESTURE_TRIAL_LISTS[False]} and, for every trial they name, "
                f"its userNN_<lighting>.aedat and userNN_<lighting>_labels.csv; missing: {_missing_list(missing)}. "
                "Nothing is downloaded."
            )
        # Per trial: (events offset, count, overflow, earliest t, latest t) of each polarity packet.
        self.packet_index = []
        self.gestures = []  # (trial, start, end) per sample
        for trial, (aedat, label_file) in enumerate(zip(self.trials, self.label_files)):
            data = aedat.read_bytes()
            packets = _aedat3_polarity_packets(data, aedat)
            _, timestamp = _aedat3_polarity_words(data, packets)
            # Time bounds from all of a packet's events, not its first and last: no order is assumed.
            bounds = np.zeros((len(packets), 2), np.int64)
            if len(packets):
                starts = np.cumsum(packets[:, 1]) - packets[:, 1]
                bounds[:, 0] = np.minimum.reduceat(timestamp, starts)
                bounds[:, 1] = np.maximum.reduceat(timestamp, starts)
            self.packet_index.append(np.concatenate([packets, bounds], axis=1))
            for label, start, end in read_dvs_gesture_labels(label_file):
                self.gestures.append((trial, start, end))
                self.labels.append(label)

    def read_events(self, index: int) -> dict:
        trial, start, end = self.gestures[index]
        packets = self.packet_index[trial]
        packets = packets[(packets[:, 4] >= start) & (packets[:, 3] < end)]
        if len(packets) == 0:
            return _decode_aedat3_polarity(np.zeros(0, np.int64), np.zeros(0, np.int64))
        first, stop = int(packets[0, 0]), int(packets[-1, 0] + 8 * packets[-1, 1])
        with open(self.trials[trial], "rb") as f:
            f.seek(first)
            data = f.read(stop - first)
        events = _decode_aedat3_polarity(*_aedat3_polarity_words(data, packets[:, :3], base=first))
        inside = (events["t"] >= start) & (events["t"] < end)
        return {key: value[inside] for key, value in events.items()}
