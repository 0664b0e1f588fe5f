"""Temporary files of this process (downloaded encoders and artifacts, rendered figures, local
copies of remote files): one folder per process under the system's temporary folder, removed when
the process exits, so repeated runs leave nothing behind."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_ROOTS: dict[int, Path] = {}


def _remove(pid: int, root: Path) -> None:
    if os.getpid() == pid:  # a forked child inherits the handler, not the folder
        shutil.rmtree(root, ignore_errors=True)


def folder(prefix: str) -> Path:
    """A new, empty folder inside this process's scratch folder."""
    pid = os.getpid()
    if pid not in _ROOTS:
        _ROOTS[pid] = Path(tempfile.mkdtemp(prefix=f"avssl-{pid}-"))
        atexit.register(_remove, pid, _ROOTS[pid])
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_ROOTS[pid]))
