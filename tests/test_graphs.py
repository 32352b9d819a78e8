"""``zsharp.optim.graphs``: the CUDA-graphed step equals the eager step; what cannot be captured
is refused in one line.

On a CPU the graphed step runs with ``capture=False``: the same static buffers, kinds of
step (variants and shapes), warm-up, checks and dispatch-mode inspection, without a graph;
it must equal the eager step bitwise. The capture itself needs a CUDA device: those tests
are skipped here with the reason, and run where a GPU is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import zsharp.optim as zo
from tests.cases import EVERY_OPTIMIZER, SHARPNESS_AWARE
from zsharp.optim import SAM
from zsharp.optim.graphs import GraphedStep, check_graphable, graph_base_kwargs, tensor_lr_
from zsharp.optim.step import loss_passes, two_pass_step

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="CUDA graphs need a CUDA device; not measured on a GPU yet"
)

# key → (create() name, its own arguments): SGD and every sharpness-aware optimizer
OPTIMIZERS = {"sgd": EVERY_OPTIMIZER["sgd"], **SHARPNESS_AWARE}


def cnn(seed: int = 0) -> nn.Module:
    """A small CNN with BatchNorm (running statistics frozen in the second pass); its convs
    have no bias, as a ResNet's: a bias before BatchNorm has a zero gradient up to rounding,
    which Adam's normalised step turns into differences of the order of lr."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def batches(sizes: list[int], device: torch.device | str = "cpu") -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 3, 8, 8, generator=g).to(device),
            torch.randint(0, 5, (n,), generator=g).to(device),
        )
        for n in sizes
    ]


def build(
    model: nn.Module, key: str, base: str = "sgd", **extra: object
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer as a graphed cell builds it: capturable base, lr tensor after the
    scheduler (which changes the rate every step, so a frozen rate would show)."""
    name, own = OPTIMIZERS[key]
    device = next(model.parameters()).device
    kwargs = {"lr": 0.05, "weight_decay": 5e-4, **graph_base_kwargs(base, device), **own, **extra}
    if base == "sgd":
        kwargs["momentum"] = 0.9
    if name == "sgd":
        optimizer = zo.create("sgd", model.parameters(), **kwargs)
    else:
        optimizer = zo.create(name, zo.params_for(name, model), base=base, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    tensor_lr_(optimizer)
    return optimizer, scheduler


def trainer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor]]:
    """The trainer's step function (zsharp/train.py), without the GradScaler and the
    scheduler: the library's two_pass_step over one micro-batch."""

    def correct(logits: Tensor, y: Tensor) -> Tensor:
        return (logits.argmax(dim=1) == y).sum()

    def step(x: Tensor, y: Tensor, two_pass: bool) -> tuple[Tensor, Tensor]:
        passes = loss_passes(model, F.cross_entropy, x, y, measure=correct)
        result = two_pass_step(optimizer, model, passes, sharpness_aware=two_pass, keep_grads=False)
        return result.loss.float(), result.outputs[0]

    return step


def train(
    model: nn.Module,
    key: str,
    data: list[tuple[Tensor, Tensor]],
    *,
    interval: int = 1,
    graphed: bool,
    capture: bool = False,
    base: str = "sgd",
    warmup: int = 2,
) -> tuple[list[tuple[Tensor, ...]], torch.optim.Optimizer, GraphedStep | None]:
    optimizer, scheduler = build(model, key, base)
    body = trainer_step(model, optimizer)
    sam = isinstance(optimizer, SAM)
    graph = (
        GraphedStep(body, model=model, optimizer=optimizer, capture=capture, warmup=warmup)
        if graphed
        else None
    )
    outputs = []
    model.train()
    for x, y in data:
        two_pass = sam and scheduler.last_epoch % interval == 0
        out = graph(x, y, two_pass) if graph is not None else body(x, y, two_pass)
        scheduler.step()
        outputs.append(tuple(t.detach().clone() for t in out))
    return outputs, optimizer, graph


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    tensors = [t.detach() for t in model.state_dict().values()]
    for opt in (optimizer, getattr(optimizer, "base_optimizer", None)):
        if opt is not None:
            for state in opt.state.values():
                tensors += [v for v in state.values() if isinstance(v, Tensor)]
    return tensors


def assert_same_run(a: tuple, b: tuple, *, exact: bool = True) -> None:
    (out_a, opt_a, model_a), (out_b, opt_b, model_b) = a, b
    pairs = list(zip(state_tensors(model_a, opt_a), state_tensors(model_b, opt_b), strict=True))
    pairs += [(s, t) for o, p in zip(out_a, out_b, strict=True) for s, t in zip(o, p, strict=True)]
    for s, t in pairs:
        if exact:
            assert torch.equal(s, t), (s - t).abs().max()
        else:
            torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-6)


