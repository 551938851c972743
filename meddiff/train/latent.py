"""Latent diffusion in training: which autoencoder a denoiser trains on (checked against the dataset),
its training batches as scaled latents, and decoded preview images."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from meddiff import storage
from meddiff.data.shards import DatasetVersion
from meddiff.errors import MeddiffError
from meddiff.models.autoencoders import TrainedAutoencoder, load_autoencoder


def autoencoder_ref(ae_uri: str, ds: DatasetVersion) -> dict[str, Any]:
    """What a latent denoiser records about its autoencoder; raises when the AE does not fit ``ds``
    (checked on its card first, then its weights are loaded and verified)."""
    from meddiff.data.shards import read_card

    card = read_card(ae_uri.rstrip("/"), "model.json") if storage.exists(ae_uri) else {}
    if card.get("kind") == "autoencoder":
        ae_ds = card.get("dataset") or {}
        if ae_ds.get("name") != ds.card.get("name"):
            raise MeddiffError(f"autoencoder {ae_uri} was trained on dataset {ae_ds.get('name')!r}, not "
                               f"{ds.card.get('name')!r}; train one on this dataset with 'meddiff train-autoencoder'")
        if card.get("image_size") != ds.image_size or card.get("channels") != ds.channels:
            raise MeddiffError(f"autoencoder {ae_uri} takes {card.get('channels')}-channel {card.get('image_size')} px "
                               f"images, but {ds.uri} has {ds.channels}-channel {ds.image_size} px images; train one "
                               "at this size")
    ae = load_autoencoder(ae_uri)  # missing / corrupt / not an autoencoder → ArtifactError
    return {"uri": ae.uri, "sha256": ae.sha256, "scale_factor": ae.scale_factor,
            "latent_shape": list(ae.latent), "kind": ae.card["ae_kind"], "factor": int(ae.card["factor"])}


def open_autoencoder(ref: dict[str, Any], device: torch.device) -> TrainedAutoencoder:
    """The recorded autoencoder, verified against the recorded sha256."""
    return load_autoencoder(ref["uri"], device, expected_sha256=ref["sha256"])


def latent_data(plan, data: Iterator[tuple[torch.Tensor, torch.Tensor]], class_id: int | None, batch_size: int,
                start_step: int, rank: int, world: int, device: torch.device
                ) -> tuple[TrainedAutoencoder, Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """The autoencoder and the training batches as scaled latents: read from latent shards made by this
    autoencoder (``meddiff encode``) when they exist, else ``data`` encoded on the fly."""
    from meddiff.train.latent_shards import find_latents, latent_shard_batches, load_latents

    ae = open_autoencoder(plan.autoencoder, device)
    uri = find_latents(plan.dataset, plan.autoencoder)
    if uri is None:
        return ae, latent_batches(data, ae, device)
    z, y = load_latents(uri, "train", ae)
    return ae, latent_shard_batches(z, y, class_id, batch_size, plan.cfg.seed, start_step, rank, world)


def latent_batches(data: Iterator[tuple[torch.Tensor, torch.Tensor]], ae: TrainedAutoencoder,
                   device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Encode on the fly: x (B, C, H, W) in [-1, 1] → z = scale · E(x) (B, C_lat, h, w), labels unchanged."""
    for x, y in data:
        yield ae.to_latent(x.to(device)), y


def size_divisible(ref: dict[str, Any], levels: int) -> int:
    """What an image side must divide by for both nets without padding (MONAI 2d_ldm: 2^(L_ae + L_unet − 2))."""
    return ref["factor"] * 2 ** (levels - 1)
