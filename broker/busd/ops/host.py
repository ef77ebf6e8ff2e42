"""Host limits a bus depends on, computed once for everyone who needs them.

Contract: :func:`inotify_budget` is THE answer to "can the daemon watch this bus
with inotify?". The daemon's watcher (:mod:`busd.runtime.watcher`) falls back to
polling exactly when :attr:`InotifyBudget.native` is False, and ``busd doctor``
reports an error exactly then, so the two can never disagree.

The watcher watches ``outbox/`` and ``inbox/`` recursively: one inotify watch per
directory (the two tops and every agent directory in them), and one inotify
instance. The limits in force are the smaller of the per-user sysctls
(``/proc/sys/fs/inotify/max_user_*``) and those of the user namespace
(``/proc/sys/user/max_inotify_*``); where neither exists (not Linux) there is no
limit to check. Everything here reads metadata only and never prints, except
:func:`raise_fd_limit`, which lifts the daemon's soft descriptor limit to the hard one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from busd.config import Config
from busd.ops.findings import Finding
from busd.store.layout import Layout

__all__ = [
    "REMOTE_FS",
    "InotifyBudget",
    "InotifyLimits",
    "check_disk",
    "check_filesystem",
    "check_inotify",
    "flock_holders",
    "inotify_budget",
    "mount_of",
    "pid_alive",
    "raise_fd_limit",
    "read_inotify_limits",
]

_DISK_MIN_FREE_BYTES = 1 << 30
_DISK_MIN_FREE_RATIO = 0.05
# Filesystems where inotify misses changes (made on other machines, or by a FUSE
# daemon): busd then only sees files at its periodic rescan.
REMOTE_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "ncpfs", "afs", "9p", "fuse", "fuseblk"}
)

_WATCH_LIMITS = ("/proc/sys/fs/inotify/max_user_watches", "/proc/sys/user/max_inotify_watches")
_INSTANCE_LIMITS = (
    "/proc/sys/fs/inotify/max_user_instances",
    "/proc/sys/user/max_inotify_instances",
)


@dataclass(frozen=True, slots=True)
class InotifyLimits:
    """The inotify limits in force for this process; None where there is none to read."""

    max_watches: int | None
    max_instances: int | None


@dataclass(frozen=True, slots=True)
class InotifyBudget:
    """What watching a bus needs against what the host allows."""

    needed_watches: int
    """Directories the watcher watches: ``outbox/``, ``inbox/`` and every agent directory."""
    limits: InotifyLimits

    @property
    def native(self) -> bool:
        """True when inotify can watch every directory: else the daemon polls."""
        if self.limits.max_instances is not None and self.limits.max_instances < 1:
            return False
        return self.limits.max_watches is None or self.needed_watches <= self.limits.max_watches

    @property
    def tight(self) -> bool:
        """More than half of the watch limit, which every program of the user shares."""
        limit = self.limits.max_watches
        return limit is not None and self.needed_watches > limit // 2


def _read_proc_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _smallest(paths: tuple[str, ...]) -> int | None:
    values = [v for p in paths if (v := _read_proc_int(p)) is not None]
    return min(values) if values else None


def read_inotify_limits() -> InotifyLimits:
    """The inotify limits in force (the smaller of the user and namespace sysctls)."""
    return InotifyLimits(_smallest(_WATCH_LIMITS), _smallest(_INSTANCE_LIMITS))


def _watched_directories(layout: Layout) -> int:
    count = 2  # outbox/ and inbox/ themselves
    for top in (layout.outbox, layout.inbox):
        try:
            with os.scandir(top) as it:
                count += sum(1 for e in it if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            continue
    return count


def inotify_budget(layout: Layout) -> InotifyBudget:
    """The inotify budget of the bus ``layout`` on this host, right now."""
    return InotifyBudget(_watched_directories(layout), read_inotify_limits())


# -- processes and mounts ----------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (ours or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def flock_holders(path: Path) -> list[int] | None:
    """Pids holding a ``flock`` on ``path`` (from ``/proc/locks``); None if unknown.

    Looking costs nothing and, unlike trying the lock, cannot make a starting
    daemon believe another one runs.
    """
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: list[int] = []
    for line in lines:
        parts = line.split()
        if "->" in parts:  # a waiter, not a holder
            continue
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == wanted:
            try:
                pids.append(int(parts[4]))
            except ValueError:
                continue
    return pids


# -- doctor's host checks ---------------------------------------------------


def check_inotify(config: Config, fix: bool) -> Finding:
    """``busd doctor``'s inotify check: an error exactly when the watcher polls."""
    if config.force_polling:
        return Finding("inotify", "ok", "force_polling = true: the daemon polls, no watches used")
    budget = inotify_budget(config.layout)
    limits = budget.limits
    if limits.max_instances is not None and limits.max_instances < 1:
        return Finding(
            "inotify",
            "error",
            "no inotify instance may be created (max_user_instances is 0): the daemon polls. "
            "Raise it: sysctl fs.inotify.max_user_instances=128",
        )
    if limits.max_watches is None:
        return Finding("inotify", "ok", "no inotify limit to check on this system")
    # The smaller of max_user_watches and the user namespace's max_inotify_watches.
    needed, limit = budget.needed_watches, limits.max_watches
    detail = f"the daemon needs about {needed} watches; the limit in force is {limit}"
    if not budget.native:
        return Finding(
            "inotify",
            "error",
            f"{detail}: the daemon falls back to polling (slower, and more CPU). "
            "Raise it: sysctl fs.inotify.max_user_watches=524288",
        )
    if budget.tight:
        return Finding(
            "inotify",
            "warn",
            f"{detail}, shared with every other program of this user: raise it "
            "(sysctl fs.inotify.max_user_watches=524288)",
        )
    return Finding("inotify", "ok", detail)


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def check_disk(config: Config, fix: bool) -> Finding:
    """``busd doctor``'s free-space check (bytes and inodes)."""
    root = config.layout.root
    usage = shutil.disk_usage(root)
    ratio = usage.free / usage.total if usage.total else 1.0
    detail = f"{_gib(usage.free)} free of {_gib(usage.total)} ({ratio:.0%})"
    try:
        vfs = os.statvfs(root)
        inodes = vfs.f_favail / vfs.f_files if vfs.f_files else 1.0
    except OSError:
        inodes = 1.0
    if usage.free < _DISK_MIN_FREE_BYTES or ratio < _DISK_MIN_FREE_RATIO:
        return Finding(
            "disk_space",
            "warn",
            f"{detail}: under 5% or 1 GiB. When the disk fills, producers and the journal "
            "fail (storage_error); run `busd gc`, lower journal_max_bytes, or free space",
        )
    if inodes < _DISK_MIN_FREE_RATIO:
        return Finding(
            "disk_space",
            "warn",
            f"{detail}, but only {inodes:.0%} of inodes are free: each message is a file",
        )
    return Finding("disk_space", "ok", detail)


