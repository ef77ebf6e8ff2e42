"""Configuration: defaults, precedence, validation, root and file discovery, the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from busd.config import Config, ConfigLoader, find_root, load_config
from busd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "config" / "busd.toml"
BUSD = Path(sys.executable).parent / "busd"
EX_CONFIG = 78

# Every key a file, variable or flag may set (root and config_file are not settings).
KEYS = [f.name for f in msgspec.structs.fields(Config) if f.name not in ("root", "config_file")]


def _defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in msgspec.structs.fields(Config):
        if f.name in KEYS:
            has_default = f.default is not msgspec.NODEFAULT
            out[f.name] = f.default if has_default else f.default_factory()
    return out


def _settings(cfg: Config) -> dict[str, Any]:
    data = msgspec.structs.asdict(cfg)
    return {k: data[k] for k in KEYS}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _no_bus_above(path: Path) -> bool:
    return not any((p / ".busd").is_dir() for p in (path, *path.parents))


# -- defaults and precedence ---------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    """With no file, variable or flag every key has its built-in default."""
    cfg = load_config(root=str(tmp_path / "bus"), env={}, cwd=tmp_path)
    assert _settings(cfg) == _defaults()
    assert cfg.root == str(tmp_path / "bus")
    assert cfg.config_file is None
    assert cfg.lease_seconds == 60.0
    assert cfg.log_level == "info"


def test_precedence_flags_env_file_defaults(tmp_path: Path) -> None:
    """Each key comes from the highest of flags > env > file > defaults that sets it."""
    cfg_file = _write(
        tmp_path / "busd.toml",
        'lease_seconds = 10.0\nlog_level = "warning"\nmax_deliveries = 3\n',
    )
    env = {"BUSD_LEASE_SECONDS": "20", "BUSD_LOG_LEVEL": "error"}
    cfg = load_config(
        root=str(tmp_path / "bus"),
        config_file=str(cfg_file),
        env=env,
        cwd=tmp_path,
        lease_seconds=30.0,
    )
    assert cfg.lease_seconds == 30.0  # flag beats env and file
    assert cfg.log_level == "error"  # env beats file
    assert cfg.max_deliveries == 3  # file beats default
    assert cfg.max_in_flight == _defaults()["max_in_flight"]  # default
    assert cfg.config_file == str(cfg_file)


def test_env_beats_file_for_booleans_and_strings(tmp_path: Path) -> None:
    """Environment text values override the file for bools and strings too."""
    cfg_file = _write(tmp_path / "c.toml", 'fsync = true\ndefault_recipient = "boss"\n')
    env = {"BUSD_FSYNC": "false", "BUSD_DEFAULT_RECIPIENT": "lead"}
    cfg = load_config(root=str(tmp_path), config_file=str(cfg_file), env=env)
    assert cfg.fsync is False
    assert cfg.default_recipient == "lead"


def test_env_lease_seconds_one(tmp_path: Path) -> None:
    """BUSD_LEASE_SECONDS=1 gives a one-second lease."""
    cfg = load_config(root=str(tmp_path), env={"BUSD_LEASE_SECONDS": "1"})
    assert cfg.lease_seconds == 1.0


def test_env_value_syntax(tmp_path: Path) -> None:
    """Env lists/tables are JSON, and empty or `none` unsets an optional key."""
    env = {
        "BUSD_ALLOWED_UIDS": "[1000, 1001]",
        "BUSD_SUBSCRIPTIONS": '{"deploys": ["alice", "bob"]}',
        "BUSD_JOURNAL_MAX_AGE_SECONDS": "none",
        "BUSD_JOURNAL_MAX_BYTES": "",
        "BUSD_FORCE_POLLING": "1",
    }
    cfg = load_config(root=str(tmp_path), env=env)
    assert cfg.allowed_uids == [1000, 1001]
    assert cfg.subscriptions == {"deploys": ["alice", "bob"]}
    assert cfg.journal_max_age_seconds is None
    assert cfg.journal_max_bytes is None
    assert cfg.force_polling is True


def test_busd_table_in_file(tmp_path: Path) -> None:
    """A file may hold its keys in a [busd] table, subscriptions as a nested table."""
    cfg_file = _write(
        tmp_path / "c.toml",
        '[busd]\nmax_in_flight = 7\n\n[busd.subscriptions]\nalerts = ["ops"]\n',
    )
    cfg = load_config(root=str(tmp_path), config_file=str(cfg_file), env={})
    assert cfg.max_in_flight == 7
    assert cfg.subscriptions == {"alerts": ["ops"]}


# -- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "source"),
    [
        ("file", "config file"),
        ("env", "BUSD_MAX_DELIVERIES"),
        ("flag", "--set max_deliveries=0"),
    ],
)
def test_bad_value_names_key_and_source(tmp_path: Path, where: str, source: str) -> None:
    """A bad value raises ConfigError naming the key and where the value came from."""
    cfg_file = _write(tmp_path / "c.toml", "max_deliveries = 0\n" if where == "file" else "")
    env = {"BUSD_MAX_DELIVERIES": "0"} if where == "env" else {}
    flags: dict[str, Any] = {"max_deliveries": 0} if where == "flag" else {}
    with pytest.raises(ConfigError) as err:
        load_config(root=str(tmp_path), config_file=str(cfg_file), env=env, **flags)
    assert err.value.code == "config_error"
    assert err.value.context["key"] == "max_deliveries"
    assert "max_deliveries" in str(err.value)
    assert source in str(err.value)
    if where == "file":
        assert str(cfg_file) in str(err.value)


def test_bad_literal_value_is_refused(tmp_path: Path) -> None:
    """A value outside a fixed set (log_level) is refused, naming the key."""
    with pytest.raises(ConfigError, match="log_level") as err:
        load_config(root=str(tmp_path), env={"BUSD_LOG_LEVEL": "loud"})
    assert err.value.context["key"] == "log_level"


def test_bad_json_in_env_names_variable(tmp_path: Path) -> None:
    """Malformed JSON in a list variable is refused, naming the variable."""
    with pytest.raises(ConfigError, match="BUSD_ALLOWED_UIDS"):
        load_config(root=str(tmp_path), env={"BUSD_ALLOWED_UIDS": "[1000,"})


@pytest.mark.parametrize("where", ["file", "env", "flag"])
def test_unknown_key_is_refused(tmp_path: Path, where: str) -> None:
    """An unknown key in the file, the environment or a flag raises ConfigError naming it."""
    cfg_file = _write(tmp_path / "c.toml", "lease_secondz = 1\n" if where == "file" else "")
    env = {"BUSD_LEASE_SECONDZ": "1"} if where == "env" else {}
    flags: dict[str, Any] = {"lease_secondz": 1} if where == "flag" else {}
    with pytest.raises(ConfigError, match=r"(?i)lease_secondz") as err:
        load_config(root=str(tmp_path), config_file=str(cfg_file), env=env, **flags)
    assert err.value.context["key"].lower() in ("lease_secondz", "busd_lease_secondz")


def test_config_file_key_is_not_a_setting(tmp_path: Path) -> None:
    """config_file cannot be set from inside a file or as BUSD_CONFIG_FILE."""
    cfg_file = _write(tmp_path / "c.toml", 'config_file = "other.toml"\n')
    with pytest.raises(ConfigError, match="config_file"):
        load_config(root=str(tmp_path), config_file=str(cfg_file), env={})
    with pytest.raises(ConfigError, match="BUSD_CONFIG_FILE"):
        load_config(root=str(tmp_path), env={"BUSD_CONFIG_FILE": str(cfg_file)})


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    """A named config file that is missing or not TOML raises ConfigError naming it."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_config(root=str(tmp_path), config_file=str(missing), env={})
    broken = _write(tmp_path / "broken.toml", "lease_seconds = = 1\n")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_config(root=str(tmp_path), env={"BUSD_CONFIG": str(broken)})


