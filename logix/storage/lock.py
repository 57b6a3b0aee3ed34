"""One writer per rank of a project: `<project>/writer-r<rank>.lock` (docs/format.md, "One
writer at a time").

A session takes its rank's lock before it writes anything and gives it back at finalize. The
lock is an flock(2) on that file, which the kernel drops however its process ends (SIGKILL
included), so a crashed writer never blocks the next run. The file names the holder (host, pid,
start time) for the refusal message and is emptied on release: a holder named there when the
lock is taken ended without finalize().
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import time
import warnings
import weakref
from typing import Callable, Optional

from logix.errors import UsageError
from logix.storage.format import lock_name

# The locks this process holds, by path: two Runs of one process share one pid (and flock
# semantics differ on network file systems), so they are told apart here.
_HELD: "weakref.WeakValueDictionary[str, WriterLock]" = weakref.WeakValueDictionary()


class WriterLock:
    """`busy()`: whether its holder still has rows to write. Another Run of the same process
    takes the lock over from a holder that is not busy (e.g. a run left after a refused step);
    that holder is then `taken_over` and must not write again."""

    def __init__(self, project_dir: str, rank: int, busy: Callable[[], bool]) -> None:
        self.project_dir, self.rank, self.busy = project_dir, rank, busy
        self.path = os.path.join(project_dir, lock_name(rank))
        self.taken_over = False
        self._key = ""  # the lock file's real path while held (the key in _HELD)
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None  # a lock inherited by a forked child is not the child's

    @property
    def held(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def acquire(self) -> None:
        """Take the lock, or raise a UsageError naming the process that holds it."""
        if self.held:
            return
        key = os.path.realpath(self.path)
        other = _HELD.get(key)
        if other is not None and other.held:
            if other.busy():
                raise UsageError(f"another Run of this process is writing to "
                                 f"{self.project_dir!r} (rank {self.rank}): call its finalize() "
                                 "before logging into the same project with a new Run.")
            other.taken_over = True
            other.release()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                warnings.warn(f"{self.path!r} cannot be locked ({e}): this file system does "
                              "not tell LogIX whether another process writes to the project. "
                              "Run one writer at a time.")
            else:
                holder = _holder(_named(fd))
                os.close(fd)
                raise UsageError(
                    f"{holder} is writing to {self.project_dir!r} (rank {self.rank}); two "
                    "writers would overwrite each other's shards. Wait for it to finish "
                    "(finalize), stop it, or log into another project name.") from None
        previous = _read(fd)
        if previous:
            warnings.warn(f"{_holder(previous)} stopped writing to {self.project_dir!r} "
                          "without finalize(): its rows not yet flushed are not in the log (its "
                          "flushed shards are). This run takes its lock over.")
        now = datetime.datetime.now(datetime.timezone.utc)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": now.isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())  # not fsynced: the lock dies with its process
        except OSError:
            _empty(fd)
            os.close(fd)
            raise
        self._fd, self._pid, self._key = fd, os.getpid(), key
        _HELD[key] = self

    def release(self) -> None:
        """Empty the file (its holder finished) and unlock it."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if self._pid == os.getpid():
            _empty(fd)
            if _HELD.get(self._key) is self:
                del _HELD[self._key]
        os.close(fd)

    def __del__(self) -> None:  # a Run dropped by its process (its writer threads ended)
        self.release()


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {"pid": "?"}
    return data if isinstance(data, dict) else {"pid": "?"}


def _named(fd: int) -> dict:
    """The holder named in a locked file (which its holder may be about to write)."""
    for _ in range(100):
        info = _read(fd)
        if info.get("pid", "?") != "?":
            break
        time.sleep(0.01)
    return info


def _empty(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass


def _holder(info: dict) -> str:
    return (f"the process with pid {info.get('pid', '?')} on host {info.get('host', '?')!r} "
            f"(since {info.get('started', '?')})")
