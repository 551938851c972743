"""prefect.yaml's pull step: run the deployment from the worker's own ``MEDDIFF_REPO``, read when the
run starts on the worker (``{{ $MEDDIFF_REPO }}`` would be filled in from the deployer's shell)."""

from __future__ import annotations

import os
from pathlib import Path

from meddiff.errors import MeddiffError

REPO_ENV = "MEDDIFF_REPO"  # the worker's repository checkout (/app in the docker-compose images)


def worker_repo(variable: str = REPO_ENV) -> dict[str, str]:
    """Change into the folder named by the worker's ``$variable``; returns ``{"directory": path}``.

    Unset: the worker's current folder, when it holds the project's flows/ (a worker started from the
    checkout); otherwise a one-line error naming the variable.
    """
    value = os.environ.get(variable)
    folder = Path(value).expanduser() if value else Path.cwd()
    if not (folder / "flows").is_dir():
        where = f"{variable}={value}" if value else f"{variable} is not set and the worker's folder {folder}"
        raise MeddiffError(f"{where} holds no flows/ folder: start the worker with {variable} set to the meddiff "
                           f"checkout (e.g. {variable}=$PWD prefect worker start --pool gpu)")
    os.chdir(folder)
    return {"directory": str(folder.resolve())}
