"""``meddiff deploy``: create the work pools and apply the project's prefect.yaml (the current
folder's, or ``--file``) against PREFECT_API_URL."""

from __future__ import annotations

from typing import List, Optional

import typer

from meddiff.cli import app


@app.command()
def deploy(
    name: Optional[List[str]] = typer.Option(None, "--name", "-n",
                                             help="'flow/deployment' to apply (repeatable); default: all."),
    prefect_file: str = typer.Option("prefect.yaml", "--file", "--prefect-file",
                                     help="prefect.yaml to apply; entrypoints are relative to its folder."),
    api_url: Optional[str] = typer.Option(None, envvar="PREFECT_API_URL", help="Prefect API URL."),
    gpu_concurrency: int = typer.Option(1, help="Concurrent flow runs on the gpu pool."),
) -> None:
    """Create the work pools `cpu` and `gpu` (process) and the deployments of prefect.yaml."""
    from meddiff.ops.deploy import DeployConfig, deploy as run_deploy

    cfg = DeployConfig(prefect_file=prefect_file, api_url=api_url, names=tuple(name or ()),
                       gpu_concurrency=gpu_concurrency)
    result = run_deploy(cfg, log=typer.echo)
    typer.echo(f"applied {len(result.deployments)} deployments to {result.api_url}; start workers with "
               "MEDDIFF_REPO=$PWD prefect worker start --pool gpu (and --pool cpu)")
