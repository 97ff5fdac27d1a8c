"""plif_cuda.nir: export to NIR and load from NIR, checked against the original networks and against snnTorch."""

import math

import nir
import numpy as np
import pytest
import torch
from torch import nn

import plif_cuda.nir as plif_nir
from helpers import printed_by_fresh_interpreter
from plif_cuda import LIFNode, ParametricLIFNode, patch_spikingjelly
from plif_cuda.models import EventFrameSNN, SeqDropout, SeqToBatch, StaticImageSNN, reset_states

T, N = 6, 3
TINY = dict(depth=2, width=4, fc_width=12, voting=3, dropout=0.5)


def round_trip(graph, tmp_path):
    path = tmp_path / "net.nir"
    nir.write(path, graph)
    return plif_nir.load(nir.read(path))


def run_fresh(model, x):
    """The model's eval-mode output from resting membranes (what export writes)."""
    model.eval()
    reset_states(model)
    with torch.no_grad():
        return model(x)


def random_w(shape, generator):
    """Learned-looking taus: w from -3 to 3 (tau from 1.05 to 21), one per element."""
    return torch.rand(shape, generator=generator) * 6 - 3


def tau_shapes(granularity, channels, height_width):
    conv = {"layer": (), "channel": (channels, 1, 1), "neuron": (channels, *height_width)}[granularity]
    return conv


def conv_net(granularity, decay_input, generator, *, v_reset=0.0, v_threshold=1.0):
    """conv - PLIF - avg pool - flatten - linear - PLIF - dropout - linear - LIF, time folded by SeqToBatch."""
    neuron = dict(decay_input=decay_input, v_reset=v_reset, v_threshold=v_threshold, step_mode="m")
    first = ParametricLIFNode(tau_shape=tau_shapes(granularity, 4, (8, 8)), **neuron)
    hidden_shape = {"layer": (), "channel": (20,), "neuron": (20,)}[granularity]
    second = ParametricLIFNode(tau_shape=hidden_shape, **neuron)
    with torch.no_grad():
        for layer in (first, second):
            layer.w.copy_(random_w(layer.w.shape, generator))
    model = nn.Sequential(
        SeqToBatch(nn.Conv2d(2, 4, 3, padding=1)),
        first,
        SeqToBatch(nn.AvgPool2d(2)),
        SeqToBatch(nn.Flatten()),
        SeqToBatch(nn.Linear(64, 20)),
        second,
        SeqDropout(0.5),
        SeqToBatch(nn.Linear(20, 7, bias=False)),
        LIFNode(tau=3.7, **neuron),
    )
    high = 0.5 if decay_input else 0.4  # without input decay the membrane sums more of its input
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.uniform_(-0.3, high, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1, generator=generator)
        model[7].module.weight.add_(0.15 if decay_input else 0.1)  # an output layer that fires
    return model


def assert_spiking(spikes):
    """The comparison means something: the layer fires, and not everywhere."""
    rate = spikes.float().mean().item()
    assert 0.02 < rate < 0.98, rate


@pytest.mark.parametrize("seed", range(4))
def test_exported_tau_loads_back_to_the_same_w(seed):
    generator = torch.Generator().manual_seed(seed)
    w = torch.cat(
        [
            torch.randn(100_000, generator=generator) * 4,
            torch.randn(1000, generator=generator) * 1e-7,
            torch.tensor([0.0, 1e-30, -1e-30, 25.0, 40.0, -60.0]),
        ]
    )
    dt = [1e-4, 1e-3, 3.7e-5, 1.0][seed]
    tau_nir = dt * (1.0 + np.exp(-w.double().numpy()))  # NIR's tau: tau_plif * dt, tau_plif = 1/sigmoid(w)
    loaded = torch.from_numpy(plif_nir.w_from_tau(tau_nir, dt))
    assert loaded.dtype == torch.float32
    assert torch.equal(torch.sigmoid(loaded), torch.sigmoid(w))
    # Where float64 tells float32 neighbours apart, the very w comes back.
    distinct = (w.abs() > 1e-5) & (w.abs() < 20)
    assert torch.equal(loaded[distinct], w[distinct])


