"""``python -m train.report``: plots and the routing summary of a short smoke run, the fall-back to the latest
checkpoint, a LoRA run (no router: no routing map, no PCA, no failure) and the one-line errors.

The routing written to ``summary.json`` is checked against ``routing()`` of the adapters restored here
independently (the real model built from the smoke config, the best checkpoint restored into it).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from child_env import set_xla_flags
from e2e_helpers import cache_env, shared_reference
from in_process import smoke_args, train_main
from shared_runs import completed, once, process

from train.logger import read_metrics

REPO = Path(__file__).resolve().parents[2]
PNGS = ("training.png", "eval.png", "routing.png", "task_embeddings_pca.png")
LORA = ["--config.adapter.kind=lora", "--config.train.steps=3", "--config.train.warmup_steps=0",
        "--config.train.log_every=1", "--config.train.eval_every=3", "--config.train.checkpoint_every=3",
        "--config.eval.max_examples=2", "--config.eval.final_test=False"]


def environment(cache_dir: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", **cache_env(cache_dir))
    set_xla_flags(env)
    env.pop("EPT_STOP_AFTER_STEP", None)
    return env


def train(workdir: Path, args) -> None:
    """``train.main`` on the smoke config, in this process (tests/in_process.py)."""
    out = train_main(*smoke_args(workdir, args, overrides=()))
    assert out.returncode == 0, out.stderr[-4000:]


def report(args, cache_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.report", *map(str, args)], cwd=REPO,
                          env=environment(cache_dir), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("report_jax_cache")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    """A copy of the session's 20-step EPT smoke run (evaluated at steps 10 and 20: e2e_helpers.shared_reference,
    which tests/e2e/test_reliability.py and test_train_resume.py fault and compare) and its report in the default
    place."""
    reference = shared_reference(tmp_path_factory, lambda workdir: train_main(*smoke_args(workdir)))

    def make(root: Path) -> dict:
        shutil.copytree(reference, root / "run")  # the shared run stays as it is (the report writes into its copy)
        return {"workdir": str(root / "run"), "out": completed(report(["--workdir", root / "run"], cache_dir))}

    r = once(tmp_path_factory, "report_run", make)  # once for the session (every worker reads it)
    return Path(r["workdir"]), process(r["out"])


def check_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 5_000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200, (path, im.size)
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.std() > 5.0, path  # drawn on, not a blank canvas
    assert len(np.unique(pixels)) > 20, path


def test_report_writes_valid_plots(run):
    workdir, out = run
    assert out.returncode == 0, out.stderr[-4000:]
    assert "4 plot(s)" in out.stdout and "best checkpoint" in out.stdout
    for name in PNGS:
        check_png(workdir / "report" / name)
    summary = json.loads((workdir / "report/summary.json").read_text())
    assert summary["plots"] == {"training": "training.png", "eval": "eval.png", "routing": "routing.png",
                                "pca": "task_embeddings_pca.png"}
    assert summary["notes"] == []
    # the best checkpoint is the last step marked best in metrics.jsonl
    best_step = max(r["step"] for r in read_metrics(workdir) if r.get("best"))
    assert summary["checkpoint"]["source"] == "best" and summary["checkpoint"]["step"] == best_step


def test_summary_routing_equals_restored_adapters(run):
    from flax import nnx

    from configs.smoke import get_config
    from ept_jax.adapters.base import adapted_linears
    from ept_jax.core.params import TRAINABLE
    from train import state as state_lib
    from train.checkpointing import Checkpointer
    from train.rundir import run_identity

    workdir, out = run
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((workdir / "report/summary.json").read_text())
    config = get_config()
    tasks = list(config.data.tasks)
    assert summary["tasks"] == tasks and summary["adapter_kind"] == "ept"

    model = state_lib.build_model(config)
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    ckpt = Checkpointer(workdir, 2)
    restored, host = ckpt.restore_best(trainable, run_identity(config))
    ckpt.close()
    assert host["step"] == summary["checkpoint"]["step"]
    initial = {lin.name: np.asarray(lin.adapter.routing()[0]) for _, lin in adapted_linears(model)}
    model = nnx.merge(graphdef, restored, frozen)
    linears = adapted_linears(model)
    assert set(summary["routing"]) == {lin.name for _, lin in linears} and len(linears) == 12
    changed = False
    for _, lin in linears:
        weights, idx = (np.asarray(a) for a in lin.adapter.routing())
        assert summary["expert_kernel_sizes"][lin.name] == [2, 2, 4, 4]
        for t, task in enumerate(tasks):
            entry = summary["routing"][lin.name][task]
            assert entry["experts"] == [int(e) for e in idx[t]] and len(entry["experts"]) == 2
            np.testing.assert_allclose(entry["weights"], weights[t, idx[t]], rtol=1e-6)
            assert sum(entry["weights"]) == pytest.approx(1.0, abs=1e-6)
            assert entry["weights"][0] >= entry["weights"][1] > 0
        changed = changed or not np.allclose(weights, initial[lin.name], atol=1e-4)
    assert changed  # the restored (trained) routers, not those of the freshly initialised model
    pca = summary["task_embedding_pca"]
    assert set(pca["coordinates"]) == set(tasks) and sum(pca["explained_variance_ratio"]) <= 1.0 + 1e-9
    assert pca["explained_variance_ratio"][0] >= pca["explained_variance_ratio"][1] > 0


def test_falls_back_to_the_latest_checkpoint(run, tmp_path, cache_dir):
    workdir, _ = run
    copy = tmp_path / "no_best"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("report"))
    shutil.rmtree(copy / "best")
    out = report(["--workdir", copy, "--out", tmp_path / "elsewhere"], cache_dir)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((tmp_path / "elsewhere/summary.json").read_text())
    assert summary["checkpoint"] == {"source": "latest", "step": 20, "score": None}
    assert not (copy / "report").exists()
    check_png(tmp_path / "elsewhere/routing.png")


def test_lora_run_gets_no_routing_map(tmp_path, cache_dir):
    workdir = tmp_path / "lora"
    train(workdir, LORA)
    out = report(["--workdir", workdir], cache_dir)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "no routing map and no task-embedding PCA" in out.stdout
    summary = json.loads((workdir / "report/summary.json").read_text())
    assert summary["adapter_kind"] == "lora" and summary["routing"] is None
    assert summary["task_embedding_pca"] is None
    assert summary["plots"]["routing"] is None and summary["plots"]["pca"] is None
    check_png(workdir / "report/training.png")
    assert not (workdir / "report/routing.png").exists()


def _one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_errors_are_one_line_with_exit_code_2(run, tmp_path, cache_dir):
    workdir, _ = run
    _one_line_error(report([], cache_dir), "--workdir is required")
    _one_line_error(report(["--workdir", tmp_path / "absent"], cache_dir), "absent", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(report(["--workdir", empty], cache_dir), "config.json is missing")
    no_metrics = tmp_path / "no_metrics"
    no_metrics.mkdir()
    shutil.copy(workdir / "config.json", no_metrics)
    _one_line_error(report(["--workdir", no_metrics], cache_dir), "metrics.jsonl is missing or empty")
    no_ckpt = tmp_path / "no_checkpoint"
    no_ckpt.mkdir()
    shutil.copy(workdir / "config.json", no_ckpt)
    shutil.copy(workdir / "metrics.jsonl", no_ckpt)
    _one_line_error(report(["--workdir", no_ckpt], cache_dir), "no checkpoint")
    assert sorted(p.name for p in no_ckpt.iterdir()) == ["config.json", "metrics.jsonl"]  # nothing created


def test_eval_plot_of_a_run_evaluated_by_held_out_loss_alone(tmp_path):
    """``eval.generation=False`` runs log ``eval_loss`` but no ``eval``: the evaluation plot shows the losses."""
    from train import report

    records = [{"step": 8, "loss": 2.0}, {"step": 16, "loss": 1.0, "eval_loss": {"arc_e": 3.1, "arc_c": 3.4},
                                           "eval_loss_mean": 3.25},
               {"step": 32, "loss": 0.9, "eval_loss": {"arc_e": 2.9, "arc_c": 3.2}, "eval_loss_mean": 3.05}]
    assert report.plot_eval(records, ["arc_e", "arc_c"], tmp_path / "eval.png")
    assert (tmp_path / "eval.png").stat().st_size > 1000
    assert not report.plot_eval([{"step": 8, "loss": 2.0}], ["arc_e"], tmp_path / "none.png")
