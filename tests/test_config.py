"""The configuration layer: one registry per axis, one rule per setting, one cell document.

What is checked here is that the rules are *used*, not copied: the schema's names are the
registries', the schema and the Python checks accept the same values (they are made from the
same Arg), a cell's JSON document round-trips through the command line, and a plugin that
registers a new optimizer, model and dataset needs nothing else to reach ``create``, the
config validation, ``zsharp train`` and ``snakemake -n``.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import zsharp.optim as zo
from tests.workflow_helpers import REPO, environment, snakemake, tiny_config, write_config
from zsharp.data.registry import DATASETS
from zsharp.models.registry import MODELS
from zsharp.optim import create
from zsharp.optim.args import ArgError
from zsharp.optim.registry import OPTIMIZERS, get_optimizer
from zsharp.optim.step import SharpnessAwareStep
from zsharp.pipeline.cell.config import SETTINGS, ConfigError, cell_config, from_dict
from zsharp.pipeline.cli import build_parser, cell_from_arguments
from zsharp.pipeline.grid.expand import cell_settings, load_grid
from zsharp.pipeline.grid.schema import _Validator, check_schema, schema

SCHEMA = schema()
PLUGIN_ENV = {"ZSHARP_PLUGINS": "tests.toy_plugin", "PYTHONPATH": str(REPO)}


def test_schema_names_are_the_registries() -> None:
    props = SCHEMA["properties"]
    assert props["datasets"]["propertyNames"]["enum"] == list(DATASETS)
    assert props["models"]["propertyNames"]["anyOf"][0]["enum"] == list(MODELS)
    entry = SCHEMA["$defs"]["optimizer_entry"]["oneOf"][1]
    assert entry["properties"]["optimizer"]["enum"] == list(OPTIMIZERS)
    settings = set(SCHEMA["$defs"]["settings_keys"]["properties"])
    assert settings == {a.name for a in SETTINGS} | {"opt_args", "model_args"}


# values that exercise each kind of rule: in range, at and past the bounds, wrong types
PROBES: list[Any] = [
    0, 1, -1, 2, 0.5, 1.0, 99.9, 100, 1e9, 2**32, "1e-3", "abc", True, None, [0.9, 0.99],
    "cosine", "linear", "sgd", "adam", "paper", "official", "A", "B", math.inf, math.nan,
]  # fmt: skip
ALL_ARGS = [*SETTINGS, *(a for info in OPTIMIZERS.values() for a in info.args)]


@pytest.mark.parametrize("arg", ALL_ARGS, ids=[f"{a.name}-{i}" for i, a in enumerate(ALL_ARGS)])
def test_schema_and_python_accept_the_same_values(arg) -> None:
    """One Arg makes both the schema fragment and the check: they agree on every probe."""
    validator = _Validator(arg.schema())
    for value in PROBES:
        try:
            arg.check(value)
            python = True
        except ArgError:
            python = False
        # JSON has no NaN or infinity: the schema never sees them from a YAML config
        if isinstance(value, float) and not math.isfinite(value):
            assert not python, (arg.name, value)
            continue
        assert validator.is_valid(value) == python, (arg.name, value)


@pytest.mark.parametrize("name", [n for n, i in OPTIMIZERS.items() if not i.is_base])
def test_each_sharpness_aware_optimizer_takes_its_registry_arguments(name: str) -> None:
    info = get_optimizer(name)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    params = zo.params_for(name, net)
    optimizer = create(name, params, lr=0.1)
    group = optimizer.param_groups[0]
    for arg in info.args:  # the registry's defaults are what runs: in the param groups, or
        # the optimizer's own (LookSAM's k, WSAM's γ) or its filter's (the variant)
        if arg.name in group:
            value = group[arg.name]
        elif hasattr(optimizer, arg.name):
            value = getattr(optimizer, arg.name)
        else:
            value = getattr(optimizer.zfilter, arg.name)
        if arg.default is None:  # "none": resolved to its documented stand-in, never left None
            assert value is not None or arg.name == "max_norm", arg.name
            continue
        assert value == arg.default, arg.name
    for key, value in info.fixed.items():
        assert optimizer.param_groups[0][key] == value
    others = {a.name for i in OPTIMIZERS.values() if not i.is_base for a in i.args}
    for key in others - info.arg_names:
        with pytest.raises(ValueError, match=key):
            create(name, zo.params_for(name, net), **{key: 0.5})


@pytest.mark.parametrize("name", [n for n, i in OPTIMIZERS.items() if i.is_base])
def test_base_optimizer_arguments_exist_in_torch_with_those_defaults(name: str) -> None:
    """The registry's base-optimizer arguments against torch.optim's own signatures."""
    parameters = inspect.signature(get_optimizer(name).load()).parameters
    for arg in get_optimizer(name).args:
        default = parameters[arg.name].default
        assert (tuple(default) if isinstance(default, tuple) else default) == arg.default


@pytest.mark.parametrize("path", ["config/config.yaml", "config/paper.yaml", "config/sgd.yaml"])
def test_every_cell_document_round_trips_through_the_command_line(path: str) -> None:
    grid = load_grid(yaml.safe_load((REPO / path).read_text()))
    parser = build_parser()
    for cell in grid.cells:
        args = parser.parse_args(["train", "--config", cell.config_json(), "--out", "x"])
        again = cell_from_arguments(args)
        assert again.to_dict() == cell.config.to_dict(), cell.key
        assert again.digest() == cell.config.digest()


def test_flags_override_the_document_and_build_the_same_cell() -> None:
    parser = build_parser()
    by_flags = cell_from_arguments(parser.parse_args([
        "train", "--dataset", "digits", "--model", "resnet20", "--optimizer", "zsharp",
        "--lr", "1e-3", "--opt", "percentile=90", "--opt", "rho=5e-2", "--out", "x",
    ]))  # fmt: skip
    document = {"dataset": "digits", "model": "resnet20", "optimizer": "zsharp", "lr": 0.5,
                "opt_args": {"percentile": 90.0, "rho": 0.05}}  # fmt: skip
    by_document = cell_from_arguments(
        parser.parse_args(
            ["train", "--config", json.dumps(document), "--lr", "0.001", "--out", "x"]
        )
    )
    assert by_flags.to_dict() == by_document.to_dict()
    assert by_flags.lr == 1e-3 and by_flags.opt_args["percentile"] == 90.0


def test_settings_merge_in_documented_order() -> None:
    config = check_schema(
        tiny_config(
            train={"epochs": 2, "lr": 0.1, "opt_args": {"rho": 0.2}},
            datasets={"digits": {"epochs": 3}},
            models={"resnet20": {"lr": 0.3}},
            optimizers={"zsharp": {"lr": 0.4, "opt_args": {"percentile": 90.0}}},
            overrides=[
                {
                    "when": {"optimizer": "zsharp", "dataset": "digits"},
                    "set": {"epochs": 5, "opt_args": {"rho": 0.5}},
                },
                {"when": {"model": "resnet20", "optimizer": "sgd"}, "set": {"epochs": 99}},
            ],
        ),
        SCHEMA,
    )
    optimizer, settings, source = cell_settings(config, "digits", "resnet20", "zsharp")
    assert optimizer == "zsharp"
    assert settings["epochs"] == 5 and settings["lr"] == 0.4
    assert settings["opt_args"] == {"rho": 0.5, "percentile": 90.0}
    assert source["epochs"] == "overrides.0.set.epochs"
    assert source["opt_args.percentile"] == "optimizers.zsharp.opt_args.percentile"


def test_a_dataset_recipe_comes_from_its_registry_entry() -> None:
    cfg = cell_config("digits", "resnet20", "sgd", deep=False)
    for key, value in DATASETS["digits"].defaults.items():
        assert getattr(cfg, key) == value, key


def test_deep_validation_builds_the_optimizer_and_the_model() -> None:
    # the rules pass, but timm does not know the model: only building it tells
    cell_config("digits", "timm:no_such_model_xyz", "sgd", deep=False)
    with pytest.raises(ConfigError, match="model_args"):
        cell_config("digits", "timm:no_such_model_xyz", "sgd")
    cell_config("digits", "vit", "sgd", model_args={"patch_size": 2})


def test_from_dict_names_a_missing_key() -> None:
    with pytest.raises(ConfigError, match=r"^model: required"):
        from_dict({"dataset": "digits", "optimizer": "sgd"})


# --- one registration, nothing else touched ---------------------------------------------------


@pytest.fixture
def toy_registered():
    """The toy plugin registered in this process; the registries restored afterwards."""
    saved = (dict(OPTIMIZERS), dict(MODELS), dict(DATASETS))
    sys.modules.pop("tests.toy_plugin", None)
    import tests.toy_plugin  # noqa: F401  (registers on import)

    yield
    for registry, before in zip((OPTIMIZERS, MODELS, DATASETS), saved, strict=True):
        registry.clear()
        registry.update(before)
    sys.modules.pop("tests.toy_plugin", None)


def toy_grid() -> dict[str, Any]:
    return tiny_config(
        experiment="toy",
        datasets={"toy-blobs": {}},
        models={"toy-mlp": {"model_args": {"width": 4}}},
        optimizers={
            "half-sam": {"opt_args": {"share": 0.25, "rho": 0.1}},
            "ortho-sam": {"opt_args": {"alpha": 0.5}},
            "sgd": {},
        },
        train={"epochs": 1},
    )


def test_a_plugin_reaches_create_and_the_config_validation(toy_registered) -> None:
    model = MODELS["toy-mlp"].load()(3, 4, 1, width=4)
    optimizer = create("half-sam", model.parameters(), lr=0.1, share=0.25)
    assert type(optimizer).__name__ == "HalfSAM" and optimizer.share == 0.25
    grid = load_grid(toy_grid())
    cell = grid.cell("toy-blobs", "toy-mlp", "half-sam", 0).config
    assert cell.opt_args["share"] == 0.25 and cell.epochs == 1
    assert cell.batch_size == 8  # the toy dataset's recipe: its registry entry
    bad = copy.deepcopy(toy_grid())
    bad["optimizers"]["half-sam"]["opt_args"]["share"] = 2
    with pytest.raises(ValueError, match=r"^optimizers\.half-sam\.opt_args\.share"):
        load_grid(bad)
    bad = copy.deepcopy(toy_grid())
    bad["models"]["toy-mlp"]["model_args"]["depth"] = 2
    with pytest.raises(ValueError, match=r"^models\.toy-mlp\.model_args\.depth"):
        load_grid(bad)


def float64_ortho_sam(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], rho: float,
    alpha: float, lr: float,
) -> list[torch.Tensor]:  # fmt: skip
    """OrthoSAM + SGD written from its docstring's equation, in float64, without zsharp:
    ε = ρ g/(‖g‖ + 1e-12), g' = ∇L(w + ε), d_ℓ = g'_ℓ − α (g_ℓ − ⟨g_ℓ, g'_ℓ⟩/(‖g'_ℓ‖² + 1e-12)
    g'_ℓ), w ← w − lr d."""
    m = copy.deepcopy(model).double()
    params = list(m.parameters())

    def grad(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        loss = torch.nn.functional.cross_entropy(m(x.double()), y)
        return list(torch.autograd.grad(loss, params))

    for x, y in batches:
        w = [p.detach().clone() for p in params]
        g = grad(x, y)
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        with torch.no_grad():
            for p, t in zip(params, g, strict=True):
                p.add_(rho * t / (norm + 1e-12))
        g2 = grad(x, y)
        with torch.no_grad():
            for p, w0, a, b in zip(params, w, g, g2, strict=True):
                d = b - alpha * (a - (a * b).sum() / ((b * b).sum() + 1e-12) * b)
                p.copy_(w0 - lr * d)
    return [p.detach() for p in params]


def test_a_descent_variant_is_one_module(toy_registered) -> None:
    """The toy descent variant (only its _descent hook) built by name, three steps of it
    through SharpnessAwareStep equal to a float64 transcription of its equation."""
    torch.manual_seed(0)
    model = MODELS["toy-mlp"].load()(3, 4, 1, width=6).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(10, 1, 4, 4, generator=g), torch.randint(0, 3, (10,), generator=g))
               for _ in range(3)]  # fmt: skip
    start = copy.deepcopy(model)
    expected = float64_ortho_sam(model, batches, rho=0.1, alpha=0.7, lr=0.2)
    optimizer = create("ortho-sam", model.parameters(), lr=0.2, rho=0.1, alpha=0.7)
    step = SharpnessAwareStep(model, optimizer, torch.nn.functional.cross_entropy)
    for x, y in batches:
        step(x.double(), y)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)
    # with α = 0 the same equation is SAM's, and far from α = 0.7's weights
    sam = float64_ortho_sam(start, batches, rho=0.1, alpha=0.0, lr=0.2)
    assert max(float((a - b).abs().max()) for a, b in zip(sam, expected, strict=True)) > 1e-4


