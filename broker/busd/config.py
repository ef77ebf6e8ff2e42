"""Configuration: one frozen :class:`Config`, loaded once with a fixed precedence.

Precedence, highest first: command-line flags > ``BUSD_<KEY>`` environment
variables > the config file > built-in defaults. The config file is the one
named by ``--config``, else ``BUSD_CONFIG``, else ``<root>/busd.toml`` when it
exists. The bus root is ``--root``, else ``BUSD_ROOT``, else the nearest
``.busd/`` in the current directory or its parents, else ``./.busd``.

Any unknown key or bad value raises :class:`ConfigError` naming the key and
where it came from, so a typo stops start-up instead of being ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from busd.errors import ConfigError, InvalidName
from busd.store.layout import Layout

__all__ = [
    "ENV_PREFIX",
    "MIRROR_AGENT_PREFIX",
    "TABLES",
    "Bridge",
    "Conductor",
    "ConductorFollow",
    "ConductorMirror",
    "Config",
    "ConfigLoader",
    "default_bus_name",
    "endpoints",
    "find_root",
    "load_config",
    "mirror_agent",
    "parse_text_value",
    "socket_path",
    "with_mirrors",
]

ENV_PREFIX = "BUSD_"
_Positive = Annotated[float, msgspec.Meta(gt=0)]
_PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
_Uid = Annotated[int, msgspec.Meta(ge=0)]


def default_bus_name(host: str | None = None) -> str:
    """The host name reduced to the agent-id rule: the default ``bus_name``.

    Only the first label of a dotted name is kept (``build-1.example.org`` ->
    ``build-1``); characters outside ``[A-Za-z0-9._-]`` become ``-``.
    """
    name = (host if host is not None else socket.gethostname()).split(".", 1)[0]
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:64]
    if not name or not re.match(r"[A-Za-z0-9_]", name):
        name = f"bus{name}"[:64] if name else "bus"
    if name.upper() in _DEVICE_NAMES:
        name = f"{name}-bus"
    return name


_DEVICE_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)]
)


class ConductorFollow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``[[conductor.follow]]`` entry: a conductor-loop bus file (or a directory
    searched for ``*MESSAGE-BUS.md``) whose messages the daemon routes to ``to``."""

    path: str
    to: str


