"""The documentation pages that are generated or checked against their sources: docs/benchmarks.md (from
benchmarks/results), docs/reliability.md (every test it names exists) and the README's size."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README_LIMIT = 16_000


def test_benchmarks_page_is_generated_from_the_result_files():
    from benchmarks import table

    assert (REPO / "docs" / "benchmarks.md").read_text() == table.docs_page(), \
        "run python -m benchmarks.table --docs"
    names = sorted(p.name for p in (REPO / "benchmarks" / "results").glob("*.json"))
    page = table.docs_page()
    assert all(f"## {n}" in page and f"| `{n}`" in page for n in names)


def test_every_test_the_reliability_page_names_exists():
    text = (REPO / "docs" / "reliability.md").read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]]*\])?`", text)
    assert len(refs) >= 20
    for path, name in refs:
        source = (REPO / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"docs/reliability.md names {path}::{name}, which is gone"


def test_readme_is_a_manual_not_a_history():
    size = len((REPO / "README.md").read_text())
    assert size <= README_LIMIT, f"README.md has {size} characters; move detail into docs/ (limit {README_LIMIT})"