def mount_of(path: Path) -> tuple[str, str] | None:
    """``(mount point, fstype)`` of the mount holding ``path``, from /proc/mounts."""
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, parts[2])
    return best


def check_filesystem(config: Config, fix: bool) -> Finding:
    """``busd doctor``'s filesystem check: network and FUSE filesystems miss events."""
    mount = mount_of(config.layout.root)
    if mount is None:
        return Finding("filesystem", "ok", "filesystem type unknown (no /proc/mounts)")
    point, fstype = mount
    base = fstype.split(".", 1)[0]
    detail = f"{fstype} mounted at {point}"
    if base in REMOTE_FS or fstype in REMOTE_FS:
        if config.force_polling:
            return Finding("filesystem", "ok", f"{detail}; force_polling = true already")
        return Finding(
            "filesystem",
            "warn",
            f"{detail}: a network or FUSE filesystem, where file events are not (reliably) "
            "reported, so new files wait for the rescan every "
            f"{config.rescan_interval_seconds:g} s. Set force_polling = true, or keep the "
            "bus on a local disk",
        )
    return Finding("filesystem", "ok", detail)


def raise_fd_limit() -> None:
    """Lift the soft descriptor limit to the hard one: each client costs a descriptor."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # keep what we have; accept errors are survived anyway
