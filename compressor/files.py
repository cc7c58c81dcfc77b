"""Outputs that appear whole or not at all: a folder or a file is written under a temporary
sibling name and renamed into place, so a killed or failed run never leaves half an output.
One writer at a time: `file_lock` serializes the processes that write the same output folder
or cache entry."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)


class OutputExistsError(FileExistsError):
    pass


def check_output(out_dir: Path, overwrite: bool) -> None:
    if Path(out_dir).exists() and not overwrite:
        raise OutputExistsError(f"Output folder {out_dir} already exists; choose another --out or "
                                "pass --overwrite to replace it.")


def check_free_space(folder: Path, needed: int, what: str, remedy: str = "give --home on a larger disk") -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{what} need {needed / 1e9:.1f} GB on disk and {folder.parent} has "
                                    f"{free / 1e9:.1f} GB free; free space, or {remedy}", folder.parent)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(out_dir: Path) -> None:
    """Remove what a killed writer of `out_dir` left: its temporary folder, and the previous
    output it had moved aside, which goes back in place if the new one never arrived."""
    for leftover in sorted(out_dir.parent.glob(f".{out_dir.name}.*-*")):
        kind, _, pid = leftover.name.removeprefix(f".{out_dir.name}.").partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or process_alive(int(pid)):
            continue
        if kind == "old" and not out_dir.exists():
            leftover.rename(out_dir)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _owner(fd: int) -> dict:
    """The {"pid", "host"} a lock file holds ({} while its writer has not written it yet)."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # half written by a killed owner
        return {}
    return owner if isinstance(owner, dict) else {}


def _read_owner(path: Path) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return {}
    try:
        return _owner(fd)
    finally:
        os.close(fd)


def _wait_message(path: Path, owner: dict, what: str) -> str:
    host = owner.get("host")
    where = "on this host" if host == socket.gethostname() else f"on host {host}"
    return f"waiting for pid {owner.get('pid')} {where}, which holds the lock {path} on {what}"


def _try_lock(path: Path) -> int | None:
    """An open descriptor of `path` holding its exclusive flock, or None while another holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # its folder was removed meanwhile
        path.parent.mkdir(parents=True, exist_ok=True)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # the previous holder removed the file as it released it: lock the new one
        os.close(fd)
        return None
    return fd


def _acquire(path: Path, what: str) -> int:
    """Poll (sleeping 0.05 s, growing to 1 s: never a hot spin) until `path` is locked here."""
    delay, logged = 0.05, False
    while (fd := _try_lock(path)) is None:
        if not logged:
            owner = _read_owner(path)
            if owner:  # else its owner is writing it: name the pid on the next poll
                log.warning(_wait_message(path, owner, what))  # a warning: --quiet still says why it stalls
                logged = True
        time.sleep(delay)
        delay = min(2 * delay, 1.0)
    stale = _owner(fd)
    if stale:  # a holder always empties the file before it releases: this one was killed
        log.warning("the lock %s on %s was left by pid %s on host %s, which ended without releasing it "
                    "(killed?); taking it over", path, what, stale.get("pid"), stale.get("host"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
    return fd


@contextmanager
def file_lock(path: Path, what: str = "a shared file") -> Iterator[None]:
    """Hold an exclusive lock named `path` (`what` it guards, for messages) while the block runs.

    The lock is an flock on the file, which holds the owner's pid and host for the messages of
    the processes that wait. The kernel releases an flock when its owner dies, so a lock left by
    a killed process (whose pid is dead) is taken over at once, with a warning. On release the
    file is emptied and removed; a waiter that had opened the removed file notices it is gone
    and locks the new one (so two processes never both hold it). Not reentrant: a process that
    takes the same lock twice waits for itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _acquire(path, what)
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # A file system without flock (some network mounts): run unguarded rather than not at all.
        log.warning("cannot lock %s (%s); writing %s without a lock", path, error.strerror, what)
        fd = None
    if fd is None:
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
        return
    try:
        yield
    finally:
        os.ftruncate(fd, 0)  # emptied first: a file with an owner in it means a killed owner
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)


def folder_lock(out_dir: Path) -> Path:
    """The lock file of an output folder: a hidden sibling that clean_stale leaves alone."""
    return out_dir.with_name(f".{out_dir.name}.lock")


@contextmanager
def atomic_folder(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out_dir`, on failure it is removed.
    Two processes writing the same `out_dir` take turns (the second then finds it exists)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder_lock(out_dir), f"the output folder {out_dir}"):
        with _atomic_folder(out_dir, overwrite) as tmp:
            yield tmp


@contextmanager
def _atomic_folder(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    clean_stale(out_dir)
    check_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, out_dir: Path) -> None:
    """Rename the finished folder `new` to `out_dir`. An existing `out_dir` is moved aside
    first and deleted last, so a kill in between leaves it (clean_stale puts it back), never
    neither."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        new.rename(out_dir)
        shutil.rmtree(old)
    else:
        new.rename(out_dir)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write` on a temporary sibling of `path`, then rename it into place."""
    path = Path(path)
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):  # what killed writers left (a GGUF is 1 GB)
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            leftover.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
