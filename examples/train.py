"""Train and evaluate the PLIF paper's networks (plif_cuda.models) with the fused PLIF layer.

    python examples/train.py --dataset digits --neuron plif             # no files needed; seconds on a CPU
    python examples/train.py --dataset mnist --data-dir ~/data           # <data-dir>/MNIST/*-ubyte[.gz]
    python examples/train.py --dataset fashion-mnist                     # the main example, from Debian's package:
                                                                         # apt-get install dataset-fashion-mnist
    python examples/train.py --dataset fashion-mnist --data-dir ~/data   # <data-dir>/FashionMNIST/*-ubyte[.gz]
    python examples/train.py --dataset cifar10 --data-dir ~/data         # <data-dir>/cifar-10-batches-py/
    python examples/train.py --dataset nmnist --data-dir ~/data          # <data-dir>/NMNIST/{Train,Test}/<digit>/*.bin
    python examples/train.py --dataset cifar10-dvs --data-dir ~/data     # <data-dir>/CIFAR10-DVS/<class>/*.aedat
    python examples/train.py --dataset dvs128-gesture --data-dir ~/data  # <data-dir>/DvsGesture/ (DvsGesture.tar.gz)
    torchrun --nproc_per_node 2 examples/train.py --dataset digits       # DistributedDataParallel (gloo / nccl)

Each run writes to --out-dir: metrics.csv (one row per epoch, with the learned tau of every
neuron layer and the wall time since the run started), checkpoint.pt (every epoch; --resume
continues from it) and curves.png.
The loss is the paper's: mean squared error between the output firing rates and the one-hot label.
Fashion-MNIST, the main example, runs the paper's network at a width that fits two CPU cores
(T=4, 32 conv channels, FC256, no dropout; the paper: T=8, 128, FC2048, dropout 0.5); its results
are in examples/results/fashion-mnist/.
Unset architecture/training options take the dataset's preset (PRESETS below).
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plif_cuda import datasets  # noqa: E402
from plif_cuda.models import EventFrameSNN, StaticImageSNN, learned_taus, reset_states  # noqa: E402

# The paper's networks, one row per dataset (None: the option's default), but digits and fashion-mnist
# sized for two shared CPU cores: see NOTES, "Examples: the digits and Fashion-MNIST presets".
PRESET_KEYS = (
    "T", "depth", "width", "convs_per_stage", "fc_width", "dropout", "epochs", "batch_size", "test_batch_size", "lr",
    "threads",
)  # fmt: skip
PRESET_ROWS = {
    "digits":         (4,  2, 32,  1, 128,  0.0, 12,  32, None, 1e-3, 1),
    "mnist":          (8,  2, 128, 1, 2048, 0.5, 100, 16, None, 1e-3, None),
    "fashion-mnist":  (4,  2, 32,  1, 256,  0.0, 5,   64, None, 1e-3, 1),
    "cifar10":        (8,  2, 256, 3, 2048, 0.5, 200, 16, None, 1e-3, None),
    "nmnist":         (10, 2, 128, 1, 2048, 0.5, 100, 16, None, 1e-3, None),
    "cifar10-dvs":    (20, 4, 128, 1, 512,  0.5, 200, 16, 32,   1e-3, None),
    "dvs128-gesture": (20, 5, 128, 1, 512,  0.5, 200, 16, 32,   1e-3, None),
}  # fmt: skip
PRESETS = {
    dataset: {key: value for key, value in zip(PRESET_KEYS, row) if value is not None}
    for dataset, row in PRESET_ROWS.items()
}
EVENT_DATASETS = {
    "nmnist": datasets.NMNISTFrames,
    "cifar10-dvs": datasets.CIFAR10DVSFrames,
    "dvs128-gesture": datasets.DVS128GestureFrames,
}
# The network's sizes; they and the run's counts are whole numbers >= 1 (parse_args checks).
SIZE_KEYS = ("T", "depth", "width", "convs_per_stage", "fc_width", "voting")
COUNT_KEYS = SIZE_KEYS + ("epochs", "batch_size", "test_batch_size", "train_subset", "test_subset")
# What a checkpoint's network is built from (--resume refuses other values).
MODEL_KEYS = SIZE_KEYS + ("neuron", "pooling", "tau_granularity", "init_tau", "surrogate", "detach_reset", "dropout")
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=datasets.DATASETS, default="digits")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder holding the dataset files (default: examples/data; for fashion-mnist "
        f"{datasets.FASHION_MNIST_DEBIAN_DIR}, where apt-get install "
        f"{datasets.FASHION_MNIST_APT_PACKAGE} puts them)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="metrics, checkpoint and plot go here (default: examples/runs/<dataset>-<neuron>)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint.pt")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many epochs (of --epochs, whose schedule stays); --resume continues",
    )
    parser.add_argument("--neuron", choices=("plif", "lif"), default="plif")
    parser.add_argument("--init-tau", type=float, default=2.0)
    parser.add_argument("--tau-granularity", choices=("layer", "channel"), default="layer")
    parser.add_argument("--pooling", choices=("max", "avg"), default="max")
    parser.add_argument("--surrogate", default="atan")
    parser.add_argument("--detach-reset", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--backend", default="auto", help="neuron backend: auto, cpu, cuda, cupy or torch")
    parser.add_argument("--T", type=int, default=None, help="time steps")
    parser.add_argument("--depth", type=int, default=None, help="conv stages (each pools by 2)")
    parser.add_argument("--width", type=int, default=None, help="conv channels")
    parser.add_argument("--convs-per-stage", type=int, default=None)
    parser.add_argument("--fc-width", type=int, default=None)
    parser.add_argument("--voting", type=int, default=10, help="output neurons per class")
    parser.add_argument("--dropout", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="per process, under DDP")
    parser.add_argument(
        "--test-batch-size",
        type=int,
        default=None,
        help="per process (default: the preset's, else max(batch size, 256))",
    )
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (cosine decay to 0)")
    parser.add_argument("--seed", type=int, default=0)
    for split, samples in (("train", "the training set"), ("test", "the test set")):
        explained = f"{split} on this many samples, drawn at random (by --seed) from {samples}"
        parser.add_argument(f"--{split}-subset", type=int, default=None, help=explained)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--split-by",
        choices=datasets.SPLIT_BY,
        default="number",
        help="event datasets: the same number of events, or the same time span, per frame",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.test_batch_size is None:
        args.test_batch_size = max(args.batch_size, 256)
    if args.out_dir is None:
        args.out_dir = Path(__file__).resolve().parent / "runs" / f"{args.dataset}-{args.neuron}"
    if args.data_dir is None and args.dataset != "fashion-mnist":
        args.data_dir = DEFAULT_DATA_DIR
    for key in COUNT_KEYS:
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    return args


# ---------------------------------------------------------------- data


def load_data(args):
    """(train dataset, test dataset, model class, input channels, image side, classes)."""
    if args.dataset == "digits":
        train, test = datasets.load_digits(seed=0)
        return TensorDataset(*train), TensorDataset(*test), StaticImageSNN, 1, 8, 10
    if args.dataset in ("mnist", "fashion-mnist"):
        loader = datasets.load_mnist if args.dataset == "mnist" else datasets.load_fashion_mnist
        train, test = loader(args.data_dir)
        return TensorDataset(*train), TensorDataset(*test), StaticImageSNN, 1, 28, 10
    if args.dataset == "cifar10":
        train, test = datasets.load_cifar10(args.data_dir)
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        train = ((train[0] - mean) / std, train[1])
        test = ((test[0] - mean) / std, test[1])
        return TensorDataset(*train), TensorDataset(*test), StaticImageSNN, 3, 32, 10
    event_dataset = EVENT_DATASETS[args.dataset]
    train = event_dataset(args.data_dir, train=True, T=args.T, split_by=args.split_by)
    test = event_dataset(args.data_dir, train=False, T=args.T, split_by=args.split_by)
    return train, test, EventFrameSNN, 2, event_dataset.size, event_dataset.num_classes


def random_subset(dataset, size, seed: int, name: str):
    """``size`` samples of ``dataset`` drawn without replacement (all of it when ``size`` is None)."""
    if size is None:
        return dataset
    if size > len(dataset):
        raise ValueError(f"--{name} {size} is larger than the {len(dataset)} samples there are")
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return Subset(dataset, indices.tolist())


def augment_cifar(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random 32x32 crop of the 4-pixel zero-padded image."""
    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
    padded = F.pad(images, (4, 4, 4, 4))
    offsets = torch.randint(0, 9, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + 32, dx : dx + 32] for i, (dy, dx) in enumerate(offsets.tolist())])


