"""The package as a whole: what importing it costs, its version, and the private names of its dependencies it uses."""

import importlib
import sys
from importlib import metadata

import trl_distill


def test_import_does_not_load_trl_experimental_gkd(monkeypatch):
    # DPO-only users must not pay for (or be warned about) `trl.experimental.gkd`; GKDVariant loads it on first use.
    # Re-import the package with it and trl_distill unloaded; monkeypatch puts the original modules back afterwards.
    def ours(name):
        return name == "trl_distill" or name.startswith(("trl_distill.", "trl.experimental.gkd"))

    for name in [m for m in sys.modules if ours(m)]:
        monkeypatch.delitem(sys.modules, name)
    try:
        fresh = importlib.import_module("trl_distill")
        assert fresh is not trl_distill
        assert "trl.experimental.gkd" not in sys.modules
        assert fresh.GKDVariant.__name__ == "GKDVariant" and "GKDVariant" in dir(fresh)
        assert "trl.experimental.gkd" in sys.modules
    finally:  # drop the fresh copies; monkeypatch then restores the modules every other test imported
        for name in [m for m in sys.modules if ours(m)]:
            del sys.modules[name]


def test_version_comes_from_the_installed_metadata():
    assert trl_distill.__version__ == metadata.version("trl-distill")
