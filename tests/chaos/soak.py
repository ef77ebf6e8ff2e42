"""Soak: run busd for a long time at a steady rate with consumers; RSS, open files and the
bus size must stay flat (``make soak``; not collected by pytest).

    python tests/chaos/soak.py --minutes 60 --rate 40 --png docs/soak.png

Producers (socket ``publish`` and file drops) send ``--rate`` messages per second in
total; a socket consumer (bob) and busd's daemon-less consumer (carol) fetch and ack.
Retention is set so the bus can reach a steady state (journal capped by size, short
dedupe window so the ack ledgers are compacted). Every ``--every`` seconds it prints one
line: time, daemon RSS, open fds, bus bytes and files, published, consumed, backlog.

At the end: every published message was consumed (nothing lost), and the second half of
the run is flat: RSS and bus size within ``--tolerance`` of the first half's peak, open
fds within a few. The exit code says whether it held. The series is plotted to ``--png``
(matplotlib if installed, else a small built-in PNG writer).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from _chaos import ChaosDaemon, open_fds, rss_kb  # noqa: E402

from _rpc import Rpc  # noqa: E402
from busd.config import load_config  # noqa: E402
from busd.routing.consumer import Consumer  # noqa: E402
from busd.store.layout import init_bus  # noqa: E402
from daemon_harness import message  # noqa: E402

ENV = {
    "BUSD_JOURNAL_SEGMENT_BYTES": str(1 << 20),
    "BUSD_JOURNAL_MAX_BYTES": str(8 << 20),
    "BUSD_DEDUPE_WINDOW_SECONDS": "120",
    "BUSD_LEASE_SECONDS": "10",
}


@dataclass
class Counters:
    lock: threading.Lock = field(default_factory=threading.Lock)
    published: set[str] = field(default_factory=set)
    consumed: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def _socket_producer(root: Path, rate: float, stop: threading.Event, c: Counters) -> None:
    n = 0
    with Rpc(root / "busd.sock", timeout=30) as rpc:
        start = time.monotonic()
        while not stop.is_set():
            mid = f"s-{n:08d}"
            rpc("publish", {"message": message(0, message_id=mid, to="bob", body="s" * 300)})
            with c.lock:
                c.published.add(mid)
            n += 1
            time.sleep(max(0.0, start + n / rate - time.monotonic()))


def _file_producer(root: Path, rate: float, stop: threading.Event, c: Counters) -> None:
    outbox = root / "outbox" / "alice"
    outbox.mkdir(exist_ok=True)
    n = 0
    start = time.monotonic()
    while not stop.is_set():
        mid = f"f-{n:08d}"
        tmp = root / "tmp" / f"soak-{mid}"
        tmp.write_text(json.dumps(message(0, message_id=mid, to="carol", body="f" * 300)))
        os.rename(tmp, outbox / f"{time.time_ns():020d}-{mid}.json")
        with c.lock:
            c.published.add(mid)
        n += 1
        time.sleep(max(0.0, start + n / rate - time.monotonic()))


def _socket_consumer(root: Path, stop: threading.Event, c: Counters) -> None:
    with Rpc(root / "busd.sock", timeout=30) as rpc:
        while not stop.is_set():
            msgs = rpc("fetch", {"agent_id": "bob", "max": 100, "wait_s": 0.5})["messages"]
            ids = [m["message"]["message_id"] for m in msgs]
            if ids:
                rpc("ack", {"agent_id": "bob", "message_ids": ids})
                with c.lock:
                    c.consumed.update(ids)


def _file_consumer(root: Path, stop: threading.Event, c: Counters) -> None:
    consumer = Consumer(load_config(root=str(root), env=ENV), "carol")
    while not stop.is_set():
        ids = [claim.message.message_id for claim in consumer.claim(100)]
        if ids:
            consumer.ack(ids)
            with c.lock:
                c.consumed.update(ids)
        else:
            time.sleep(0.1)


def _guard(target: Callable[..., None], *args: Any) -> threading.Thread:
    c: Counters = args[-1]

    def run() -> None:
        try:
            target(*args)
        except Exception as exc:  # noqa: BLE001 - reported at the end, fails the soak
            c.errors.append(f"{target.__name__}: {exc!r}")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _bus_size(root: Path) -> tuple[int, int]:
    size = count = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            try:
                size += os.lstat(os.path.join(dirpath, n)).st_size
                count += 1
            except FileNotFoundError:
                pass
    return size, count


def run(minutes: float, rate: float, every: float, root: Path | None) -> list[dict[str, float]]:
    base = root or Path(tempfile.mkdtemp(prefix="busd-soak-"))
    bus = init_bus(base / "bus").root
    d = ChaosDaemon(bus, env=ENV).ready()
    c = Counters()
    stop, stop_consumers = threading.Event(), threading.Event()
    threads = [
        _guard(_socket_producer, bus, rate / 2, stop, c),
        _guard(_file_producer, bus, rate / 2, stop, c),
    ]
    consumers = [
        _guard(_socket_consumer, bus, stop_consumers, c),
        _guard(_file_consumer, bus, stop_consumers, c),
    ]
    series: list[dict[str, float]] = []
    t0 = time.monotonic()
    print(f"soak: {minutes} min at {rate}/s on {bus}", flush=True)
    print(" minute   rss_MiB  fds   bus_MiB  files  published  consumed  backlog", flush=True)
    try:
        while time.monotonic() - t0 < minutes * 60:
            time.sleep(every)
            if not d.alive():
                raise SystemExit(f"the daemon died: {d.stderr_text()[-1000:]}")
            size, count = _bus_size(bus)
            with c.lock:
                pub, con = len(c.published), len(c.consumed)
            row = {
                "minute": round((time.monotonic() - t0) / 60, 2),
                "rss_mib": round(rss_kb(d.proc.pid) / 1024, 2),
                "fds": open_fds(d.proc.pid),
                "bus_mib": round(size / (1 << 20), 3),
                "files": count,
                "published": pub,
                "consumed": con,
                "backlog": pub - con,
            }
            series.append(row)
            print(
                f"{row['minute']:7.2f} {row['rss_mib']:9.2f} {row['fds']:4d} {row['bus_mib']:9.3f}"
                f" {count:6d} {pub:10d} {con:9d} {pub - con:8d}",
                flush=True,
            )
            if c.errors:
                raise SystemExit(f"errors: {c.errors}")
        stop.set()
        for t in threads:
            t.join(30)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with c.lock:
                if c.published <= c.consumed:
                    break
            time.sleep(0.5)
        stop_consumers.set()
        for t in consumers:
            t.join(30)
        assert d.stop() == 0
    finally:
        d.kill()
    lost = c.published - c.consumed
    print(f"published {len(c.published)}, consumed {len(c.consumed)}, lost {len(lost)}")
    if lost or c.errors:
        raise SystemExit(f"LOST {len(lost)} e.g. {sorted(lost)[:5]}; errors {c.errors[:3]}")
    return series


def flat(series: list[dict[str, float]], tolerance: float) -> list[str]:
    """Why the second half is not flat compared with the first (empty if it is)."""
    if len(series) < 4:
        return ["too few samples"]
    half = len(series) // 2
    first, second = series[:half], series[half:]
    problems = []
    for key in ("rss_mib", "bus_mib"):
        peak1, peak2 = max(r[key] for r in first), max(r[key] for r in second)
        if peak2 > peak1 * (1 + tolerance) + (1 if key == "rss_mib" else 0.5):
            problems.append(f"{key} grew: first-half peak {peak1}, second-half peak {peak2}")
    fds1, fds2 = max(r["fds"] for r in first), max(r["fds"] for r in second)
    if fds2 > fds1 + 5:
        problems.append(f"open fds grew: {fds1} -> {fds2}")
    return problems


# -- plotting -----------------------------------------------------------------------------------

_PANELS = [
    ("rss_mib", "RSS MIB"),
    ("fds", "OPEN FDS"),
    ("bus_mib", "BUS MIB"),
    ("backlog", "BACKLOG"),
]


def plot(series: list[dict[str, float]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_png(series, path, title)
        return
    fig, axes = plt.subplots(len(_PANELS), 1, figsize=(8, 9), sharex=True)
    xs = [r["minute"] for r in series]
    for ax, (key, label) in zip(axes, _PANELS, strict=True):
        ax.plot(xs, [r[key] for r in series])
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# A 3x5 pixel font for the built-in writer: enough for labels and numbers.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", " ": "000000000000000",
    "-": "000000111000000", "/": "001001010100100", ":": "000010000010000",
    "A": "010101111101101", "B": "110101110101110", "C": "111100100100111",
    "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "111100101101111", "H": "101101111101101", "I": "111010010010111",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101",
    "N": "110101101101101", "O": "111101101101111", "P": "111101111100100",
    "R": "110101110101101", "S": "111100111001111", "T": "111010010010010",
    "U": "101101101101111", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111",
}  # fmt: skip


def _plot_png(series: list[dict[str, float]], path: Path, title: str) -> None:
    w, panel_h, margin = 800, 190, 50
    h = panel_h * len(_PANELS) + 40
    px = bytearray(b"\xff" * (w * h * 3))

    def put(x: int, y: int, rgb: tuple[int, int, int]) -> None:
        if 0 <= x < w and 0 <= y < h:
            i = (y * w + x) * 3
            px[i : i + 3] = bytes(rgb)

    def text(x: int, y: int, s: str, scale: int = 2) -> None:
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for k, bit in enumerate(glyph):
                if bit == "1":
                    for dx in range(scale):
                        for dy in range(scale):
                            put(x + (k % 3) * scale + dx, y + (k // 3) * scale + dy, (0, 0, 0))
            x += 4 * scale

    def line(x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for s in range(steps + 1):
            put(x0 + (x1 - x0) * s // steps, y0 + (y1 - y0) * s // steps, rgb)

    text(margin, 8, title)
    xs = [r["minute"] for r in series]
    xmax = max(xs) or 1
    for p, (key, label) in enumerate(_PANELS):
        top = 40 + p * panel_h
        bottom = top + panel_h - 40
        ys = [float(r[key]) for r in series]
        ymax = max(max(ys) * 1.15, 1e-9)
        line(margin, bottom, w - 20, bottom, (0, 0, 0))
        line(margin, top, margin, bottom, (0, 0, 0))
        for frac in (0.25, 0.5, 0.75, 1.0):
            y = bottom - int((bottom - top) * frac / 1.15)
            line(margin + 1, y, w - 20, y, (225, 225, 225))
        text(margin + 6, top, f"{label}  MAX {max(ys):g}")
        text(w - 170, bottom + 8, f"{xmax:.0f} MIN")
        text(8, bottom - 10, "0")
        pts = [
            (
                margin + int((x / xmax) * (w - 20 - margin)),
                bottom - int((y / ymax) * (bottom - top)),
            )
            for x, y in zip(xs, ys, strict=True)
        ]
        for a, b in itertools.pairwise(pts):
            line(*a, *b, (31, 119, 180))
    raw = b"".join(b"\x00" + bytes(px[y * w * 3 : (y + 1) * w * 3]) for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=40.0, help="messages per second in total")
    ap.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the series here")
    ap.add_argument("--root", type=Path, default=None)
    args = ap.parse_args()
    series = run(args.minutes, args.rate, args.every, args.root)
    if args.json:
        args.json.write_text(json.dumps(series, indent=1))
    if args.png:
        plot(series, args.png, f"BUSD SOAK {args.minutes:g} MIN AT {args.rate:g}/S")
    problems = flat(series, args.tolerance)
    print("flat" if not problems else "NOT FLAT: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