# -- root and config file discovery -----------------------------------------------


def test_root_nearest_busd_upwards(tmp_path: Path) -> None:
    """With no --root or BUSD_ROOT the nearest .busd in cwd or its parents is the root."""
    outer = tmp_path / "project" / ".busd"
    outer.mkdir(parents=True)
    deep = tmp_path / "project" / "src" / "pkg"
    deep.mkdir(parents=True)
    assert load_config(env={}, cwd=deep).root == str(outer)
    inner = tmp_path / "project" / "src" / ".busd"
    inner.mkdir()
    assert load_config(env={}, cwd=deep).root == str(inner)
    assert find_root(deep) == inner


def test_root_defaults_to_dot_busd_in_cwd(tmp_path: Path) -> None:
    """With no .busd anywhere above, the root is ./.busd."""
    if not _no_bus_above(tmp_path):
        pytest.skip("a .busd directory exists above the temporary directory")
    assert load_config(env={}, cwd=tmp_path).root == str(tmp_path / ".busd")


def test_root_env_and_explicit(tmp_path: Path) -> None:
    """BUSD_ROOT beats discovery and an explicit root beats BUSD_ROOT."""
    (tmp_path / ".busd").mkdir()
    from_env = tmp_path / "env-bus"
    explicit = tmp_path / "flag-bus"
    env = {"BUSD_ROOT": str(from_env)}
    assert load_config(env=env, cwd=tmp_path).root == str(from_env)
    assert load_config(root=str(explicit), env=env, cwd=tmp_path).root == str(explicit)
    # A relative root is relative to the working directory.
    assert load_config(root="rel", env={}, cwd=tmp_path).root == str(tmp_path / "rel")


