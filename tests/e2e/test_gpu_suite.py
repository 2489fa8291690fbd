"""The GPU suite's CPU dry run: ``bash benchmarks/gpu.sh --dry-run`` end to end, as a user runs it.

One dry run (a subprocess, from a foreign working directory) is shared by the module: it must exit 0 and write
every planned row, each ``ok`` with the documented figures or skipped with its reason. The GPU models' shapes are
checked without building them. No timing is asserted.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from child_env import set_xla_flags
from shared_runs import once

from benchmarks import gpu_suite, run, setups

REPO = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"id", "model", "row", "status", "reason", "step_s", "tokens_per_s", "mfu", "compile_s",
                "peak_device_bytes", "xla_peak_bytes", "trainable_params"}


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One ``gpu.sh --dry-run`` for the session (every worker reads it: shared_runs.once)."""
    return once(tmp_path_factory, "gpu_suite_dry", _dry)


def _dry(tmp: Path) -> dict:
    out = tmp / "dry.json"
    wheels = tmp / "no_wheels"  # nothing to install: the test never touches the environment
    wheels.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHON=sys.executable, EPT_WHEELS=str(wheels))
    set_xla_flags(env)
    # the session's compilation cache (scripts/test.sh): the models and rows of benchmarks.run --quick's
    cache = ["--compilation-cache", os.environ["EPT_COMPILATION_CACHE"]] if os.environ.get("EPT_COMPILATION_CACHE") \
        else []
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out), *cache],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return json.loads(out.read_text())


def test_dry_run_header(dry):
    assert dry["schema"] == gpu_suite.SCHEMA and dry["suite"] == "gpu"
    assert dry["complete"] is True and dry["dry_run"] is True
    assert dry["dtype"] == dry["param_dtype"] == "float32" and dry["reps"] == 1 and dry["budget_s"] is None
    assert dry["device_kind"] == dry["machine"]["jax_device_kind"] and dry["machine"]["jax_backend"] == "cpu"
    assert dry["peak_flops"] is None  # a CPU: no MFU denominator
    assert dry["compilation_cache"] == (os.environ.get("EPT_COMPILATION_CACHE") or None)
    assert run.QUICK_XLA_FLAG in dry["xla_flags"]
    assert set(dry["versions"]) == {"ml_collections", "qwix", "torch", "peft"}
    assert set(dry["models"]) == {s.name for s in gpu_suite.DRY_MODELS}
    for spec in gpu_suite.DRY_MODELS:
        m = dry["models"][spec.name]
        assert m["shapes"] == spec.shapes() and m["arch"] == spec.arch and m["family"] == spec.family
        assert m["kernel_sizes"] == list(spec.kernel_sizes)
        limit = next(r for r in dry["rows"] if r["model"] == spec.name and r["row"] == "limit")
        assert m["frozen_params"] == limit["params"]["base"] > 0


def test_dry_run_every_planned_row(dry):
    ids = [r["id"] for r in dry["rows"]]
    assert ids == dry["planned"] == [gpu_suite.skeleton(s, n)["id"] for s, n in gpu_suite.planned(gpu_suite.DRY_MODELS)]
    assert len(ids) == len(set(ids))
    for r in dry["rows"]:
        if r["row"] in gpu_suite.MAIN_ROWS:
            assert r["status"] == "ok", (r["id"], r["reason"])
        else:
            assert r["status"] in ("ok", "skipped") and (r["status"] == "ok" or r["reason"]), r["id"]
        if r["status"] != "ok":
            continue
        assert r["median_s"] > 0 and len(r["times_s"]) == 1 and r["compile_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["median_s"])
        assert r["mfu"] is None and r["flops_per_call"] > 0
        assert r["memory"]["xla_peak_bytes"] > 0 and r["memory"]["device_peak_bytes_in_use"] is None
    qwix = [r for r in dry["rows"] if r["row"] == "qwix_lora"]
    assert qwix and all(r["reason"] == gpu_suite.DRY_NO_QWIX for r in qwix)
    torch = [r for r in dry["rows"] if r["row"] == "torch_peft_lora"]
    assert torch and all(r["reason"] == gpu_suite.TORCH_OFF and r["framework"] == "torch" for r in torch)


def test_dry_run_summary_and_ratios(dry):
    assert [s["id"] for s in dry["summary"]] == [r["id"] for r in dry["rows"]]
    for s, r in zip(dry["summary"], dry["rows"], strict=True):
        assert set(s) == SUMMARY_KEYS
        assert (s["step_s"], s["tokens_per_s"], s["mfu"], s["compile_s"]) == (
            r["median_s"], r["tokens_per_s"], r["mfu"], r["compile_s"])
    names = {q["name"] for q in dry["ratios"]}
    assert {"ept_reference/lora", "ept_paper/lora", "ept_reference/limit", "lora/limit"} <= names
    main = {(r["model"], r["row"]): r for r in dry["rows"]}
    for q in dry["ratios"]:
        if q["name"] == "ept_reference/limit":
            a, b = main[(q["model"], "ept_reference")], main[(q["model"], "limit")]
            assert q["value"] == pytest.approx(a["median_s"] / b["median_s"])


def test_gpu_models_shapes():
    t5, llama = gpu_suite.GPU_MODELS
    assert (t5.name, t5.arch["d_model"], t5.arch["num_layers"], t5.arch["num_heads"], t5.arch["d_ff"]) == (
        "t5_base", 768, 12, 12, 3072)
    a = llama.arch
    assert (a["hidden_size"], a["num_hidden_layers"], a["num_attention_heads"], a["num_key_value_heads"],
            a["intermediate_size"], a["vocab_size"]) == (2048, 16, 32, 8, 8192, 32000)
    head = a["hidden_size"] // a["num_attention_heads"]
    layer = (2 * a["hidden_size"] ** 2 + 2 * a["hidden_size"] * a["num_key_value_heads"] * head
             + 3 * a["hidden_size"] * a["intermediate_size"] + 2 * a["hidden_size"])
    n = a["num_hidden_layers"] * layer + a["vocab_size"] * a["hidden_size"] + a["hidden_size"]
    assert 1.0e9 < n < 1.1e9  # the "1.04 B frozen parameters" of the docs
    # the paper variant needs every kernel size to divide every adapted width
    widths = {t5.name: (768, 3072), llama.name: (2048, 512, 8192)}
    for spec in gpu_suite.GPU_MODELS:
        assert all(w % k == 0 for k in spec.kernel_sizes for w in widths[spec.name]), spec.name
        assert spec.targets == (setups.T5_TARGETS if spec.family == "t5" else setups.LLAMA_TARGETS)


def test_budget_and_param_dtype():
    assert gpu_suite.budget_reason(10.0, None) is None and gpu_suite.budget_reason(10.0, 20.0) is None
    assert "time budget" in gpu_suite.budget_reason(30.0, 20.0)
    spec = setups.QUICK[1]
    original = setups.bench_config
    with gpu_suite.base_param_dtype("bfloat16"):
        c = setups.bench_config(spec, None, dtype="bfloat16")
        assert (c.model.dtype, c.model.param_dtype) == ("bfloat16", "bfloat16")
    assert setups.bench_config is original
    assert setups.bench_config(spec, None).model.param_dtype == "float32"


@pytest.mark.parametrize("argv", [["--dtype", "float16"], ["--reps", "0"], ["--models", "nope"],
                                  ["--budget-s", "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    assert gpu_suite.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")
