"""``busd doctor``: checks that explain what is wrong with a bus, and safe repairs.

:func:`diagnose` runs every check in a fixed order and returns one
:class:`Finding` per check: ``status`` is ``ok``, ``warn`` or ``error``,
``detail`` says what was seen and what to do, ``fixed`` tells whether
``fix=True`` repaired it. Nothing here prints. The checks read metadata only
(modes, owners, mtimes, ``/proc``), never a message or the journal.

Repairs are limited to what cannot lose data or disturb a running daemon:
removing socket files nothing listens on (only while no process holds the bus
lock), removing files in ``tmp/`` older than a day, returning claims whose lease
expired long ago (:func:`busd.consumer.return_expired`), narrowing modes to
0700 / 0600, creating missing layout directories, replacing stale bus-lock
content by taking the lock for an instant as a CLI pass does, and (``compat =
"tapps"``) moving busd's own dead letters left in ``dlq/`` into ``dlq/busd/``, out of
the reach of Tapps' ``replay_dlq``. A Tapps claim without a lease yet (mtime <=
ctime, see :mod:`busd.routing.consumer`) is not an expired claim.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from busd.config import Config, endpoints
from busd.ops.findings import Finding, Status, fixed, shown
from busd.ops.host import check_disk, check_filesystem, check_inotify, flock_holders, pid_alive
from busd.routing.consumer import return_expired
from busd.routing.retention import TMP_MAX_AGE_S
from busd.store import foreign
from busd.store.buslock import BusLock
from busd.store.layout import init_bus

__all__ = [
    "CHECKS",
    "CLAIM_EXPIRED_LONG_AGO_S",
    "Finding",
    "diagnose",
]

CLAIM_EXPIRED_LONG_AGO_S = 300.0
"""A claim whose lease ran out this long ago should have been returned by a sweep."""
_SUBDIRS = ("tmp", "outbox", "inbox", "locks", "processed", "dlq", "journal")


# -- checks ------------------------------------------------------------------


def _layout(config: Config, fix: bool) -> Finding:
    root = config.layout.root
    missing = [d for d in _SUBDIRS if not (root / d).is_dir()]
    if missing:
        f = Finding("layout", "error", f"{root} lacks {', '.join(missing)}/")
        if fix:
            init_bus(root)
            return fixed(f, "created them (busd init)")
        return f
    root_dev = os.stat(root).st_dev
    other = [d for d in _SUBDIRS if os.stat(root / d).st_dev != root_dev]
    if other:
        return Finding(
            "layout",
            "error",
            f"{', '.join(other)} on another filesystem than {root}: the protocol renames "
            "files between these directories, so everything must be on one filesystem",
        )
    return Finding("layout", "ok", f"{root}: all {len(_SUBDIRS)} directories present")


def _mode_problem(path: Path, wanted: int, owner: int) -> tuple[str | None, bool]:
    """``(problem, fixable)`` for ``path``'s owner and mode; problem is None if fine."""
    st = os.lstat(path)
    if st.st_uid != owner:
        return f"{path} is owned by uid {st.st_uid}, not by uid {owner}", False
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"{path} is {mode:04o}, expected {wanted:04o}", True
    return None, False


def _shared(config: Config) -> bool:
    return bool(config.allowed_uids or config.allowed_gids)


def _root_permissions(config: Config, fix: bool) -> Finding:
    root = config.layout.root
    problem, fixable = _mode_problem(root, 0o700, os.geteuid())
    if problem is None:
        return Finding("root_permissions", "ok", f"{root} is 0700 and yours")
    if fixable and _shared(config):
        return Finding(
            "root_permissions",
            "ok",
            f"{problem}: widened on purpose, as allowed_uids/allowed_gids are set",
        )
    if not fixable:
        return Finding(
            "root_permissions",
            "error",
            f"{problem} (you): run busd as the bus owner (sudo -u ...), or files you create "
            "will be unreadable to it",
        )
    f = Finding("root_permissions", "warn", f"{problem}: other users can reach the bus")
    if fix:
        os.chmod(root, 0o700)
        return fixed(f, "chmod 0700")
    return f


