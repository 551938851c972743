"""``meddiff models list | show``: trained (and in-progress) models under the storage root, and one
model's card (autoencoders too)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from meddiff import storage
from meddiff.cli import app
from meddiff.cli.tables import UNREADABLE, print_listing, print_table, readable, unfinished_status, where_now

models = typer.Typer(no_args_is_help=True, help="Inspect trained models.")
app.add_typer(models, name="models")


@models.command("list")
def list_(storage_root: Optional[str] = typer.Option(
        None, "--storage", envvar=storage.ENV_VAR, help="Storage root (a folder or s3://bucket/prefix; default ./storage).")) -> None:
    """List models (and autoencoders) under the storage root: complete ones with their card, unfinished ones as such."""
    from meddiff.data.shards import read_card

    root = storage.storage_root(storage_root)
    t, problems = Table("model", "status", "mode", "objective", "steps", "dataset", "uri"), []
    for folder in ("models", "autoencoders"):
        for run_id in storage.listdir(storage.join(root, folder)):
            uri = storage.join(root, folder, run_id)
            card_uri = storage.join(uri, "model.json")
            if not storage.exists(card_uri):
                t.add_row(run_id, unfinished_status(uri, "incomplete (resumable)"), "", "", "", "", uri)
                continue
            c = readable(lambda: read_card(uri, "model.json"), problems)
            if c is None:
                t.add_row(run_id, UNREADABLE, "", "", "", "", uri)
                continue
            mode = f"autoencoder ({c.get('ae_kind', '')})" if c.get("kind") == "autoencoder" else c.get("mode", "")
            t.add_row(run_id, "complete", mode, c.get("objective", ""), str(c.get("steps", "")),
                      (c.get("dataset") or {}).get("name", ""), uri)
    print_listing(t, "models", root, "`meddiff train`", problems)

def card_rows(card: dict, here: str) -> list[tuple[str, str]]:
    """(field, value) rows of the model or autoencoder card at ``here``, for people (the card itself is
    model.json); the dataset and autoencoder it names are shown where they are now."""
    ds, latent, final = card.get("dataset") or {}, card.get("latent") or {}, card.get("final") or {}
    sha = card.get("checkpoint_sha256")
    side = card.get("image_size")

    def shape(dims: list[int] | None) -> str | None:
        return "×".join(map(str, dims)) if dims else None

    rows = [
        ("kind", card.get("kind")), ("run", card.get("run_id")), ("mode", card.get("mode")),
        ("preset", card.get("preset")), ("objective", card.get("objective")),
        ("dataset", where_now(ds.get("uri"), here, "dataset.json")),
        ("classes", "; ".join(f"{i} {n}" for i, n in enumerate(card.get("class_names") or []))),  # names hold commas
        ("images", shape([card["channels"], side, side]) if side else None),
        ("latent", f"{where_now(latent['uri'], here, 'model.json')} (latent {shape(latent.get('latent_shape'))})"
         if latent else None),
        ("autoencoder", card.get("ae_kind")),
        ("latent shape", f"{shape(card['latent_shape'])} (scale factor {card['scale_factor']:.4g}, "
                         f"{card['compression_ratio']:.3g}× smaller than uint8 pixels)"
         if card.get("latent_shape") else None),
        ("val L1", f"{final['val_l1']:.4g}" if final.get("val_l1") is not None else None),
        ("conditioning", card.get("conditioning")),
        ("parameters", f"{card['param_count']:,}" if card.get("param_count") else None),
        ("steps", card.get("steps")),
        ("final loss", f"{card['final_loss']:.4g}" if card.get("final_loss") is not None else None),
        ("wall time", f"{card['wall_time_s']:.0f} s" if card.get("wall_time_s") is not None else None),
        ("device", card.get("device_name") or card.get("device")), ("sessions", sessions_row(card.get("sessions"))),
        ("created", card.get("created_at")),
        ("weights sha256", card.get("weights_sha256")),
        ("checkpoint sha256", sha if isinstance(sha, str) else
         "; ".join(f"{k} {v[:12]}…" for k, v in (sha or {}).items()) or None),
    ]
    return [(k, str(v)) for k, v in rows if v not in (None, "")]


def sessions_row(sessions: list | dict | None) -> str | None:
    """The sessions that trained the weights (a per-class model: per class, once where they agree), and a
    warning when CPU sessions used several thread counts (kernels' last bits follow it)."""
    from meddiff.train.sessions import cpu_thread_counts, describe  # here: it imports torch and MONAI

    if not sessions:
        return None
    per_part = sessions if isinstance(sessions, dict) else {None: sessions}
    lines = {name: describe(s or []) for name, s in per_part.items()}
    text = next(iter(lines.values())) if len(set(lines.values())) == 1 else \
        "; ".join(f"class {name}: {line}" for name, line in lines.items())
    counts = {n for s in per_part.values() for n in cpu_thread_counts(s or [])}
    if len(counts) > 1:
        text += (" — trained under several CPU thread counts (or steps not recorded): no single re-run with "
                 "--threads writes these exact weights")
    elif counts and None not in counts:
        text += f" — to write these exact weights again on a CPU: --threads {counts.pop()}"
    return text


@models.command("show")
def show(uri: str = typer.Argument(
        ..., help="A model's URI (printed by meddiff train; see meddiff models list).")) -> None:
    """Show a model's (or an autoencoder's) card: what it was trained on, how, and its checkpoint."""
    from meddiff.data.shards import read_card

    t = Table("field", "value")
    for k, v in card_rows(read_card(uri, "model.json"), uri):
        t.add_row(k, v)
    print_table(t)