# --- the CPU path: same code, no capture -------------------------------------------------------


@pytest.mark.parametrize("key", list(OPTIMIZERS))
@pytest.mark.parametrize("interval", [1, 2])
def test_uncaptured_graph_path_equals_eager_bitwise(key: str, interval: int) -> None:
    # full batches and the short last batch of an epoch, twice: every kind of step warms
    # up, is "captured" and then runs on the static buffers
    data = batches([6, 6, 6, 6, 4, 6, 4, 4, 6])
    eager_model, graph_model = cnn(), cnn()
    eager_out, eager_opt, _ = train(eager_model, key, data, interval=interval, graphed=False)
    graph_out, graph_opt, graph = train(graph_model, key, data, interval=interval, graphed=True)
    assert graph is not None and graph.counts["replays"] > 0
    assert_same_run((eager_out, eager_opt, eager_model), (graph_out, graph_opt, graph_model))


def test_uncaptured_adam_base_and_resnet20_equal_eager() -> None:
    from zsharp.models import build_model

    data = batches([2, 2, 2])
    runs = []
    for graphed in (False, True):
        torch.manual_seed(3)
        model = build_model("resnet20", num_classes=5, image_size=8)
        out, opt, _ = train(model, "zsharp", data, graphed=graphed, base="adam", warmup=1)
        runs.append((out, opt, model))
    assert_same_run(*runs)


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_graph_ready_optimizer_is_the_default_one_to_float_tolerance(base: str) -> None:
    """What graphs change besides the capture: a fused base optimizer and a float32 lr
    tensor instead of foreach and a Python float (the default eager cell)."""
    data = batches([6, 6, 6, 6])
    runs = []
    for graph_ready in (False, True):
        model = cnn()
        # the paper's Adam: lr 1e-3, weight decay 5e-5
        kwargs = {"lr": 0.05, "weight_decay": 5e-4, "momentum": 0.9}
        if base == "adam":
            kwargs = {"lr": 1e-3, "weight_decay": 5e-5}
        if graph_ready:
            kwargs |= graph_base_kwargs(base, "cpu")
        optimizer = zo.create("zsharp", model.parameters(), base=base, **kwargs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        if graph_ready:
            tensor_lr_(optimizer)
        step = trainer_step(model, optimizer)
        outputs = []
        for x, y in data:
            outputs.append(step(x, y, True))
            scheduler.step()
        runs.append((outputs, optimizer, model))
    assert_same_run(*runs, exact=False)


def test_counts_follow_kinds_of_step() -> None:
    data = batches([6, 6, 6, 6, 4, 4, 4, 4, 6, 6])
    _, _, graph = train(cnn(), "zsharp", data, interval=2, graphed=True, warmup=1)
    assert graph is not None
    # kinds: (two-pass, 6), (one-pass, 6), (two-pass, 4), (one-pass, 4), alternating; each
    # runs eagerly once, is captured (and replayed at once) the next time, then replayed
    assert graph.graphs == 4
    assert graph.counts == {"eager": 4, "captures": 4, "replays": 6}


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")
def test_scheduler_rate_reaches_the_step_through_the_tensor() -> None:
    model = cnn()
    optimizer, scheduler = build(model, "sam")
    lr = optimizer.param_groups[0]["lr"]
    assert lr.dtype == torch.float32 and lr.dim() == 0
    assert optimizer.base_optimizer.param_groups[0]["lr"] is lr  # one tensor for both
    for step in range(1, 4):
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] is lr  # filled in place, never replaced
        assert float(lr) == pytest.approx(0.05 / (1 + step), rel=1e-7)


