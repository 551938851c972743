"""Where a run is built: its own folder for local roots, a local work folder synced to s3:// roots."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from meddiff import storage
from meddiff.train.checkpoint import checkpoint_files, list_checkpoints
from meddiff.records import content_hash


@dataclass(frozen=True)
class RunFolder:
    """A run's local working folder and where it is published (the same path for local roots)."""

    local: Path
    uri: str

    @staticmethod
    def for_uri(uri: str) -> "RunFolder":
        if not storage.is_remote(uri):
            return RunFolder(Path(uri), uri)
        key = content_hash(uri, 16)
        return RunFolder(Path(tempfile.gettempdir()) / "meddiff-train" / key, uri)

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.uri)

    def pull_latest(self) -> None:
        """Remote: fetch metrics and the newest checkpoint into the local folder — unless this folder
        already holds a newer checkpoint (a run killed while publishing it): then its own metrics,
        which match that checkpoint, are kept and it resumes from there."""
        if not self.remote:
            return
        fs, path = storage.filesystem(self.uri)
        self.local.mkdir(parents=True, exist_ok=True)
        names = sorted(storage.listdir(storage.join(self.uri, "checkpoints")))
        names = [n for n in names if n.startswith("step-") and n.endswith(".pt")]
        local = list_checkpoints(self.local)
        if local and (not names or local[-1].name > names[-1]):  # step-XXXXXXX.pt: zero-padded, ordered as text
            return
        for name in ("metrics.jsonl",):
            if fs.exists(f"{path}/{name}"):
                fs.get_file(f"{path}/{name}", str(self.local / name))
        if names and not (self.local / "checkpoints" / names[-1]).exists():
            (self.local / "checkpoints").mkdir(exist_ok=True)
            ckpt, record = checkpoint_files(self.local / "checkpoints" / names[-1])
            self._download(ckpt)
            if fs.exists(f"{path}/{record}"):  # checkpoints written before session records have none
                self._download(record)

    def _download(self, rel: str) -> None:
        """Remote file → the same relative path here, through a temp name (never a partial file)."""
        fs, path = storage.filesystem(self.uri)
        tmp = (self.local / rel).with_name(f".{Path(rel).name}.download")
        storage.with_retries(lambda: fs.get_file(f"{path}/{rel}", str(tmp)), what=f"download {rel}")
        tmp.replace(self.local / rel)

    def push(self, rel_paths: list[str]) -> None:
        """Remote: upload these files (in order); local: nothing to do."""
        if not self.remote:
            return
        fs, path = storage.filesystem(self.uri)
        for rel in rel_paths:
            src = self.local / rel
            if src.is_file():
                storage.with_retries(lambda: fs.put_file(str(src), f"{path}/{rel}"), what=f"upload {rel}")
        keep = {Path(rel).name for p in list_checkpoints(self.local) for rel in checkpoint_files(p)}
        for name in storage.listdir(storage.join(self.uri, "checkpoints")):
            if name.startswith("step-") and name not in keep:
                fs.rm(f"{path}/checkpoints/{name}")
