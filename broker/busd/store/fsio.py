"""Durable file primitives: the one copy of each, for every module of the store.

Everything here is synchronous and may block on the disk: async callers run it
in worker threads. Contracts:

* :func:`write_durable` returns only after the file's bytes and its directory
  entry are on disk (unless ``fsync=False``), and never replaces an existing
  file: a name clash raises ``FileExistsError`` and leaves both files intact.
* :func:`replace_durable` replaces a file atomically (readers see the old bytes
  or the new, never a mix) and returns once both the bytes and the new directory
  entry are on disk; no temporary file is left behind in any failure.
* :func:`file_lock` is THE lock of every lock file of a bus (protocol.md 6.3, 9):
  ``flock(2)`` on the whole file on POSIX, a byte-range lock on Windows, given up
  with :class:`LockTimeout` after ``timeout``. The lock dies with its process.
* :func:`read_limited` never follows a symlink, never opens anything but a
  regular file without blocking (FIFOs), and never reads more than the limit.
* :func:`list_names` lists the visible names of a directory (not starting with
  ``.``: in-progress writes by convention), sorted; a missing directory is empty.
* Disk full, read-only, quota and permission failures (:data:`STORAGE_ERRNOS`)
  become :class:`StorageError` through :func:`storage_error`, everywhere alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from busd.errors import InvalidMessage, LockTimeout, Reason, StorageError

__all__ = [
    "STORAGE_ERRNOS",
    "file_lock",
    "fsync_dir",
    "fsync_file",
    "list_names",
    "mark_top_dir",
    "read_limited",
    "rename_noreplace",
    "replace_durable",
    "scan_entries",
    "storage_error",
    "syncfs",
    "tmp_name",
    "write_durable",
]

_IS_WINDOWS = sys.platform == "win32"
STORAGE_ERRNOS: frozenset[int] = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EROFS", "EDQUOT", "EACCES", "EPERM")
    if hasattr(errno, name)  # EDQUOT is missing on some platforms
)
"""The errnos that mean "the filesystem refuses this write": disk full, read-only,
quota, permissions. They become :class:`StorageError`; any other ``OSError`` is a bug
or a race and propagates as it is."""
_counter = itertools.count()
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _load_renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()
_renameat2_works = _renameat2 is not None


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (a no-op on Windows)."""
    if _IS_WINDOWS:
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def syncfs(path: Path) -> bool:
    """Flush the whole filesystem holding ``path`` (Linux ``syncfs(2)``).

    Returns False where there is no syncfs, so the caller fsyncs file by file.
    One call waits for one device flush, where an fsync per file waits for one
    flush each: a checkpoint of 1,000 deliveries on a disk whose flush takes 2 ms
    is 2 ms instead of 2 s. Since Linux 5.8 it reports writeback errors as fsync does.
    """
    if _syncfs is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
    return True


def _ioc(direction: int, number: int) -> int:
    # _IOR/_IOW('f', number, long) from <linux/fs.h>; the kernel reads and writes an int.
    return (direction << 30) | (ctypes.sizeof(ctypes.c_long) << 16) | (ord("f") << 8) | number


_FS_IOC_GETFLAGS = _ioc(2, 1)
_FS_IOC_SETFLAGS = _ioc(1, 2)
_FS_TOPDIR_FL = 0x00020000


def mark_top_dir(path: Path) -> bool:
    """Best effort: mark directory ``path`` as the top of a hierarchy (``chattr +T``).

    ext4 (and ext3) then spread the subdirectories created under it over block
    groups with free inodes (the Orlov allocator), instead of packing them into
    the parent's group. New files get their inodes in their directory's group:
    when that group is full, each creation searches for room, and that was
    measured at 0.8-1 ms of system time per file against 15-25 us in an empty
    group. Returns False where the filesystem or platform has no such flag.
    """
    if not sys.platform.startswith("linux"):
        return False
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
        flags = int.from_bytes(buf[:4], sys.byteorder)
        if flags & _FS_TOPDIR_FL:
            return True
        buf[:4] = (flags | _FS_TOPDIR_FL).to_bytes(4, sys.byteorder)
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, buf)
    except OSError:  # ENOTTY/EOPNOTSUPP (tmpfs, btrfs, ...), EPERM: a hint only
        return False
    finally:
        os.close(fd)
    return True