def test_load_state_dict_drops_the_graphs() -> None:
    data = batches([6, 6, 6, 6])
    model = cnn()
    _, optimizer, graph = train(model, "sam", data, graphed=True, warmup=1)
    assert graph is not None and graph.graphs == 1
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert graph.graphs == 0
    graph(*data[0], True)
    assert graph.counts["eager"] == 2  # warmed up again before a new capture


def test_a_hyperparameter_changed_after_capture_is_refused() -> None:
    data = batches([6, 6, 6])
    model = cnn()
    _, optimizer, graph = train(model, "sam", data, graphed=True, warmup=1)
    assert graph is not None
    optimizer.param_groups[0]["momentum"] = 0.5
    with pytest.raises(RuntimeError, match=r"'momentum' changed from 0\.9 to 0\.5"):
        graph(*data[0], True)


def test_a_replaced_lr_tensor_is_refused() -> None:
    data = batches([6, 6, 6])
    _, optimizer, graph = train(cnn(), "sgd", data, graphed=True, warmup=1)
    assert graph is not None
    optimizer.param_groups[0]["lr"] = torch.tensor(0.1)
    with pytest.raises(RuntimeError, match="lr tensor was replaced"):
        graph(*data[0], False)


# --- refusals ---------------------------------------------------------------------------------


