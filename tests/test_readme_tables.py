"""The README's generated result blocks equal what scripts/readme_tables.py renders from docs/results."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_result_blocks_are_generated_from_their_files():
    spec = importlib.util.spec_from_file_location("readme_tables", REPO / "scripts" / "readme_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    found = []
    for doc in mod.DOCUMENTS:
        path = REPO / doc
        if not path.is_file():
            continue
        text = path.read_text()
        found += [name for name in mod.BLOCKS if f"<!-- generated:{name} -->" in text]
        assert mod.render(text) == text, f"{doc}: run python scripts/readme_tables.py"
    assert found, "no generated block"