def fsync_file(path: Path) -> None:
    """Make the bytes of file ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name() -> str:
    """Return a name unique among every process and thread writing to one ``tmp/``."""
    return f"{os.getpid()}-{threading.get_ident()}-{next(_counter)}-{time.time_ns()}.tmp"


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` atomically, raising ``FileExistsError`` if ``dst`` exists.

    Linux uses ``renameat2(RENAME_NOREPLACE)``; where the filesystem lacks it,
    ``link`` + ``unlink`` gives the same no-replace guarantee (a crash between
    the two leaves the source behind, which is a harmless extra name). Windows
    ``rename`` already refuses to replace; transient sharing violations from
    scanners and indexers are retried briefly.
    """
    global _renameat2_works
    if _renameat2_works and _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
        _renameat2_works = False
    if _IS_WINDOWS:
        _rename_windows(src, dst)
        return
    if stat.S_ISDIR(os.lstat(src).st_mode):
        # link(2) cannot take a directory; check-then-rename is the best left, and
        # only the DLQ moves directories (found where a message file should be).
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst))
        os.rename(src, dst)
        return
    os.link(src, dst)
    os.unlink(src)


def _rename_windows(src: Path, dst: Path) -> None:
    for attempt in range(50):
        try:
            os.rename(src, dst)
            return
        except PermissionError as exc:
            # ERROR_ACCESS_DENIED (5) and ERROR_SHARING_VIOLATION (32) are what
            # antivirus and indexers cause while they hold the file open.
            if getattr(exc, "winerror", None) not in (5, 32) or attempt == 49:
                raise
            time.sleep(0.01 * (attempt + 1))


def write_durable(
    directory: Path, name: str, data: bytes, *, tmp_dir: Path, fsync: bool = True
) -> Path:
    """Write ``data`` as ``directory/name`` atomically and (by default) durably.

    Steps: write ``tmp_dir/<unique>``, fsync it, publish it under ``name``
    without replacing (``FileExistsError`` if taken), fsync ``directory``.
    ``tmp_dir`` must be on the same filesystem. Disk-full, read-only and
    permission failures raise :class:`StorageError`; no half file is left in
    ``directory`` or ``tmp_dir`` in any failure.
    """
    tmp = tmp_dir / tmp_name()
    target = directory / name
    try:
        _write_new(tmp, data, 0o600, fsync)
        rename_noreplace(tmp, target)
        if fsync:
            fsync_dir(directory)
    except OSError as exc:
        _unlink_quietly(tmp)
        if isinstance(exc, FileExistsError):
            raise
        if exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc, path=target) from exc
        raise
    return target


