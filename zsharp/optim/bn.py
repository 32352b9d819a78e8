"""BatchNorm in a two-pass step: update running statistics on the first pass only.

SAM's second forward pass runs at w + ε, on the same batch. If BatchNorm updated its
running mean and variance there too, each step would count the batch twice, once at
weights the model never takes. Inside :func:`disable_running_stats` batch-norm layers in
training mode still normalise with the batch's statistics (the gradient is the same), but
leave ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def disable_running_stats(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the block with every BatchNorm of ``model`` not updating its running stats.

    Use it around the second forward pass::

        loss_fn(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        with disable_running_stats(model):
            loss_fn(model(x), y).backward()
        optimizer.second_step(zero_grad=True)

    ``enabled=False`` makes it a no-op (handy inside a closure: ``enabled=opt.perturbed``).
    It works by clearing ``track_running_stats`` for the block, which makes
    ``nn.BatchNorm*`` (and SyncBatchNorm) use batch statistics without updating the
    buffers; evaluation mode is unaffected.
    """
    layers = (
        [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        if enabled
        else []
    )
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True
