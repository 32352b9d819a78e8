"""The write points of a ``zsharp`` command, and a SIGKILL at any one of them.

Installed in a command's process (the command server's children call :func:`install` when
``ZSHARP_CRASH_UNDER`` is set), an audit hook (PEP 578) sees every file operation the
process makes and counts as a *write point* each one under the folders named in
``ZSHARP_CRASH_UNDER`` (comma-separated) that changes what is on disk:

``create``   a file opened to be written (an atomic write's temporary file, a lock file)
``append``   a file opened to append to (``failures.jsonl``)
``rename``   a rename into place (every atomic write's publication)
``remove``   a file removed (results cleared before a retrain, the checkpoint at the end)
``wandb.*``  a call into W&B (``Tracker`` starting a run, ``log``, ``summary``,
             ``log_table``, ``finish``), whose own service process writes the run's files

With ``ZSHARP_CRASH_LOG`` each point is appended to that file as a JSON line (its number,
kind and path); with ``ZSHARP_CRASH_AT=N`` the process sends itself SIGKILL at point N,
before the operation happens — as a lost node or the OOM killer would stop it. Nothing in
``zsharp`` knows about any of this.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

KINDS = ("create", "append", "rename", "remove", "wandb")
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def install() -> None:
    """Count (and log, and kill at) the write points of this process, from now on."""
    under = tuple(
        os.path.realpath(p) + os.sep for p in os.environ["ZSHARP_CRASH_UNDER"].split(",") if p
    )
    at = int(os.environ.get("ZSHARP_CRASH_AT", "0"))
    log = os.environ.get("ZSHARP_CRASH_LOG")
    # opened before the hook exists: writing it is no write point of the command's
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if log else None
    count = [0]

    def point(kind: str, path: str) -> None:
        count[0] += 1
        if log_fd is not None:
            line = json.dumps({"n": count[0], "kind": kind, "path": path}) + "\n"
            os.write(log_fd, line.encode())
        if count[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)

    def watched(path: Any) -> str | None:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return None  # a file descriptor
        full = os.path.realpath(os.fsdecode(path))
        return full if full.startswith(under) else None

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "os.rename":
            kind, path = "rename", watched(args[1])
        elif event == "os.remove":
            kind, path = "remove", watched(args[0])
        elif event == "open":
            target, mode, flags = args
            if isinstance(mode, str):
                writes, appends = any(c in mode for c in "wax+"), "a" in mode
            else:
                flags = flags or 0
                writes, appends = bool(flags & _WRITING), bool(flags & os.O_APPEND)
            if not writes:
                return
            kind, path = ("append" if appends else "create"), watched(target)
        else:
            return
        if path is not None:
            point(kind, path)

    sys.addaudithook(hook)

    from zsharp.pipeline.cell import tracking

    for name in ("__init__", "log", "summary", "log_table", "finish"):
        original = getattr(tracking.Tracker, name)

        def wrapped(self: Any, *args: Any, _original: Any = original, _name: str = name,
                    **kwargs: Any) -> Any:  # fmt: skip
            point(f"wandb.{_name}", "")
            return _original(self, *args, **kwargs)

        setattr(tracking.Tracker, name, wrapped)
