"""A finished model, ready for sampling: ``load_model(uri, device)`` → ``TrainedModel`` (EMA weights,
verified against the sha256 in the model card), and the checkpoint reader it shares with training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from meddiff import storage
from meddiff.data.shards import read_card
from meddiff.devices import resolve_device
from meddiff.errors import ArtifactError
from meddiff.models.networks import NetworkConfig, build_network
from meddiff.records import sha256_file

CHECKPOINT_FORMAT = 1


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a truncated or foreign file becomes a clear ArtifactError."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip/pickle/EOF errors all mean "corrupt"
        raise ArtifactError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}); "
                            f"delete it to resume from the previous one, or re-run with --no-resume") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "ema" not in state:
        raise ArtifactError(f"checkpoint {path} is not a meddiff training checkpoint")
    return state


def ema_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The EMA network's weights from an ``AveragedModel`` state dict (drops ``n_averaged``)."""
    return {k[len("module."):]: v for k, v in checkpoint["ema"].items() if k.startswith("module.")}


@dataclass
class TrainedModel:
    """A finished model, ready for sampling.

    Network call: ``networks[k](x, timesteps=t, class_labels=y)``, x: (B, C, H, W) in [-1, 1]
    (shard images [0, 1] map to 2x-1), t: (B,) timesteps in [0, T), y: (B,) long class ids
    (``null_class`` = unconditional, for classifier-free guidance) for the conditional net,
    None for per-class nets. Output (B, C, H, W), in the convention of the MONAI scheduler
    rebuilt by ``meddiff.models.diffusion.build_scheduler(scheduler_config)`` so its ``.step()`` applies:

    * objective ``ddpm``, prediction_type ``epsilon``: the noise ε;
      ``v_prediction``: v = sqrt(ᾱ_t) ε − sqrt(1−ᾱ_t) x_0 (use DDPMScheduler or DDIMScheduler
      with the same ``schedule``/``prediction_type``);
    * objective ``rflow``: the velocity x_0 − ε for x_t = (1 − t/T) x_0 + (t/T) ε (t may be a
      float); ``RFlowScheduler.step`` integrates from t = T (noise) to 0.
    """

    uri: str
    card: dict
    mode: Literal["conditional", "per-class"]
    class_names: list[str]
    channels: int
    image_size: int
    objective: Literal["ddpm", "rflow"]
    scheduler_config: dict  # meddiff.models.diffusion.build_scheduler(scheduler_config) rebuilds the training schedule
    networks: dict[int | None, torch.nn.Module]  # EMA weights, eval(), on device
    checkpoint_sha256: dict[str, str]  # "model" (conditional) or class name (per-class) → sha256
    null_class: int | None  # conditional: reserved null label (= num_classes); per-class: None
    autoencoder: Any = None  # latent diffusion: the TrainedAutoencoder the networks' outputs decode through

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """What the networks denoise: (C_lat, h, w) latents, or (C, H, W) images."""
        if self.autoencoder is not None:
            return tuple(self.card["latent"]["latent_shape"])
        return (self.channels, self.image_size, self.image_size)


def load_network(run_uri: str, part: dict[str, Any], device: str) -> tuple[torch.nn.Module, str]:
    """EMA network of one run folder, verified against the sha256 in its card."""
    ckpt_uri = storage.join(run_uri, part["checkpoint"])
    if not storage.exists(ckpt_uri):
        raise ArtifactError(f"{run_uri} is incomplete: checkpoint {part['checkpoint']} is missing")
    path = storage.fetch_local(ckpt_uri)
    digest = sha256_file(path)
    if digest != part["checkpoint_sha256"]:
        raise ArtifactError(f"checkpoint {ckpt_uri} is corrupt: sha256 {digest[:12]}… does not match the "
                            f"model card ({part['checkpoint_sha256'][:12]}…)")
    state = load_checkpoint(path)
    latent = part.get("latent")
    net = build_network(NetworkConfig(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in part["network"].items()}),
                        latent["latent_shape"][0] if latent else part["channels"], part["num_class_embeds"],
                        part.get("conditioning", "embedding"))
    try:
        net.load_state_dict(ema_state_dict(state))
    except RuntimeError as e:  # shapes/keys of another network: torch's message is pages long
        first = str(e).splitlines()[0][:200]
        raise ArtifactError(f"checkpoint {ckpt_uri} does not fit the network in {run_uri}/model.json ({first}); "
                            "the card or the checkpoint was replaced: re-train or restore the run folder") from None
    return net.to(device).eval().requires_grad_(False), digest


def trained_on(card: dict[str, Any], anchor: str) -> str | None:
    """The dataset version a model learned from, as its ``card`` (model.json) names it, followed to the storage
    root ``anchor`` sits in when that root was moved (storage.relocated); None when the card names none."""
    recorded = (card.get("dataset") or {}).get("uri")
    return recorded and (storage.relocated(recorded, anchor, "dataset.json") or recorded)  # (gone: open_dataset says)


def dataset_of(model: TrainedModel) -> str:
    """:func:`trained_on` for a loaded model, or an ArtifactError asking for the dataset."""
    uri = trained_on(model.card, model.uri)
    if not uri:
        raise ArtifactError(f"{model.uri}: model.json names no dataset: pass the dataset version "
                            "(`meddiff datasets list` shows them)")
    return uri


def load_model(uri: str, device: str = "cpu") -> TrainedModel:
    """Load a complete model (``model.json`` present) with its EMA weights on ``device``."""
    uri = storage.absolute(uri)
    card = read_card(uri, "model.json")
    if card.get("kind") != "model":
        raise ArtifactError(f"{uri} is not a model (kind={card.get('kind')!r})")
    device = str(resolve_device(device))
    names = list(card["class_names"])
    if card["mode"] == "conditional":
        net, digest = load_network(uri, card, device)
        networks: dict[int | None, torch.nn.Module] = {None: net}
        sha = {"model": digest}
        null_class: int | None = len(names)
    else:
        networks, sha, null_class = {}, {}, None
        for key, part_rel in card["parts"].items():
            cid = int(key)
            part_uri = storage.join(uri, part_rel)
            part = read_card(part_uri, "model.json")
            networks[cid], sha[names[cid]] = load_network(part_uri, part, device)
    autoencoder = None
    if card.get("latent"):  # latent diffusion: the autoencoder it was trained with, checked by sha256
        from meddiff.models.autoencoders import load_autoencoder

        recorded = card["latent"]["uri"]  # where it was; a moved or copied root has it at the same layout path
        ae_uri = storage.relocated(recorded, uri, "model.json") or recorded  # (load_autoencoder names it if gone)
        autoencoder = load_autoencoder(ae_uri, device, expected_sha256=card["latent"]["sha256"])
        sha["autoencoder"] = autoencoder.sha256
    return TrainedModel(uri=uri, card=card, mode=card["mode"], class_names=names, channels=int(card["channels"]),
                        image_size=int(card["image_size"]), objective=card["objective"],
                        scheduler_config=dict(card["scheduler_config"]), networks=networks,
                        checkpoint_sha256=sha, null_class=null_class, autoencoder=autoencoder)