@pytest.mark.parametrize("granularity", ["layer", "channel", "neuron"])
@pytest.mark.parametrize("decay_input", [True, False])
def test_round_trip_gives_bit_identical_spikes(granularity, decay_input, tmp_path):
    generator = torch.Generator().manual_seed(1)
    model = conv_net(granularity, decay_input, generator, v_reset=-0.25, v_threshold=0.8)
    x = torch.rand(T, N, 2, 8, 8, generator=generator) * 2
    with torch.no_grad():
        model(x)  # export leaves the membranes as it finds them
    membranes = [layer.v.clone() for layer in (model[1], model[5], model[8])]
    graph = plif_nir.export(model, x)
    assert all(torch.equal(layer.v, v) for layer, v in zip((model[1], model[5], model[8]), membranes))
    loaded = round_trip(graph, tmp_path)

    original_hidden, loaded_hidden = [], []
    model[5].register_forward_hook(lambda m, a, out: original_hidden.append(out))
    loaded.layers["5"].register_forward_hook(lambda m, a, out: loaded_hidden.append(out))
    expected = run_fresh(model, x)
    got = loaded(torch.rand(T, N, 2, 8, 8, generator=generator) * 2)  # a first call leaves no state behind
    got = loaded(x)
    assert_spiking(original_hidden[0])
    assert expected.any()
    assert torch.equal(loaded_hidden[-1], original_hidden[0])
    assert torch.equal(got, expected)
    assert got.shape == (T, N, 7)
    # tau's granularity comes back as it was (w of shape (), [C, 1, 1] or per neuron).
    for original, name in ((model[1], "1"), (model[5], "5")):
        assert loaded.layers[name].w.shape == original.w.shape
        assert torch.equal(loaded.layers[name].w, original.w.detach())
        assert loaded.layers[name].decay_input is decay_input


def test_sum_pooling_round_trips_as_nir_sum_pooling(tmp_path):
    generator = torch.Generator().manual_seed(10)
    neuron = ParametricLIFNode(step_mode="m", tau_shape=(3, 1, 1), v_threshold=1.2)
    with torch.no_grad():
        neuron.w.copy_(random_w((3, 1, 1), generator))
    model = nn.Sequential(
        SeqToBatch(nn.AvgPool2d(2, divisor_override=1)),
        neuron,
        SeqToBatch(nn.AvgPool2d(3, stride=1, padding=1)),
        ParametricLIFNode(step_mode="m", v_threshold=0.3),
    )
    x = torch.rand(T, N, 3, 8, 8, generator=generator)
    graph = plif_nir.export(model, x)
    assert isinstance(graph.nodes["0_module"], nir.SumPool2d)
    assert isinstance(graph.nodes["2_module"], nir.AvgPool2d)
    np.testing.assert_array_equal(graph.nodes["2_module"].padding, [1, 1])
    expected = run_fresh(model, x)
    assert_spiking(expected)
    with torch.no_grad():
        assert torch.equal(round_trip(graph, tmp_path)(x), expected)


def test_grouped_convolution_round_trips(tmp_path):
    generator = torch.Generator().manual_seed(11)
    model = nn.Sequential(
        SeqToBatch(nn.Conv2d(4, 4, 3, groups=4, padding="same")),
        ParametricLIFNode(step_mode="m", v_threshold=0.3),
        SeqToBatch(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)),
        ParametricLIFNode(step_mode="m", decay_input=False, v_threshold=0.3),
    )
    x = torch.rand(T, N, 4, 9, 9, generator=generator)
    graph = plif_nir.export(model, x)
    np.testing.assert_array_equal(graph.nodes["0_module"].input_type["input"], [4, 9, 9])
    path = tmp_path / "grouped.nir"
    nir.write(path, graph)
    # nir 1.0's reader checks a grouped conv's input against in_channels / groups: it needs type_check=False.
    loaded = plif_nir.load(nir.read(path, type_check=False))
    expected = run_fresh(model, x)
    assert_spiking(expected)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_exported_lif_nodes_follow_the_euler_mapping():
    generator = torch.Generator().manual_seed(2)
    dt = 2.5e-3
    for decay_input in (True, False):
        model = conv_net("neuron", decay_input, generator, v_reset=-0.25, v_threshold=0.8)
        graph = plif_nir.export(model, torch.rand(T, N, 2, 8, 8, generator=generator), dt=dt)
        lif = graph.nodes["1"]
        tau_plif = (1.0 / torch.sigmoid(model[1].w.detach().double())).numpy()
        np.testing.assert_allclose(lif.tau, tau_plif * dt, rtol=1e-14)
        assert lif.tau.shape == (4, 8, 8)
        np.testing.assert_allclose(lif.r, 1.0 if decay_input else tau_plif, rtol=1e-14)
        assert (lif.v_leak == -0.25).all() and (lif.v_reset == -0.25).all() and (lif.v_threshold == 0.8).all()
        last = graph.nodes["8"]  # LIFNode(tau=3.7): one tau, broadcast over its 7 neurons
        assert last.tau.shape == (7,)
        np.testing.assert_allclose(last.tau, 3.7 * dt, rtol=1e-7)
    assert [type(graph.nodes[k]).__name__ for k in ("0_module", "2_module", "3_module", "4_module", "7_module")] == [
        "Conv2d",
        "AvgPool2d",
        "Flatten",
        "Affine",
        "Linear",
    ]
    assert len(graph.nodes) == 10  # input, output and 8 layers: the dropout is dropped
    metadata = graph.metadata
    assert metadata["dt"] == dt
    assert metadata["discretisation"] == "forward-euler"
    assert metadata["reset"] == "hard"


