"""Where ReSpec keeps what it builds, and where it finds the optional GSM8K file.

Nothing here is relative to the working directory: the cache lives under ``$RESPEC_CACHE_DIR``
(default ``~/.cache/respec``) and the GSM8K training split is found through ``$RESPEC_GSM8K``.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "RESPEC_CACHE_DIR"
GSM8K_ENV = "RESPEC_GSM8K"


def cache_dir() -> Path:
    """Converted models, tuned kernel tables, compiled kernels and cost profiles."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "respec"))


def gsm8k_path() -> Path | None:
    """The GSM8K-format JSONL named by ``$RESPEC_GSM8K`` (None when it is not set); a name that is not a
    file is an error rather than a silent switch to other prompts."""
    value = os.environ.get(GSM8K_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{GSM8K_ENV}: {path} is not a file")
    return path.resolve()