def _directories(config: Config) -> list[Path]:
    layout = config.layout
    dirs = [layout.root / d for d in _SUBDIRS]
    for parent in (layout.outbox, layout.inbox, layout.locks):
        try:
            with os.scandir(parent) as it:
                dirs += [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            continue
    return dirs


def _directory_permissions(config: Config, fix: bool) -> Finding:
    owner = os.stat(config.layout.root).st_uid  # the bus owner, whoever runs doctor
    wide: list[Path] = []
    foreign: list[str] = []
    for path in _directories(config):
        try:
            problem, fixable = _mode_problem(path, 0o700, owner)
        except FileNotFoundError:
            continue
        if problem is not None and fixable:
            wide.append(path)
        elif problem is not None:
            foreign.append(problem)
    if foreign:
        return Finding(
            "directory_permissions",
            "error",
            f"{shown(foreign)}: busd cannot manage them; chown them to the bus owner",
        )
    if not wide:
        return Finding(
            "directory_permissions", "ok", "every bus directory is 0700 and the bus owner's"
        )
    names = [str(p.relative_to(config.layout.root)) for p in wide]
    f = Finding(
        "directory_permissions",
        "warn",
        f"{len(wide)} directories wider than 0700: {shown(names)} "
        "(a producer without umask 077 made them)",
    )
    if fix:
        for path in wide:
            os.chmod(path, 0o700)
        return fixed(f, f"chmod 0700 on {len(wide)}")
    return f


def _probe(path: Path) -> int:
    """0 if something accepts on the socket at ``path``, else the errno."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect(str(path))
    except OSError as exc:
        return exc.errno or errno.ECONNREFUSED
    finally:
        sock.close()
    return 0


def _socket(config: Config, fix: bool) -> Finding:
    root = config.layout.root
    owner = os.stat(root).st_uid
    path_file = config.layout.socket_path_file
    lines: list[str] = []
    stale: list[Path] = []
    worst: Status = "ok"

    def note(status: Status, text: str) -> None:
        nonlocal worst
        lines.append(text)
        if status == "error" or (status == "warn" and worst == "ok"):
            worst = status

    for path in endpoints(config):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISSOCK(st.st_mode):
            note("error", f"{path} exists but is not a socket: move it away")
            continue
        err = _probe(path)
        if err == 0:
            mode = stat.S_IMODE(st.st_mode)
            if st.st_uid != owner:
                note("warn", f"daemon listening at {path}, owned by uid {st.st_uid}, not {owner}")
            elif mode & 0o077:
                note("warn", f"daemon listening at {path} with mode {mode:04o}, expected 0600")
            else:
                note("ok", f"daemon listening at {path} (0600)")
        elif err in (errno.ECONNREFUSED, errno.ENOENT):
            stale.append(path)
            note("warn", f"stale socket file {path}: nothing listens (the daemon died?)")
        else:
            note("warn", f"cannot connect to {path}: {os.strerror(err)}")
    written = _read_path_file(path_file)
    if written is not None and not os.path.lexists(written):
        note("warn", f"{path_file.name} names {written}, which does not exist")
        stale.append(path_file)
    if not lines:
        return Finding("socket", "ok", "no socket file (no daemon running)")
    f = Finding("socket", worst, "; ".join(lines))
    if fix and stale and worst == "warn":
        holders = flock_holders(config.layout.lock_file)
        if holders:
            # Someone routes this bus right now (a daemon starting?): leave its files alone.
            return f
        removed = []
        for path in stale:
            if path == path_file or _probe(path) in (errno.ECONNREFUSED, errno.ENOENT):
                try:
                    os.unlink(path)
                    removed.append(str(path))
                except FileNotFoundError:
                    continue
        if written is not None and Path(written) in stale:
            try:
                os.unlink(path_file)
                removed.append(str(path_file))
            except FileNotFoundError:
                pass
        if removed:
            return fixed(f, f"removed {', '.join(dict.fromkeys(removed))}")
    return f


def _read_path_file(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def _lock(config: Config, fix: bool) -> Finding:
    lock_file = config.layout.lock_file
    if not lock_file.exists():
        return Finding("lock", "ok", "busd.lock does not exist yet (nothing has routed)")
    lock = BusLock(config.layout, role="cli")
    holder = lock.holder()
    holders = flock_holders(lock_file)
    pid = holder.get("pid") if holder else None
    role = holder.get("role") if holder else None
    if holders:
        return Finding("lock", "ok", f"held by pid {shown([str(p) for p in holders])} ({role})")
    if holder is None or not isinstance(pid, int):
        f = Finding("lock", "warn", "busd.lock content is unreadable")
    elif holders is None and pid_alive(pid):
        return Finding("lock", "ok", f"last taken by pid {pid} ({role}), which is alive")
    elif role == "daemon" and not pid_alive(pid):
        f = Finding(
            "lock",
            "warn",
            f"stale lock: busd.lock names daemon pid {pid}, which is not running, and "
            "nobody holds the lock: the daemon died without stopping (crash, kill -9, "
            "out of memory). Harmless for the next start; see why it died "
            "(journalctl -u busd) and start it again",
        )
    else:
        return Finding("lock", "ok", f"free; last taken by pid {pid} ({role})")
    if fix and lock.acquire(timeout=0):
        # What any CLI routing pass does: the content now names a short-lived cli holder.
        lock.release()
        return fixed(f, "rewrote busd.lock by taking and releasing the lock")
    return f


def _claims(config: Config, fix: bool) -> Finding:
    locks = config.layout.locks
    limit = time.time() - CLAIM_EXPIRED_LONG_AGO_S
    old: dict[str, int] = {}
    try:
        agents = sorted(e.name for e in os.scandir(locks) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        agents = []
    tapps = config.compat == "tapps"
    for agent in agents:
        try:
            with os.scandir(locks / agent) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                        if tapps and st.st_mtime_ns <= st.st_ctime_ns:
                            continue  # a Tapps claim the sweep has not stamped yet: no lease
                        if st.st_mtime < limit:
                            old[agent] = old.get(agent, 0) + 1
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            continue
    if not old:
        return Finding("expired_claims", "ok", "no claim expired long ago")
    total = sum(old.values())
    who = shown([f"{a} ({n})" for a, n in old.items()])
    f = Finding(
        "expired_claims",
        "warn",
        f"{total} claims expired more than {CLAIM_EXPIRED_LONG_AGO_S / 60:g} min ago and were "
        f"not returned: {who}. Claims record no pid; the consumer died or no sweep ran "
        "(no daemon; `busd recv AGENT` sweeps its agent)",
    )
    if fix:
        report = return_expired(config)
        return fixed(
            f,
            f"returned {len(report.returned)} to their inboxes, "
            f"dead-lettered {len(report.dead_lettered)} (delivery limit)",
        )
    return f


def _tmp(config: Config, fix: bool) -> Finding:
    tmp = config.layout.tmp
    limit = time.time() - TMP_MAX_AGE_S
    old: list[str] = []
    try:
        with os.scandir(tmp) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(st.st_mode) and st.st_mtime < limit:
                    old.append(e.name)
    except FileNotFoundError:
        return Finding("tmp_files", "ok", "no tmp/ directory")
    if not old:
        return Finding("tmp_files", "ok", "no file in tmp/ older than a day")
    f = Finding(
        "tmp_files",
        "warn",
        f"{len(old)} files in tmp/ older than a day (writes abandoned by killed producers): "
        f"{shown(sorted(old))}",
    )
    if fix:
        removed = 0
        for name in old:
            try:
                os.unlink(tmp / name)
                removed += 1
            except FileNotFoundError:
                continue
        return fixed(f, f"removed {removed}")
    return f


def _dlq_location(config: Config, fix: bool) -> Finding:
    layout = config.layout
    if not layout.dlq_subdir:
        return Finding("dlq_location", "ok", "busd's dead letters are in dlq/")
    strays = foreign.strays(layout)
    if not strays:
        return Finding("dlq_location", "ok", f"busd's dead letters are in dlq/{layout.dlq_subdir}/")
    f = Finding(
        "dlq_location",
        "warn",
        f'{len(strays)} busd dead letters in dlq/ from before compat = "tapps" (not listed by '
        f"`busd dlq list`; Tapps' replay_dlq moves their data into an inbox): {shown(strays)}",
    )
    if fix:
        moved = foreign.adopt_strays(layout)
        return fixed(f, f"moved {len(moved)} into dlq/{layout.dlq_subdir}/")
    return f


CHECKS: tuple[tuple[str, Callable[[Config, bool], Finding]], ...] = (
    ("layout", _layout),
    ("root_permissions", _root_permissions),
    ("directory_permissions", _directory_permissions),
    ("socket", _socket),
    ("lock", _lock),
    ("expired_claims", _claims),
    ("tmp_files", _tmp),
    ("dlq_location", _dlq_location),
    ("inotify", check_inotify),
    ("disk_space", check_disk),
    ("filesystem", check_filesystem),
)
"""Every check, in the order :func:`diagnose` runs them."""


def diagnose(config: Config, *, fix: bool = False) -> list[Finding]:
    """Run every check (repairing what is safe when ``fix``); one Finding per check.

    A check that fails unexpectedly (permission denied while looking, say)
    becomes an ``error`` finding naming the failure; the others still run. The
    checks after ``layout`` need the bus directories, so they are skipped
    while the layout is broken and not fixed.
    """
    findings: list[Finding] = []
    for name, check in CHECKS:
        if findings and findings[0].status == "error" and not findings[0].fixed:
            break  # no usable layout: the other checks would only report its absence
        try:
            findings.append(check(config, fix))
        except OSError as exc:
            findings.append(Finding(name, "error", f"could not check: {exc}"))
    return findings