def _write_new(tmp: Path, data: bytes, mode: int, fsync: bool) -> None:
    """Create ``tmp`` (never an existing file), write all of ``data``, fsync it if asked."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def replace_durable(
    path: Path,
    data: bytes,
    *,
    tmp_dir: Path | None = None,
    mode: int = 0o600,
    fsync: bool = True,
) -> None:
    """Atomically replace (or create) ``path`` with ``data``, durably.

    Steps: write a temporary file (in ``tmp_dir``, else hidden beside ``path``:
    ``tmp_dir`` must be on the same filesystem), fsync it, ``os.replace`` it over
    ``path``, fsync ``path``'s directory. ``fsync=False`` skips both fsyncs (for a
    bus configured without fsync); the replace stays atomic. Storage failures raise
    :class:`StorageError`; the temporary file never survives a failure.
    """
    directory = path.parent
    tmp = (tmp_dir / tmp_name()) if tmp_dir is not None else directory / f".{tmp_name()}"
    try:
        _write_new(tmp, data, mode, fsync)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(directory)
    except OSError as exc:
        _unlink_quietly(tmp)
        if exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc, path=path) from exc
        raise


def storage_error(exc: OSError, *, path: Path | str | None = None) -> StorageError:
    """The :class:`StorageError` for ``exc`` (whose errno should be in :data:`STORAGE_ERRNOS`).

    The message names ``path`` (else the exception's file name, else the bus) and the
    OS reason; the context carries ``path`` and ``errno`` for scripts.
    """
    where = path if path is not None else exc.filename
    why = exc.strerror or str(exc)
    if where is None:
        return StorageError(f"the bus cannot be written: {why}", errno=exc.errno)
    return StorageError(f"cannot write {where}: {why}", path=str(where), errno=exc.errno)


def list_names(directory: Path, *, hidden: bool = False, sort: bool = True) -> list[str]:
    """The visible names in ``directory``, sorted; a missing directory (or a file) is empty.

    Names starting with ``.`` are in-progress writes or lock files by convention and
    are left out unless ``hidden`` (busd's own hidden claims, ``locks/<a>/.claim-*``).
    Sorted (delivery names sort in arrival order) unless ``sort`` is False: a caller
    that needs only the min/max of a huge inbox, or filters first, sorts less.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    if not hidden:
        names = [n for n in names if not n.startswith(".")]
    return sorted(names) if sort else names


def scan_entries(directory: Path) -> list[os.DirEntry[str]]:
    """Every entry of ``directory`` with its cached type and stat (hidden ones too), for
    callers that need mtimes or types; a missing directory (or a file) is empty."""
    try:
        with os.scandir(directory) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


_LOCK_POLL_FIRST_S = 0.0005
_LOCK_POLL_MAX_S = 0.01


@contextlib.contextmanager
def file_lock(
    path: Path, *, timeout: float, shared: bool = False, what: str = "lock file"
) -> Iterator[BinaryIO]:
    """Hold an OS lock on ``path`` (created if missing) for the ``with`` block.

    Exclusive unless ``shared``. Polls (0.5 ms, doubling to 10 ms) until ``timeout``
    seconds have passed, then raises :class:`LockTimeout` naming ``what`` and the path;
    ``timeout=0`` tries once. Yields the open file (read/write, binary) so a holder may
    write information into it (the bus lock does). The lock is taken on a fresh open
    file each time, so it is never shared with a forked child or another thread, and
    it dies with its process. The file mode is the umask's default (protocol.md 2).
    """
    if timeout < 0:
        raise ValueError("timeout must be >= 0")
    # Imported here: it costs ~10 ms at start-up, and `busd status` never locks.
    import portalocker

    fh = _open_lock_file(path)
    try:
        flags = portalocker.LockFlags.SHARED if shared else portalocker.LockFlags.EXCLUSIVE
        flags |= portalocker.LockFlags.NON_BLOCKING
        deadline = time.monotonic() + timeout
        delay = _LOCK_POLL_FIRST_S
        while True:
            try:
                portalocker.lock(fh, flags)
                break
            except portalocker.exceptions.LockException:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    msg = f"could not lock {what} {path} within {timeout:g} s"
                    raise LockTimeout(msg, path=str(path), timeout=timeout) from None
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, _LOCK_POLL_MAX_S)
        try:
            yield fh
        finally:
            portalocker.unlock(fh)
    finally:
        fh.close()


def _open_lock_file(path: Path) -> BinaryIO:
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc, path=path) from exc
        raise
    return os.fdopen(fd, "r+b", buffering=0)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_limited(path: Path, max_bytes: int) -> bytes:
    """Read a whole regular file of at most ``max_bytes`` bytes.

    Raises :class:`InvalidMessage` with reason ``not_a_regular_file`` for a
    symlink, FIFO, directory, socket or device (checked on the opened fd, so
    a swap after a ``stat`` cannot fool it), and ``too_large`` when the file is
    bigger than the limit (checked before reading, and again while reading in
    case it grows). ``FileNotFoundError`` propagates: the file was claimed or
    removed by someone else.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) or (_IS_WINDOWS and os.path.islink(path)):
            raise InvalidMessage(
                Reason.NOT_A_REGULAR_FILE, f"{path.name} is a symbolic link; not followed"
            ) from exc
        if isinstance(exc, IsADirectoryError):
            raise InvalidMessage(Reason.NOT_A_REGULAR_FILE, f"{path.name} is a directory") from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise InvalidMessage(
                Reason.UNREADABLE, f"{path.name} may not be read by busd (permission denied)"
            ) from exc
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket or a device without driver
            kind = _kind(os.lstat(path).st_mode)
            raise InvalidMessage(Reason.NOT_A_REGULAR_FILE, f"{path.name} is a {kind}") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _kind(st.st_mode)
            raise InvalidMessage(Reason.NOT_A_REGULAR_FILE, f"{path.name} is a {kind}")
        if st.st_size > max_bytes:
            raise InvalidMessage(
                Reason.TOO_LARGE, f"{st.st_size} bytes is over the limit of {max_bytes} bytes"
            )
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, max(65536, max_bytes + 1 - total))
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise InvalidMessage(
                    Reason.TOO_LARGE, f"more than the limit of {max_bytes} bytes (still growing)"
                )
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"