def test_root_busd_toml_picked_up(tmp_path: Path) -> None:
    """<root>/busd.toml is read when it exists and no other file is named."""
    root = tmp_path / "bus"
    toml = _write(root / "busd.toml", "lease_seconds = 7.0\n")
    cfg = load_config(root=str(root), env={})
    assert cfg.lease_seconds == 7.0
    assert cfg.config_file == str(toml)
    # Found through BUSD_ROOT and through discovery as well.
    assert load_config(env={"BUSD_ROOT": str(root)}).lease_seconds == 7.0
    dot = tmp_path / "work" / ".busd"
    _write(dot / "busd.toml", "max_deliveries = 2\n")
    assert load_config(env={}, cwd=tmp_path / "work").max_deliveries == 2


def test_named_config_file_wins_over_root_busd_toml(tmp_path: Path) -> None:
    """--config (or BUSD_CONFIG) replaces <root>/busd.toml rather than merging with it."""
    root = tmp_path / "bus"
    _write(root / "busd.toml", "lease_seconds = 7.0\nmax_deliveries = 2\n")
    other = _write(tmp_path / "other.toml", "lease_seconds = 8.0\n")
    cfg = load_config(root=str(root), config_file=str(other), env={})
    assert (cfg.lease_seconds, cfg.max_deliveries) == (8.0, _defaults()["max_deliveries"])
    cfg = load_config(root=str(root), env={"BUSD_CONFIG": str(other)})
    assert cfg.lease_seconds == 8.0
    assert cfg.config_file == str(other)


def test_root_from_named_config_file(tmp_path: Path) -> None:
    """A named file's `root` is relative to the file and loses to --root and BUSD_ROOT."""
    cfg_file = _write(tmp_path / "etc" / "busd.toml", 'root = "../data/bus"\n')
    cfg = load_config(config_file=str(cfg_file), env={}, cwd=tmp_path)
    assert Path(cfg.root).resolve() == (tmp_path / "data" / "bus").resolve()
    env = {"BUSD_ROOT": str(tmp_path / "env-bus")}
    assert load_config(config_file=str(cfg_file), env=env).root == str(tmp_path / "env-bus")


# -- the shipped file and reload ---------------------------------------------------


def test_shipped_config_equals_defaults(tmp_path: Path) -> None:
    """config/busd.toml loads and yields exactly the built-in defaults."""
    cfg = load_config(config_file=str(SHIPPED), root=str(tmp_path), env={})
    assert _settings(cfg) == _defaults()
    assert cfg.config_file == str(SHIPPED)


def test_shipped_config_documents_every_key() -> None:
    """config/busd.toml shows every key (set or commented out) and its BUSD_ variable."""
    text = SHIPPED.read_text(encoding="utf-8")
    for key in KEYS:
        shown = re.search(rf"^(# )?{key} = ", text, re.MULTILINE) or (
            key == "subscriptions" and "[subscriptions]" in text
        )
        assert shown, f"{key} is missing from {SHIPPED}"
        assert f"BUSD_{key.upper()}" in text, f"BUSD_{key.upper()} is missing from {SHIPPED}"


def test_configuration_doc_lists_every_key() -> None:
    """docs/configuration.md names every key and its BUSD_ variable."""
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    for key in KEYS:
        assert f"`{key}`" in text, f"{key} is missing from docs/configuration.md"
        assert f"BUSD_{key.upper()}" in text


def test_reload_sees_edited_file(tmp_path: Path) -> None:
    """ConfigLoader.load() again after editing the file returns the new values."""
    cfg_file = _write(tmp_path / "busd.toml", "lease_seconds = 10.0\n")
    loader = ConfigLoader(root=str(tmp_path / "bus"), config_file=str(cfg_file), env={})
    assert loader.load().lease_seconds == 10.0
    _write(cfg_file, 'lease_seconds = 20.0\n[subscriptions]\nnews = ["bob"]\n')
    again = loader.load()
    assert again.lease_seconds == 20.0
    assert again.subscriptions == {"news": ["bob"]}


def test_reload_sees_edited_env(tmp_path: Path) -> None:
    """The loader re-reads its environment mapping on every load (SIGHUP semantics)."""
    env: dict[str, str] = {"BUSD_MAX_IN_FLIGHT": "5"}
    loader = ConfigLoader(root=str(tmp_path), env=env)
    assert loader.load().max_in_flight == 5
    env["BUSD_MAX_IN_FLIGHT"] = "6"
    assert loader.load().max_in_flight == 6


