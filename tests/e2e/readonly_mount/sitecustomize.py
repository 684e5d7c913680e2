"""Test-only stand-in for a read-only (``:ro``) compose mount, for a local process that has no mounts.

tests/e2e puts this folder on ``PYTHONPATH`` of the processes it starts and names the read-only folders
in ``HARDNEG_E2E_READONLY`` (``os.pathsep``-separated). A Python audit hook (PEP 578) then refuses every
write-like operation under those folders with ``EROFS``, as a read-only mount would, and reports it on
stderr with the marker below, so that a test can show the api never even tries to write to the store.
Writes done inside C code (e.g. FAISS's ``write_index``) are not seen; the api never calls those.
"""

from __future__ import annotations

import errno
import os
import sys

MARKER = "HARDNEG-E2E-READONLY-VIOLATION"
_ROOTS = tuple(os.path.realpath(p) for p in os.environ.get("HARDNEG_E2E_READONLY", "").split(os.pathsep) if p)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# audit event -> positions of the paths it changes (https://docs.python.org/3/library/audit_events.html)
_PATH_EVENTS = {
    "os.mkdir": (0,), "os.rmdir": (0,), "os.remove": (0,), "os.rename": (0, 1), "os.link": (1,),
    "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
    "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.move": (0, 1),
}


def _inside(path: object) -> bool:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False  # a file descriptor: the open that made it was checked
    real = os.path.realpath(os.fsdecode(path))
    return any(real == root or real.startswith(root + os.sep) for root in _ROOTS)


def _hook(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writes = ((isinstance(flags, int) and bool(flags & _WRITE_FLAGS))
                  or (isinstance(mode, str) and any(c in mode for c in "wax+")))
        targets = (path,) if writes else ()
    elif event in _PATH_EVENTS:
        targets = tuple(args[i] for i in _PATH_EVENTS[event])
    else:
        return
    for target in targets:
        if _inside(target):
            sys.stderr.write(f"{MARKER} {event} {os.fsdecode(target)}\n")
            raise OSError(errno.EROFS, "Read-only file system (emulated ':ro' mount)", os.fsdecode(target))


if _ROOTS:
    sys.addaudithook(_hook)
