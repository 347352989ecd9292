"""The docs stay true to the code: the API reference is regenerated from it, and every relative link resolves."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_api_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("api_reference", ROOT / "scripts" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected, current = module.render().splitlines(), module.DOCS.read_text().splitlines()
    changed = [f"- {a}\n+ {b}" for a, b in zip(current, expected) if a != b] or [f"{len(current)} vs {len(expected)} lines"]
    assert expected == current, "docs/api.md is out of date (run `python scripts/api_reference.py`):\n" + changed[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code blocks are not links
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name} links to missing {target}"
