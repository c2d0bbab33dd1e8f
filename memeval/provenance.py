"""Provenance of a run: versions, git commit, hardware, seeds and the command (summary.json ``meta``)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import memeval


BUILD_COMMIT = Path(memeval.__file__).resolve().parent / "_build_commit.txt"  # written by setup.py at build time


def git_commit() -> str:
    """The commit of the memeval source in use: the one recorded when the installed package was built (a
    ``pip install .``), else the git checkout memeval runs from (an editable install or a source tree), else
    ``MEMEVAL_GIT_COMMIT``, else 'unknown'."""
    if BUILD_COMMIT.is_file() and BUILD_COMMIT.read_text().strip():
        return BUILD_COMMIT.read_text().strip()
    here = Path(memeval.__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file():  # a source tree, not site-packages inside some other repository
        try:
            out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                       capture_output=True, text=True, timeout=5).stdout.strip()
                return out.stdout.strip() + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return os.environ.get("MEMEVAL_GIT_COMMIT", "unknown")


def hardware(device: torch.device) -> str:
    cpu = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({torch.cuda.device_count()} visible); {cpu}"
    return cpu


def run_metadata(opts: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    return {
        "memeval_version": memeval.__version__,
        "git_commit": git_commit(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "seed": opts.seed,
        "batch_size": opts.batch_size,
        "command": opts.command(),
        "limit": opts.limit,
        "split": opts.split,
        "limited": opts.limit is not None or opts.split != "test",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(device),
        # CPU kernels split reductions by thread count: the last float bits (and so a tie in a ranking) may
        # depend on it, so it is part of what produced the numbers
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
