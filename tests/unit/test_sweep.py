"""python -m train.sweep: grid parsing and a tiny two-point sweep on the smoke config."""

from __future__ import annotations

import json

import pytest

from train import sweep


def test_parsing_and_unknown_keys():
    assert sweep.parse_run("ept_hi: train.learning_rate=1e-2 adapter.kind=ept") == (
        "ept_hi", {"train.learning_rate": 0.01, "adapter.kind": "ept"})
    with pytest.raises(ValueError, match="expected 'NAME: KEY=VALUE"):
        sweep.parse_run("no colon here")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        sweep.parse_assignments("train.learning_rate")
    from configs.smoke import get_config

    c = get_config()
    with pytest.raises(ValueError, match="no key 'train.lr'"):
        sweep.apply(c, {"train.lr": 1.0})


def test_tiny_sweep_writes_curves_table_and_plot(tmp_path, capsys):
    out = tmp_path / "grid"
    rc = sweep.main(["--config", "configs/smoke.py", "--out", str(out),
                     "--run", "ept: adapter.kind=ept", "--run", "lora: adapter.kind=lora",
                     "--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "train.log_every=2",
                     "--set", "train.checkpoint_every=4", "--set", "train.warmup_steps=1",
                     "--set", "eval.max_examples=4"])
    assert rc == 0
    data = json.loads((out / "sweep.json").read_text())
    for name in ("ept", "lora"):
        (c,) = data["curves"][name]
        assert c["step"] == [2, 4] and all(v > 0 for v in c["eval_loss"])
        assert data["summary"][name]["mean"] == c["eval_loss"][-1]
    assert (out / "heldout_loss.png").stat().st_size > 1000
    assert "| ept | 1 |" in (out / "table.md").read_text()
    # a finished point is reused, not trained again
    assert sweep.main(["--config", "configs/smoke.py", "--out", str(out), "--run", "ept: adapter.kind=ept",
                       "--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "train.log_every=2",
                       "--set", "train.checkpoint_every=4", "--set", "train.warmup_steps=1",
                       "--set", "eval.max_examples=4"]) == 0
    assert sweep.main(["--config", "configs/smoke.py", "--out", str(out), "--run", "x: train.nope=1"]) == 2
    assert "no key 'train.nope'" in capsys.readouterr().err
