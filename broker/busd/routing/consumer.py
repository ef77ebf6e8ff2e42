"""The daemon-less consumer: claim, ack, release, extend, fail; the lease sweep.

Moved to :mod:`busd.routing.claims` (re-exported here): the claim files' names, leases and
moves back to the inbox, and the :class:`Claim` and :class:`ExpiredReport` records.

Synchronous (async callers use worker threads). Contracts:

* Claiming is an atomic no-replace rename from ``inbox/<a>/`` into ``locks/<a>/``:
  of racing consumers (threads or processes) exactly one wins; the others get
  ``FileNotFoundError`` and move on.
* The delivery count lives in the name: ``<arrival>-<n>-<id>.json`` is claimed as
  ``<arrival>-<n+1>-<id>.json`` and returns under that name, so the count survives
  and listing order stays arrival order. A file already delivered
  ``max_deliveries`` times is dead-lettered (``delivery_limit``), not handed out.
* A claimed file's mtime is its lease expiry, set on the inbox file just *before*
  the claiming rename so a sweep never sees a fresh claim with a stale mtime.
* Foreign names (dropped straight into the inbox) are claimed as the hidden
  ``locks/<a>/.claim-<16 hex>-<foreign name>``, which nobody else touches, and
  once decoded renamed (no-replace; on a clash a new arrival key) to
  ``<new arrival>-001-<message_id>.json``. A hidden claim left by a crash goes
  back to the inbox under its foreign name when its lease expires.
* Ack is ledger first: records are appended to ``processed/<a>.jsonl`` (one write,
  one fsync, exclusive lock), then the claims are removed. A message whose
  ``message_id`` is an acked id, or whose ``idempotency_key`` is an acked key (ids
  match ids, keys match keys: ``ProcessedLedger.acked``), is dropped when claimed, so a
  redelivery never repeats an acknowledged side effect.
* Receipts (protocol.md 6.8): a claim's receipt is its name in ``locks/<a>/`` without
  ``.json``, so it names one delivery (the count is in it). Settling, releasing or
  extending by receipt touches that exact file only. A receipt whose file is gone
  while the message is held under another claim name (its lease expired and it was
  handed out again) or is back in the inbox (released, or swept) is stale:
  :class:`~busd.errors.StaleReceipt`, and nothing changes. A message id means "every
  current claim of that message" (the CLI and old clients).
* Both delivery-name forms (:mod:`busd.store.layout`) are claimed, returned and
  settled alike; a claim keeps the form of its inbox name.
* ``compat = "tapps"``: Tapps claims by a bare rename, so its claim keeps the file's
  old mtime. A claim is *stamped* when its mtime is later than its ctime (why every
  lease busd sets is: :mod:`busd.routing.claims`); an unstamped claim (mtime <= ctime)
  is stamped by the sweep with a lease of ``lease_seconds`` from the moment the sweep
  first sees it, instead of being returned. The stamp is the file's mtime, so it
  survives a restart. Acks also append a bare-id line, for Tapps' ledger reader.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from busd.config import Config
from busd.core.codec import encode_json
from busd.core.model import Message, check_agent_name
from busd.errors import InvalidMessage, InvalidName, NotFound, Reason, StaleReceipt
from busd.routing import intake, refusals
from busd.routing.claims import (
    CLAIM_PREFIX,
    Claim,
    ExpiredReport,
    count_of,
    foreign_name,
    foreign_origin,
    hidden_claim_name,
    index_of,
    names_in,
    return_to_inbox,
    set_lease,
    unstamped,
)
from busd.routing.intake import Origin, Parcel, Refused, Rules
from busd.store.fsio import rename_noreplace
from busd.store.layout import (
    delivery_name,
    parse_delivery_name,
    receipt_of,
    tapps_delivery_name,
)
from busd.store.ledger import LedgerRecord, ProcessedLedger, rfc3339
from busd.store.mailbox import arrival_clock, ensure_agent_dirs
from busd.store.tapps import from_tapps

__all__ = ["Claim", "Consumer", "ExpiredReport", "return_expired"]


def _peek(rules: Rules, origin: Origin) -> Message | None:
    """The message in a claimed file, or None if it is gone or invalid (for DLQ metadata)."""
    try:
        result = intake.admit(rules, Parcel(origin), intake.CLAIM)
    except FileNotFoundError:
        return None
    return None if isinstance(result, Refused) else result.message


class Consumer:
    """Claims and settles the messages of one agent (name checked).

    ``dead_lettered`` counts the files this consumer dead-lettered (at claim
    time, by ``fail`` and by the lease sweep), through :mod:`busd.routing.refusals`.
    """

    def __init__(self, config: Config, agent_id: str) -> None:
        self.config = config
        self._rules = Rules(config)
        self.dead_lettered = 0
        self.agent_id = check_agent_name(agent_id)
        self.layout = config.layout
        self.inbox = self.layout.inbox_dir(agent_id)
        self.locks = self.layout.locks_dir(agent_id)
        ensure_agent_dirs(self.layout, agent_id)
        self._ledger = ProcessedLedger(self.layout.ledger(agent_id))
        self._tapps = config.compat == "tapps"

    def processed(self) -> ProcessedLedger:
        """The agent's processed ledger (shared by this consumer's calls)."""
        return self._ledger

    # -- claiming -------------------------------------------------------

    def claim(self, max: int = 1) -> list[Claim]:
        """Claim up to ``max`` messages in arrival order (see the module docstring).

        Invalid files are dead-lettered, already-processed ones removed, and
        neither counts towards ``max``.
        """
        claims: list[Claim] = []
        for name in names_in(self.inbox):
            if len(claims) >= max:
                break
            if not name.startswith("."):
                claim = self._claim_one(name)
                if claim is not None:
                    claims.append(claim)
        return claims

    def _claim_one(self, name: str) -> Claim | None:
        src = self.inbox / name
        parsed = parse_delivery_name(name)
        if parsed is not None:
            count = parsed.deliveries + 1
            dst = self.locks / parsed.renamed(deliveries=count)
        else:
            count = 1
            dst = self.locks / hidden_claim_name(name)
        expiry = time.time() + self.config.lease_seconds
        try:
            lease = set_lease(src, expiry)
            rename_noreplace(src, dst)
        except (FileNotFoundError, FileExistsError):
            return None  # another consumer won the race (or the router renamed it)
        origin = self._origin(dst)
        try:
            result = intake.admit(self._rules, Parcel(origin), intake.CLAIM)
        except FileNotFoundError:
            return None
        if isinstance(result, Refused):
            refusals.dead_letter(self.layout, result, counts=self, delivery_count=count)
            return None
        msg, raw = result.message, result.body
        restored = from_tapps(msg)
        if restored is not msg:
            # A tapps-mode delivery: busd's consumers get the message the producer sent.
            msg, raw = restored, encode_json(restored)
        if self._ledger.acked(msg.message_id, msg.idempotency_key):
            # Acked before: dropping the copy is what keeps side effects single.
            os.unlink(dst)
            return None
        if parsed is not None and parsed.deliveries >= self.config.max_deliveries:
            n = parsed.deliveries
            detail = f"already delivered {n} times (max_deliveries={self.config.max_deliveries})"
            self._dead_letter(origin, InvalidMessage(Reason.DELIVERY_LIMIT, detail), n, msg)
            return None
        if parsed is None or parsed.message_id != msg.message_id:
            arrival = parsed.arrival if parsed is not None else arrival_clock.next()
            # A foreign name takes the mode's form; a delivery name keeps its own form.
            tapps_form = self._tapps if parsed is None else parsed.message_type or parsed.native
            tag = msg.__struct_config__.tag
            kind = tag if tapps_form and isinstance(tag, str) else None
            dst = self._rename_canonical(dst, arrival, count, msg.message_id, kind)
        return Claim(msg, dst.name, dst, count, lease, raw)

    def _origin(self, path: Path) -> Origin:
        """A claimed file as an origin (a foreign claim keeps the inbox path it came from)."""
        return Origin.claim(
            self.layout, self.agent_id, path, foreign_origin(self.agent_id, path.name)
        )

    def _dead_letter(
        self, origin: Origin, why: InvalidMessage, count: int, msg: Message | None
    ) -> str:
        """Move a claimed file to the DLQ (not journaled: the consumer is no journal writer)."""
        refused = Refused(origin, why, msg)
        return refusals.dead_letter(self.layout, refused, counts=self, delivery_count=count).name

    def _rename_canonical(
        self, path: Path, arrival: str, count: int, message_id: str, kind: str | None
    ) -> Path:
        """``kind``: the message type, for tapps mode's names (else None: busd's form)."""
        while True:
            name = (
                delivery_name(arrival, count, message_id)
                if kind is None
                else tapps_delivery_name(arrival, count, message_id, kind)
            )
            target = self.locks / name
            try:
                rename_noreplace(path, target)
                return target
            except FileExistsError:
                arrival = arrival_clock.next()

    # -- settling -------------------------------------------------------

    def _index(self) -> dict[str, list[Path]]:
        return index_of(self.locks, names_in(self.locks))

    def _find(self, message_id: str) -> list[Path]:
        paths = self._index().get(message_id)
        if not paths:
            raise NotFound(f"{self.agent_id} holds no claim on {message_id}", message_id=message_id)
        return paths

    def _resolve(
        self, receipts: Iterable[str], index: dict[str, list[Path]]
    ) -> tuple[dict[str, Path], list[str], list[str]]:
        """(held: receipt -> its claim file, stale receipts, receipts not held at all)."""
        held: dict[str, Path] = {}
        stale: list[str] = []
        not_held: list[str] = []
        in_inbox: set[str] | None = None
        for receipt in dict.fromkeys(receipts):
            parsed = parse_delivery_name(f"{receipt}.json")
            if parsed is None:
                not_held.append(receipt)  # not the receipt grammar: it names no delivery
                continue
            claims = index.get(parsed.message_id, [])
            path = next((c for c in claims if receipt_of(c.name) == receipt), None)
            if path is not None:
                held[receipt] = path
                continue
            if in_inbox is None:
                in_inbox = set(index_of(self.inbox, names_in(self.inbox)))
            if claims or parsed.message_id in in_inbox:
                stale.append(receipt)  # handed out again, or back in the queue
            else:
                not_held.append(receipt)  # acked, dead-lettered, or never ours
        return held, stale, not_held

    def _stale(self, stale: Sequence[str]) -> StaleReceipt:
        return StaleReceipt(
            f"{self.agent_id}: receipt {', '.join(stale)} names a delivery that is no longer "
            "current (its lease expired and it was delivered again, or it was released)",
            receipts=list(stale),
        )

    def _claim_of(self, message_id: str | None, receipt: str | None) -> list[Path]:
        """The claim files one release/extend acts on: the receipt's, or every copy of an id."""
        if receipt is None:
            if message_id is None:
                raise TypeError("name a message_id or a receipt")
            return self._find(message_id)
        held, stale, _ = self._resolve([receipt], self._index())
        if stale:
            raise self._stale(stale)
        path = held.get(receipt)
        parsed = parse_delivery_name(f"{receipt}.json")
        if path is None or (
            message_id is not None and (parsed is None or parsed.message_id != message_id)
        ):
            raise NotFound(f"{self.agent_id} holds no delivery {receipt}", receipt=receipt)
        return [path]

    def settle(
        self, *, message_ids: Iterable[str] = (), receipts: Iterable[str] = ()
    ) -> tuple[int, list[str]]:
        """Record claimed messages as processed (ledger first), then remove their claims.

        A receipt settles the claim file of that exact name; a message id settles
        every claimed copy of that message. If any receipt is stale (module
        docstring), StaleReceipt is raised before anything is written. Returns
        (messages acked, the ids and receipts this agent does not hold); one not
        held is skipped, also when it is already in the ledger.
        """
        index = self._index()
        held, stale, not_held = self._resolve(receipts, index)
        if stale:
            raise self._stale(stale)
        targets: dict[str, dict[Path, None]] = {}
        for path in held.values():
            parsed = parse_delivery_name(path.name)
            assert parsed is not None  # _resolve parsed it
            targets.setdefault(parsed.message_id, {})[path] = None
        for mid in dict.fromkeys(message_ids):
            found = index.get(mid)
            if not found:
                not_held.append(mid)
                continue
            targets.setdefault(mid, {}).update(dict.fromkeys(found))
        now = rfc3339(time.time())
        records: list[LedgerRecord] = []
        for mid, paths in targets.items():
            msg = _peek(self._rules, self._origin(next(iter(paths))))
            key = msg.idempotency_key if msg is not None else None
            records.append(LedgerRecord(message_id=mid, idempotency_key=key, acked_at=now))
        self._ledger.add_many(records, bare_ids=self._tapps)
        for paths in targets.values():
            for path in paths:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass  # the sweep returned it; the ledger makes the next claim drop it
        return len(records), not_held

    def ack(self, message_ids: Iterable[str]) -> int:
        """:meth:`settle` by message ids (every claimed copy); returns how many were acked."""
        return self.settle(message_ids=message_ids)[0]

    def release(
        self, message_id: str | None = None, *, receipt: str | None = None, delay_s: float = 0
    ) -> None:
        """Give a claim back (nack); the delivery count is kept in the name.

        Names the claim by ``receipt`` (that delivery only; StaleReceipt if it is no
        longer current) or by ``message_id`` (every claimed copy). ``delay_s`` <= 0:
        back to the inbox at once. ``delay_s`` > 0: it stays in ``locks/`` under its
        name with its lease expiry set to now + ``delay_s``, and the lease sweep
        (:func:`return_expired`) returns it then. NotFound if not held.
        """
        for path in self._claim_of(message_id, receipt):
            if delay_s > 0:
                self._lease(path, time.time() + delay_s)
            else:
                with self._held(path.name):
                    return_to_inbox(self.layout, self.agent_id, path, path.name)

    def extend(
        self, message_id: str | None = None, *, receipt: str | None = None, lease_s: float
    ) -> datetime:
        """Set the claim's lease to expire ``lease_s`` from now, naming it by receipt or
        message id as :meth:`release` does; NotFound if not held."""
        expiry = time.time() + lease_s
        for path in self._claim_of(message_id, receipt):
            self._lease(path, expiry)
        return datetime.fromtimestamp(expiry, UTC)

    def _lease(self, path: Path, expiry: float) -> None:
        with self._held(path.name):
            set_lease(path, expiry)

    @contextmanager
    def _held(self, what: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise NotFound(f"claim {what} was lost (lease expired?)", name=what) from None

    def _sweep(self, now_ns: int, report: ExpiredReport) -> None:
        """The body of :func:`return_expired` for this agent."""
        for name in names_in(self.locks):
            path = self.locks / name
            parsed = parse_delivery_name(name)
            try:
                st = os.lstat(path)
                if st.st_mtime_ns > now_ns:
                    continue
                if self._tapps and not name.startswith(".") and unstamped(st):
                    # A Tapps claim: its lease starts now, it is not taken back.
                    set_lease(path, now_ns / 1e9 + self.config.lease_seconds)
                    report.stamped.append(name)
                    continue
                if name.startswith(CLAIM_PREFIX):
                    name = foreign_name(name)
                elif name.startswith("."):
                    continue
                if parsed is None or parsed.deliveries < self.config.max_deliveries:
                    report.returned.append(return_to_inbox(self.layout, self.agent_id, path, name))
                    continue
                n = parsed.deliveries
                why = f"lease expired on delivery {n} (max_deliveries={self.config.max_deliveries})"
                origin = self._origin(path)
                msg = _peek(self._rules, origin)
                entry = self._dead_letter(
                    origin, InvalidMessage(Reason.DELIVERY_LIMIT, why), n, msg
                )
                report.dead_lettered.append(entry)
            except (FileNotFoundError, NotFound):
                continue  # acked, or moved by another sweep meanwhile

    def fail(self, message_id: str | None, reason: str, *, receipt: str | None = None) -> str:
        """Dead-letter a claim with reason ``rejected``, ``detail=reason``; return the entry.

        Names the claim by ``receipt`` (that delivery; StaleReceipt if it is no longer
        current) or by ``message_id`` (each claimed copy gets an entry; the first one's
        name is returned). NotFound if not held.
        """
        why = InvalidMessage(Reason.REJECTED, reason)
        names = []
        for path in self._claim_of(message_id, receipt):
            origin = self._origin(path)
            names.append(self._dead_letter(origin, why, count_of(path), _peek(self._rules, origin)))
        return names[0]


def return_expired(
    config: Config, agent: str | None = None, *, now: float | None = None
) -> ExpiredReport:
    """Return every claim whose lease (mtime) has expired; dead-letter exhausted ones.

    A claim delivered ``max_deliveries`` times or more goes to the DLQ with
    reason ``delivery_limit``; any other goes back to ``inbox/<agent>/`` under
    the same name. ``agent`` limits the sweep to one agent; ``now`` (epoch
    seconds) is for tests. Safe to run concurrently with consumers and other
    sweeps: a file someone else moved first is skipped.
    """
    agents = [agent] if agent is not None else names_in(config.layout.locks)
    now_ns = int((time.time() if now is None else now) * 1e9)
    report = ExpiredReport()
    for a in agents:
        try:
            consumer = Consumer(config, a)
        except InvalidName:
            if agent is not None:
                raise
            continue  # a stray directory in locks/, not an agent's
        consumer._sweep(now_ns, report)
    return report
