"""benchmarks.scaling without a measurement: tables and figures from a synthetic result, the --check logic, the
argument errors, and docs/scaling.md against the committed result JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import scaling

REPO = Path(__file__).resolve().parents[2]


def _row(sweep, method, n, r, ms, mib, trainable):
    return {"sweep": sweep, "method": method, "n_tasks": n, "r": r, "median_s": ms / 1e3, "times_s": [ms / 1e3],
            "compile_s": 1.0,
            "memory": {"xla_argument_bytes": int(mib * 2**20), "xla_output_bytes": 2**20, "xla_alias_bytes": 2**20,
                       "xla_temp_bytes": 2**21, "xla_peak_bytes": int(mib * 2**20)},
            "params": {"base": 100, "trainable": trainable}, "adapter": {}}


def _result(methods=("ept_reference", "lora_per_task"), tasks=(1, 8), ranks=(4, 8)):
    rows = []
    for n in tasks:
        for i, m in enumerate(methods):
            rows.append(_row("tasks", m, n, 8, 10.0 + i * n, 100.0 + i * n, 1000 * (1 + i * n)))
    for r in ranks:
        if r == 8:
            continue
        for m in methods:
            rows.append(_row("rank", m, 8, r, 5.0 + r, 50.0 + r, 100 * r))
    return {"schema": scaling.SCHEMA, "command": "python -m benchmarks.scaling --reps 1", "complete": True,
            "machine": {"cpu_model": "Test CPU", "cpu_usable": 2, "jax_backend": "cpu", "versions": {"jax": "0"}},
            "model": {"name": "t5_mini", "shapes": {"batch": 8, "source_len": 64, "target_len": 16}},
            "reps": 1, "warmup": 1, "base_rank": 8, "base_tasks": 8, "tasks": list(tasks), "ranks": list(ranks),
            "methods": list(methods), "rows": rows, "elapsed_s": 12.0}


def test_tables_hold_every_point_and_the_last_over_first_ratio():
    text = scaling.tables(_result())
    assert "| EPT (reference) | 10.0 | 10.0 | 1.00× |" in text  # step time flat in tasks
    assert "| LoRA per task | 11.0 | 18.0 | 1.64× |" in text
    assert "| LoRA per task | 0.002 | 0.009 | 4.50× |" in text  # trainable parameters (M)
    # memory: arguments + outputs - aliased + temporaries (2 MiB), not XLA's peak (the arguments on CPU)
    assert "| LoRA per task | 103.0 | 110.0 | 1.07× |" in text
    assert "| EPT (reference) | 2.0 | 2.0 | 1.00× |" in text  # of which temporaries
    # the rank sweep takes its r = 8 point from the task sweep's row at 8 tasks
    assert "| EPT (reference) | 9.0 | 10.0 | 1.11× |" in text
    assert "Test CPU (2 usable cores)" in text and "t5_mini" in text


def test_series_rejects_an_unknown_sweep():
    with pytest.raises(ValueError, match="'depth'"):
        scaling.series(_result(), "depth")


def test_plot_writes_both_figures(tmp_path):
    path = tmp_path / "scaling_test.json"
    path.write_text(json.dumps(_result()))
    written = scaling.plot(_result(), path)
    assert [p.name for p in written] == ["scaling_test_tasks.png", "scaling_test_rank.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_plot_command_splices_the_doc_and_check_passes_then_fails(tmp_path, capsys):
    path = tmp_path / "scaling_test.json"
    path.write_text(json.dumps(_result()))
    doc = tmp_path / "scaling.md"
    doc.write_text(f"# title\n\nprose\n\n{scaling.BEGIN}\nstale\n{scaling.END}\n\nmore prose\n")
    assert scaling.main(["--plot", str(path), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# title\n\nprose\n\n") and text.endswith(f"{scaling.END}\n\nmore prose\n")
    assert "stale" not in text and "| LoRA per task |" in text
    assert scaling.main(["--check", str(path), "--doc", str(doc)]) == 0
    doc.write_text(text.replace("| LoRA per task | 11.0", "| LoRA per task | 12.0"))
    assert scaling.main(["--check", str(path), "--doc", str(doc)]) == 1
    assert "differs" in capsys.readouterr().err


@pytest.mark.parametrize("doc", ["no markers", f"{scaling.END}\n{scaling.BEGIN}", f"{scaling.BEGIN}{scaling.BEGIN}"
                                 f"{scaling.END}"])
def test_splice_needs_one_ordered_pair_of_markers(doc):
    with pytest.raises(ValueError, match="exactly one"):
        scaling.splice(doc, "x\n")


@pytest.mark.parametrize("argv, named", [
    (["--tasks", "1,abc"], "'abc'"),
    (["--tasks", "0,8"], "--tasks 0"),
    (["--ranks", "4,4"], "repeated"),
    (["--ranks", "12"], "rank 12"),  # MoE-LoRA's 8 experts do not divide 12
    (["--methods", "ept_reference,dora"], "dora"),
    (["--model", "gpt5"], "'gpt5'"),
    (["--reps", "0"], "--reps 0"),
    (["--warmup", "-1"], "--warmup -1"),
    (["--base-rank", "x"], "'x'"),
    (["--plot", "/nonexistent/scaling.json"], "/nonexistent/scaling.json"),
    (["--plot", "a.json", "--check", "b.json"], "not allowed with"),
])
def test_bad_arguments_are_named(argv, named):
    with pytest.raises(ValueError, match=None) as e:
        scaling.parse_args(argv)
    assert named in str(e.value)


def test_bad_arguments_exit_2_with_one_line(capsys):
    assert scaling.main(["--tasks", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tasks 0") and err.count("\n") == 1


def test_rank_without_moelora_need_not_divide_its_experts():
    opts = scaling.parse_args(["--ranks", "12", "--methods", "ept_reference,lora_shared"])
    assert opts.ranks == (12,) and opts.mode == "measure"


def test_plan_measures_the_shared_point_once():
    opts = scaling.parse_args(["--tasks", "1,8", "--ranks", "4,8", "--methods", "lora_shared"])
    assert scaling.plan(opts) == [("tasks", "lora_shared", 1, 8), ("tasks", "lora_shared", 8, 8),
                                  ("rank", "lora_shared", 8, 4)]


def test_task_ids_spread_over_the_tasks():
    assert scaling.task_ids(8, 1).tolist() == [0] * 8
    assert scaling.task_ids(8, 8).tolist() == list(range(8))
    assert scaling.task_ids(8, 128).tolist() == [0, 16, 32, 48, 64, 80, 96, 112]


def test_docs_page_matches_the_committed_results():
    results = sorted((REPO / "docs" / "results").glob("scaling_*.json"))
    assert len(results) == 1, f"expected one docs/results/scaling_*.json, found {[p.name for p in results]}"
    why = scaling.check(scaling.load(results[0]), (REPO / "docs" / "scaling.md").read_text())
    assert why is None, f"docs/scaling.md: {why}: run python -m benchmarks.scaling --plot {results[0]}"


def test_per_task_lora_routes_each_example_to_its_tasks_adapter():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ept_jax.adapters import registry
    from ept_jax.adapters.config import AdapterConfig
    from ept_jax.core.params import AdapterContext

    scaling.register_per_task_lora()
    cfg = AdapterConfig(kind="lora_per_task", r=2, alpha=4.0, n_tasks=3, n_task_rows=3, dropout=0.0)
    ad = registry.make_adapter(cfg, 5, 4, rngs=nnx.Rngs(0))
    assert ad.A[...].shape == (3, 2, 5) and ad.B[...].shape == (3, 4, 2)
    ad.B[...] = jax.random.normal(jax.random.key(1), (3, 4, 2))
    x = jax.random.normal(jax.random.key(2), (4, 6, 5))
    tasks = jnp.array([2, 0, 2, 1])
    y = ad(x, AdapterContext(task_ids=tasks))
    a, b = np.asarray(ad.A[...]), np.asarray(ad.B[...])
    want = np.stack([2.0 * np.asarray(x[i]) @ a[t].T @ b[t].T for i, t in enumerate(tasks.tolist())])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ad.merge(1)), 2.0 * b[1] @ a[1], rtol=1e-6)
    with pytest.raises(ValueError, match="task=3"):
        ad.merge(3)
