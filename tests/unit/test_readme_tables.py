"""The README's generated result blocks equal what scripts/readme_tables.py renders from docs/results."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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


def _module():
    spec = importlib.util.spec_from_file_location("readme_tables", REPO / "scripts" / "readme_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seeds_are_collected_from_compare_runs_and_other_configs_refused(tmp_path):
    import json

    import pytest

    def run(seed, lr=1e-2, acc=(40.0, 50.0), loss=3.0):
        tasks = {"arc_e": {"acc_norm": acc[0]}, "arc_c": {"acc_norm": acc[1]}}
        facts = {"answer_loss": loss, "choices": {"mean": {"acc_norm": sum(acc) / 2}, "tasks": tasks}}
        d = tmp_path / f"s{seed}_{lr}"
        d.mkdir()
        config = {"train": {"seed": seed, "learning_rate": lr}}
        (d / "compare.json").write_text(json.dumps({"config": config, "runs": {
            "base": {"facts": facts}, "ept": {"facts": facts}, "lora": {"facts": {**facts, "answer_loss": loss + 1}}}}))
        return d

    mod = _module()
    out = mod.collect_seeds([run(0), run(1, acc=(42.0, 52.0), loss=2.0)])
    assert sorted(out["seeds"]) == ["0", "1"] and "base" not in out["seeds"]["0"]
    assert out["seeds"]["1"]["ept"] == {"answer_loss": 2.0, "acc_norm_mean": 47.0,
                                       "acc_norm": {"arc_e": 42.0, "arc_c": 52.0}}
    assert out["config"] == {"train": {"learning_rate": 1e-2}}
    with pytest.raises(SystemExit, match="differs"):
        mod.collect_seeds([run(2), run(3, lr=1e-3)])
