"""Only process 0 of a multi-process job writes a run's files (train.rundir.is_writer): the other processes run the
same computation and write nothing. Checked here for the programs that write besides train.loop (whose metrics,
TensorBoard, results and run lock follow the same flag; its multi-process runs are in tests/e2e/test_distributed.py):
train.compare's table, summary and plot, and train.sweep's files."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from train import compare, compile_cache, loop, rundir, sweep
from train.configuration import CONFIG_FILE, load_config_file, to_dict

REPO = Path(__file__).resolve().parents[2]


def _fake_run(config, workdir, **_):
    """What train.loop.run leaves behind, as far as compare and sweep read it."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG_FILE).write_text(json.dumps(to_dict(config)))
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "eval_loss_mean": 0.5,
                                                       "eval": {"syn_copy": {"accuracy": 50.0}}}) + "\n")
    (workdir / "results.json").write_text(json.dumps({"steps": 1, "best_step": 1, "test": {
        "syn_copy": {"accuracy": 50.0}}}))
    return {"step": 1}


@pytest.mark.parametrize("process", [0, 1])
def test_compare_and_sweep_write_on_process_0_only(process, tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda *a: process)
    monkeypatch.setattr(loop, "run", _fake_run)
    monkeypatch.setattr(compile_cache, "enable", lambda *a: None)  # sweep.main's: not this process's setting
    assert rundir.is_writer() == (process == 0)
    config = load_config_file(str(REPO / "configs/smoke.py"))
    out = compare.compare(config, tmp_path / "cmp", ("ept", "lora"))
    assert "| EPT" in out["table"]  # computed on every process
    written = {p.name for p in (tmp_path / "cmp").iterdir() if p.is_file()}
    assert written == ({compare.TABLE_FILE, compare.SUMMARY_FILE, compare.PLOT_FILE} if process == 0 else set())
    code = sweep.main(["--config", str(REPO / "configs/smoke.py"), "--out", str(tmp_path / "sw"),
                       "--run", "a: train.learning_rate=0.1"])
    assert code == 0
    files = {p.name for p in (tmp_path / "sw").iterdir() if p.is_file()}
    assert files == ({"sweep.json", "table.md", "heldout_loss.png"} if process == 0 else set())