def test_metadata_survives_the_file(tmp_path):
    model = conv_net("channel", True, torch.Generator().manual_seed(3))
    path = tmp_path / "net.nir"
    nir.write(path, plif_nir.export(model, torch.rand(T, N, 2, 8, 8), dt=1e-3))
    read = nir.read(path)
    assert float(read.metadata["dt"]) == 1e-3
    assert read.metadata["discretisation"] == "forward-euler"
    assert read.metadata["reset"] == "hard"
    assert plif_nir.load(path).metadata["dt"] == 1e-3  # load also takes the file's path


def test_batch_norm_is_folded_into_the_layer_before_it(tmp_path):
    torch.manual_seed(4)  # the conv's initial weights
    generator = torch.Generator().manual_seed(4)
    conv, bn = nn.Conv2d(2, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
    linear, bn1d = nn.Linear(5 * 16, 9), nn.BatchNorm1d(9)
    with torch.no_grad():
        for norm in (bn, bn1d):
            norm.running_mean.uniform_(-0.5, 0.5, generator=generator)
            norm.running_var.uniform_(0.5, 2.0, generator=generator)
            norm.weight.uniform_(0.5, 1.5, generator=generator)
            norm.bias.uniform_(0.5, 1.2, generator=generator)
        bn1d.running_var.uniform_(0.2, 1.0, generator=generator)
        linear.weight.uniform_(-0.1, 0.2, generator=generator)
    model = nn.Sequential(
        SeqToBatch(conv, bn),
        ParametricLIFNode(step_mode="m", tau_shape=(5, 1, 1)),
        SeqToBatch(nn.AvgPool2d(2), nn.Flatten(), linear, bn1d),
        ParametricLIFNode(step_mode="m", tau_shape=(9,)),
    )
    model.train()  # export uses the running statistics whatever the mode, and leaves the mode as it was
    x = torch.rand(T, N, 2, 8, 8, generator=generator) * 3
    graph = plif_nir.export(model, x)
    assert model.training and bn.training
    assert set(graph.nodes) == {"input", "0_module_0", "1", "2_module_0", "2_module_1", "2_module_2", "3", "output"}
    loaded = round_trip(graph, tmp_path)
    model.eval()
    with torch.no_grad():
        currents = bn(conv(x.flatten(0, 1)))
        np.testing.assert_allclose(
            loaded.layers["0_module_0"](x.flatten(0, 1)).numpy(), currents.numpy(), rtol=1e-5, atol=1e-5
        )
        first_spikes = model[1](currents.unflatten(0, (T, N)))
        features = model[2].module[:2](first_spikes.flatten(0, 1))
        np.testing.assert_allclose(
            loaded.layers["2_module_2"](features).numpy(), bn1d(linear(features)).numpy(), rtol=1e-5, atol=1e-5
        )
    expected, got = run_fresh(model, x), loaded(x)
    assert_spiking(first_spikes)
    assert_spiking(expected)
    # Folding rounds differently from conv-then-BN: a current within a rounding of the threshold may flip.
    assert (got != expected).float().mean().item() < 0.01


def test_paper_event_network_with_avg_pooling_round_trips(tmp_path):
    torch.manual_seed(5)
    model = EventFrameSNN(
        image_size=8, num_classes=4, T=T, pooling="avg", tau_granularity="channel", batch_norm=False, **TINY
    )
    with torch.no_grad():
        for layer in plif_nir_neurons(model):
            layer.w.uniform_(-3, 3)
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.uniform_(-0.5, 1.0)
    x = torch.rand(T, N, 2, 8, 8) * 2
    graph = plif_nir.export(model, x)
    assert "readout" in graph.metadata
    loaded = round_trip(graph, tmp_path)
    last_spikes = []
    model.head[-1].register_forward_hook(lambda m, a, out: last_spikes.append(out))
    rates = run_fresh(model, x)
    votes = loaded(x)
    assert votes.shape == (T, N, 4)
    assert_spiking(last_spikes[0])
    loaded_spikes = list(loaded.layers.values())[-2]
    assert isinstance(loaded_spikes, ParametricLIFNode)
    torch.testing.assert_close(votes.mean(0), rates, rtol=0, atol=1e-6)


def plif_nir_neurons(model):
    return [m for m in model.modules() if isinstance(m, ParametricLIFNode) and not isinstance(m, LIFNode)]


@pytest.mark.parametrize("batch_norm", [False, True])
def test_paper_static_network_takes_its_image_at_every_step(batch_norm, tmp_path):
    torch.manual_seed(6)
    model = StaticImageSNN(image_size=8, num_classes=4, T=T, pooling="avg", batch_norm=batch_norm, **TINY)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.uniform_(-0.5, 1.0)
    images = torch.rand(N, 1, 8, 8) * 2
    loaded = round_trip(plif_nir.export(model, images), tmp_path)
    first_spikes = []
    model.first_neuron.register_forward_hook(lambda m, a, out: first_spikes.append(out))
    loaded_first = []
    loaded.layers["first_neuron"].register_forward_hook(lambda m, a, out: loaded_first.append(out))
    rates = run_fresh(model, images)
    votes = loaded(images.expand(T, *images.shape))
    assert_spiking(first_spikes[0])
    if batch_norm:
        assert (loaded_first[0] != first_spikes[0]).float().mean().item() < 0.01
    else:
        assert torch.equal(loaded_first[0], first_spikes[0])
        torch.testing.assert_close(votes.mean(0), rates, rtol=0, atol=1e-6)


def test_spikingjelly_modules_round_trip(tmp_path):
    from spikingjelly.activation_based import layer, neuron

    torch.manual_seed(7)
    model = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, step_mode="m"),
        neuron.ParametricLIFNode(init_tau=3.0, step_mode="m"),
        layer.SeqToANNContainer(nn.AvgPool2d(2), nn.Flatten()),
        layer.Dropout(0.3, step_mode="m"),
        layer.Linear(64, 10, step_mode="m"),
        neuron.LIFNode(tau=5.0, decay_input=False, v_threshold=0.7, step_mode="m"),
    )
    with torch.no_grad():
        model[1].w.fill_(-0.7)
        for module in (model[0], model[4]):
            module.weight.uniform_(-0.3, 0.5)
    x = torch.rand(T, N, 2, 8, 8) * 2
    loaded = round_trip(plif_nir.export(model, x), tmp_path)
    with patch_spikingjelly():  # SpikingJelly's LIFNode divides by tau; patched, it runs our k = 1/tau
        expected = run_fresh(model, x)
    assert_spiking(expected)
    assert torch.equal(loaded(x), expected)
    assert torch.equal(loaded.layers["1"].w, model[1].w.detach())


