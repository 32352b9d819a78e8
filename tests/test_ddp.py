"""DDP semantics of ``zsharp.optim.step`` on 2 CPU processes (gloo).

One spawn runs every configuration (both ranks save their ε and weights); the tests
compare them with references computed here in one process: (a) synced ascent against the
hand-written two-pass step on the concatenated batch, (b) m-sharpness against each rank's
own ε and the mean of the ranks' gradients at their own w + ε_r. A DDP comm hook counts
the all-reduces: two per step for (a), one for (b). FSDP is refused with a clear error.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import zsharp.optim as zo
from zsharp.optim.step import SharpnessAwareStep

WORLD = 2
STEPS = 3
BATCH = 16  # global batch; 8 per rank
LR, MOMENTUM = 0.1, 0.9
# (optimizer key, ddp mode, micro-batches per rank)
CONFIGS = [
    (key, mode, 1)
    for key in ("sam", "zsharp", "zsharp-official")
    for mode in ("synced", "m-sharpness")
] + [("zsharp", "synced", 2), ("zsharp", "m-sharpness", 2)]
SYNCED = [(key, micro) for key, mode, micro in CONFIGS if mode == "synced"]
M_SHARPNESS = [(key, micro) for key, mode, micro in CONFIGS if mode == "m-sharpness"]
OPTIMIZERS = {
    "sam": ("sam", {}),
    "zsharp": ("zsharp", {"variant": "paper"}),
    "zsharp-official": ("zsharp", {"variant": "official"}),
}


def mlp() -> nn.Module:
    """No BatchNorm: the loss of the global batch is the mean of the ranks' losses."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)
    )


def make(key: str, params: Any) -> zo.SAM:
    name, kwargs = OPTIMIZERS[key]
    return zo.create(name, params, base="sgd", lr=LR, momentum=MOMENTUM, **kwargs)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 12, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def shard(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    part = BATCH // WORLD
    return x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part]


def _counting_allreduce(state, bucket):  # no annotations: DDP checks them, strings fail
    """DDP's default all-reduce (mean), counting the buckets it reduces."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state[0] += 1
    return allreduce_hook(None, bucket)


def _worker(rank: int, rendezvous: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results: dict[str, Any] = {}
        for key, mode, micro in CONFIGS:
            model = nn.parallel.DistributedDataParallel(mlp())
            allreduces = [0]
            model.register_comm_hook(allreduces, _counting_allreduce)
            opt = make(key, model.parameters())
            epsilons: list[list[torch.Tensor]] = []
            second_step = opt.second_step

            def spy(*args: Any, _opt=opt, _next=second_step, _eps=epsilons, **kwargs: Any) -> None:
                # the weights are w + ε here; w is saved by the caller below
                _eps.append([p.detach().clone() for p in _opt.param_groups[0]["params"]])
                _next(*args, **kwargs)

            opt.second_step = spy
            step = SharpnessAwareStep(model, opt, F.cross_entropy, ddp=mode, micro_batches=micro)
            weights, counts = [], []
            for s in range(STEPS):
                w = [p.detach().clone() for p in model.parameters()]
                before = allreduces[0]
                step(*shard(s, rank))
                epsilons[-1] = [a - b for a, b in zip(epsilons[-1], w, strict=True)]
                counts.append(allreduces[0] - before)
                weights.append([p.detach().clone() for p in model.parameters()])
            results[f"{key}/{mode}/{micro}"] = {
                "eps": epsilons,
                "weights": weights,
                "allreduces": counts,
            }
        results["fsdp_error"] = _fsdp_error()
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _fsdp_error() -> str:
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    fully_shard(model)
    try:
        SharpnessAwareStep(model, make("zsharp", model.parameters()), F.cross_entropy)
    except ValueError as error:
        return str(error)
    return ""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Both ranks' results of every configuration (one spawn of 2 processes)."""
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(
        _worker, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD, join=True
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    loss = F.cross_entropy(model(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], exact: bool = False) -> None:
    for p, q in zip(a, b, strict=True):
        if exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("key", "micro"), SYNCED)
def test_synced_ascent_equals_one_process_on_the_global_batch(
    ranks: list[dict[str, Any]], key: str, micro: int
) -> None:
    results = [r[f"{key}/synced/{micro}"] for r in ranks]
    model = mlp()
    opt = make(key, model.parameters())
    for s in range(STEPS):
        x, y = global_batch(s)
        w = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        eps = [p.detach() - wi for p, wi in zip(model.parameters(), w, strict=True)]
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        for r in results:
            _close(r["eps"][s], eps)  # every rank perturbs by the global batch's ε
            _close(r["weights"][s], [p.detach() for p in model.parameters()])
    assert all(r["allreduces"] == [2] * STEPS for r in results)  # one per pass


@pytest.mark.parametrize(("key", "micro"), M_SHARPNESS)
def test_m_sharpness_gives_each_rank_its_own_epsilon(
    ranks: list[dict[str, Any]], key: str, micro: int
) -> None:
    results = [r[f"{key}/m-sharpness/{micro}"] for r in ranks]
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for s in range(STEPS):
        descent = []
        for rank, r in enumerate(results):
            x, y = shard(s, rank)
            local = copy.deepcopy(model)
            w = [p.detach().clone() for p in local.parameters()]
            local_opt = make(key, local.parameters())  # ε of SAM/ZSharp is stateless
            for p, g in zip(local.parameters(), _grads(local, x, y), strict=True):
                p.grad = g
            local_opt.first_step(zero_grad=True)
            eps = [p.detach() - wi for p, wi in zip(local.parameters(), w, strict=True)]
            _close(r["eps"][s], eps)  # rank r's ε from its own batch only
            descent.append(_grads(local, x, y))  # g'_r at w + ε_r
        for p, g0, g1 in zip(model.parameters(), *descent, strict=True):
            p.grad = (g0 + g1) / 2  # the one all-reduce: the mean of the ranks' g'
        base.step()
        assert not all(
            torch.equal(a, b)
            for a, b in zip(results[0]["eps"][s], results[1]["eps"][s], strict=True)
        )
        _close(results[0]["weights"][s], results[1]["weights"][s], exact=True)
        _close(results[0]["weights"][s], [p.detach() for p in model.parameters()])
    assert all(r["allreduces"] == [1] * STEPS for r in results)


def test_fsdp_is_refused_with_the_reason(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert "need whole parameter tensors" in r["fsdp_error"]
        assert "FSDP" in r["fsdp_error"]
