"""plif_cuda.datasets on small files in each dataset's real format, written here, and on the real
Fashion-MNIST of Debian's package dataset-fashion-mnist (scripts/setup_env.sh installs it)."""

import csv
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from helpers import command_line, load_script, train_tiny_network
from plif_cuda import datasets

# ---------------------------------------------------------------- IDX


def write_idx(path, array: np.ndarray, compress: bool):
    type_codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, type_codes[array.dtype], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_mnist_like(folder, compress, rng, n_train=6, n_test=4):
    folder.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    arrays = write_mnist_like(tmp_path / "MNIST", compress, rng)
    (x_train, y_train), (x_test, y_test) = datasets.load_mnist(tmp_path)
    assert x_train.shape == (6, 1, 28, 28) and x_test.shape == (4, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert torch.equal(x_train[:, 0], torch.from_numpy(arrays["train"][0]).float() / 255)
    assert torch.equal(y_train, torch.from_numpy(arrays["train"][1]).long())
    assert torch.equal(x_test[:, 0], torch.from_numpy(arrays["t10k"][0]).float() / 255)
    assert torch.equal(y_test, torch.from_numpy(arrays["t10k"][1]).long())


def test_fashion_mnist_reads_the_torchvision_layout(tmp_path):
    rng = np.random.default_rng(1)
    arrays = write_mnist_like(tmp_path / "FashionMNIST" / "raw", True, rng)
    (_, y_train), (x_test, _) = datasets.load_fashion_mnist(tmp_path)
    assert torch.equal(y_train, torch.from_numpy(arrays["train"][1]).long())
    assert torch.equal(x_test[:, 0], torch.from_numpy(arrays["t10k"][0]).float() / 255)


def test_fashion_mnist_reads_debians_folder_by_default(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    arrays = write_mnist_like(tmp_path / "fashion-mnist", True, rng)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "fashion-mnist")
    (x_train, y_train), (_, y_test) = datasets.load_fashion_mnist()
    assert torch.equal(x_train[:, 0], torch.from_numpy(arrays["train"][0]).float() / 255)
    assert torch.equal(y_train, torch.from_numpy(arrays["train"][1]).long())
    assert torch.equal(y_test, torch.from_numpy(arrays["t10k"][1]).long())


def test_missing_fashion_mnist_names_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "fashion-mnist")
    with pytest.raises(datasets.DatasetNotFoundError) as error:
        datasets.load_fashion_mnist()
    message = str(error.value)
    assert f"in {tmp_path / 'fashion-mnist'}/" in message
    assert "apt-get install dataset-fashion-mnist" in message
    with pytest.raises(datasets.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist(tmp_path)


def test_truncated_gzip_raises_value_error_naming_the_file(tmp_path):
    folder = tmp_path / "FashionMNIST"
    write_mnist_like(folder, True, np.random.default_rng(4))
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: truncated or corrupt gzip"):
        datasets.load_fashion_mnist(tmp_path)
    path.write_bytes(b"\x1f\x8b" + bytes(30))  # the gzip magic number, then no valid header
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: truncated or corrupt gzip"):
        datasets.read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_files_with_a_dot_before_idx_are_found(tmp_path, compress):
    folder = tmp_path / "FashionMNIST"
    arrays = write_mnist_like(folder, compress, np.random.default_rng(5))
    for path in folder.iterdir():
        path.rename(path.with_name(path.name.replace("-idx", ".idx")))
    assert (folder / ("t10k-labels.idx1-ubyte" + (".gz" if compress else ""))).is_file()
    (_, y_train), (x_test, y_test) = datasets.load_fashion_mnist(tmp_path)
    assert torch.equal(y_train, torch.from_numpy(arrays["train"][1]).long())
    assert torch.equal(x_test[:, 0], torch.from_numpy(arrays["t10k"][0]).float() / 255)
    assert torch.equal(y_test, torch.from_numpy(arrays["t10k"][1]).long())


def test_real_fashion_mnist_from_debians_package():
    """The files of ``apt-get install dataset-fashion-mnist`` (scripts/setup_env.sh installs it)."""
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    # Fashion-MNIST is balanced: 6000 train and 1000 test images of each of the ten classes.
    assert torch.bincount(y_train, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(y_test, minlength=10).tolist() == [1000] * 10
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    # The published per-pixel statistics of the training images (mean 0.2860, std 0.3530).
    assert abs(x_train.mean().item() - 0.2860) < 5e-4
    assert abs(x_train.std().item() - 0.3530) < 5e-4


def test_read_idx_multi_byte_big_endian(tmp_path):
    values = np.arange(-3, 9, dtype=">i4").reshape(3, 4)
    write_idx(tmp_path / "ints", values, compress=False)
    got = datasets.read_idx(tmp_path / "ints")
    assert got.dtype == np.int32 and got.dtype.isnative
    assert np.array_equal(got, values)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78" + bytes(10))
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "junk")
    write_idx(tmp_path / "short", np.zeros((2, 3, 3), np.uint8), compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="holds 17 bytes"):
        datasets.read_idx(tmp_path / "short")


def test_missing_mnist_says_where_to_put_which_files(tmp_path):
    (tmp_path / "MNIST").mkdir()
    write_idx(tmp_path / "MNIST" / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8), False)
    with pytest.raises(datasets.DatasetNotFoundError) as error:
        datasets.load_mnist(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "MNIST") in message
    assert "missing: train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte" in message
    assert "downloaded" in message