def test_graph_exported_here_runs_the_same_in_snntorch():
    from snntorch.import_nir import import_from_nir

    torch.manual_seed(8)  # the linear layers' biases
    generator = torch.Generator().manual_seed(8)
    # snnTorch's Leaky: mem = beta * mem + input, beta = 1 - dt/tau: PLIF without input decay, hard reset to 0.
    first = ParametricLIFNode(decay_input=False, step_mode="m", tau_shape=(24,))
    second = ParametricLIFNode(decay_input=False, step_mode="m", tau_shape=(5,))
    with torch.no_grad():
        first.w.copy_(random_w((24,), generator))
        second.w.copy_(random_w((5,), generator))
    model = nn.Sequential(SeqToBatch(nn.Linear(12, 24)), first, SeqToBatch(nn.Linear(24, 5)), second)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.uniform_(-0.3, 0.6, generator=generator)
    x = torch.rand(20, N, 12, generator=generator)
    graph = plif_nir.export(model, x)  # at snnTorch's dt, 1e-4
    snn_net = import_from_nir(graph)
    with torch.no_grad():
        snn_spikes, state = [], None
        for x_step in x:
            spikes, state = snn_net(x_step) if state is None else snn_net(x_step, state)
            snn_spikes.append(spikes)
    expected = run_fresh(model, x)
    assert_spiking(expected)
    assert torch.equal(torch.stack(snn_spikes).to(expected.dtype), expected)


