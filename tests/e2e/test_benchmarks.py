"""The benchmark harness: ``python -m benchmarks.run --quick`` end to end, and its pieces.

One quick run (a subprocess, as a user runs it) is shared by the module: it must exit 0, write every planned
row with the documented fields, and its ratios must be the quotients of the rows' medians. No timing is
asserted anywhere: the numbers are whatever the machine gives.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from child_env import set_xla_flags
from shared_runs import once

from benchmarks import allocator, interleaved, measure, run, setups, table

REPO = Path(__file__).resolve().parents[2]
# every model's main rows (qwix_lora too: qwix intercepts ept_jax's Linears in T5 as in LLaMA)
MAIN_ROWS = {"limit", "ept_reference", "ept_paper", "ept_materialized", "lora", "torch_peft_lora", "qwix_lora",
             "generate_base", "generate_merged", "generate_unmerged"}
ROW_KEYS = {"id", "model", "family", "row", "kind", "framework", "shapes", "status", "reason", "sweep", "n_experts",
            "median_s", "times_s", "warmup", "compile_s", "memory", "tokens", "tokens_per_s", "flops_per_call", "mfu",
            "params"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``benchmarks.run --quick`` for the session (every worker reads it: shared_runs.once)."""
    out = Path(once(tmp_path_factory, "bench_quick", _quick))
    return json.loads(out.read_text()), out


def _quick(root: Path) -> str:
    out = root / "quick.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    set_xla_flags(env)
    # the session's compilation cache (scripts/test.sh): the interleaved rounds load the programs of the main rows
    # and the GPU suite's dry run (the same models and rows) those of this run
    cache = ["--compilation-cache", os.environ["EPT_COMPILATION_CACHE"]] if os.environ.get("EPT_COMPILATION_CACHE") \
        else []
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out), *cache], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)


def test_quick_run_schema_and_machine(quick):
    result, _ = quick
    assert result["schema"] == run.SCHEMA and result["quick"] is True and result["reps"] == 2
    assert result["complete"] is True
    assert run.QUICK_XLA_FLAG in result["xla_flags"]
    assert result["allocator"] == allocator.loaded()  # the test process's, inherited: no --allocator
    assert result["compilation_cache"] == (os.environ.get("EPT_COMPILATION_CACHE") or None)
    m = result["machine"]
    for key in ("cpu_model", "cpu_count", "cpu_usable", "jax_backend", "jax_device_kind", "versions"):
        assert m[key] not in (None, ""), key
    assert m["jax_backend"] == "cpu"
    assert set(result["models"]) == {s.name for s in setups.QUICK}
    for row in result["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)


def test_every_row_ran(quick):
    result, _ = quick
    ids = [r["id"] for r in result["rows"]]
    assert len(ids) == len(set(ids)), "row ids must be unique"
    for spec in setups.QUICK:
        rows = [r for r in result["rows"] if r["model"] == spec.name]
        assert {r["row"] for r in rows if r["sweep"] == "main"} == MAIN_ROWS
        for r in rows:
            assert r["status"] == "ok", (r["id"], r["reason"])
            assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
            assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
            assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["median_s"])
            if r["framework"] == "jax":
                assert r["compile_s"] > 0 and r["memory"]["xla_peak_bytes"] > 0, r["id"]
        # every planned sweep point is there, each with its own shapes or expert count
        seq = {(r["row"], r["shapes"].get("source_len", r["shapes"].get("seq_len"))) for r in rows
               if r["sweep"] in ("main", "seq_len")}
        for name in run.SEQ_SWEPT:
            for n in (spec.seq, *spec.seq_sweep):
                assert (name, n) in seq, (name, n)
        experts = sorted(r["n_experts"] for r in rows
                         if r["row"] == "ept_reference" and r["sweep"] in ("main", "experts"))
        assert experts == sorted({*spec.expert_sweep, len(spec.kernel_sizes)})
        # the PyTorch peer trains what ept_jax's LoRA trains: the same number of adapter parameters
        dropout_rows = {r["row"]: r for r in rows if r["sweep"] == "dropout"}
        assert set(dropout_rows) == {name for name, _ in run.DROPOUT_ROWS}
        assert dropout_rows["ept_reference_threefry"]["adapter"]["dropout_impl"] == "threefry"
        assert dropout_rows["ept_reference_nodropout"]["adapter"]["dropout"] == 0.0
        by = {r["row"]: r for r in rows if r["sweep"] == "main"}
        assert by["torch_peft_lora"]["params"]["trainable"] == by["lora"]["params"]["trainable"]
        assert by["limit"]["params"]["base"] == by["lora"]["params"]["base"] == by["ept_reference"]["params"]["base"]
        assert by["ept_reference"]["flops_per_call"] == by["limit"]["flops_per_call"] > 0
        # qwix's LoRA (benchmarks.qwix_peer) on the same plain model: the same base, the same adapter parameters
        q = by["qwix_lora"]
        assert q["framework"] == "jax" and q["params"] == by["lora"]["params"]
        assert q["flops_per_call"] == by["limit"]["flops_per_call"] and q["tokens"] == by["lora"]["tokens"]
        assert q["scan_layers"] is False and "layers unrolled" in q["notes"]
        assert q["versions"]["qwix"] == result["machine"]["versions"]["qwix"] is not None
        # merging leaves the base model's program: the same instructions on the same shapes; the routed
        # (unmerged) adapters add their own
        assert by["generate_merged"]["program"] == by["generate_base"]["program"]
        assert by["generate_unmerged"]["program"] != by["generate_base"]["program"]