def one_line(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith("graphs: ")
    return message


def test_capture_on_a_cpu_is_refused() -> None:
    model = cnn()
    optimizer, _ = build(model, "sam")
    with pytest.raises(ValueError, match="need a CUDA device") as excinfo:
        GraphedStep(trainer_step(model, optimizer), model=model, optimizer=optimizer, capture=True)
    one_line(excinfo)


@pytest.mark.parametrize(
    ("what", "match"),
    [
        ("grad_scaler", "GradScaler"),
        ("compiled", "torch.compile"),
        ("dropout", "Dropout, p=0.1"),
        ("float_lr", "lr is a Python number"),
        ("float64_lr", "0-d float32 tensor"),
        ("foreach_sgd", "SGD needs fused=True"),
        ("foreach_adam", "Adam needs fused=True"),
        ("warmup", "warmup must be"),
    ],
)
def test_refusals_are_one_line(what: str, match: str) -> None:
    model = cnn()
    if what == "dropout":
        model.insert(7, nn.Dropout(0.1))
    kwargs: dict[str, object] = {}
    optimizer, _ = build(model, "zsharp")
    if what == "grad_scaler":
        kwargs["grad_scaler"] = torch.amp.GradScaler("cpu")
    elif what == "compiled":
        kwargs["compiled"] = True
    elif what == "float_lr":
        optimizer.param_groups[0]["lr"] = 0.1
    elif what == "float64_lr":
        optimizer.param_groups[0]["lr"] = torch.tensor(0.1, dtype=torch.float64)
    elif what == "foreach_sgd":
        optimizer = zo.create("sam", model.parameters(), base="sgd", lr=0.1, momentum=0.9)
        tensor_lr_(optimizer)
    elif what == "foreach_adam":
        optimizer = zo.create("adam", model.parameters(), lr=1e-3)
        tensor_lr_(optimizer)
    elif what == "warmup":
        kwargs["warmup"] = 0
    with pytest.raises(ValueError, match=match) as excinfo:
        GraphedStep(
            trainer_step(model, optimizer),
            model=model,
            optimizer=optimizer,
            capture=False,
            **kwargs,
        )
    one_line(excinfo)


def test_the_vit_passes_with_dropout_zero_only() -> None:
    from zsharp.models import build_model

    model = build_model("vit", num_classes=5, image_size=8, patch_size=4)
    optimizer, _ = build(model, "zsharp")
    check_graphable(model, optimizer, capture=False)  # the paper's dropout 0: nothing drawn
    model = build_model("vit", num_classes=5, image_size=8, patch_size=4, dropout=0.1)
    optimizer, _ = build(model, "zsharp")
    with pytest.raises(ValueError, match=r"'encoder\.0\..*Dropout, p=0\.1") as excinfo:
        check_graphable(model, optimizer, capture=False)
    one_line(excinfo)
    check_graphable(model, optimizer, capture=False, allow_random=True)


def test_base_kwargs() -> None:
    assert graph_base_kwargs("sgd", "cuda") == {"fused": True}
    assert graph_base_kwargs("adamw", "cuda") == {"fused": True, "capturable": True}
    assert graph_base_kwargs(torch.optim.Adam, "cpu") == {"fused": True}
    with pytest.raises(ValueError, match="rmsprop"):
        graph_base_kwargs("rmsprop", "cuda")


# --- the run-time inspection: what a capture could not hold -----------------------------------


def inspected(step: Callable[[Tensor, Tensor], tuple[Tensor, ...]]) -> str:
    model = cnn()
    optimizer, _ = build(model, "sgd")
    graph = GraphedStep(step, model=model, optimizer=optimizer, capture=False, warmup=1)
    x, y = batches([4])[0]
    with pytest.raises(ValueError, match="the step cannot be captured") as excinfo:
        graph(x, y)
    return one_line(excinfo)


def test_inspection_finds_a_host_sync() -> None:
    def step(x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        loss = x.square().mean()
        if loss > 0:  # data-dependent control flow: bool(tensor)
            loss = loss * 2
        return (loss,)

    assert "host sync aten." in inspected(step)  # is_nonzero, or its _local_scalar_dense


def test_inspection_finds_an_item_and_a_boolean_mask() -> None:
    def step(x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        scale = x.abs().max().item()
        return (x[x > 0].sum() / scale,)

    message = inspected(step)
    assert "_local_scalar_dense" in message and "1 other kind" in message


def test_inspection_finds_a_random_draw() -> None:
    def step(x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        return (F.dropout(x, 0.5, training=True).sum(),)

    assert "random draw aten.bernoulli" in inspected(step)


# --- CUDA: the captured graph ---------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("key", ["sgd", "sam", "zsharp", "zsharp-official", "fsam"])
@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_captured_step_equals_eager_on_cuda(key: str, base: str) -> None:
    device = torch.device("cuda")
    data = batches([8, 8, 8, 8, 8, 5, 8, 8, 5, 8, 8, 8], device)
    runs = []
    for graphed in (False, True):
        model = cnn().to(device).to(memory_format=torch.channels_last)
        data_cl = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in data]
        out, opt, graph = train(
            model, key, data_cl, interval=2, graphed=graphed, capture=True, base=base
        )
        if graph is not None:
            assert graph.counts["replays"] > 0 and graph.graphs == 4 - 2 * (key == "sgd")
        runs.append((out, opt, model))
    # the same kernels on the same device; the tolerance covers non-deterministic
    # backward kernels (atomics), which differ between two eager runs too
    assert_same_run(*runs, exact=False)


@needs_cuda
def test_captured_step_follows_the_learning_rate_on_cuda() -> None:
    device = torch.device("cuda")
    model = cnn().to(device)
    optimizer, _ = build(model, "sam")
    graph = GraphedStep(
        trainer_step(model, optimizer), model=model, optimizer=optimizer, capture=True, warmup=1
    )
    x, y = batches([8], device)[0]
    graph(x, y, True)
    graph(x, y, True)  # captured and replayed
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.param_groups[0]["lr"].fill_(0.0)
    graph(x, y, True)
    torch.cuda.synchronize()
    # lr 0: SAM's weights are restored exactly and the descent step moves nothing
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
