"""One trainer per run directory: `OutputLock` (`<dir>/.htpo.lock` holds pid and host), taken
on `trainer.output_dir` and on the checkpoint directory; a lock left by a dead process on this
host is taken over with a warning."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from pathlib import Path

from htpo_jax.run.preflight import LaunchError, is_url

log = logging.getLogger(__name__)

LOCK_NAME = ".htpo.lock"


# ---------------------------------------------------------------- output-dir lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class OutputLock:
    """`<directory>/.htpo.lock`, created atomically (O_EXCL), removed by `release()`. `key` is
    the config key that names the directory (`trainer.output_dir`, `checkpoint.dir`), for the
    messages.

    A second trainer on the same dir gets a LaunchError naming the holder. A lock whose process
    is gone (same host, pid not running) is stale: it is taken over with a warning. A lock held
    from another host cannot be checked from here, so it is refused too (delete the file if that
    host's run is over). Remote (gs://) output dirs are not locked: O_EXCL has no meaning there.
    """

    def __init__(self, output_dir: str | os.PathLike, key: str = "trainer.output_dir"):
        self.path = None if is_url(output_dir) else Path(output_dir) / LOCK_NAME
        self.key = key
        self.held = False

    def acquire(self) -> OutputLock:
        """Takes the lock and returns self; LaunchError when another trainer holds it (a stale lock
        of a dead process on this host is taken over; a URL directory is not locked)."""
        if self.path is None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LaunchError(
                f"{self.key}: cannot create {self.path.parent} ({e.strerror or e})"
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except OSError as e:
                if not isinstance(e, FileExistsError):
                    raise LaunchError(
                        f"{self.key}: cannot create the lock {self.path} ({e.strerror or e})"
                    ) from None
                holder = self._holder()
                if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    self.held = True  # this process already holds it (train() called twice)
                    return self
                same_host = holder.get("host") == me["host"]
                pid = holder.get("pid")
                if same_host and isinstance(pid, int) and not _pid_alive(pid):
                    log.warning(
                        "taking over the stale lock %s of pid %d (no longer running)",
                        self.path,
                        pid,
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise LaunchError(
                    f"{self.path.parent} is in use by another trainer (pid {pid} on host "
                    f"{holder.get('host')}, lock {self.path}); use another {self.key}, "
                    "or delete the lock file if that run is over"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)  # also on an exception that ends the process
            return self
        raise LaunchError(f"could not take the lock {self.path}")

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}  # being written right now, or garbage: treated as held by an unknown

    def release(self) -> None:
        """Removes the lock file when this process holds it (also registered to run at exit)."""
        if self.held and self.path is not None:
            holder = self._holder()
            if holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