# ---------------------------------------------------------------- CIFAR-10


def write_cifar_batch(path, images: np.ndarray, labels):
    """The layout of the python CIFAR-10 batches: bytes keys, data rows R plane | G plane | B plane."""
    batch = {
        b"batch_label": b"test batch",
        b"labels": list(labels),
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"{i}.png".encode() for i in range(len(images))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_reads_python_batches(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3).tolist()
        write_cifar_batch(folder / name, images, labels)
        written[name] = (images, labels)
    (x_train, y_train), (x_test, y_test) = datasets.load_cifar10(tmp_path)
    assert x_train.shape == (15, 3, 32, 32) and x_test.shape == (3, 3, 32, 32)
    expected_train = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert torch.equal(x_train, torch.from_numpy(expected_train).float() / 255)
    assert y_train.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert torch.equal(x_test, torch.from_numpy(written["test_batch"][0]).float() / 255)
    assert y_test.tolist() == written["test_batch"][1]
    # The first 1024 values of a row are the red plane.
    assert x_test[0, 0, 0, 5] == written["test_batch"][0].reshape(3, -1)[0, 5] / 255


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must not run",))


def test_cifar10_batch_reader_refuses_pickles_that_run_code(tmp_path):
    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": _RunsCode(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        datasets.read_cifar10_batch(tmp_path / "evil")


def test_missing_cifar10_names_the_folder(tmp_path):
    with pytest.raises(datasets.DatasetNotFoundError, match="cifar-10-batches-py"):
        datasets.load_cifar10(tmp_path)


# ---------------------------------------------------------------- N-MNIST


def encode_nmnist(x, y, p, t) -> bytes:
    """40 bits per event: x (8), y (8), polarity (1) and timestamp (23 bits, microseconds)."""
    out = bytearray()
    for xi, yi, pi, ti in zip(x, y, p, t):
        out += bytes([xi, yi, (pi << 7) | ((ti >> 16) & 0x7F), (ti >> 8) & 0xFF, ti & 0xFF])
    return bytes(out)


def test_nmnist_event_decoding(tmp_path):
    x, y, p = [0, 33, 17, 5], [1, 0, 33, 20], [1, 0, 1, 0]
    t = [0, 65_535, 65_536, 2**23 - 1]  # across the byte boundaries up to the 23-bit maximum
    (tmp_path / "00001.bin").write_bytes(encode_nmnist(x, y, p, t))
    events = datasets.read_nmnist_events(tmp_path / "00001.bin")
    assert events["x"].tolist() == x
    assert events["y"].tolist() == y
    assert events["p"].tolist() == p
    assert events["t"].tolist() == t
    (tmp_path / "broken.bin").write_bytes(encode_nmnist(x, y, p, t)[:-2])
    with pytest.raises(ValueError, match="5-byte"):
        datasets.read_nmnist_events(tmp_path / "broken.bin")


def test_events_to_frames_by_number_and_by_time():
    events = {
        "x": np.array([0, 1, 2, 3, 3, 3]),
        "y": np.array([0, 0, 1, 1, 1, 2]),
        "p": np.array([0, 1, 1, 0, 0, 1]),
        "t": np.array([0, 1, 2, 3, 49, 99]),
    }
    by_number = datasets.events_to_frames(events, T=3, height=4, width=4, split_by="number")
    assert by_number.shape == (3, 2, 4, 4)
    assert by_number.sum(axis=(1, 2, 3)).tolist() == [2, 2, 2]
    assert by_number[0, 0, 0, 0] == 1 and by_number[0, 1, 0, 1] == 1
    assert by_number[1, 0, 1, 3] == 1 and by_number[2, 0, 1, 3] == 1 and by_number[2, 1, 2, 3] == 1
    by_time = datasets.events_to_frames(events, T=2, height=4, width=4, split_by="time")
    assert by_time.sum(axis=(1, 2, 3)).tolist() == [5, 1]
    assert by_time[0, 0, 1, 3] == 2  # two events at the same pixel and polarity add up
    assert datasets.events_to_frames({k: v[:0] for k, v in events.items()}, 2, 4, 4).sum() == 0


def test_split_by_number_gives_the_last_frame_the_remainder():
    # SpikingJelly's split (the paper's): n // T events per frame, the rest in the last frame.
    n = 11
    events = {"x": np.arange(n), "y": np.zeros(n, np.int64), "p": np.zeros(n, np.int64), "t": np.arange(n)}
    frames = datasets.events_to_frames(events, T=3, height=1, width=n)
    assert frames.sum(axis=(1, 2, 3)).tolist() == [3, 3, 5]
    assert frames[2, 0, 0].tolist() == [0] * 6 + [1] * 5
    few = datasets.events_to_frames({k: v[:2] for k, v in events.items()}, T=3, height=1, width=n)
    assert few.sum(axis=(1, 2, 3)).tolist() == [0, 0, 2]


def test_nmnist_dataset_reads_train_and_test_folders(tmp_path):
    rng = np.random.default_rng(3)
    expected = {}
    for split in ("Train", "Test"):
        for digit in (0, 3, 9):
            folder = tmp_path / "NMNIST" / split / str(digit)
            folder.mkdir(parents=True)
            n = 40 + digit
            x, y = rng.integers(0, 34, n), rng.integers(0, 34, n)
            p, t = rng.integers(0, 2, n), np.sort(rng.integers(0, 300_000, n))
            (folder / "00001.bin").write_bytes(encode_nmnist(x, y, p, t))
            expected[split, digit] = (x, y, p, t)
    train = datasets.NMNISTFrames(tmp_path, train=True, T=5)
    test = datasets.NMNISTFrames(tmp_path, train=False, T=5, binarize=True)
    assert len(train) == 3 and len(test) == 3
    labels = [train[i][1] for i in range(3)]
    assert labels == [0, 3, 9]
    frames, label = train[1]
    assert frames.shape == (5, 2, 34, 34) and frames.dtype == torch.float32
    x, y, p, t = expected["Train", 3]
    assert frames.sum() == len(x)
    assert frames[0, p[0], y[0], x[0]] >= 1  # the first event lands in the first frame, at (p, y, x)
    binary, _ = test[2]
    assert set(binary.unique().tolist()) <= {0.0, 1.0}


def test_missing_nmnist_says_where_to_put_the_files(tmp_path):
    with pytest.raises(datasets.DatasetNotFoundError, match="NMNIST.*Train/0"):
        datasets.NMNISTFrames(tmp_path, train=True)


# ---------------------------------------------------------------- digits


def test_digits_split_is_stratified_disjoint_and_seeded():
    (x_train, y_train), (x_test, y_test) = datasets.load_digits(seed=0)
    assert x_train.shape[1:] == (1, 8, 8) and len(x_train) + len(x_test) == 1797
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) == 1.0
    train_counts, test_counts = torch.bincount(y_train, minlength=10), torch.bincount(y_test, minlength=10)
    assert ((test_counts.float() / (train_counts + test_counts) - 0.25).abs() < 0.01).all()
    # Together the two parts are the whole dataset, each image once.
    from sklearn.datasets import load_digits as sklearn_digits

    def sorted_rows(a):
        return a[np.lexsort(a.T[::-1])]

    everything = torch.cat([x_train, x_test]).flatten(1).numpy() * 16
    assert np.array_equal(sorted_rows(everything), sorted_rows(sklearn_digits().data.astype(np.float32)))
    (x_again, _), _ = datasets.load_digits(seed=0)
    (x_other, _), _ = datasets.load_digits(seed=1)
    assert torch.equal(x_again, x_train) and not torch.equal(x_other, x_train)