# -- the command line ------------------------------------------------------------


def _busd(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the venv's busd with a clean environment (no inherited BUSD_* variables)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}
    return subprocess.run(
        [str(BUSD), *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--root", "{root}", "init"],
        ["init", "--root", "{root}"],
        ["init", "{root}"],
    ],
)
def test_cli_root_before_or_after_subcommand(tmp_path: Path, argv: list[str]) -> None:
    """`busd --root R init`, `busd init --root R` and `busd init R` all create R."""
    root = tmp_path / "bus"
    proc = _busd(*(a.format(root=root) for a in argv), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (root / "outbox").is_dir()
    assert (root / "journal").is_dir()


@pytest.mark.parametrize("before", [True, False])
def test_cli_config_before_or_after_subcommand(tmp_path: Path, before: bool) -> None:
    """--config is honoured before and after the subcommand (a bad file proves it is read)."""
    bad = _write(tmp_path / "bad.toml", "lease_secondz = 1\n")
    root = str(tmp_path / "bus")
    argv = ["--config", str(bad), "init", root] if before else ["init", root, "--config", str(bad)]
    proc = _busd(*argv, cwd=tmp_path)
    assert proc.returncode == EX_CONFIG, proc.stderr
    assert "lease_secondz" in proc.stderr


def test_cli_bad_env_variable_exits_78(tmp_path: Path) -> None:
    """A bad BUSD_ variable makes `busd init` exit 78 naming the variable."""
    unknown = _busd("init", cwd=tmp_path, env={"BUSD_LEASE_SECONDZ": "1"})
    assert unknown.returncode == EX_CONFIG
    assert "BUSD_LEASE_SECONDZ" in unknown.stderr
    assert "config_error" in unknown.stderr
    bad_value = _busd("init", cwd=tmp_path, env={"BUSD_MAX_DELIVERIES": "zero"})
    assert bad_value.returncode == EX_CONFIG
    assert "BUSD_MAX_DELIVERIES" in bad_value.stderr
    assert not (tmp_path / ".busd").exists()


def test_cli_run_set_bad_key_exits_78(tmp_path: Path) -> None:
    """`busd run --set` with an unknown key or bad value exits 78 before starting."""
    root = tmp_path / "bus"
    assert _busd("init", str(root), cwd=tmp_path).returncode == 0
    unknown = _busd("run", "--root", str(root), "--set", "lease_secondz=1", cwd=tmp_path)
    assert unknown.returncode == EX_CONFIG
    assert "lease_secondz" in unknown.stderr
    bad = _busd("run", "--root", str(root), "--set", "lease-seconds=0", cwd=tmp_path)
    assert bad.returncode == EX_CONFIG
    assert "lease_seconds" in bad.stderr
    level = _busd("run", "--root", str(root), "--log-level", "loud", cwd=tmp_path)
    assert level.returncode == EX_CONFIG
    assert "log_level" in level.stderr


def test_conductor_tables_and_compat(tmp_path: Path) -> None:
    """[[conductor.follow]] / [[conductor.mirror]] load beside [busd]; paths resolve
    against the root; a bad recipient names the key."""
    cfg_file = _write(
        tmp_path / "busd.toml",
        '[busd]\ncompat = "tapps"\n'
        '[[conductor.follow]]\npath = "proj/MESSAGE-BUS.md"\nto = "topic:conductor"\n'
        '[[conductor.mirror]]\npath = "/abs/BUS.md"\ntopic = "releases"\n',
    )
    cfg = load_config(root=str(tmp_path / "bus"), config_file=str(cfg_file), env={})
    assert cfg.compat == "tapps"
    (follow,) = cfg.conductor.follow
    assert (follow.path, follow.to) == ("proj/MESSAGE-BUS.md", "topic:conductor")
    assert cfg.resolve(follow.path) == tmp_path / "bus" / "proj" / "MESSAGE-BUS.md"
    assert cfg.resolve(cfg.conductor.mirror[0].path) == Path("/abs/BUS.md")
    bad = _write(tmp_path / "bad.toml", '[[conductor.follow]]\npath = "x"\nto = "a/b"\n')
    with pytest.raises(ConfigError) as info:
        load_config(root=str(tmp_path / "bus"), config_file=str(bad), env={})
    assert info.value.context["key"] == "conductor"
    with pytest.raises(ConfigError):
        load_config(root=str(tmp_path / "bus"), env={"BUSD_COMPAT": "rabbit"})
