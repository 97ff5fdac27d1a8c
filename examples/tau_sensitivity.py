"""The PLIF paper's central experiment, small: PLIF (learned tau) vs LIF (fixed tau) at several
initial tau.

    python examples/tau_sensitivity.py                         # digits, tau 2 4 8 16, seeds 0 1 2: ~4 min, 2 cores
    python examples/tau_sensitivity.py --out examples/results  # update the committed figure docs/examples.md shows
    python examples/tau_sensitivity.py --dataset fashion-mnist --taus 2 16 --seeds 0 --epochs 4 \
        --train-subset 15000 --test-subset 5000 --out examples/results/fashion-mnist  # 11 min on 2 cores

Every (neuron, init tau, seed) run is examples/train.py on the dataset (default: the bundled
digits) with the same seed, so PLIF and LIF start from the same weights and see the same batches;
only tau differs. Other datasets run train.py's preset network for that dataset, on random
subsets when asked. Writes <out>/tau_sensitivity.csv (one row per run and epoch, with the learned
tau of every layer) and <out>/tau_sensitivity.png (test accuracy vs epoch, learned tau vs epoch, final accuracy;
its title names the CPU, the date and the wall time the runs took).
<out> defaults to examples/runs/tau_sensitivity/ (digits) or examples/runs/tau_sensitivity-<dataset>/,
which git does not track.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The paper's T for static images; the other datasets take train.py's preset.
DIGITS_T = 8


def load_train_module():
    spec = importlib.util.spec_from_file_location("plif_train_example", HERE / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help="a dataset of examples/train.py (default: digits)")
    parser.add_argument("--taus", type=float, nargs="+", default=[2.0, 4.0, 8.0, 16.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument(
        "--T", type=int, default=None, help=f"time steps (default: {DIGITS_T} on digits, else the preset's)"
    )
    parser.add_argument("--train-subset", type=int, default=None, help="passed on to train.py")
    parser.add_argument("--test-subset", type=int, default=None, help="passed on to train.py")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default examples/runs/tau_sensitivity[-<dataset>], not tracked by git; "
        "the committed results docs/examples.md shows are in examples/results)",
    )
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    if args.dataset == "digits" and args.T is None:
        args.T = DIGITS_T
    if args.out is None:
        name = "tau_sensitivity" if args.dataset == "digits" else f"tau_sensitivity-{args.dataset}"
        args.out = HERE / "runs" / name
    return args


def run_all(args, train):
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for init_tau in args.taus:
            for neuron in ("plif", "lif"):
                for seed in args.seeds:
                    out_dir = Path(scratch) / f"{neuron}-{init_tau}-{seed}"
                    options = {"--T": args.T, "--train-subset": args.train_subset, "--test-subset": args.test_subset}
                    given = [
                        str(item) for name, value in options.items() if value is not None for item in (name, value)
                    ]
                    train.main(
                        [
                            "--dataset",
                            args.dataset,
                            "--neuron",
                            neuron,
                            "--init-tau",
                            str(init_tau),
                            "--seed",
                            str(seed),
                            "--epochs",
                            str(args.epochs),
                            *given,
                            "--backend",
                            args.backend,
                            "--out-dir",
                            str(out_dir),
                            "--no-progress",
                            "--no-plot",
                        ]
                    )
                    with open(out_dir / "metrics.csv", newline="") as f:
                        for row in csv.DictReader(f):
                            rows.append({"neuron": neuron, "init_tau": init_tau, "seed": seed, **row})
    return rows


def final_rows(rows, epochs):
    return [r for r in rows if int(r["epoch"]) == epochs]


def summarize(rows, args) -> list[str]:
    lines = []
    for init_tau in args.taus:
        for neuron in ("plif", "lif"):
            last = [r for r in final_rows(rows, args.epochs) if r["neuron"] == neuron and r["init_tau"] == init_tau]
            accs = [float(r["test_acc"]) for r in last]
            tau_keys = [k for k in last[0] if k.startswith("tau:")]
            taus = " ".join(f"{k[4:]}={statistics.mean(float(r[k]) for r in last):.2f}" for k in tau_keys)
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(
                f"init tau {init_tau:>4g} {neuron:>4}: final test acc {statistics.mean(accs):.4f} "
                f"+- {spread:.4f} (min {min(accs):.4f}) | tau after training: {taus}"
            )
    return lines


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def plot(rows, args, path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(
        zip(args.taus, plt.cm.viridis([i / max(1, len(args.taus) - 1) * 0.85 for i in range(len(args.taus))]))
    )
    epochs = list(range(1, args.epochs + 1))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))

    def mean_curve(neuron, init_tau, key):
        runs = [r for r in rows if r["neuron"] == neuron and r["init_tau"] == init_tau]
        return [statistics.mean(float(r[key]) for r in runs if int(r["epoch"]) == e) for e in epochs]

    for init_tau in args.taus:
        for neuron, style in (("plif", "-"), ("lif", "--")):
            axes[0].plot(
                epochs,
                mean_curve(neuron, init_tau, "test_acc"),
                style,
                color=colors[init_tau],
                label=f"{neuron.upper()} init tau {init_tau:g}",
            )
        tau_keys = [k for k in rows[0] if k.startswith("tau:")]
        layer_mean = [statistics.mean(v) for v in zip(*(mean_curve("plif", init_tau, k) for k in tau_keys))]
        axes[1].plot(epochs, layer_mean, color=colors[init_tau], label=f"PLIF init tau {init_tau:g}")
    axes[0].set_title(f"{args.dataset} test accuracy (mean of seeds {args.seeds})")
    axes[0].set_ylim(0, 1)
    axes[1].set_title("PLIF: learned tau (mean over layers and seeds)")
    axes[1].set_yscale("log", base=2)

    final = final_rows(rows, args.epochs)
    width = 0.38
    for offset, neuron in ((-width / 2, "plif"), (width / 2, "lif")):
        means, lows, highs = [], [], []
        for init_tau in args.taus:
            accs = [float(r["test_acc"]) for r in final if r["neuron"] == neuron and r["init_tau"] == init_tau]
            means.append(statistics.mean(accs))
            lows.append(statistics.mean(accs) - min(accs))
            highs.append(max(accs) - statistics.mean(accs))
        positions = [i + offset for i in range(len(args.taus))]
        axes[2].bar(positions, means, width, yerr=[lows, highs], capsize=3, label=neuron.upper())
    axes[2].set_xticks(range(len(args.taus)), [f"{t:g}" for t in args.taus])
    axes[2].set_xlabel("initial tau")
    axes[2].set_title(f"final test accuracy after {args.epochs} epochs (bars: min-max over seeds)")
    axes[2].set_ylim(0, 1)
    for ax in axes[:2]:
        ax.set_xlabel("epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    subsets = (
        f", {args.train_subset or 'all'} train / {args.test_subset or 'all'} test samples"
        if args.train_subset or args.test_subset
        else ""
    )
    fig.suptitle(f"PLIF vs LIF on {args.dataset}, T={args.T}{subsets}. {machine}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    train = load_train_module()
    if args.T is None:
        args.T = train.PRESETS[args.dataset]["T"]
    started = time.gmtime()
    start = time.time()
    rows = run_all(args, train)
    machine = (
        f"{cpu_name()}, {os.cpu_count()} cores; runs from {time.strftime('%Y-%m-%d %H:%M UTC', started)}, "
        f"{(time.time() - start) / 60:.0f} min in all"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "tau_sensitivity.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = summarize(rows, args)
    print("\n".join(lines))
    png_path = args.out / "tau_sensitivity.png"
    plot(rows, args, png_path, machine)
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
