"""TESTING ONLY: fault-injection points of the evaluation, switched on by $VLA_ACCEL_FAULTS (JSON).

Unset (always, outside tests) every function here does nothing beyond one dict lookup. The faults
are real where it matters: a paused worker is a real simulator process that the test signals by
pid (kill -9, SIGSTOP); only the disk is simulated (no tiny filesystem needed to fill it).

    VLA_ACCEL_FAULTS='{"dir": D, "pause": "startup"}'                       # a worker, before it is ready
    VLA_ACCEL_FAULTS='{"dir": D, "pause": "reset", "task": 0, "episode": 1}'  # the worker starting task 0 ep 1
    VLA_ACCEL_FAULTS='{"dir": D, "pause": "step", "episode": 1, "step": 3}'   # ... at step 3 of ep 1 (any task)
    VLA_ACCEL_FAULTS='{"disk_full_after": 2}'       # results.jsonl: the 3rd append fails with ENOSPC, half written

A pause fires once per D: the first process to get there creates D/<pause>.pid (its pid) and sleeps
until it is signalled, its parent is gone, or 300 s pass; later ones (a retried episode) go on.
"""

from __future__ import annotations

import errno
import json
import os
import time
from functools import cache
from pathlib import Path
from typing import IO

ENV_VAR = "VLA_ACCEL_FAULTS"
PAUSE_LIMIT_S = 300.0


@cache
def _spec() -> dict:
    text = os.environ.get(ENV_VAR)
    return json.loads(text) if text else {}


def pause(where: str, **point: int | None) -> None:
    """Stop here (once per fault dir) when the fault spec asks for this point (where, and the task,
    episode, step it names); see the module doc."""
    spec = _spec()
    if spec.get("pause") != where or any(spec.get(k, v) != v for k, v in point.items()):
        return
    marker = Path(spec["dir"]) / f"{where}.pid"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return                                    # fired before: the retry goes through
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    parent, end = os.getppid(), time.monotonic() + PAUSE_LIMIT_S
    while time.monotonic() < end and os.getppid() == parent:
        time.sleep(0.05)


_appends = {"n": 0}


def write(file: IO[bytes], data: bytes) -> None:
    """All of `data` to an unbuffered binary file; with disk_full_after=N the appends after the N-th
    write half of their data and raise ENOSPC, as a filling disk does."""
    limit = _spec().get("disk_full_after")
    if limit is not None:
        _appends["n"] += 1
        if _appends["n"] > limit:
            file.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(file, "name", None))
    view = memoryview(data)
    while view:
        view = view[file.write(view):]