def to_model_input(images: torch.Tensor, event_frames: bool) -> torch.Tensor:
    # Event frames come from the DataLoader as [N, T, 2, H, W]; the model is time-first.
    return images.transpose(0, 1).contiguous() if event_frames else images


# ---------------------------------------------------------------- training


def progress(iterable, total, description, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(iterable, total, description)
    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)


def _plain_progress(iterable, total, description):
    step = max(1, total // 10)
    for i, item in enumerate(iterable, 1):
        yield item
        if i % step == 0 or i == total:
            print(f"  {description}: {i}/{total}", flush=True)


def lr_at(epoch: int, args) -> float:
    """Cosine decay from args.lr to 0 over args.epochs (a function of the epoch, so resuming needs no state)."""
    return 0.5 * args.lr * (1.0 + math.cos(math.pi * epoch / args.epochs))


def run_epoch(model, loader, optimizer, device, num_classes, event_frames, show_progress, description, augment=None):
    """One pass over ``loader``; trains when ``optimizer`` is given. Returns (summed loss, correct, count)."""
    training = optimizer is not None
    model.train(training)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    with torch.set_grad_enabled(training):
        for images, labels in progress(loader, len(loader), description, show_progress):
            if augment is not None:
                images = augment(images)
            images = to_model_input(images, event_frames).to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            rates = model(images)
            loss = F.mse_loss(rates, F.one_hot(labels, num_classes).to(rates.dtype))
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            # The neurons keep their membrane (and its graph) until reset: every batch starts at rest.
            reset_states(model)
            total_loss += loss.detach().double() * len(labels)
            correct += (rates.argmax(1) == labels).sum()
            count += len(labels)
    return total_loss, correct, count


def all_reduce_sum(*tensors):
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)
    return tensors


