"""Stage 2, models: the denoiser network, noise schedules and losses, samplers, and loading a
finished model for sampling (``load_model``)."""

from meddiff._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "NetworkConfig": "networks", "build_network": "networks",
    "TrainedModel": "trained", "load_model": "trained",
})