def test_ratios_are_the_quotients_of_the_medians(quick):
    result, _ = quick
    rows = {r["id"]: r for r in result["rows"]}
    assert len(result["ratios"]) == len(run.RATIOS) * len(setups.QUICK)
    for q in result["ratios"]:
        num, den = rows[q["numerator"]], rows[q["denominator"]]
        assert num["model"] == den["model"] == q["model"] and {num["sweep"], den["sweep"]} <= set(run.RATIO_SWEEPS)
        assert q["value"] == pytest.approx(num["median_s"] / den["median_s"])
        assert q["met"] == (None if q["target"] is None else q["value"] <= q["target"])


def test_interleaved_ratios_are_medians_of_in_round_quotients(quick):
    result, _ = quick
    assert set(result["interleaved"]) == {s.name for s in setups.QUICK}
    for inter in result["interleaved"].values():
        assert inter["rounds"] == 1 and inter["reps"] == 1
        assert set(inter["rows"]) == set(interleaved.ROWS)
        for r in inter["rows"].values():
            assert len(r["times_s"]) == 1 and len(r["times_s"][0]) == 1 and r["median_s"] > 0
        names = {q["name"] for q in inter["ratios"]}
        assert names == {n for n, a, b, _ in run.RATIOS if a in interleaved.ROWS and b in interleaved.ROWS}
        for q in inter["ratios"]:
            num, den = (inter["rows"][x]["times_s"] for x in q["name"].split("/"))
            assert q["per_round"] == pytest.approx([statistics.median(a) / statistics.median(b)
                                                    for a, b in zip(num, den, strict=True)])
            assert q["value"] == pytest.approx(statistics.median(q["per_round"]))


def test_table_prints_every_model_row_and_ratio(quick, capsys):
    result, path = quick
    assert table.main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "Quick mode" in text and result["machine"]["cpu_model"] in text
    for spec in setups.QUICK:
        assert f"#### {spec.name}" in text
    for name in MAIN_ROWS | {name for name, _ in run.DROPOUT_ROWS}:
        assert f"| {name} |" in text
    for name, *_ in run.RATIOS:
        assert f"| {name} |" in text
    assert "| ratio, interleaved |" in text
    assert text.count("qwix_lora: qwix ") == len(setups.QUICK)  # the row's notes (layers unrolled, optax)
    assert text.count("generate_merged compiles to the same XLA program as generate_base") == len(setups.QUICK)


def test_table_and_run_refuse_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert table.main([str(bad)]) == 2
    assert "not a readable benchmarks.run result" in capsys.readouterr().err
    assert run.main(["--quick", "--dtype", "float16"]) == 2
    assert "--dtype='float16'" in capsys.readouterr().err
    assert run.main(["--quick", "--models", "t5_small"]) == 2
    assert "accepted ['llama_tiny', 't5_tiny']" in capsys.readouterr().err
    assert run.main(["--quick", "--skip", "lora,limit"]) == 2
    assert "--skip ['limit']: accepted ept_reference" in capsys.readouterr().err
    assert run.main(["--quick", "--allocator", "mimalloc"]) == 2
    assert "--allocator='mimalloc': accepted default, tcmalloc, jemalloc" in capsys.readouterr().err


def test_allocator_lookup_detection_and_preload(tmp_path):
    with pytest.raises(ValueError, match=r"--allocator=tcmalloc: none of libtcmalloc_minimal.so.4, "
                                         r"libtcmalloc.so.4 under .*apt-get install libtcmalloc-minimal4"):
        allocator.find("tcmalloc", dirs=(str(tmp_path),))
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert allocator.find("jemalloc", dirs=("/nonexistent", str(tmp_path))) == str(tmp_path / "libjemalloc.so.2")
    libc = "7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    assert allocator.loaded(libc) == "glibc"
    assert allocator.loaded(libc + "7f20-7f30 r-xp 0 08:01 2 /usr/lib/libtcmalloc_minimal.so.4.5.9\n") == "tcmalloc"
    assert allocator.loaded(libc + "7f20-7f30 r-xp 0 08:01 2 /usr/lib/libjemalloc.so.2\n") == "jemalloc"
    env = allocator.preload_env("/l/libtcmalloc_minimal.so.4", {"LD_PRELOAD": "/x/a.so:/l/libtcmalloc_minimal.so.4",
                                                               "PATH": "/bin"})
    assert env["LD_PRELOAD"] == "/l/libtcmalloc_minimal.so.4 /x/a.so" and env["PATH"] == "/bin"
    assert allocator.ensure("default", "benchmarks.run", []) is None  # no exec


