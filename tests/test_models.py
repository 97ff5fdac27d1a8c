"""plif_cuda.models (the paper's networks) and examples/train.py on the bundled digits."""

import csv
import itertools

import numpy as np
import pytest
import torch

from helpers import load_script, train_tiny_network
from plif_cuda import LIFNode, ParametricLIFNode
from plif_cuda.models import (
    EventFrameSNN,
    SeqDropout,
    StaticImageSNN,
    VotingLayer,
    learned_taus,
    neuron_layers,
    reset_states,
)

SMALL = dict(depth=2, width=4, fc_width=12, voting=3, dropout=0.0)


def strengthen(model):
    """Weights large enough that an untrained network's spikes reach its output."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.uniform_(-0.5, 1.0)
    return model


@pytest.mark.parametrize(
    "neuron, pooling, tau_granularity, batch_norm",
    list(itertools.product(("plif", "lif"), ("max", "avg"), ("layer", "channel"), (True, False))),
)
def test_static_image_net_forward_backward(neuron, pooling, tau_granularity, batch_norm):
    torch.manual_seed(0)
    choices = dict(neuron=neuron, pooling=pooling, tau_granularity=tau_granularity, batch_norm=batch_norm)
    model = StaticImageSNN(in_channels=3, image_size=8, num_classes=5, T=3, init_tau=3.0, **choices, **SMALL)
    x = torch.rand(4, 3, 8, 8) * 4
    rates = model(x)
    assert rates.shape == (4, 5)
    assert ((rates >= 0) & (rates <= 1)).all()
    rates.sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
    layers = neuron_layers(model)
    assert len(layers) == 4
    for layer in layers.values():
        assert isinstance(layer, ParametricLIFNode)
        assert isinstance(layer, LIFNode) == (neuron == "lif")
        if neuron == "lif":
            assert layer.tau == 3.0 and not list(layer.parameters()) and not layer.state_dict()
            continue
        assert layer.w.requires_grad
        if tau_granularity == "channel":
            assert layer.w.dim() >= 1 and layer.w.numel() > 1
        else:
            assert layer.w.dim() == 0
        assert torch.allclose(layer.tau, torch.tensor(3.0))
    if neuron == "plif":
        assert any(layer.w.grad.abs().sum() > 0 for layer in layers.values())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == (2 if batch_norm else 0)
    pool_type = torch.nn.MaxPool2d if pooling == "max" else torch.nn.AvgPool2d
    assert sum(isinstance(m, pool_type) for m in model.modules()) == 2


@pytest.mark.parametrize("neuron, tau_granularity", [("plif", "layer"), ("lif", "channel"), ("plif", "channel")])
def test_event_frame_net_forward_backward(neuron, tau_granularity):
    torch.manual_seed(0)
    model = EventFrameSNN(
        T=4, image_size=10, neuron=neuron, tau_granularity=tau_granularity, convs_per_stage=2, **SMALL
    )
    frames = (torch.rand(4, 2, 2, 10, 10) < 0.3).float()
    rates = model(frames)
    assert rates.shape == (2, 10)
    rates.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert len(neuron_layers(model)) == 6  # 2 stages x 2 convs, the hidden FC layer, the output layer
    with pytest.raises(ValueError, match="time steps"):
        model(frames[:3])


def test_static_net_runs_the_first_block_once_and_matches_per_step_evaluation():
    """Repeating the first conv+BN over T must equal running it at every step on the repeated image."""
    torch.manual_seed(1)
    static = StaticImageSNN(in_channels=1, image_size=8, num_classes=4, T=5, **SMALL).eval()
    strengthen(static)
    per_step = EventFrameSNN(in_channels=1, image_size=8, num_classes=4, T=5, **SMALL).eval()
    per_step.load_state_dict(static.state_dict())
    images = torch.rand(3, 1, 8, 8) * 3
    with torch.no_grad():
        expected = per_step(images.unsqueeze(0).expand(5, -1, -1, -1, -1))
        got = static(images)
    assert torch.equal(got, expected)
    assert got.sum() > 0


def test_neurons_keep_state_until_reset():
    torch.manual_seed(2)
    model = strengthen(StaticImageSNN(in_channels=1, image_size=8, num_classes=4, T=3, **SMALL).eval())
    images = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        first = model.encode(images)
        carried = model.encode(images)  # starts from the membranes the first call left
        reset_states(model)
        fresh = model.encode(images)
    assert 0 < first.mean() < 1
    assert torch.equal(first, fresh)
    assert not torch.equal(first, carried)
    assert isinstance(model.first_neuron.v, torch.Tensor)
    reset_states(model)
    assert all(layer.v == 0.0 for layer in neuron_layers(model).values())
    with torch.no_grad():
        model(images)
        with pytest.raises(ValueError, match="reset"):
            model(images[:2])


def test_voting_layer_averages_groups_and_time():
    spikes = torch.zeros(4, 2, 3 * 5)
    spikes[:, 0, 5:10] = 1.0  # sample 0: class 1's whole group fires at every step
    spikes[:2, 1, 10:12] = 1.0  # sample 1: 2 of class 2's 5 neurons, half of the steps
    rates = VotingLayer(5)(spikes)
    assert torch.equal(rates, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.2]]))


def test_seq_dropout_shares_its_mask_over_time():
    torch.manual_seed(3)
    dropout = SeqDropout(0.5)
    x = torch.ones(6, 4, 50)
    y = dropout(x)
    dropped = y == 0
    assert dropped.any() and (~dropped).any()
    assert (dropped == dropped[0]).all()
    assert torch.allclose(y[~dropped], torch.tensor(2.0))
    assert torch.equal(dropout.eval()(x), x)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(neuron="izhikevich"), "neuron"),
        (dict(pooling="min"), "pooling"),
        (dict(tau_granularity="neuron"), "tau_granularity"),
        (dict(T=0), "T"),
        (dict(depth=4), "depth"),
        (dict(init_tau=1.0), "init_tau"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    options = dict(in_channels=1, image_size=8, num_classes=10, **SMALL)
    options.update(kwargs)
    with pytest.raises(ValueError, match=name):
        StaticImageSNN(**options)


def test_learned_taus_follow_the_parameter():
    model = StaticImageSNN(in_channels=1, image_size=8, num_classes=2, init_tau=4.0, **SMALL)
    assert all(abs(tau - 4.0) < 1e-5 for tau in learned_taus(model).values())
    with torch.no_grad():
        model.first_neuron.w.fill_(0.0)
    assert learned_taus(model)["first_neuron"] == pytest.approx(2.0)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_training_on_digits_learns_and_resumes(tmp_path):
    train = load_script("examples/train.py")
    common = ["--dataset", "digits", "--no-progress", "--no-plot"]
    straight = train.main(common + ["--epochs", "3", "--out-dir", str(tmp_path / "straight")])
    # Chance is 10%; the untrained network sits near it (its first-epoch train accuracy shows that).
    rows = read_rows(tmp_path / "straight" / "metrics.csv")
    assert len(rows) == 3
    assert float(straight["test_acc"]) > 0.5
    assert float(straight["test_acc"]) > float(rows[0]["train_acc"]) + 0.2
    tau_columns = [k for k in rows[0] if k.startswith("tau:")]
    assert len(tau_columns) == 4
    assert any(abs(float(rows[-1][k]) - 2.0) > 1e-3 for k in tau_columns)  # tau is learned

    interrupted = tmp_path / "interrupted"
    train.main(common + ["--epochs", "3", "--stop-after", "2", "--out-dir", str(interrupted)])
    assert len(read_rows(interrupted / "metrics.csv")) == 2
    resumed = train.main(common + ["--epochs", "3", "--out-dir", str(interrupted), "--resume"])
    assert len(read_rows(interrupted / "metrics.csv")) == 3
    for key in ("train_loss", "test_loss", "test_acc"):
        assert resumed[key] == straight[key], key

    with pytest.raises(ValueError, match="width"):
        train.main(common + ["--width", "8", "--out-dir", str(interrupted), "--resume"])


def write_fake_nmnist(root, rng):
    for split in ("Train", "Test"):
        for digit in (1, 7):
            folder = root / "NMNIST" / split / str(digit)
            folder.mkdir(parents=True)
            n = 200
            x, y, p = rng.integers(0, 34, n), rng.integers(0, 34, n), rng.integers(0, 2, n)
            t = np.sort(rng.integers(0, 2**23, n))
            events = np.stack([x, y, (p << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF], axis=1).astype(np.uint8)
            (folder / "00001.bin").write_bytes(events.tobytes())


def write_fake_mnist(root, rng):
    folder = root / "MNIST"
    folder.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, 4, dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3, 0, 0, 0, 4, 0, 0, 0, 28, 0, 0, 0, 28]) + images.tobytes()
        )
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 4]) + labels.tobytes())


@pytest.mark.parametrize("dataset, writer", [("nmnist", write_fake_nmnist), ("mnist", write_fake_mnist)])
def test_train_script_runs_on_files_from_data_dir(tmp_path, dataset, writer):
    writer(tmp_path / "data", np.random.default_rng(0))
    out_dir = tmp_path / "run"
    row = train_tiny_network(dataset, out_dir, data_dir=tmp_path / "data", batch_size=2)
    assert row["epoch"] == 1
    assert len(read_rows(out_dir / "metrics.csv")) == 1
    assert (out_dir / "curves.png").stat().st_size > 0
    assert (out_dir / "checkpoint.pt").exists()


def test_plain_progress_reports_and_yields_everything(capsys):
    train = load_script("examples/train.py")
    assert list(train._plain_progress(range(20), 20, "work")) == list(range(20))
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "  work: 20/20" and len(lines) == 10
