"""Stage 3, train: diffusion models from dataset shards (one conditional model or one per class),
with resumable checkpoints, records and DDP. ``python -m meddiff.train`` is ``meddiff train``."""

from meddiff._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "TrainConfig": "config", "TrainResult": "config", "RunPlan": "config", "plan_run": "config",
    "train": "loop", "train_part": "loop", "finish_group": "cards",
    "PRESETS": "presets", "get_preset": "presets",
})
