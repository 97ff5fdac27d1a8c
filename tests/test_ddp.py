"""DistributedDataParallel (gloo, 2 CPU processes) trains the fused PLIF layer like one process does.

Each process takes half of the global batch; DDP averages the gradients, so after a few SGD
steps every parameter (the learnable tau included) must equal a single process's on the whole
batch. The models have no batch-norm, whose statistics would differ per process.
"""

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import load_script
from plif_cuda.models import StaticImageSNN, neuron_layers, reset_states

# The example's process-group set-up and teardown, which the workers below use as it does.
train_example = load_script("examples/train.py")

WORLD_SIZE = 2
STEPS = 3
GLOBAL_BATCH = 8
TAU_GRANULARITIES = ("layer", "channel")
NETWORK = dict(in_channels=1, image_size=8, num_classes=4, T=4, depth=1, width=6, fc_width=16, voting=2, dropout=0.0)


def make_model(tau_granularity):
    torch.manual_seed(0)
    model = StaticImageSNN(**NETWORK, batch_norm=False, tau_granularity=tau_granularity, backend="cpu")
    with torch.no_grad():  # without batch-norm, weights this large keep every layer firing
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.uniform_(-0.3, 0.6)
    return model


def make_batches():
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.rand(GLOBAL_BATCH, 1, 8, 8, generator=generator) * 3,
            torch.randint(0, 4, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def train(model, batches, rank=0, world_size=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    share = GLOBAL_BATCH // world_size
    for images, labels in batches:
        images, labels = images[rank * share : (rank + 1) * share], labels[rank * share : (rank + 1) * share]
        rates = model(images)
        loss = F.mse_loss(rates, F.one_hot(labels, 4).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reset_states(model)


def thread_names() -> list[str]:
    return [(Path("/proc/self/task") / task / "comm").read_text().strip() for task in os.listdir("/proc/self/task")]


def ddp_worker(rank, init_file, result_file):
    torch.set_num_threads(1)
    train_example.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    results = {}
    for tau_granularity in TAU_GRANULARITIES:
        model = make_model(tau_granularity)
        network = torch.nn.parallel.DistributedDataParallel(model)
        train(network, make_batches(), rank, WORLD_SIZE)
        results[tau_granularity] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gloo_threads_before = [name for name in thread_names() if "gloo" in name]
    del network
    train_example.destroy_process_group()
    # gloo's threads must be gone before the interpreter shuts down (see the example's
    # init_process_group): one still there can abort the process at exit.
    results["gloo_threads"] = (gloo_threads_before, [name for name in thread_names() if "gloo" in name])
    torch.save(results, f"{result_file}.{rank}")


def test_ddp_matches_single_process_on_the_global_batch(tmp_path):
    result_file = tmp_path / "params"
    mp.spawn(ddp_worker, args=(str(tmp_path / "init"), str(result_file)), nprocs=WORLD_SIZE, join=True)
    per_rank = [torch.load(f"{result_file}.{rank}") for rank in range(WORLD_SIZE)]
    for rank, params in enumerate(per_rank):
        before, after = params["gloo_threads"]
        assert before, "no gloo threads found to check (did /proc/self/task change?)"
        assert after == [], f"rank {rank}: gloo threads {after} outlive destroy_process_group"
    for tau_granularity in TAU_GRANULARITIES:
        model = make_model(tau_granularity)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        train(model, make_batches())
        single = model.state_dict()
        taus_moved = [
            name for name, layer in neuron_layers(model).items() if not torch.equal(layer.w, initial[f"{name}.w"])
        ]
        assert taus_moved, "the test must move tau to check its gradient is all-reduced"
        for key, value in single.items():
            assert not torch.equal(value, initial[key]) or key.endswith(".w"), f"{key} did not train"
            for rank, params in enumerate(per_rank):
                assert torch.allclose(params[tau_granularity][key], value, rtol=1e-5, atol=1e-6), (
                    f"{tau_granularity}: {key} on rank {rank} differs from the single process"
                )
