"""Optional integrations of ``zsharp.optim`` with training frameworks.

``zsharp.integrations.lightning``
    :class:`~zsharp.integrations.lightning.SharpnessAwareMixin` for a LightningModule
    (``pip install "zsharp-sam[lightning]"``).
``zsharp.integrations.huggingface``
    :class:`~zsharp.integrations.huggingface.SharpnessAwareTrainer`, a ``transformers``
    Trainer (``pip install "zsharp-sam[transformers]"``).

Each module imports its framework; importing this package imports neither. Both run the
step of :func:`zsharp.optim.step.two_pass_step`, so BatchNorm, accumulation, DDP
semantics, clipping, AMP and ``interval`` behave as in
:class:`~zsharp.optim.step.SharpnessAwareStep`.
"""
