"""One training run per output folder: a lock file naming its holder (process id, host, start time), taken by the
main process for the whole run and released when it ends (or at exit). Two runs in one folder would overwrite each
other's checkpoints and model: after `kill -9` of `accelerate launch`, say, its workers go on training. A lock whose
process is gone (killed, crashed, its process id reused) is stale and taken over; a live holder's is refused with its
process id."""

import atexit
import json
import logging
import os
import socket
import time


__all__ = ["LOCK_NAME", "OutputDirLock", "OutputDirLockedError", "lock_output_dir", "release_output_dir"]

LOCK_NAME = "training.lock"

logger = logging.getLogger(__name__)

# locks held by this process, by folder (real path)
_HELD: dict = {}


class OutputDirLockedError(RuntimeError):
    """Another live training run holds the output folder."""


def _process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), None where unknown: with the pid it
    names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class OutputDirLock:
    """
    The lock file `LOCK_NAME` in an output folder.

    Args:
        output_dir (`str`): the folder of the run (it must exist).
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.record = None  # what this process wrote, while it holds the lock

    def acquire(self):
        """Take the lock, taking over a stale one; `OutputDirLockedError` naming the holder when a live run has it."""
        pid = os.getpid()
        record = {
            "pid": pid,
            "hostname": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "process_start": _process_start(pid),
        }
        for _ in range(3):  # a stale lock removed, then our own written (another run may race us to it)
            if self._create(record):
                self.record = record
                atexit.register(self.release)
                return self
            holder = self._read()
            if holder is None:  # released meanwhile
                continue
            reason = self._stale(holder)
            if reason is None:
                raise OutputDirLockedError(self._refusal(holder))
            logger.warning("Taking over the stale lock %s: %s.", self.path, reason)
            if self._read() == holder:  # still the stale one (not a racing run's new lock)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
        raise OutputDirLockedError(
            f"Could not take the lock {self.path}: other runs are starting in {self.output_dir}."
        )

    def release(self):
        """Remove the lock file if it is still this process's (idempotent)."""
        if self.record is None:
            return
        if self._read() == self.record:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.record = None
        atexit.unregister(self.release)

    def _create(self, record: dict) -> bool:
        """Write the lock atomically (a hard link of a complete file), False if one exists."""
        tmp = f"{self.path}.{record['pid']}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive creation
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            return True
        finally:
            os.remove(tmp)

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                record = json.load(f)
            return record if isinstance(record, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable

    def _stale(self, holder: dict) -> str | None:
        """Why the lock of `holder` is stale, or None while its process may be running."""
        pid, host = holder.get("pid"), holder.get("hostname")
        if not isinstance(pid, int) or host is None:
            try:  # a damaged file: stale once it is not being written any more
                age = time.time() - os.path.getmtime(self.path)
            except OSError:
                return "it was just released"
            return f"the lock file is unreadable and {age:.0f} s old" if age > 10 else None
        if host != socket.gethostname():
            return None  # its process cannot be checked from here
        if pid == os.getpid():
            return "this process holds it from an earlier run that did not release it"
        if not _alive(pid):
            return f"its process {pid} has ended"
        start = _process_start(pid)
        if holder.get("process_start") is not None and start is not None and start != holder["process_start"]:
            return f"its process {pid} has ended (the process id now names another process)"
        return None

    def _refusal(self, holder: dict) -> str:
        pid, host = holder.get("pid", "?"), holder.get("hostname", "?")
        started = f", started {holder['started']}" if holder.get("started") else ""
        text = (
            f"{self.output_dir} is in use by another training run: process {pid} on {host}{started} holds "
            f"{self.path}. Two runs in one output folder overwrite each other's checkpoints and model. Wait for it to "
            f"end, or stop it (kill {pid}: after `kill -9` of `accelerate launch` its worker processes go on "
            "running), or choose another --output_dir."
        )
        if host != socket.gethostname():
            text += (
                f" Its process cannot be checked from {socket.gethostname()}: if that run is over, delete {self.path}."
            )
        return text


def lock_output_dir(output_dir: str) -> OutputDirLock:
    """Take the lock of `output_dir` for this process (kept until `release_output_dir` or exit); see `OutputDirLock`."""
    key = os.path.realpath(output_dir)
    held = _HELD.get(key)
    if held is not None and held.record is not None:
        return held
    _HELD[key] = OutputDirLock(output_dir).acquire()
    return _HELD[key]


def release_output_dir(output_dir: str):
    """Release the lock this process holds on `output_dir`, if any."""
    held = _HELD.pop(os.path.realpath(output_dir), None)
    if held is not None:
        held.release()
