"""The package facade: ``busd`` exposes its small public surface, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import busd
from busd.config import Config, load_config
from busd.errors import BusdError

pytestmark = pytest.mark.timeout(30)


def test_the_facade_names_the_public_surface() -> None:
    assert busd.Config is Config
    assert busd.load_config is load_config
    assert busd.BusdError is BusdError
    assert sorted(busd.__all__) == ["BusdError", "Config", "__version__", "load_config"]


def test_importing_busd_loads_no_layer() -> None:
    """``import busd`` costs nothing: the layers load when a name is first used."""
    code = "import sys, busd; print(sorted(m for m in sys.modules if m.startswith('busd.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = busd.no_such_thing
