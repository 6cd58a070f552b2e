"""Writing a run folder: append-only metrics, resolved config, atomic checkpoints.

Layout (the stable format; ``rf2.analysis.results`` reads it)::

    config.yaml        the validated RunConfig (a plug-in's unused keys left out: rf2.core.plugins)
    population.json    per-tier population summary (federated: how the tiers were made)
    tiers.csv          user_id,tier of every user (federated runs)
    data.json          dataset sizes and the train/test split used (chronological/random/given)
    data_fingerprint.json  the data's sizes and SHA-256: a resume refuses other data (federated)
    metrics.jsonl      one JSON object per round (round 0 = before training)
    checkpoints/round_NNNNNN/{arrays.npz,state.json,manifest.json}   resumable state, atomic;
                       the manifest holds each file's size and SHA-256, checked on load
    .lock              held while a process writes the folder (``rf2.runs.lock``)
    rf2.log            the console of every command that wrote the folder (``rf2.runs.console``)
    nodes.json         Ray nodes the clients trained on (Ray backend)
    model.pt           final global model (state_dict of tensors only)
    ttt.json           test-time training's metric change (model.index.ttt)
    DONE               written last: the run finished

A crash can tear only the last line of ``metrics.jsonl``; :meth:`RunFolder.read_metrics`
drops such a line and :meth:`RunFolder.truncate_to_round` rewrites nothing but that tail.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rf2.core.errors import UserInputError

log = logging.getLogger("rf2")

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
DONE = "DONE"
MANIFEST = "manifest.json"
CHECKPOINT_FILES = ("arrays.npz", "state.json")


class RunFolderError(OSError):
    """The run folder cannot be written (full disk, read-only, missing)."""


class RunExists(UserInputError):
    """A new run was pointed at a folder that already holds one."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any]
    path: Path


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return path.stat().st_size, h.hexdigest()


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- creation --------------------------------------------------------------------
    def create(self, config: dict[str, Any]) -> None:
        """Start a new run here; refuse to overwrite another run."""
        if self.holds_run:
            raise RunExists(
                f"{self.path} already holds a run; pass resume={self.path} "
                "to continue it or choose another output directory"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_text(CONFIG, yaml.safe_dump(config, sort_keys=False))

    def write_text(self, name: str, text: str) -> None:
        """Write a whole file atomically (temp file + rename)."""
        self.write_atomic(name, lambda fh: fh.write(text.encode("utf-8")))

    @property
    def holds_run(self) -> bool:
        return (self.path / METRICS).exists() or (self.path / CONFIG).exists()

    def save_model(self, write: Any, name: str = "model.pt") -> None:
        """``write(file_object)`` the model into ``name`` atomically."""
        self.write_atomic(name, write)

    def write_atomic(self, name: str, write: Any) -> None:
        """``write(binary_file_object)`` into ``name`` atomically (temp file + fsync +
        rename); a full disk or read-only folder is one line, and no partial file stays."""
        target = self.path / name
        tmp = target.with_name(target.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as ex:
            _cleanup(tmp)
            raise RunFolderError(f"cannot write {target}: {ex.strerror or ex}") from ex
        except RuntimeError as ex:  # torch.save wraps a failed write in RuntimeError
            _cleanup(tmp)
            raise RunFolderError(f"cannot write {target}: {ex}") from ex

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def read_config(self) -> dict[str, Any]:
        with open(self.path / CONFIG, encoding="utf-8") as fh:
            return yaml.safe_load(fh)

    # -- metrics ---------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one whole line; fsync so a crash loses at most this line."""
        line = (json.dumps(row, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")
        path = self.path / METRICS
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as ex:
            raise RunFolderError(f"cannot append to {path}: {ex.strerror or ex}") from ex
        try:
            before = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as ex:
                # A full disk can leave part of the line: cut it off so every line in the
                # file stays a whole row (truncating needs no free space).
                try:
                    os.ftruncate(fd, before)
                except OSError:
                    pass
                raise RunFolderError(f"cannot append to {path}: {ex.strerror or ex}") from ex
        finally:
            os.close(fd)

    def read_metrics(self) -> list[dict[str, Any]]:
        """All whole rows; a torn last line (crash mid-write) is dropped."""
        path = self.path / METRICS
        if not path.exists():
            return []
        rows = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # torn tail
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
        return rows

    def truncate_to_round(self, last_round: int) -> None:
        """Keep rows with round <= last_round (drops rows past a checkpoint and torn tails)."""
        rows = [r for r in self.read_metrics() if int(r["round"]) <= last_round]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        self.write_text(METRICS, text)

    # -- checkpoints -----------------------------------------------------------------
    def save_checkpoint(
        self, round_: int, arrays: dict[str, np.ndarray], state: dict[str, Any], keep: int = 2
    ) -> Path:
        """Write ``checkpoints/round_N`` via a temp dir renamed into place (atomic)."""
        root = self.path / "checkpoints"
        final = root / f"round_{round_:06d}"
        tmp = root / f".round_{round_:06d}.tmp"
        try:
            root.mkdir(exist_ok=True)
            _cleanup(tmp)
            tmp.mkdir()
            with open(tmp / "arrays.npz", "wb") as fh:
                # allow_pickle (the default) named: an array of that name is then an error,
                # never silently taken for the option.
                np.savez(fh, allow_pickle=True, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            with open(tmp / "state.json", "w", encoding="utf-8") as fh:
                json.dump(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            manifest = {}
            for name in CHECKPOINT_FILES:
                size, sha = _digest(tmp / name)
                manifest[name] = {"size": size, "sha256": sha}
            with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
                json.dump(manifest, fh)
                fh.flush()
                os.fsync(fh.fileno())
            _cleanup(final)
            os.replace(tmp, final)
        except OSError as ex:
            _cleanup(tmp)
            raise RunFolderError(f"cannot write checkpoint {final}: {ex.strerror or ex}") from ex
        for old in sorted(root.glob("round_*"))[:-keep]:
            _cleanup(old)
        return final

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint that passes :meth:`verify_checkpoint`.

        Damaged newer ones are skipped with one warning line naming them; when
        checkpoints exist but none is valid, one warning line says so and None is
        returned (the run restarts from round 0, which gives the same rows again).
        """
        root = self.path / "checkpoints"
        candidates = sorted(root.glob("round_*")) if root.exists() else []
        damaged: list[str] = []
        for ckpt in reversed(candidates):
            problem = verify_checkpoint(ckpt)
            if problem is None:
                try:
                    loaded = _load_checkpoint(ckpt)
                except Exception as ex:  # noqa: BLE001 - any unreadable file means damaged
                    problem = f"unreadable ({type(ex).__name__}: {ex})"
                else:
                    if damaged:
                        log.warning("rf2: warning: skipped damaged checkpoint(s) %s; resuming "
                                    "from %s", "; ".join(damaged), ckpt.name)
                    return loaded
            damaged.append(f"{ckpt.name}: {problem}")
        if damaged:
            log.warning("rf2: warning: no valid checkpoint in %s (%s); resuming from round 0",
                        root, "; ".join(damaged))
        return None

    def mark_done(self) -> None:
        self.write_text(DONE, "")

    def undo_done(self) -> None:
        """A finished run is being extended: it is not finished until it ends again."""
        _cleanup(self.path / DONE)

    @property
    def done(self) -> bool:
        return (self.path / DONE).exists()


def verify_checkpoint(ckpt: Path) -> str | None:
    """None if ``ckpt``'s files match its manifest (sizes, SHA-256), else the problem.

    Checkpoints written before manifests existed are accepted if their files load.
    """
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None if all((ckpt / n).is_file() for n in CHECKPOINT_FILES) else "files missing"
    except (OSError, ValueError) as ex:
        return f"unreadable {MANIFEST} ({ex})"
    for name in CHECKPOINT_FILES:
        want = manifest.get(name) if isinstance(manifest, dict) else None
        if not isinstance(want, dict):
            return f"{MANIFEST} lacks {name}"
        try:
            size, sha = _digest(ckpt / name)
        except OSError as ex:
            return f"{name}: {ex.strerror or ex}"
        if size != want.get("size"):
            return f"{name} has {size} bytes, expected {want.get('size')}"
        if sha != want.get("sha256"):
            return f"{name} does not match its SHA-256"
    return None


def _load_checkpoint(ckpt: Path) -> Checkpoint:
    with np.load(ckpt / "arrays.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    with open(ckpt / "state.json", encoding="utf-8") as fh:
        state = json.load(fh)
    return Checkpoint(int(ckpt.name.split("_")[1]), arrays, state, ckpt)


def _cleanup(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    except OSError:
        pass
