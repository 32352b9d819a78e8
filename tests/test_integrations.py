"""Lightning and Hugging Face integrations (``zsharp.integrations``), on the CPU.

Lightning: ZSharp trains a small BatchNorm CNN on scikit-learn's digits for two epochs,
lowers the loss, counts each batch once in the running statistics and steps the
scheduler. Hugging Face: a tiny BERT built from a config (nothing downloaded) trains with
``SharpnessAwareTrainer`` and gradient accumulation 2; one accumulated, clipped update
equals the two-pass step written by hand on the concatenated batch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import zsharp.optim as zo

L = pytest.importorskip("lightning")
transformers = pytest.importorskip("transformers")

from zsharp.integrations.huggingface import SharpnessAwareTrainer  # noqa: E402
from zsharp.integrations.lightning import SharpnessAwareMixin  # noqa: E402

# --- Lightning --------------------------------------------------------------------------------


def digits(batch_size: int = 64) -> torch.utils.data.DataLoader:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


class DigitsNet(SharpnessAwareMixin, L.LightningModule):
    """Conv, BatchNorm, pool, linear: 8×8 digits to 10 classes."""

    def __init__(self, optimizer: str = "zsharp") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )
        self.optimizer_name = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        opt = zo.create(self.optimizer_name, self.parameters(), base="sgd", lr=0.05, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def mean_loss(model: nn.Module, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), y, reduction="sum") for x, y in loader]
    return float(torch.stack(losses).sum()) / len(loader.dataset)


def lightning_trainer(**kwargs: Any) -> Any:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_lightning_trains_digits_with_zsharp() -> None:
    loader = digits()
    module = DigitsNet()
    before = mean_loss(module, loader)
    module.train()  # Lightning keeps the modes it finds
    passes: list[int] = []
    module.net.register_forward_pre_hook(lambda *_: passes.append(1))
    trainer = lightning_trainer(max_epochs=2)
    trainer.fit(module, loader)
    batches = 2 * len(loader)
    assert trainer.global_step == batches
    assert len(passes) == 2 * batches  # two passes per step
    bn = module.net[1]
    assert int(bn.num_batches_tracked) == batches  # each batch counted once
    assert mean_loss(module, loader) < 0.5 * before
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)


def test_lightning_bf16_interval_and_micro_batches() -> None:
    """bf16-mixed autocast, a two-pass step every 2nd step, batches split in 2."""
    loader = digits(batch_size=128)
    module = DigitsNet("sam")
    module.sharpness_interval, module.micro_batches, module.max_grad_norm = 2, 2, 1.0
    dtypes: list[torch.dtype] = []
    module.net[0].register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    trainer = lightning_trainer(max_steps=4, precision="bf16-mixed")
    trainer.fit(module, loader)
    assert trainer.global_step == 4
    # steps 0 and 2 take 2 passes, 1 and 3 one pass; each pass 2 micro-batches
    assert len(dtypes) == (2 + 1 + 2 + 1) * 2
    assert set(dtypes) == {torch.bfloat16}
    assert int(module.net[1].num_batches_tracked) == 4 * 2


class OverflowingDigitsNet(DigitsNet):
    """Its loss is +inf on call ``overflow_at`` (0: the first pass, 1: the second)."""

    def __init__(self, overflow_at: int) -> None:
        super().__init__()
        self.overflow_at, self.calls = overflow_at, 0

    def training_loss(self, batch: Any) -> torch.Tensor:
        loss = super().training_loss(batch)
        if self.calls == self.overflow_at:
            loss = loss * float("inf")
        self.calls += 1
        return loss


@pytest.mark.parametrize("overflow_at", [0, 1], ids=["first-pass", "second-pass"])
def test_lightning_fp16_scaler_skips_an_overflowing_step(overflow_at: int) -> None:
    """Lightning's 16-mixed plugin with its GradScaler (given one explicitly on the CPU)."""
    from lightning.pytorch.plugins import MixedPrecision

    module = OverflowingDigitsNet(overflow_at)
    before = [p.detach().clone() for p in module.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer = lightning_trainer(max_steps=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    trainer.fit(module, digits())
    assert trainer.global_step == 1
    assert scaler.get_scale() == 2.0**11
    assert all(torch.equal(p, w) for p, w in zip(module.parameters(), before, strict=True))


class CountingDigitsNet(DigitsNet):
    """Counts DDP's bucket all-reduces per step and saves its weights at the end."""

    def __init__(self, mode: str, out: str) -> None:
        super().__init__()
        self.ddp_semantics, self.out = mode, out

    def on_train_start(self) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.allreduces = [0]

        def counting(state, bucket):  # no annotations: DDP checks them, strings fail
            state[0] += 1
            return allreduce_hook(None, bucket)

        self.trainer.strategy.model.register_comm_hook(self.allreduces, counting)

    def on_train_end(self) -> None:
        weights = [p.detach() for p in self.parameters()]
        rank = self.trainer.global_rank
        torch.save({"weights": weights, "allreduces": self.allreduces[0]}, f"{self.out}/{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "per_step"), [("synced", 2), ("m-sharpness", 1)])
def test_lightning_ddp_semantics(tmp_path: Path, mode: str, per_step: int) -> None:
    """strategy="ddp_spawn" on 2 CPU processes: the all-reduces per step, equal weights."""
    torch.multiprocessing.set_sharing_strategy("file_system")  # fds do not pass here
    trainer = lightning_trainer(max_steps=3, strategy="ddp_spawn", devices=2)
    trainer.fit(CountingDigitsNet(mode, str(tmp_path)), digits())
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert all(r["allreduces"] == 3 * per_step for r in ranks)
    for p, q in zip(ranks[0]["weights"], ranks[1]["weights"], strict=True):
        assert torch.equal(p, q)


# --- Hugging Face -----------------------------------------------------------------------------


class Tokens(torch.utils.data.Dataset):
    """Sequences of 8 tokens; the label says whether the first token is below 25."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 50, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] < 25).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    # Its loss is a mean that ignores `num_items_in_batch`: without this the Trainer (plain
    # or not) would not divide it for accumulation, doubling the gradient at accumulation 2.
    model.accepts_loss_kwargs = False
    return model


def training_args(tmp_path: Path, **kwargs: Any) -> Any:
    defaults: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "learning_rate": 0.1,
        "lr_scheduler_type": "constant",
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    return transformers.TrainingArguments(**{**defaults, **kwargs})


@pytest.mark.parametrize("clip", [0.0, 0.1], ids=["no-clip", "clip"])
def test_hf_trainer_one_update_equals_the_hand_written_step(tmp_path: Path, clip: float) -> None:
    """16 samples = one update of 2 micro-batches of 8 (clipped or not): the full-batch step."""
    data = Tokens(16)
    model = tiny_bert()
    twin = copy.deepcopy(model)
    opt = zo.create("zsharp", model.parameters(), base="sgd", lr=0.1)
    args = training_args(tmp_path, max_steps=1, max_grad_norm=clip)
    trainer = SharpnessAwareTrainer(
        model=model, args=args, train_dataset=data, optimizers=(opt, None)
    )
    passes: list[int] = []
    model.register_forward_pre_hook(lambda *_: passes.append(1))
    trainer.train()
    assert len(passes) == 4  # 2 micro-batches × 2 passes

    twin.train()
    twin_opt = zo.create("zsharp", twin.parameters(), base="sgd", lr=0.1)
    batch = {"input_ids": data.ids, "labels": data.labels}
    twin(**batch).loss.backward()
    twin_opt.first_step(zero_grad=True)
    twin(**batch).loss.backward()
    if clip:
        assert torch.nn.utils.clip_grad_norm_(twin.parameters(), clip) > clip  # it clips
    twin_opt.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class OverflowingTrainer(SharpnessAwareTrainer):
    """Its loss is +inf on ``compute_loss`` call ``overflow_at`` (None: never)."""

    def __init__(self, *args: Any, overflow_at: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overflow_at, self.calls = overflow_at, 0

    def compute_loss(self, model: nn.Module, inputs: Any, **kwargs: Any) -> Any:
        loss = super().compute_loss(model, inputs, **kwargs)
        if self.calls == self.overflow_at:
            loss = loss * float("inf")
        self.calls += 1
        return loss


@pytest.mark.parametrize("overflow_at", [None, 1, 2], ids=["finite", "first-pass", "second-pass"])
def test_hf_trainer_grad_scaler(tmp_path: Path, overflow_at: int | None) -> None:
    """fp16's GradScaler path (Accelerate gives none on the CPU: one is set by hand).

    Two micro-batches: call 1 is the second micro-batch of the first pass, call 2 the
    first of the second pass. Finite: the scaled step equals the unscaled one (each pass
    unscaled once); an overflow skips the update and the scheduler step, halves the scale.
    """
    data = Tokens(16)
    model, twin = tiny_bert(), tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    opt = zo.create("zsharp", model.parameters(), base="sgd", lr=0.1)
    trainer = OverflowingTrainer(
        model=model, args=training_args(tmp_path, max_steps=1, max_grad_norm=1.0),
        train_dataset=data, optimizers=(opt, None), overflow_at=overflow_at,
    )  # fmt: skip
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer.train()
    scale = trainer.accelerator.scaler.get_scale()
    if overflow_at is not None:
        assert scale == 2.0**11 and trainer.accelerator.optimizer_step_was_skipped
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before, strict=True))
        return
    assert scale == 2.0**12
    twin_opt = zo.create("zsharp", twin.parameters(), base="sgd", lr=0.1)
    reference = SharpnessAwareTrainer(
        model=twin, args=training_args(tmp_path, max_steps=1, max_grad_norm=1.0),
        train_dataset=data, optimizers=(twin_opt, None),
    )  # fmt: skip
    reference.train()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_hf_trainer_trains_with_accumulation(tmp_path: Path) -> None:
    train, held_out = Tokens(64), Tokens(64, seed=1)
    model = tiny_bert()
    args = training_args(
        tmp_path, num_train_epochs=8, max_grad_norm=1.0, learning_rate=3e-3, bf16=True
    )
    trainer = SharpnessAwareTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        zsharp_optimizer="zsharp",
        zsharp_kwargs={"base": "adamw", "rho": 0.05},
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.state.global_step == 8 * 4  # 64 samples / (8 × 2) per update
    assert isinstance(trainer.stepping_optimizer, zo.SAM)
    assert trainer.evaluate(train)["eval_loss"] < 0.5 * before
    assert trainer.evaluate()["eval_loss"] < before


def test_hf_trainer_interval(tmp_path: Path) -> None:
    model = tiny_bert()
    passes: list[int] = []
    model.register_forward_pre_hook(lambda *_: passes.append(1))
    opt = zo.create("sam", model.parameters(), base="sgd", lr=0.01)
    args = training_args(tmp_path, max_steps=4)
    trainer = SharpnessAwareTrainer(
        model=model, args=args, train_dataset=Tokens(64), optimizers=(opt, None),
        sharpness_interval=2,
    )  # fmt: skip
    trainer.train()
    assert len(passes) == (2 + 1 + 2 + 1) * 2
