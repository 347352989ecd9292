"""The package as a whole: what importing it costs, its version, and the private names of its dependencies it uses."""

import importlib
import sys
from importlib import metadata

import pytest

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


def test_every_private_name_the_package_uses_still_exists():
    # One entry per private TRL / transformers / bitsandbytes name (trl_distill/_compat.py); an upgrade that moves one
    # fails here, naming it, instead of in the middle of a training run.
    from trl_distill._compat import PRIVATE_NAMES, resolve

    missing = []
    for name in PRIVATE_NAMES:
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            missing.append(str(error))
    assert not missing, "private names that moved:\n" + "\n".join(missing)


def test_private_names_are_imported_from_the_compat_module_only():
    # Any other module importing a private name from a dependency would escape the check above.
    import re
    from pathlib import Path

    package = Path(trl_distill.__file__).parent
    pattern = re.compile(r"^\s*from (trl|transformers|bitsandbytes|accelerate|peft)[\w.]* import .*\b_[a-zA-Z]", re.M)
    offenders = [str(path.relative_to(package)) for path in package.rglob("*.py")
                 if path.name != "_compat.py" and pattern.search(path.read_text())]
    assert not offenders, offenders


def test_private_attributes_of_other_objects_are_ours_or_listed():
    # `obj._name` read or written on an object that is not `self` must be trl_distill's own name or an entry of
    # PRIVATE_NAMES: otherwise a dependency's private attribute would escape the check above.
    import re
    from pathlib import Path

    from trl_distill._compat import PRIVATE_NAMES

    package = Path(trl_distill.__file__).parent
    code = {path: re.sub(r"#.*", "", path.read_text()) for path in package.rglob("*.py")}
    ours = set(re.findall(r"(?:\bdef |\bclass |self\.|^\s*)(_[A-Za-z]\w*)\s*[(=:]", "\n".join(code.values()), re.M))
    listed = set(re.findall(r"\b(_[A-Za-z]\w*)", " ".join(PRIVATE_NAMES)))
    unlisted = sorted({f"{path.name}: {obj}.{name}" for path, text in code.items() if path.name != "_compat.py"
                       for obj, name in re.findall(r"\b(\w+)\.(_[A-Za-z]\w*)", text)
                       if obj not in ("self", "cls") and name not in ours | listed and not name.startswith("__")})
    assert not unlisted, unlisted


def test_resolve_names_the_entry_that_moved():
    from trl_distill._compat import resolve

    with pytest.raises(AttributeError, match="trl.DPOTrainer._renamed_loss"):
        resolve("trl.DPOTrainer._renamed_loss")
    with pytest.raises(AttributeError, match="self._no_such_attribute"):
        resolve("trl.DPOTrainer.__init__:self._no_such_attribute")
