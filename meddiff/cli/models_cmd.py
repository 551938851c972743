"""``meddiff models list``: trained (and in-progress) models under the storage root."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from meddiff import storage
from meddiff.cli import app
from meddiff.cli.tables import print_table

models = typer.Typer(no_args_is_help=True, help="Inspect trained models.")
app.add_typer(models, name="models")


@models.command("list")
def list_(storage_root: Optional[str] = typer.Option(None, "--storage", envvar=storage.ENV_VAR)) -> None:
    """List models under the storage root: complete ones with their card, unfinished ones as such."""
    root = storage.join(storage.storage_root(storage_root), "models")
    t = Table("model", "status", "mode", "objective", "steps", "dataset", "uri")
    for run_id in storage.listdir(root):
        uri = storage.join(root, run_id)
        card_uri = storage.join(uri, "model.json")
        if not storage.exists(card_uri):
            t.add_row(run_id, "[yellow]incomplete (resumable)", "", "", "", "", uri)
            continue
        c = storage.read_json(card_uri)
        t.add_row(run_id, "complete", c.get("mode", ""), c.get("objective", ""), str(c.get("steps", "")),
                  (c.get("dataset") or {}).get("uri", "").rstrip("/").rsplit("/", 2)[-2] if c.get("dataset") else "",
                  uri)
    print_table(t)