def expected_frames_by_number(x, y, p, T, size):
    """Frames built one event at a time: n // T events per frame, the rest in the last frame."""
    frames = np.zeros((T, 2, size, size), np.float32)
    per_frame = len(x) // T
    for i, (xi, yi, pi) in enumerate(zip(x, y, p)):
        frames[min(i // per_frame, T - 1), pi, yi, xi] += 1
    return frames


# ---------------------------------------------------------------- CIFAR10-DVS (AEDAT 2.0)

AEDAT2_HEADER = (
    b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n"
    b"# Data format is int32 address, int32 timestamp (8 bytes total), repeated for each event\r\n"
    b"# Timestamps tick is 1 us\r\n"
)


def encode_aedat2(jaer_x, jaer_y, bit0, t, header=AEDAT2_HEADER) -> bytes:
    """jAER DVS128 address: bit 0 polarity, bits 1-7 x, bits 8-14 y; then the timestamp; big-endian."""
    body = b"".join(
        struct.pack(">II", (yi << 8) | (xi << 1) | bi, ti) for xi, yi, bi, ti in zip(jaer_x, jaer_y, bit0, t)
    )
    return header + body


def test_aedat2_event_decoding(tmp_path):
    jaer_x, jaer_y, bit0 = [0, 127, 5, 64], [0, 3, 127, 64], [0, 1, 1, 0]
    t = [0, 255, 65_536, 2**32 - 1]
    (tmp_path / "a.aedat").write_bytes(encode_aedat2(jaer_x, jaer_y, bit0, t))
    events = datasets.read_aedat2_events(tmp_path / "a.aedat")
    # Placed as SpikingJelly places CIFAR10-DVS events (the frames the paper trained on).
    assert events["x"].tolist() == [127, 124, 0, 63]
    assert events["y"].tolist() == [127, 0, 122, 63]
    assert events["p"].tolist() == [1, 0, 0, 1]
    assert events["t"].tolist() == t
    (tmp_path / "noheader.aedat").write_bytes(encode_aedat2(jaer_x, jaer_y, bit0, t, header=b""))
    assert datasets.read_aedat2_events(tmp_path / "noheader.aedat")["x"].tolist() == [127, 124, 0, 63]


def test_aedat2_reader_rejects_other_versions_and_partial_events(tmp_path):
    (tmp_path / "v1.aedat").write_bytes(b"#!AER-DAT1.0\r\n" + bytes(12))
    with pytest.raises(ValueError, match="AEDAT version '1.0'"):
        datasets.read_aedat2_events(tmp_path / "v1.aedat")
    (tmp_path / "cut.aedat").write_bytes(encode_aedat2([1, 2], [3, 4], [0, 1], [5, 6])[:-3])
    with pytest.raises(ValueError, match="13 bytes after the header.*8-byte"):
        datasets.read_aedat2_events(tmp_path / "cut.aedat")


def write_cifar10_dvs(root, rng, files_per_class, n_events=45):
    """``files_per_class[c]`` recordings of random events per class; returns {path: (jaer_x, jaer_y, bit0, t)}."""
    written = {}
    for label, name in enumerate(datasets.CIFAR10_DVS_CLASSES):
        folder = root / "CIFAR10-DVS" / name
        folder.mkdir(parents=True)
        for i in range(files_per_class[label]):
            events = (
                rng.integers(0, 128, n_events),
                rng.integers(0, 128, n_events),
                rng.integers(0, 2, n_events),
                np.sort(rng.integers(0, 2**32, n_events)),
            )
            path = folder / f"cifar10_{name}_{i}.aedat"
            path.write_bytes(encode_aedat2(*(e.tolist() for e in events)))
            written[path] = events
    return written


def test_cifar10_dvs_splits_each_class_9_to_1_in_name_order(tmp_path):
    files_per_class = [11] + [1] * 8 + [20]
    written = write_cifar10_dvs(tmp_path, np.random.default_rng(4), files_per_class)
    train = datasets.CIFAR10DVSFrames(tmp_path, train=True)
    test = datasets.CIFAR10DVSFrames(tmp_path, train=False)
    # ceil(0.9 n) train per class: 11 -> 10 + 1, 1 -> 1 + 0, 20 -> 18 + 2.
    assert train.labels == [0] * 10 + list(range(1, 9)) + [9] * 18
    assert test.labels == [0, 9, 9]
    # Name order: cifar10_airplane_10 sorts before _2, so _9 is the last airplane file.
    assert [f.name for f in test.files] == [
        "cifar10_airplane_9.aedat",
        "cifar10_truck_8.aedat",
        "cifar10_truck_9.aedat",
    ]
    assert not set(train.files) & set(test.files) and len(train) + len(test) == len(written)
    frames, label = test[0]
    assert label == 0 and frames.shape == (20, 2, 128, 128) and frames.dtype == torch.float32
    jaer_x, jaer_y, bit0, _ = written[test.files[0]]
    expected = expected_frames_by_number(127 - jaer_y, 127 - jaer_x, 1 - bit0, T=20, size=128)
    assert np.array_equal(frames.numpy(), expected)
    assert frames.sum(axis=(1, 2, 3)).tolist() == [2] * 19 + [7]  # 45 events: 2 per frame, the last 2 + 5


@pytest.mark.parametrize("dataset", [datasets.NMNISTFrames, datasets.CIFAR10DVSFrames, datasets.DVS128GestureFrames])
def test_event_datasets_name_bad_arguments(tmp_path, dataset):
    with pytest.raises(ValueError, match="split_by must be one of"):
        dataset(tmp_path, train=True, split_by="events")
    with pytest.raises(ValueError, match="T must be a positive int"):
        dataset(tmp_path, train=True, T=0)


def test_missing_cifar10_dvs_names_the_empty_class_folders(tmp_path):
    write_cifar10_dvs(tmp_path, np.random.default_rng(5), [1] * 10)
    for name in ("bird", "truck"):
        for path in (tmp_path / "CIFAR10-DVS" / name).iterdir():
            path.unlink()
    with pytest.raises(datasets.DatasetNotFoundError) as error:
        datasets.CIFAR10DVSFrames(tmp_path, train=True)
    message = str(error.value)
    assert str(tmp_path / "CIFAR10-DVS") in message and "airplane.zip" in message
    assert "no .aedat files in: bird, truck." in message and "downloaded" in message


# ---------------------------------------------------------------- DVS128 Gesture (AEDAT 3.1)

AEDAT3_HEADER = (
    b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n"
    b"#Start-Time: 2017-01-01 12:00:00 (TZ+0000)\r\n#!END-HEADER\r\n"
)


def aedat3_packet(event_type, events: bytes, number, overflow=0, capacity=None, event_size=8, ts_offset=4):
    """28-byte little-endian header (type, source, size, ts offset, ts overflow, capacity, number, valid), events."""
    capacity = number if capacity is None else capacity
    header = struct.pack("<hhiiiiii", event_type, 1, event_size, ts_offset, overflow, capacity, number, number)
    return header + events


def polarity_events(x, y, p, t, valid=None) -> bytes:
    """8 bytes each: data (bit 0 valid, bit 1 polarity, bits 2-16 y, bits 17-31 x), int32 timestamp."""
    valid = [1] * len(x) if valid is None else valid
    return b"".join(
        struct.pack("<Ii", (xi << 17) | (yi << 2) | (pi << 1) | vi, ti) for xi, yi, pi, ti, vi in zip(x, y, p, t, valid)
    )


def test_aedat3_polarity_event_decoding(tmp_path):
    body = aedat3_packet(1, polarity_events([0, 127, 3], [5, 0, 127], [1, 0, 1], [10, 20, 30]), 3)
    body += aedat3_packet(0, polarity_events([9, 9], [9, 9], [1, 1], [40, 50]), 2)  # special events: skipped
    # Capacity 3, number 2: the third slot is not an event; the second event is marked invalid.
    body += aedat3_packet(
        1, polarity_events([1, 2, 4], [1, 2, 4], [0, 1, 0], [60, 70, 80], valid=[1, 0, 1]), 2, capacity=3
    )
    body += aedat3_packet(1, polarity_events([100], [101], [0], [7]), 1, overflow=3)
    (tmp_path / "trial.aedat").write_bytes(AEDAT3_HEADER + body)
    events = datasets.read_aedat3_events(tmp_path / "trial.aedat")
    assert events["x"].tolist() == [0, 127, 3, 1, 100]
    assert events["y"].tolist() == [5, 0, 127, 1, 101]
    assert events["p"].tolist() == [1, 0, 1, 0, 0]
    assert events["t"].tolist() == [10, 20, 30, 60, 3 * 2**31 + 7]


def test_aedat3_reader_rejects_bad_files(tmp_path):
    packet = aedat3_packet(1, polarity_events([1, 2], [1, 2], [0, 1], [5, 6]), 2)
    cases = {
        "v2.aedat": (AEDAT2_HEADER + packet, "not an AEDAT 3.x file"),
        "noend.aedat": (b"#!AER-DAT3.1\r\n" + packet, "END-HEADER"),
        "cut.aedat": (AEDAT3_HEADER + packet[:-1], "bad packet at byte"),
        "halfheader.aedat": (AEDAT3_HEADER + packet + packet[:10], "truncated packet header"),
        "wide.aedat": (AEDAT3_HEADER + aedat3_packet(1, bytes(32), 2, event_size=16), "16-byte events"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            datasets.read_aedat3_events(tmp_path / name)


def write_gesture_trial(root, name, rng, gestures, packet_events=7):
    """One trial: events every 10 us over the gestures' span, in packets; its labels csv.

    ``gestures``: (class 1..11, start, end). Timestamps from 2**31 on are written as the packet's
    overflow 1 and t - 2**31 (a new packet starts there). Returns the events written (x, y, p, t, valid).
    """
    first, last = min(g[1] for g in gestures) - 30, max(g[2] for g in gestures) + 30
    t = np.arange(first, last, 10)
    n = len(t)
    x, y, p = rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n)
    valid = (rng.random(n) > 0.1).astype(np.int64)
    body = b""
    bounds = sorted(set(range(0, n, packet_events)) | {int(np.searchsorted(t, 2**31)), n})
    for begin, end in zip(bounds[:-1], bounds[1:]):
        if begin == end:
            continue
        chunk = slice(begin, end)
        overflow, stamps = int(t[begin]) >> 31, t[chunk] & (2**31 - 1)
        body += aedat3_packet(
            1, polarity_events(x[chunk], y[chunk], p[chunk], stamps, valid[chunk]), len(stamps), overflow=overflow
        )
        body += aedat3_packet(0, polarity_events([0], [0], [0], [int(stamps[0])]), 1, overflow=overflow)
    (root / f"{name}.aedat").write_bytes(AEDAT3_HEADER + body)
    rows = "".join(f"{c},{s},{e}\n" for c, s, e in gestures)
    (root / f"{name}_labels.csv").write_text("class,startTime_usec,endTime_usec\n" + rows)
    return x, y, p, t, valid


def write_dvs_gesture(tmp_path, rng):
    root = tmp_path / "DvsGesture"
    root.mkdir(parents=True)
    trials = {
        "user01_fluorescent": dict(gestures=[(1, 1000, 1400), (11, 1400, 1810), (5, 2000, 2305)]),
        "user02_led": dict(gestures=[(3, 2**31 - 300, 2**31 + 250)]),
        "user24_natural": dict(gestures=[(8, 500, 900), (8, 880, 1500)]),  # overlapping spans, as in the data
    }
    written = {name: write_gesture_trial(root, name, rng, **options) for name, options in trials.items()}
    (root / "trials_to_train.txt").write_text("user01_fluorescent.aedat\nuser02_led.aedat\n\n")
    (root / "trials_to_test.txt").write_text("user24_natural.aedat\n")
    return trials, written


def test_dvs_gesture_cuts_trials_into_labelled_gestures(tmp_path):
    trials, written = write_dvs_gesture(tmp_path, np.random.default_rng(6))
    train = datasets.DVS128GestureFrames(tmp_path, train=True, T=4)
    test = datasets.DVS128GestureFrames(tmp_path, train=False, T=4)
    assert train.labels == [0, 10, 4, 2] and test.labels == [7, 7]
    samples = [
        (train, 0, "user01_fluorescent", 0),
        (train, 1, "user01_fluorescent", 1),
        (train, 2, "user01_fluorescent", 2),
        (train, 3, "user02_led", 0),
        (test, 0, "user24_natural", 0),
        (test, 1, "user24_natural", 1),
    ]
    for dataset, index, trial, gesture in samples:
        x, y, p, t, valid = written[trial]
        _, start, end = trials[trial]["gestures"][gesture]
        keep = (t >= start) & (t < end) & (valid == 1)  # the start is in the gesture, the end is not
        events = dataset.read_events(index)
        assert events["t"].tolist() == t[keep].tolist(), (trial, gesture)
        assert events["x"].tolist() == x[keep].tolist() and events["y"].tolist() == y[keep].tolist()
        assert events["p"].tolist() == p[keep].tolist()
        frames, label = dataset[index]
        assert frames.shape == (4, 2, 128, 128) and label == dataset.labels[index]
        assert np.array_equal(frames.numpy(), expected_frames_by_number(x[keep], y[keep], p[keep], T=4, size=128))
    # The gesture across the timestamp overflow: 2**31 - 300 <= t < 2**31 + 250, every 10 us.
    assert train.read_events(3)["t"].max() == 2**31 + 240


def test_dvs_gesture_labels_file_errors_name_the_line(tmp_path):
    (tmp_path / "a_labels.csv").write_text("class,startTime_usec,endTime_usec\n1,10,20\n12,30,40\n")
    with pytest.raises(ValueError, match="line 3: class must be 1..11"):
        datasets.read_dvs_gesture_labels(tmp_path / "a_labels.csv")
    (tmp_path / "b_labels.csv").write_text("class,startTime_usec,endTime_usec\n1,10\n")
    with pytest.raises(ValueError, match="line 2: expected three integers"):
        datasets.read_dvs_gesture_labels(tmp_path / "b_labels.csv")
    (tmp_path / "c_labels.csv").write_text("class,startTime_usec,endTime_usec\n11,10,20\n\n1,5,30\n")
    assert datasets.read_dvs_gesture_labels(tmp_path / "c_labels.csv") == [(10, 10, 20), (0, 5, 30)]


def test_missing_dvs_gesture_names_the_expected_files(tmp_path):
    with pytest.raises(datasets.DatasetNotFoundError) as error:
        datasets.DVS128GestureFrames(tmp_path, train=True)
    message = str(error.value)
    assert str(tmp_path / "DvsGesture") in message and "DvsGesture.tar.gz" in message
    assert "missing: trials_to_train.txt." in message and "downloaded" in message
    write_dvs_gesture(tmp_path, np.random.default_rng(7))
    (tmp_path / "DvsGesture" / "user02_led.aedat").unlink()
    (tmp_path / "DvsGesture" / "user01_fluorescent_labels.csv").unlink()
    with pytest.raises(
        datasets.DatasetNotFoundError, match="missing: user01_fluorescent_labels.csv, user02_led.aedat."
    ):
        datasets.DVS128GestureFrames(tmp_path, train=True)
    assert len(datasets.DVS128GestureFrames(tmp_path, train=False)) == 2


# ---------------------------------------------------------------- examples/train.py on these files


def test_train_script_lists_every_dataset_and_takes_the_papers_networks(capsys):
    train = load_script("examples/train.py")
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    usage = capsys.readouterr().out
    for name in ("digits", "mnist", "fashion-mnist", "cifar10", "nmnist", "cifar10-dvs", "dvs128-gesture"):
        assert name in usage
    # The paper's networks for neuromorphic data: 128x128 frames, T=20, FC512; 4 / 5 conv stages.
    for dataset, depth in (("cifar10-dvs", 4), ("dvs128-gesture", 5)):
        args = train.parse_args(["--dataset", dataset])
        assert (args.T, args.depth, args.width, args.convs_per_stage, args.fc_width) == (20, depth, 128, 1, 512)


def test_train_script_learns_real_fashion_mnist_from_its_default_folder(tmp_path):
    """A smoke test on the real data (Debian's package, read from its folder without --data-dir):
    a small network on a random 2000-image subset, seconds on 2 CPU cores."""
    out_dir = tmp_path / "run"
    sizes = dict(train_subset=2000, test_subset=1000, epochs=2, T=4, width=8, fc_width=64, batch_size=32)
    row = train_tiny_network("fashion-mnist", out_dir, **sizes, lr="5e-3", no_plot=True)
    assert float(row["test_acc"]) > 0.65, row  # chance is 0.1
    with open(out_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    elapsed = [float(r["elapsed_seconds"]) for r in rows]
    assert len(rows) == 2 and 0 < elapsed[0] < elapsed[1]
    # The wall time between two rows holds the second epoch (elapsed_seconds is rounded to 0.1 s).
    assert elapsed[1] - elapsed[0] >= float(rows[1]["epoch_seconds"]) - 0.1


def test_tau_sensitivity_compares_plif_and_lif_on_real_fashion_mnist(tmp_path, capsys):
    tau_sensitivity = load_script("examples/tau_sensitivity.py")
    assert tau_sensitivity.parse_args(["--dataset", "fashion-mnist"]).out.name == "tau_sensitivity-fashion-mnist"
    tau_sensitivity.main(
        command_line(
            dataset="fashion-mnist", taus=2, seeds=0, epochs=1, T=2, train_subset=200, test_subset=100, out=tmp_path
        )
    )
    assert "fashion-mnist: 200 train / 100 test samples" in capsys.readouterr().out
    with open(tmp_path / "tau_sensitivity.csv", newline="") as f:
        rows = {row["neuron"]: row for row in csv.DictReader(f)}
    taus = {neuron: [float(v) for k, v in row.items() if k.startswith("tau:")] for neuron, row in rows.items()}
    assert taus["lif"] == [2.0] * 4  # fixed
    assert all(tau != 2.0 for tau in taus["plif"])  # learned
    assert (tmp_path / "tau_sensitivity.png").stat().st_size > 0


def test_train_script_names_the_apt_package_when_fashion_mnist_is_missing(tmp_path, monkeypatch):
    train = load_script("examples/train.py")
    assert train.parse_args(["--dataset", "fashion-mnist"]).data_dir is None  # the package's folder
    assert train.parse_args(["--dataset", "mnist"]).data_dir == train.DEFAULT_DATA_DIR
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(datasets.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        train.main(["--dataset", "fashion-mnist", "--out-dir", str(tmp_path / "run"), "--no-progress"])


def test_train_script_subsets_are_checked(tmp_path):
    train = load_script("examples/train.py")
    with pytest.raises(SystemExit):
        train.parse_args(["--train-subset", "0"])
    with pytest.raises(ValueError, match="--test-subset 5000 is larger than the 450 samples"):
        train.main(
            command_line(dataset="digits", test_subset=5000, epochs=1, out_dir=tmp_path, no_progress=True, no_plot=True)
        )


@pytest.mark.parametrize("dataset", ["cifar10-dvs", "dvs128-gesture"])
def test_train_script_runs_on_event_files(tmp_path, dataset):
    rng = np.random.default_rng(8)
    if dataset == "cifar10-dvs":
        write_cifar10_dvs(tmp_path / "data", rng, [10] * 10, n_events=30)
        n_classes = 10
    else:
        write_dvs_gesture(tmp_path / "data", rng)
        n_classes = 11
    out_dir = tmp_path / "run"
    row = train_tiny_network(dataset, out_dir, data_dir=tmp_path / "data", batch_size=4, no_plot=True)
    assert row["epoch"] == 1
    state = torch.load(out_dir / "checkpoint.pt", weights_only=False)
    assert state["model"]["head.5.module.weight"].shape == (n_classes * 10, 8)  # voting: 10 neurons per class
