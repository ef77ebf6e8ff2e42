"""Where the daemon is in each followed conductor-loop bus file: ``conductor-follow.json``.

One JSON object, ``{"<bus file path>": Cursor}``, replaced as a whole with
:func:`~busd.store.fsio.replace_durable` (temp file, fsync, rename, fsync of the
root) after every routed batch, so a cursor on disk never names bytes whose
messages are not in the fsynced journal. A cursor also records the file's
identity (``st_dev``/``st_ino`` and the sha256 of its first bytes), so a file
replaced under the same name, or truncated, is recognised and read again from
its start (the journal's dedupe answers ``duplicate`` for what was routed).

The file is private (0600) like everything busd writes. A file that does not
parse is reported to the caller and treated as empty: the followed files are
then read from their start, which dedupe makes safe. Synchronous: call it from a
worker thread.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from busd.store.fsio import read_limited, replace_durable
from busd.store.layout import Layout

__all__ = ["HEAD_BYTES", "Cursor", "Cursors"]

HEAD_BYTES = 256
"""How many leading bytes of a followed file the identity hash covers (fewer while shorter)."""
_MAX_FILE_BYTES = 16 << 20  # thousands of cursors fit; never load a planted giant


class Cursor(msgspec.Struct, frozen=True, kw_only=True):
    """How far one bus file is routed, and which file that was.

    ``offset`` is the byte up to which every record is journaled (a record
    boundary); ``line`` the number of ``\\n`` before it (legacy lines take their
    ids from their line number). ``head`` is the sha256 hex of the first
    ``head_len`` bytes.
    """

    offset: int = 0
    line: int = 0
    dev: int = 0
    ino: int = 0
    head: str = ""
    head_len: int = 0


class Cursors:
    """The cursors of one bus root (``Layout.conductor_follow_file``)."""

    def __init__(self, layout: Layout, *, fsync: bool = True) -> None:
        self.path: Path = layout.conductor_follow_file
        self._tmp = layout.tmp
        self.fsync = fsync

    def load(self) -> tuple[dict[str, Cursor], str | None]:
        """The stored cursors and, when the file was unreadable, why (then ``{}``)."""
        try:
            raw = read_limited(self.path, _MAX_FILE_BYTES)
        except FileNotFoundError:
            return {}, None
        except Exception as exc:  # noqa: BLE001 - any bad file means: start over, safely
            return {}, str(exc)
        try:
            return msgspec.json.decode(raw, type=dict[str, Cursor]), None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return {}, str(exc)

    def store(self, cursors: dict[str, Cursor]) -> None:
        """Replace the file with ``cursors``, durably (unless the bus runs without fsync)."""
        data = msgspec.json.encode(dict(sorted(cursors.items())))
        replace_durable(self.path, data, tmp_dir=self._tmp, fsync=self.fsync)