def test_graph_written_by_snntorch_loads_and_reproduces_it(tmp_path):
    import snntorch as snn
    from snntorch import utils as snn_utils
    from snntorch.export_nir import export_to_nir

    torch.manual_seed(9)
    # snnTorch's export writes beta's and threshold's own shapes: per-neuron tensors keep its LIF nodes consistent.
    net = nn.Sequential(
        nn.Linear(10, 16),
        snn.Leaky(
            beta=torch.rand(16) * 0.8 + 0.1, threshold=torch.full((16,), 0.9), init_hidden=True, reset_mechanism="zero"
        ),
        nn.Linear(16, 6),
        snn.Leaky(
            beta=torch.full((6,), 0.85), threshold=torch.full((6,), 0.6), init_hidden=True, reset_mechanism="zero"
        ),
    )
    with torch.no_grad():
        for module in (net[0], net[2]):
            module.weight.uniform_(-0.3, 0.4)
    x = torch.rand(15, N, 10)
    graph = export_to_nir(net, x[0], ignore_dims=[0])  # the batch dimension is not the neurons' shape
    path = tmp_path / "snntorch.nir"
    nir.write(path, graph)
    loaded = plif_nir.load(path)
    hidden = []
    loaded.layers[
        [name for name, m in loaded.layers.items() if isinstance(m, ParametricLIFNode)][0]
    ].register_forward_hook(lambda m, a, out: hidden.append(out))
    got = loaded(x)

    snn_utils.reset(net)
    with torch.no_grad():
        expected = torch.stack([net(x_step) for x_step in x])
    assert_spiking(hidden[0])
    assert_spiking(expected)
    assert torch.equal(got, expected)


def test_max_pooling_is_refused_with_what_to_change():
    model = StaticImageSNN(image_size=8, num_classes=4, T=3, **TINY)  # the paper's max pooling
    with pytest.raises(
        ValueError,
        match=r"body\.\d\.module \(MaxPool2d\): NIR has no max pooling: retrain with "
        r"average pooling \(plif_cuda\.models networks: pooling='avg'",
    ):
        plif_nir.export(model, torch.rand(2, 1, 8, 8))


def test_soft_reset_is_refused_unless_the_approximation_is_asked_for(tmp_path):
    model = nn.Sequential(SeqToBatch(nn.Linear(6, 8)), ParametricLIFNode(v_reset=None, step_mode="m"))
    x = torch.rand(T, N, 6) * 3
    with pytest.raises(
        ValueError,
        match=r"^1: has a soft reset \(v_reset=None\)\. NIR's LIF only resets to v_reset "
        r".*pass approximate_soft_reset=True",
    ):
        plif_nir.export(model, x)
    graph = plif_nir.export(model, x, approximate_soft_reset=True)
    assert graph.metadata["reset"] == plif_nir.SOFT_RESET_APPROXIMATED
    assert graph.nodes["1"].metadata["reset"] == plif_nir.SOFT_RESET_APPROXIMATED
    loaded = round_trip(graph, tmp_path)
    hard = nn.Sequential(model[0], ParametricLIFNode(v_reset=0.0, step_mode="m"))
    assert torch.equal(loaded(x), run_fresh(hard, x))  # what was exported: the hard reset to 0


@pytest.mark.parametrize(
    "model, message",
    [
        (
            nn.Sequential(SeqToBatch(nn.Linear(6, 8)), SeqToBatch(nn.ReLU()), ParametricLIFNode(step_mode="m")),
            r"^1\.module: ReLU cannot be exported to NIR; export supports Conv2d, Linear",
        ),
        (
            nn.Sequential(SeqToBatch(nn.Linear(6, 8)), ParametricLIFNode(step_mode="s")),
            r"^1: export needs multi-step neurons \(step_mode='m'\)",
        ),
        (
            nn.Sequential(SeqToBatch(nn.BatchNorm1d(6)), ParametricLIFNode(step_mode="m")),
            r"^0\.module: NIR has no batch norm, and this one does not follow a Conv2d or Linear",
        ),
    ],
)
def test_unsupported_networks_are_refused(model, message):
    with pytest.raises(ValueError, match=message):
        plif_nir.export(model, torch.rand(T, N, 6))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = SeqToBatch(nn.Linear(6, 6))
        self.neuron = ParametricLIFNode(step_mode="m")

    def forward(self, x):
        return self.neuron(self.linear(x) + x)


