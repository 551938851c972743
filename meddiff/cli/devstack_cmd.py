"""``meddiff dev-stack start|stop|status``: the production topology on one machine, without Docker."""

from __future__ import annotations

from typing import Optional

import typer

from meddiff.cli import app

devstack_app = typer.Typer(no_args_is_help=True, help="PostgreSQL + Prefect server + S3 (SeaweedFS) + workers, "
                                                       "all on 127.0.0.1, without Docker.")
app.add_typer(devstack_app, name="dev-stack")

STATE_DIR = typer.Option("~/.cache/meddiff/dev-stack", help="State, logs and S3 data of the stack.")


@devstack_app.command("start")
def start(
    state_dir: str = STATE_DIR,
    gpu_workers: int = typer.Option(2, help="Process workers on the gpu pool (one per GPU)."),
    cpu_workers: int = typer.Option(1, help="Process workers on the cpu pool."),
    worker_limit: int = typer.Option(2, help="Flow runs at once per gpu worker (a waiting parent + one shard)."),
    gpus: Optional[str] = typer.Option(None, help="CUDA_VISIBLE_DEVICES per gpu worker, comma-separated "
                                                  "(default: worker k gets GPU k when GPUs exist)."),
    no_ui: bool = typer.Option(False, "--no-ui", help="Do not serve Prefect's UI."),
    no_deploy: bool = typer.Option(False, "--no-deploy", help="Do not apply prefect.yaml."),
) -> None:
    """Start the stack and print the environment to export."""
    from meddiff.ops.devstack import DevStackConfig, start as run_start

    cfg = DevStackConfig(state_dir, gpu_workers, cpu_workers, worker_limit,
                         tuple(g.strip() for g in gpus.split(",")) if gpus else (), ui=not no_ui, deploy=not no_deploy)
    state = run_start(cfg, log=typer.echo)
    typer.echo("# dev stack up; use it with:")
    for k, v in state.env.items():
        typer.echo(f"export {k}={v}")


@devstack_app.command("stop")
def stop(state_dir: str = STATE_DIR) -> None:
    """Stop every service the last start started (data is kept for the next start)."""
    from meddiff.ops.devstack import DevStackConfig, stop as run_stop

    run_stop(DevStackConfig(state_dir), log=typer.echo)


@devstack_app.command("status")
def status(state_dir: str = STATE_DIR) -> None:
    """Which services are running, and the environment to export."""
    from meddiff.ops.devstack import DevStackConfig, read_state, status as run_status

    cfg = DevStackConfig(state_dir)
    alive = run_status(cfg)
    if not alive:
        typer.echo("dev stack: not started")
        raise typer.Exit(1)
    for name, up in alive.items():
        typer.echo(f"{name}: {'running' if up else 'STOPPED'}")
    for k, v in read_state(cfg).env.items():
        typer.echo(f"export {k}={v}")
    if not all(alive.values()):
        raise typer.Exit(1)
