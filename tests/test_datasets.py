"""plif_cuda.datasets on small files in each dataset's real format, written here."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

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
    batch = {b"batch_label": b"test batch", b"labels": list(labels), b"data": images.reshape(len(images), -1),
             b"filenames": [f"{i}.png".encode() for i in range(len(images))]}
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
    events = {"x": np.array([0, 1, 2, 3, 3, 3]), "y": np.array([0, 0, 1, 1, 1, 2]),
              "p": np.array([0, 1, 1, 0, 0, 1]), "t": np.array([0, 1, 2, 3, 49, 99])}
    by_number = datasets.events_to_frames(events, T=3, height=4, width=4, split_by="number")
    assert by_number.shape == (3, 2, 4, 4)
    assert by_number.sum(axis=(1, 2, 3)).tolist() == [2, 2, 2]
    assert by_number[0, 0, 0, 0] == 1 and by_number[0, 1, 0, 1] == 1
    assert by_number[1, 0, 1, 3] == 1 and by_number[2, 0, 1, 3] == 1 and by_number[2, 1, 2, 3] == 1
    by_time = datasets.events_to_frames(events, T=2, height=4, width=4, split_by="time")
    assert by_time.sum(axis=(1, 2, 3)).tolist() == [5, 1]
    assert by_time[0, 0, 1, 3] == 2  # two events at the same pixel and polarity add up
    assert datasets.events_to_frames({k: v[:0] for k, v in events.items()}, 2, 4, 4).sum() == 0


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