# ---------------------------------------------------------------- outputs


def write_metrics(path: Path, rows: list[dict]) -> None:
    fields = list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(rows: list[dict], path: Path, title: str) -> bool:
    """curves.png: loss, accuracy and the learned tau per layer vs epoch. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("train_loss", "test_loss"):
        axes[0].plot(epochs, [float(r[key]) for r in rows], label=key)
    for key in ("train_acc", "test_acc"):
        axes[1].plot(epochs, [float(r[key]) for r in rows], label=key)
    for key in (k for k in rows[0] if k.startswith("tau:")):
        axes[2].plot(epochs, [float(r[key]) for r in rows], label=key[4:])
    for ax, ylabel in zip(axes, ("MSE loss", "accuracy", "learned tau (layer mean)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def model_config(args) -> dict:
    return {key: getattr(args, key) for key in MODEL_KEYS}


def load_checkpoint(path: Path, args, model, optimizer):
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (use the --out-dir of the run to continue)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state["model_config"]
    differing = {k: (saved.get(k), v) for k, v in model_config(args).items() if saved.get(k) != v}
    if differing or state["dataset"] != args.dataset:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differing.items())
        raise ValueError(
            f"--resume: {path} was trained with other settings ({details or 'dataset ' + state['dataset']})"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_state"])
    return state["epoch"], state["best_test_acc"]


# ---------------------------------------------------------------- main


def init_process_group(backend: str, **kwargs) -> None:
    """dist.init_process_group, arranged so that destroy_process_group (below) can free the group.

    DistributedDataParallel imports torch.distributed.nn.functional, whose functions take
    ``group=group.WORLD`` as a default argument. Imported after the group exists, those defaults
    keep it, and gloo's worker threads, alive past destroy_process_group into the interpreter's
    shutdown, where a worker that releases a finished collective's tensors needs the GIL: Python
    ends such a thread with pthread_exit, its unwinding through a C++ destructor calls
    std::terminate, and the process aborts ("terminate called without an active exception",
    SIGABRT) whenever the worker is slower than the main thread's exit. Imported first, the
    defaults are None.
    """
    import torch.distributed.nn.functional  # noqa: F401

    dist.init_process_group(backend, **kwargs)


def destroy_process_group() -> None:
    """Free the process group now, joining gloo's worker threads while Python still runs. The DDP
    wrapper holds the group too: drop it before calling this."""
    gc.collect()  # DDP's reference cycles
    dist.destroy_process_group()


def setup_distributed(device_arg):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; returns (rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg is None:
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def main(argv=None) -> dict:
    """Train; returns the last metrics row (test_acc, best_test_acc, ...)."""
    run_start = time.time()
    args = parse_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    is_main = rank == 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_set, test_set, model_class, in_channels, image_size, num_classes = load_data(args)
    train_set = random_subset(train_set, args.train_subset, args.seed, "train-subset")
    test_set = random_subset(test_set, args.test_subset, args.seed + 1, "test-subset")
    event_frames = model_class is EventFrameSNN
    train_sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed) if world_size > 1 else None
    # DistributedSampler pads the test set to a multiple of the world size: up to world_size - 1
    # samples count twice in the DDP test accuracy.
    test_sampler = DistributedSampler(test_set, shuffle=False) if world_size > 1 else None
    shuffle_generator = torch.Generator()
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        num_workers=args.workers,
        generator=shuffle_generator,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    test_loader = DataLoader(
        test_set,
        batch_size=args.test_batch_size,
        sampler=test_sampler,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )

    model = model_class(
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        backend=args.backend,
        **model_config(args),
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = args.out_dir / "checkpoint.pt"
    metrics_path = args.out_dir / "metrics.csv"
    start_epoch, best_test_acc = 0, 0.0
    rows = []
    if args.resume:
        start_epoch, best_test_acc = load_checkpoint(checkpoint_path, args, model, optimizer)
        rows = read_metrics(metrics_path)[:start_epoch]
        if is_main:
            print(f"resuming {checkpoint_path} after epoch {start_epoch}")
    elif is_main and metrics_path.exists():
        metrics_path.unlink()
    network = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    augment = None
    if args.dataset == "cifar10":
        augment_generator = torch.Generator().manual_seed(args.seed + rank)
        augment = lambda images: augment_cifar(images, augment_generator)  # noqa: E731

    if is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{args.dataset}: {len(train_set)} train / {len(test_set)} test samples; "
            f"{model_class.__name__} ({n_params} parameters, neuron={args.neuron}, T={args.T}) on {device}"
            f"{f' x {world_size} processes' if world_size > 1 else ''}; writing to {args.out_dir}"
        )
    show_progress = is_main and not args.no_progress
    start_time = time.time()
    row = rows[-1] if rows else {}
    # Wall time from the start of main (data loading included), carried on by --resume.
    elapsed_before = float(row.get("elapsed_seconds", 0.0))
    stop_epoch = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    for epoch in range(start_epoch, stop_epoch):
        lr = lr_at(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The shuffle order depends only on (seed, epoch), so a resumed run sees the same batches.
        shuffle_generator.manual_seed(args.seed * 100003 + epoch)
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        epoch_start = time.time()
        train_stats = run_epoch(
            network,
            train_loader,
            optimizer,
            device,
            num_classes,
            event_frames,
            show_progress,
            f"epoch {epoch + 1} train",
            augment,
        )
        test_stats = run_epoch(
            network, test_loader, None, device, num_classes, event_frames, show_progress, f"epoch {epoch + 1} test"
        )
        train_loss, train_correct, train_count = all_reduce_sum(*train_stats)
        test_loss, test_correct, test_count = all_reduce_sum(*test_stats)
        test_acc = test_correct.item() / test_count.item()
        best_test_acc = max(best_test_acc, test_acc)
        row = {
            "epoch": epoch + 1,
            "lr": f"{lr:.6g}",
            "train_loss": f"{train_loss.item() / train_count.item():.6f}",
            "train_acc": f"{train_correct.item() / train_count.item():.6f}",
            "test_loss": f"{test_loss.item() / test_count.item():.6f}",
            "test_acc": f"{test_acc:.6f}",
            "best_test_acc": f"{best_test_acc:.6f}",
            "epoch_seconds": f"{time.time() - epoch_start:.2f}",
            "elapsed_seconds": f"{elapsed_before + time.time() - run_start:.1f}",
            **{f"tau:{name}": f"{tau:.5f}" for name, tau in learned_taus(model).items()},
        }
        rows.append(row)
        if is_main:
            taus = " ".join(f"{name}={tau:.3f}" for name, tau in learned_taus(model).items())
            print(
                f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']} acc {row['train_acc']} | "
                f"test loss {row['test_loss']} acc {row['test_acc']} | {row['epoch_seconds']} s | tau {taus}",
                flush=True,
            )
            write_metrics(metrics_path, rows)
            torch.save(
                {
                    "epoch": epoch + 1,
                    "best_test_acc": best_test_acc,
                    "dataset": args.dataset,
                    "model_config": model_config(args),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng_state": torch.get_rng_state(),
                },
                checkpoint_path,
            )
    if is_main and rows:
        print(
            f"done: test accuracy {row['test_acc']} (best {row['best_test_acc']}) in {time.time() - start_time:.1f} s"
        )
        if not args.no_plot:
            plot_path = args.out_dir / "curves.png"
            if plot_curves(rows, plot_path, f"{args.dataset}, {args.neuron}, init tau {args.init_tau}"):
                print(f"curves: {plot_path}")
            else:
                print("matplotlib is not installed: no plot (the metrics are in metrics.csv)")
    if world_size > 1:
        del network
        destroy_process_group()
    return row


if __name__ == "__main__":
    try:
        main()
    except datasets.DatasetNotFoundError as error:
        sys.exit(f"error: {error}")