def test_computation_outside_the_layers_is_refused():
    with pytest.raises(
        ValueError,
        match=r"^neuron: its input is not the output of the layer before it "
        r"\(linear\.module\)",
    ):
        plif_nir.export(Residual(), torch.rand(T, N, 6))


def test_export_arguments_are_checked():
    model = nn.Sequential(SeqToBatch(nn.Linear(6, 8)), ParametricLIFNode(step_mode="m"))
    with pytest.raises(ValueError, match="dt must be a positive finite number"):
        plif_nir.export(model, torch.rand(T, N, 6), dt=0.0)
    with pytest.raises(TypeError, match="sample_input must be a floating-point tensor"):
        plif_nir.export(model, [[0.0]])
    with pytest.raises(TypeError, match="approximate_soft_reset must be a bool"):
        plif_nir.export(model, torch.rand(T, N, 6), approximate_soft_reset="yes")
    with pytest.raises(ValueError, match="a batch size other than the number of steps"):
        plif_nir.export(model, torch.rand(4, 4, 6))


def lif_graph(**overrides):
    shape = (3,)
    values = dict(
        tau=np.full(shape, 3e-4),
        r=np.ones(shape),
        v_leak=np.zeros(shape),
        v_threshold=np.ones(shape),
        v_reset=np.zeros(shape),
    )
    values.update(overrides)
    return nir.NIRGraph.from_list(nir.Linear(weight=np.eye(3, dtype=np.float32)), nir.LIF(**values))


def test_load_refuses_what_the_neuron_cannot_run():
    with pytest.raises(ValueError, match=r"v_threshold differs between neurons \(2 values\)"):
        plif_nir.load(lif_graph(v_threshold=np.array([1.0, 1.0, 0.5])))
    with pytest.raises(ValueError, match="v_leak differs from v_reset"):
        plif_nir.load(lif_graph(v_leak=np.full(3, 0.1)))
    with pytest.raises(ValueError, match="discrete decay dt/tau must be at most 1"):
        plif_nir.load(lif_graph(tau=np.full(3, 5e-5)))
    graph = nir.NIRGraph.from_list(
        nir.Linear(weight=np.eye(3, dtype=np.float32)), nir.IF(r=np.ones(3), v_threshold=np.ones(3))
    )
    with pytest.raises(ValueError, match=r"NIR IF is not supported by plif_cuda\.nir\.load"):
        plif_nir.load(graph)


def test_load_scales_the_input_by_an_arbitrary_r():
    """tau dv/dt = -v + r I, one Euler step: v += (dt/tau) (r I - v), computed here by hand."""
    dt, tau_steps, r = 1e-4, np.array([2.0, 4.0, 8.0]), np.array([0.5, 3.0, 1.5])
    loaded = plif_nir.load(lif_graph(tau=tau_steps * dt, r=r), dt=dt)
    x = torch.rand(30, 2, 3, dtype=torch.float64).float()
    v = np.zeros((2, 3))
    expected = []
    for x_step in x.double().numpy():
        v = v + (r * x_step - v) / tau_steps
        spike = v >= 1.0
        v = np.where(spike, 0.0, v)
        expected.append(spike)
    with torch.no_grad():
        got = loaded(x).numpy().astype(bool)
    assert 0.02 < got.mean() < 0.98
    assert (got == np.array(expected)).mean() > 0.99  # float32 against float64 arithmetic


def test_import_plif_cuda_stays_free_of_nir():
    printed = printed_by_fresh_interpreter(
        "import sys, plif_cuda; print('nir' in sys.modules, 'plif_cuda.nir' in sys.modules); "
        "print(plif_cuda.nir.export.__module__, 'nir' in sys.modules)"
    )
    assert printed == "False False\nplif_cuda.nir True"  # imported on first use


def test_load_checks_its_input_shape():
    loaded = plif_nir.load(lif_graph())
    with pytest.raises(ValueError, match=r"x_seq must be \[T, N, \*\(3,\)\], got \(4, 2, 5\)"):
        loaded(torch.rand(4, 2, 5))
    assert math.isclose(loaded.metadata.get("dt", plif_nir.DEFAULT_DT), 1e-4)
