"""Training: MAE pretraining (:mod:`.mim`), supervised training (:mod:`.classification`), scoring
(:mod:`.evaluation`).

Shared by both trainers: :mod:`.loop` (the :class:`~.loop.Trainer`: one epoch with accumulation, AMP, clipping,
EMA, step checkpoints, exact resume), :mod:`.distributed` (torchrun / DDP set-up), :mod:`.optim` (parameter
groups with layer-wise lr decay), :mod:`.schedule` (cosine with warm-up), :mod:`.ema`, :mod:`.mixup`, :mod:`.amp`,
:mod:`.state` (training-state files, RNG states), :mod:`.setup` (seeding, loaders, resume files), :mod:`.metrics`
(CSV files) and :mod:`.cli` (what the console scripts share); PNG outputs: :mod:`birder.plots`.
"""
