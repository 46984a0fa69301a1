"""Training: MAE pretraining (:mod:`.mim`), supervised training (:mod:`.classification`), scoring
(:mod:`.evaluation`).

Shared by both trainers: :mod:`.loop` (the :class:`~.loop.Trainer`: one epoch with accumulation, AMP, clipping,
EMA, step checkpoints, exact resume), :mod:`.ddp` (DDP wrapping and rank-aware logging; devices and collectives
live in :mod:`birder.distributed`), :mod:`.fsdp` (``--fsdp`` sharding, sharded states, activation
checkpointing), :mod:`.optim` (parameter groups with layer-wise lr decay, from the network's own training hooks),
:mod:`.schedule` (cosine with warm-up), :mod:`.ema`, :mod:`.mixup`, :mod:`.amp`, :mod:`.state` (training-state
files, RNG states), :mod:`.setup` (seeding, loaders, resume files), :mod:`.metrics` (CSV files) and :mod:`.cli`
(what the console scripts share); PNG outputs: :mod:`birder.plots`.
"""
