"""Versioned publication of drafter weights: whole, checked, never half-written.

The learner publishes a ``DrafterSnapshot`` (a version, host copies of every tensor, and a SHA-256
digest over them). In one process the snapshot goes through a ``Mailbox``: publishing is a single
reference swap under a lock, so a reader sees the old snapshot or the new one, never a mix. Across
processes (or to survive a crash) ``save_snapshot`` writes ``v000007/`` through a staging directory
and a rename; ``load_latest`` takes the newest directory whose digest checks out and skips any that
is half-written or corrupt. A drafter that subscribes to a source swaps in a newer snapshot at a
decode-step boundary (``apply_snapshot``), after checking names, shapes and the digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..utils.atomic import staged_dir


@dataclass(frozen=True)
class DrafterSnapshot:
    version: int
    tensors: dict[str, torch.Tensor]
    digest: str
    meta: dict = field(default_factory=dict)  # e.g. the RL step whose samples it was trained on

    def verify(self) -> bool:
        return tensor_digest(self.tensors) == self.digest


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        hasher.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.hexdigest()


def make_snapshot(module: torch.nn.Module, version: int, meta: dict | None = None,
                  dtype: torch.dtype | None = None) -> DrafterSnapshot:
    """Host copies of ``module``'s state (the learner keeps training its own tensors); floating
    tensors cast to ``dtype`` when given (the drafter's own)."""
    tensors = {name: t.detach().to("cpu", dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype,
                                   copy=True)
               for name, t in module.state_dict().items()}
    return DrafterSnapshot(version, tensors, tensor_digest(tensors), dict(meta or {}))


class Mailbox:
    """The newest published snapshot, for readers in other threads. Versions only go up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: DrafterSnapshot | None = None

    @property
    def version(self) -> int:
        latest = self._latest
        return latest.version if latest is not None else 0

    def publish(self, snapshot: DrafterSnapshot) -> None:
        with self._lock:
            if self._latest is not None and snapshot.version <= self._latest.version:
                raise ValueError(f"publish: version {snapshot.version} is not newer than {self._latest.version}")
            self._latest = snapshot

    def latest(self) -> DrafterSnapshot | None:
        return self._latest


def apply_snapshot(module: torch.nn.Module, snapshot: DrafterSnapshot, check_digest: bool = True) -> None:
    """Copy ``snapshot`` into ``module`` in place, or raise (leaving ``module`` untouched)."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(snapshot.tensors)), sorted(set(snapshot.tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"drafter v{snapshot.version}: tensors do not match the drafter "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in own.items():
        if tuple(snapshot.tensors[name].shape) != tuple(tensor.shape):
            raise ValueError(f"drafter v{snapshot.version}: {name} has shape {list(snapshot.tensors[name].shape)}, "
                             f"expected {list(tensor.shape)}")
    if check_digest and not snapshot.verify():
        raise ValueError(f"drafter v{snapshot.version}: digest mismatch (corrupt snapshot)")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(snapshot.tensors[name])


# ---------------------------------------------------------------------- on disk
def save_snapshot(root: str | os.PathLike, snapshot: DrafterSnapshot) -> Path:
    """``root/v{version:06d}/`` with model.safetensors + manifest.json, renamed into place whole."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"v{snapshot.version:06d}"
    if final.exists():
        raise ValueError(f"publish: {final} already exists (versions are published once)")
    with staged_dir(final) as staging:
        save_file({n: t.contiguous() for n, t in snapshot.tensors.items()}, str(staging / "model.safetensors"))
        manifest = {"version": snapshot.version, "digest": snapshot.digest, "meta": snapshot.meta}
        (staging / "manifest.json").write_text(json.dumps(manifest))
    return final


def load_snapshot(path: str | os.PathLike) -> DrafterSnapshot:
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        tensors = load_file(str(path / "model.safetensors"))
        snapshot = DrafterSnapshot(int(manifest["version"]), tensors, str(manifest["digest"]), manifest.get("meta", {}))
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise ValueError(f"drafter snapshot {path}: unreadable ({err})") from err
    if not snapshot.verify():
        raise ValueError(f"drafter snapshot {path}: digest mismatch (corrupt or half-written)")
    return snapshot


def load_latest(root: str | os.PathLike, newer_than: int = 0,
                skip: set[str] | None = None) -> tuple[DrafterSnapshot | None, dict[str, str]]:
    """The newest valid snapshot under ``root`` with a version above ``newer_than``, and why each newer
    directory was rejected, by name (directories named in ``skip`` are passed over unread)."""
    root, rejected, skip = Path(root), {}, skip or set()
    if not root.is_dir():
        return None, rejected
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit()),
                        key=lambda p: int(p.name[1:]), reverse=True)
    for path in candidates:
        if int(path.name[1:]) <= newer_than:
            break
        if path.name in skip:
            continue
        try:
            return load_snapshot(path), rejected
        except ValueError as err:
            rejected[path.name] = str(err)
    return None, rejected


class DirectorySource:
    """A ``Mailbox``-like reader of snapshots another process saves under ``root``; the directory is
    scanned at most every ``poll_s`` seconds (``version`` is read once per decode step)."""

    def __init__(self, root: str | os.PathLike, poll_s: float = 0.5) -> None:
        self.root, self.poll_s = Path(root), poll_s
        self.rejected: list[str] = []
        self._bad: set[str] = set()  # directories already rejected: not re-read every poll
        self._latest: DrafterSnapshot | None = None
        self._polled = float("-inf")

    @property
    def version(self) -> int:
        now = time.monotonic()
        if now - self._polled >= self.poll_s:
            self._polled = now
            snapshot, rejected = load_latest(self.root, self._latest.version if self._latest else 0, self._bad)
            self.rejected += rejected.values()
            self._bad.update(rejected)
            if snapshot is not None:
                self._latest = snapshot
        return self._latest.version if self._latest else 0

    def latest(self) -> DrafterSnapshot | None:
        return self._latest