def test_allocator_reexec_loads_the_library():
    try:
        allocator.find("tcmalloc")
    except ValueError as e:
        pytest.skip(str(e))
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "EPT_BENCH_ALLOCATOR_REEXEC")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.allocator", "tcmalloc"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["tcmalloc", allocator.find("tcmalloc")]
    bad = subprocess.run([sys.executable, "-m", "benchmarks.allocator", "hoard"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--allocator='hoard': accepted" in bad.stderr


def test_skipped_rows_are_recorded_and_left_out_of_the_rounds():
    spec = setups.QUICK[1]
    rows, inter = run.run_model(spec, reps=1, warmup=0, dtype="float32", torch_peer=True, log=lambda r: None,
                                sweeps=True, rounds=1, round_reps=1,
                                skip=frozenset({"ept_reference", "ept_paper", "ept_materialized", "torch_peft_lora",
                                                "qwix_lora"}))
    by = {r["row"]: r for r in rows}
    assert {r["row"] for r in rows if r["status"] == "ok"} == {"limit", "lora"}
    assert all(r["sweep"] in ("main", "seq_len") for r in rows)  # no EPT sweeps without the EPT row
    assert by["ept_paper"]["reason"] == "--skip" and by["torch_peft_lora"]["framework"] == "torch"
    assert by["qwix_lora"]["reason"] == "--skip" and by["qwix_lora"]["framework"] == "jax"
    assert by["generate_merged"]["reason"] == "needs the ept_reference row, skipped"
    assert set(inter["rows"]) == {"limit", "lora"} and [q["name"] for q in inter["ratios"]] == ["lora/limit"]


def test_ratios_of_a_skipped_row_carry_the_reason():
    spec = setups.QUICK[0]
    from benchmarks.jax_rows import row

    rows = [row(spec, "ept_reference", "train", spec.shapes(), median_s=2.0),
            row(spec, "lora", "train", spec.shapes(), median_s=1.0),
            row(spec, "torch_peft_lora", "train", spec.shapes(), status="skipped", reason="no CUDA torch")]
    out = {q["name"]: q for q in run.ratios(rows)}
    assert out["ept_reference/lora"]["value"] == 2.0 and out["ept_reference/lora"]["met"] is False
    skipped = out["ept_reference/torch_peft_lora"]
    assert skipped["value"] is None and "no CUDA torch" in skipped["reason"]
    assert out["ept_reference/limit"]["value"] is None and "limit" in out["ept_reference/limit"]["reason"]


def test_peak_flops_table_and_mfu():
    assert measure.peak_flops("NVIDIA H200", "bfloat16") == 989.4e12
    assert measure.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756.0e12
    assert measure.peak_flops("NVIDIA H100 80GB HBM3", "float32") == 494.7e12
    assert measure.peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0e12
    assert measure.peak_flops("cpu", "float32") is None and measure.peak_flops("Tesla T4", "float32") is None
    assert measure.mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)
    assert measure.mfu(1e12, 0.5, None) is None


def test_kernel_prefixes_and_model_names():
    t5 = setups.FULL[0]
    assert t5.kernels(2) == (2, 4) and t5.kernels(4) == (2, 4, 8, 16) and t5.kernels(8) == t5.kernel_sizes
    with pytest.raises(ValueError, match="n_experts=9"):
        t5.kernels(9)
    for spec in setups.FULL:  # the paper variant needs every kernel size to divide every adapted width
        widths = {spec.arch.get("d_model", spec.arch.get("hidden_size")), spec.arch.get("d_ff", 0) or
                  spec.arch.get("intermediate_size")}
        assert all(w % k == 0 for w in widths for k in spec.kernel_sizes), spec.name
    with pytest.raises(ValueError, match="accepted"):
        setups.specs(False, ("t5_tiny",))


def test_time_calls_counts_and_validates():
    calls = []
    out = measure.time_calls(lambda: calls.append(1), reps=3, warmup=2, sync=lambda x: x,
                             sampler=measure.RssSampler())
    assert len(calls) == 5 and len(out["times_s"]) == 3 and out["warmup"] == 2
    assert out["rss_peak_delta_bytes"] is None or out["rss_peak_delta_bytes"] >= 0
    with pytest.raises(ValueError, match="reps=0"):
        measure.time_calls(lambda: None, reps=0)
