"""The organism cache: ``$MEMEVAL_CACHE/organisms/<key>``, keyed by a hash of everything that determines
an organism. An entry is built in a temporary sibling directory, marked complete, then moved into place
with ``os.replace``; an entry without the marker (or a leftover temporary directory) is never used and is
rebuilt. A per-key ``flock`` keeps two processes from building the same entry at once (the kernel drops
the lock of a killed process)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

FORMAT_VERSION = 1
MARKER = ".complete"


def cache_root() -> Path:
    return Path(os.environ.get("MEMEVAL_CACHE") or "~/.cache/memeval").expanduser()


def organisms_dir() -> Path:
    return cache_root() / "organisms"


def cache_key(spec: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able spec (plus the cache format version)."""
    blob = json.dumps({"format": FORMAT_VERSION, **spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def entry_dir(key: str, root: Path | None = None) -> Path:
    return (root or organisms_dir()) / key


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


@contextlib.contextmanager
def locked(key: str, root: Path | None = None) -> Iterator[None]:
    """Hold the cross-process lock ``root/.<key>.lock`` (``flock``: released by the kernel if the holder dies)."""
    root = root or organisms_dir()
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / f".{key}.lock"
    with open(lock_path, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover (Windows: no cross-process lock)
            pass
        yield


def sweep_stale(root: Path | None = None) -> int:
    """Remove the temporary directories of killed builds (of any key whose lock nobody holds)."""
    root = root or organisms_dir()
    removed = 0
    if not root.is_dir():
        return 0
    for tmp in root.glob(".tmp-*"):
        key = tmp.name.split("-")[1]
        try:
            import fcntl

            with open(root / f".{key}.lock", "a+") as fh:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # a build of that key is running
                    continue
                shutil.rmtree(tmp, ignore_errors=True)
                removed += 1
        except ImportError:  # pragma: no cover
            return removed
    return removed


def build_atomically(key: str, build: Callable[[Path], None], root: Path | None = None) -> Path:
    """Return the complete entry for ``key``, calling ``build(tmp_dir)`` first if there is none.

    ``root`` is the cache directory (default: the organisms directory; detection's shadow models use their own)."""
    final = entry_dir(key, root)
    if is_complete(final):
        return final
    with locked(key, root):
        if is_complete(final):  # built by another process while we waited
            return final
        parent = final.parent
        # we hold the lock: anything left for this key is the debris of a killed build
        for stale in [final, *parent.glob(f".tmp-{key}-*")]:
            if stale.exists():
                shutil.rmtree(stale, ignore_errors=True)
        sweep_stale(parent)
        tmp = parent / f".tmp-{key}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps({"key": key, "format": FORMAT_VERSION, "time": time.time()}))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