def test_a_plugin_trains_through_the_command_line(tmp_path: Path) -> None:
    env = environment(WANDB_MODE="disabled", **PLUGIN_ENV)
    command = [
        sys.executable, "-m", "zsharp", "train", "--dataset", "toy-blobs", "--model",
        "toy-mlp", "--optimizer", "half-sam", "--opt", "share=0.25", "--model-arg", "width=4",
        "--out", str(tmp_path / "cell"), "--data-root", str(tmp_path / "data"), "--threads", "1",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "cell" / "summary.json").read_text())
    assert summary["config"]["opt_args"]["share"] == 0.25
    assert summary["label"] == "half-sam" and summary["status"] == "ok"
    assert (tmp_path / "data" / "toy-blobs" / "READY").exists()
    # the descent variant, through the same command line
    ortho = [*command[:9], "ortho-sam", "--opt", "alpha=0.7", *command[12:]]
    ortho[ortho.index("--out") + 1] = str(tmp_path / "ortho")
    result = subprocess.run(ortho, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "ortho" / "summary.json").read_text())
    assert summary["config"]["opt_args"]["alpha"] == 0.7 and summary["status"] == "ok"
    # without the plugin the same command is refused in one line, before any work
    without = {k: v for k, v in env.items() if k != "ZSHARP_PLUGINS"}
    result = subprocess.run(command, env=without, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_a_plugin_is_named_in_a_snakemake_grid(tmp_path: Path) -> None:
    path = write_config(tmp_path, toy_grid())
    result = snakemake(tmp_path, "-n", "--cores", "1", config=path, extra_env=PLUGIN_ENV)
    assert "toy-blobs/toy-mlp/half-sam/seed0" in result.stdout
    assert "toy-blobs/toy-mlp/ortho-sam/seed0" in result.stdout
    assert "toy-blobs/toy-mlp/sgd/seed0" in result.stdout


def test_the_optimizer_library_imports_only_torch_and_numpy() -> None:
    """`import zsharp.optim` and a step pull in no module of zsharp outside zsharp.optim,
    and no third-party package that importing torch does not already bring (numpy aside)."""
    probe = (
        "import sys, torch; before = {m.split('.')[0] for m in sys.modules}\n"
        "import zsharp.optim as zo\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))\n"
        "p = [next(m.parameters())]\n"
        "for name in zo.OPTIMIZERS:\n"
        "    o = zo.create(name, zo.params_for(name, m), lr=0.1)\n"
        "    p[0].grad = torch.randn(4, 4)\n"
        "    o.step(lambda: (p[0] ** 2).sum().backward()) if hasattr(o, 'first_step') "
        "else o.step()\n"
        "zo.zscore_mask(torch.randn(8, 8)); zo.disable_running_stats\n"
        "mods = sorted(m for m in sys.modules if m.startswith('zsharp'))\n"
        "new = sorted({m.split('.')[0] for m in sys.modules} - before "
        "- set(sys.stdlib_module_names))\n"
        "print(mods); print([m for m in new if not m.startswith('_')])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ZSHARP_PLUGINS"}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr
    modules, new = (eval(line) for line in out.stdout.strip().splitlines()[-2:])
    assert modules and all(m == "zsharp" or m.startswith("zsharp.optim") for m in modules)
    assert set(new) <= {"zsharp"} | _modules_of_requirements("torch", "numpy"), new


def _modules_of_requirements(*names: str) -> set[str]:
    """The top-level modules of these distributions and everything they require (torch
    imports some of its own requirements lazily, e.g. sympy when an optimizer is built)."""
    import re
    from importlib import metadata

    seen: set[str] = set()
    todo = [n.lower() for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            if "extra ==" not in requirement:
                todo.append(re.split(r"[ ;<>=!~\[]", requirement, maxsplit=1)[0].lower())
    normal = {n.replace("_", "-") for n in seen}
    return {
        module
        for module, dists in metadata.packages_distributions().items()
        if any(d.lower().replace("_", "-") in normal for d in dists)
    }


def test_the_registries_read_without_torch() -> None:
    probe = (
        "import sys\nimport zsharp.pipeline.grid.expand, zsharp.optim, zsharp.models, zsharp.data\n"
        "zsharp.pipeline.grid.expand.load_grid(__import__('yaml').safe_load(open('config/paper.yaml')))\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- sweeps --------------------------------------------------------------------------------


def test_a_sweep_expands_into_one_labelled_entry_per_combination() -> None:
    config = tiny_config(
        optimizers={
            "sam": {},
            "zsharp": {"opt_args": {"rho": 0.05}, "sweep": {"percentile": [0, 90, 99.9]}},
            "sgd": {"sweep": {"lr": ["1e-2", 0.1], "momentum": [0.0, 0.9]}},
        }
    )
    grid = load_grid(config)
    labels = list(dict.fromkeys(c.label for c in grid.cells))
    assert labels == [
        "sam", "zsharp-p0", "zsharp-p90", "zsharp-p99.9",
        "sgd-lr0.01-momentum0", "sgd-lr0.01-momentum0.9", "sgd-lr0.1-momentum0",
        "sgd-lr0.1-momentum0.9",
    ]  # fmt: skip
    p90 = grid.cell("digits", "resnet20", "zsharp-p90", 0).config
    assert p90.optimizer == "zsharp" and p90.opt_args["percentile"] == 90.0
    assert p90.opt_args["rho"] == 0.05  # the entry's own settings stay
    assert grid.cell("digits", "resnet20", "sgd-lr0.01-momentum0.9", 0).config.lr == 0.01
    assert grid.sweeps["zsharp-p90"].family == "zsharp"
    assert grid.sweeps["zsharp-p90"].values == {"percentile": 90}
    # adding a value adds entries; every other cell keeps its label and configuration
    config["optimizers"]["zsharp"]["sweep"]["percentile"].append(95)
    more = load_grid(config)
    before = {c.key: c.config_json() for c in grid.cells}
    after = {c.key: c.config_json() for c in more.cells}
    assert set(after) - set(before) == {"digits/resnet20/zsharp-p95/seed0"}
    assert all(after[key] == value for key, value in before.items())


@pytest.mark.parametrize(
    ("sweep", "key"),
    [({"percentile": [100]}, "optimizers.zsharp.sweep.percentile"),
     ({"rho": ["big"]}, "optimizers.zsharp.sweep.rho"),
     ({"percentile": []}, "optimizers.zsharp.sweep.percentile"),
     ({"sigma": [1.0]}, "optimizers.zsharp.sweep.sigma")],
)  # fmt: skip
def test_a_bad_swept_value_names_the_sweep(sweep: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(key)}"):
        load_grid(tiny_config(optimizers={"zsharp": {"sweep": sweep}}))