class ConductorMirror(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``[[conductor.mirror]]`` entry: messages to ``topic:<topic>`` are appended
    to the conductor-loop bus file ``path`` in conductor's own format."""

    path: str
    topic: str


class Conductor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[conductor]`` table. Relative paths are relative to the bus root."""

    follow: list[ConductorFollow] = []
    mirror: list[ConductorMirror] = []


class Bridge(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[bridge]`` table: ``busd bridge nats`` (docs/multi-host.md)."""

    url: str = "nats://127.0.0.1:4222"
    stream: str = "BUSD"
    topics: list[str] = []
    ordered: bool = False


TABLES = frozenset({"conductor", "bridge"})
"""Tables a config file may hold at top level beside ``[busd]``."""


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every setting of a bus and its daemon. See docs/configuration.md."""

    root: str
    config_file: str | None = None
    # messages
    max_message_bytes: _PositiveInt = 1 << 20
    default_recipient: str = "orchestrator"
    unknown_recipient: Literal["create", "dlq"] = "create"
    fsync: bool = True
    # consumers
    lease_seconds: _Positive = 60.0
    max_deliveries: _PositiveInt = 5
    max_in_flight: _PositiveInt = 100
    serve_grace_seconds: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    dedupe_window_seconds: _Positive = 7 * 86400.0
    # retention
    journal_segment_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 64 << 20
    journal_max_age_seconds: _Positive | None = 14 * 86400.0
    journal_max_bytes: Annotated[int, msgspec.Meta(ge=4096)] | None = 1 << 30
    dlq_max_age_seconds: _Positive | None = None
    # daemon
    shutdown_timeout_seconds: _Positive = 10.0
    rescan_interval_seconds: _Positive = 2.0
    watch_step_ms: Annotated[int, msgspec.Meta(ge=1)] = 1
    watch_debounce_ms: Annotated[int, msgspec.Meta(ge=1)] = 50
    force_polling: bool = False
    subscriptions: dict[str, list[str]] = {}
    # socket
    socket_path: str | None = None
    allowed_uids: list[_Uid] = []
    allowed_gids: list[_Uid] = []
    max_connections: _PositiveInt = 1024
    # compatibility with the systems busd grew from (docs/compatibility.md)
    compat: Literal["none", "tapps"] = "none"
    conductor: Conductor = msgspec.field(default_factory=Conductor)
    # multi-host (docs/multi-host.md)
    bus_name: str = msgspec.field(default_factory=default_bus_name)
    bridge: Bridge = msgspec.field(default_factory=Bridge)
    # logs
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @property
    def layout(self) -> Layout:
        """The layout of :attr:`root`; with ``compat = "tapps"`` busd's dead letters go to
        ``dlq/busd/``, out of the glob Tapps' ``replay_dlq`` moves (store/layout.py)."""
        return Layout(Path(self.root), dlq_subdir="busd" if self.compat == "tapps" else "")

    def resolve(self, path: str) -> Path:
        """``path`` from the config, made absolute against the bus root."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.root) / p


MIRROR_AGENT_PREFIX = "conductor-mirror."
"""Reserved: the agents named so are the daemon's conductor mirrors (queues it consumes)."""


def mirror_agent(config: Config, mirror: ConductorMirror) -> str:
    """The agent that subscribes ``mirror.topic`` for ``mirror.path``: a hash, not an
    index, so that reordering the config keeps each queue with its file."""
    key = f"{config.resolve(mirror.path)}\0{mirror.topic}".encode()
    return MIRROR_AGENT_PREFIX + hashlib.sha256(key).hexdigest()[:8]


def with_mirrors(config: Config, subscriptions: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """``subscriptions`` with every ``[[conductor.mirror]]`` agent subscribed to its topic:
    what the daemon and every daemon-less routing pass route with."""
    out = {topic: list(agents) for topic, agents in subscriptions.items()}
    for m in config.conductor.mirror:
        agents = out.setdefault(m.topic, [])
        agent = mirror_agent(config, m)
        if agent not in agents:
            agents.append(agent)
    return out


_KEYS = frozenset(f for f in Config.__struct_fields__)
_ENV_RESERVED = frozenset({"ROOT", "CONFIG"})


def find_root(start: Path | None = None) -> Path:
    """The nearest ``.busd`` directory in ``start`` or its parents, else ``start/.busd``."""
    here = (start or Path.cwd()).absolute()
    for d in (here, *here.parents):
        candidate = d / ".busd"
        if candidate.is_dir():
            return candidate
    return here / ".busd"


def _env_values(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    values: dict[str, tuple[Any, str]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        suffix = name[len(ENV_PREFIX) :]
        if suffix in _ENV_RESERVED:
            continue
        key = suffix.lower()
        if key not in _KEYS or key in ("root", "config_file"):
            raise ConfigError(f"unknown environment variable {name}", key=name)
        values[key] = (parse_text_value(raw, name), f"environment variable {name}")
    return values


def parse_text_value(raw: str, where: str) -> Any:
    """Parse a value given as text (env variable, ``--set``).

    Lists and tables are JSON (``[1000]``, ``{"news": ["a"]}``); empty or
    ``none`` means unset; anything else stays text for the typed conversion
    (``"1"`` -> 1, ``"true"`` -> True).
    """
    if raw[:1] in ("[", "{"):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc}", key=where) from exc
    if raw == "" or raw.lower() == "none":
        return None
    return raw


def _file_values(path: Path) -> dict[str, tuple[Any, str]]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist", key="config_file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}", key="config_file") from exc
    # [busd] is optional: a file holds the keys at top level or in that table, not both.
    table = data
    if isinstance(data.get("busd"), dict):
        table = {**data["busd"], **{k: v for k, v in data.items() if k in TABLES}}
        stray = sorted(k for k in data if k != "busd" and k not in TABLES)
        if stray:
            raise ConfigError(
                f"config file {path}: keys outside [busd]: {', '.join(stray)}", key=stray[0]
            )
    out: dict[str, tuple[Any, str]] = {}
    for key, value in table.items():
        if key not in _KEYS or key == "config_file":
            raise ConfigError(f"config file {path}: unknown key {key!r}", key=key)
        out[key] = (value, f"config file {path}")
    return out


@dataclass(frozen=True)
class ConfigLoader:
    """What the command line said; :meth:`load` turns it into a :class:`Config`.

    Kept by the daemon so SIGHUP can re-read the file and environment with the
    same flags.
    """

    root: str | None = None
    config_file: str | None = None
    flags: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] | None = None
    cwd: Path | None = None

    def load(self) -> Config:
        """Merge flags > env > file > defaults; raise :class:`ConfigError` on any bad input."""
        env = os.environ if self.env is None else self.env
        for key in self.flags:
            if key not in _KEYS or key in ("root", "config_file"):
                raise ConfigError(f"unknown option {key!r}", key=key)
        cfg_path = self.config_file or env.get("BUSD_CONFIG") or None
        root = self.root or env.get("BUSD_ROOT") or None
        file_values: dict[str, tuple[Any, str]] = {}
        if cfg_path is not None:
            file_values = _file_values(Path(cfg_path))
            if root is None and "root" in file_values:
                base = Path(cfg_path).absolute().parent
                root = str(base / str(file_values["root"][0]))
        file_values.pop("root", None)
        if root is None:
            root = str(find_root(self.cwd))
        root_path = Path(root)
        if not root_path.is_absolute():
            root_path = (self.cwd or Path.cwd()) / root_path
        if cfg_path is None and Layout(root_path).config_file.is_file():
            cfg_path = str(Layout(root_path).config_file)
            file_values = _file_values(Path(cfg_path))
            file_values.pop("root", None)
        merged: dict[str, tuple[Any, str]] = {**file_values, **_env_values(env)}
        merged.update({k: (v, f"option --set {k}={v}") for k, v in self.flags.items()})
        raw: dict[str, Any] = {k: v for k, (v, _) in merged.items()}
        raw["root"] = str(root_path)
        raw["config_file"] = str(Path(cfg_path).absolute()) if cfg_path else None
        try:
            config = msgspec.convert(raw, Config, strict=False)
        except msgspec.ValidationError as exc:
            key = _key_of(str(exc))
            source = merged[key][1] if key in merged else "configuration"
            raise ConfigError(f"{key or 'config'} (from {source}): {exc}", key=key) from exc
        _check_names(config, merged)
        return config


def _check_names(config: Config, merged: dict[str, tuple[Any, str]]) -> None:
    """Agent names in the config follow the same rule as everywhere else."""
    # Imported here: model is heavy and only this check needs it.
    from busd.core.model import check_agent_name

    def source(key: str) -> str:
        return merged[key][1] if key in merged else "configuration"

    try:
        check_agent_name(config.default_recipient, "default_recipient")
    except InvalidName as exc:
        raise ConfigError(
            f"default_recipient (from {source('default_recipient')}): {exc.message}",
            key="default_recipient",
        ) from exc
    try:
        for topic, agents in config.subscriptions.items():
            check_agent_name(topic, "topic")
            for agent in agents:
                check_agent_name(agent)
    except InvalidName as exc:
        raise ConfigError(
            f"subscriptions (from {source('subscriptions')}): {exc.message}", key="subscriptions"
        ) from exc
    try:
        check_agent_name(config.bus_name, "bus_name")
    except InvalidName as exc:
        raise ConfigError(
            f"bus_name (from {source('bus_name')}): {exc.message}", key="bus_name"
        ) from exc
    try:
        for topic in config.bridge.topics:
            check_agent_name(topic, "bridge.topics")
    except InvalidName as exc:
        raise ConfigError(f"bridge (from {source('bridge')}): {exc.message}", key="bridge") from exc
    try:
        for follow in config.conductor.follow:
            check_agent_name(follow.to.removeprefix("topic:"), "conductor.follow.to")
        for mirror in config.conductor.mirror:
            check_agent_name(mirror.topic, "conductor.mirror.topic")
    except InvalidName as exc:
        raise ConfigError(
            f"conductor (from {source('conductor')}): {exc.message}", key="conductor"
        ) from exc


def _key_of(message: str) -> str:
    marker = "at `$."
    i = message.find(marker)
    if i < 0:
        return ""
    rest = message[i + len(marker) :]
    end = min((j for j in (rest.find("`"), rest.find("["), rest.find(".")) if j >= 0), default=-1)
    return rest[:end] if end > 0 else rest


def load_config(
    *,
    root: str | None = None,
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    **flags: Any,
) -> Config:
    """Shortcut for ``ConfigLoader(...).load()``; ``flags`` are keys set on the command line."""
    return ConfigLoader(root, config_file, flags, env, cwd).load()


_SUN_PATH_MAX = 107


def socket_path(config: Config) -> Path:
    """Where the daemon of ``config`` listens (``socket_path`` overrides)."""
    if config.socket_path:
        return Path(config.socket_path)
    default = config.layout.socket
    if len(os.fsencode(default)) <= _SUN_PATH_MAX:
        return default
    digest = hashlib.sha256(os.fsencode(config.layout.root)).hexdigest()[:16]
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / "busd" / f"{digest}.sock"


def endpoints(config: Config) -> list[Path]:
    """Where the daemon of ``config`` may listen, in the order clients try them:
    :func:`socket_path`, then the path recorded in ``<root>/busd.sock.path``."""
    found = [socket_path(config)]
    try:
        written = config.layout.socket_path_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        written = ""
    if written and Path(written) not in found:
        found.append(Path(written))
    return found
