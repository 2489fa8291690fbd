"""Exporting adapters saved by the released PyTorch EPT: merged models and PEFT adapters reproduce its logits.

The release cannot merge its own adapters; ``python -m train.export --reference-adapter`` can. Every
fixture set (``$EPT_REFERENCE_FIXTURES``, default ``../shared/fixtures/reference_ept``) is exported with
``--task all`` to both formats through the command line, and every case's ``logits`` (what the release
computed for that task id) must come out of transformers (merged) and of PEFT on the unmodified base to 1e-4.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from train import export as cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(
    os.environ.get("EPT_REFERENCE_FIXTURES", ROOT.parent / "shared" / "fixtures" / "reference_ept")
)
FIXTURE_DIRS = sorted(
    p
    for s in (FIXTURES.iterdir() if FIXTURES.is_dir() else [])
    if s.is_dir()
    for p in s.iterdir()
    if (p / "expected.json").is_file()
)
TOL = 1e-4


def test_fixtures_present():
    assert FIXTURE_DIRS, f"no reference fixtures (*/t5, */llama with expected.json) under {FIXTURES}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{fixture dir: {format: out dir}}``: every fixture exported by the CLI with ``--task all``."""
    out = {}
    for d in FIXTURE_DIRS:
        root = tmp_path_factory.mktemp(f"{d.parent.name}-{d.name}")
        out[d] = {}
        for fmt in ("merged", "peft"):
            argv = [
                "--reference-adapter",
                str(d),
                "--base",
                str(d / "base"),
                "--task",
                "all",
                "--format",
                fmt,
                "--out",
                str(root / fmt),
            ]
            assert cli.main(argv) == 0
            out[d][fmt] = root / fmt
    return out


def _auto(expected):
    return (
        transformers.AutoModelForSeq2SeqLM if expected["kind"] == "t5" else transformers.AutoModelForCausalLM
    )


def _logits(model, expected) -> np.ndarray:
    ids = torch.tensor(expected["input_ids"])
    with torch.no_grad():
        if expected["kind"] == "t5":
            dec = torch.tensor(expected["decoder_input_ids"])
            return model(input_ids=ids, decoder_input_ids=dec).logits.numpy()
        return model(input_ids=ids).logits.numpy()


def _peft_loaded_exactly(model, adapter_dir: Path) -> None:
    """Every tensor of the adapter file is in the PEFT model, unchanged, and PEFT made no other LoRA weight.

    PEFT loads wrongly named keys with only a warning; this is what proves nothing was silently dropped.
    """
    from safetensors.numpy import load_file

    file = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = {
        n.replace(".default", ""): p.detach().numpy() for n, p in model.named_parameters() if "lora_" in n
    }
    assert set(loaded) == set(file)
    for k, v in file.items():
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)


@pytest.mark.parametrize("d", FIXTURE_DIRS, ids=lambda p: f"{p.parent.name}-{p.name}")
def test_exports_reproduce_release_logits(exported, d):
    expected = json.loads((d / "expected.json").read_text())
    auto = _auto(expected)
    written = sorted(p.name for p in exported[d]["merged"].iterdir())
    assert written == [f"task_{i}" for i in range(8)]  # the release's 8 task-embedding rows
    base = auto.from_pretrained(d / "base", dtype=torch.float32).eval()
    base_logits = _logits(base, expected)
    for case in expected["cases"]:
        t, want = case["task_id"], np.asarray(case["logits"])
        merged, info = auto.from_pretrained(exported[d]["merged"] / f"task_{t}", output_loading_info=True)
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
        assert next(merged.parameters()).dtype == torch.float32
        np.testing.assert_allclose(
            _logits(merged.eval(), expected), want, atol=TOL, rtol=0, err_msg=f"merged {t}"
        )

        adapter_dir = exported[d]["peft"] / f"task_{t}"
        base_copy = auto.from_pretrained(d / "base", dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base_copy, adapter_dir).eval()
        _peft_loaded_exactly(model, adapter_dir)
        np.testing.assert_allclose(_logits(model, expected), want, atol=TOL, rtol=0, err_msg=f"peft {t}")
        # the task's adapter must matter, or the comparisons above prove nothing
        assert np.abs(want - base_logits).max() > 1e-2
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        # the reference variant's task delta is exactly rank r * top_k, for every module
        assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"]) == (
            expected["r"] * expected["top_k"],
        ) * 2 + ({},)


def _run(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def fixture_dir():
    if not FIXTURE_DIRS:
        pytest.skip("no reference fixtures")
    return next(d for d in FIXTURE_DIRS if d.name == "llama")


def test_single_task_id_writes_into_out(fixture_dir, tmp_path, capsys):
    out = tmp_path / "one"
    code, _ = _run(
        [
            "--reference-adapter",
            fixture_dir,
            "--base",
            fixture_dir / "base",
            "--task",
            "2",
            "--format",
            "peft",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str(fixture_dir / "base")
    assert all(t.startswith("model.layers.") for t in cfg["target_modules"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "8"], "--task 8 is out of range"),
        (["--task", "qnli"], "ids 0..7 or 'all'"),
        (["--task", "0", "--expert-kernel-sizes", "2", "4"], "contradict the saved kernels"),
    ],
)
def test_user_errors_are_one_line(fixture_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = [
        "--reference-adapter",
        fixture_dir,
        "--base",
        fixture_dir / "base",
        "--format",
        "merged",
        "--out",
        out,
        *extra,
    ]
    code, err = _run(argv, capsys)
    assert code == cli.EXIT_USER_ERROR
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_missing_files_are_one_line_errors(fixture_dir, tmp_path, capsys):
    code, err = _run(
        [
            "--reference-adapter",
            tmp_path / "nowhere",
            "--base",
            fixture_dir / "base",
            "--task",
            "0",
            "--format",
            "peft",
            "--out",
            tmp_path / "out",
        ],
        capsys,
    )
    assert code == cli.EXIT_USER_ERROR and "does not exist" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, err = _run(
        [
            "--reference-adapter",
            tmp_path / "empty",
            "--base",
            fixture_dir / "base",
            "--task",
            "0",
            "--format",
            "peft",
            "--out",
            tmp_path / "out",
        ],
        capsys,
    )
    assert code == cli.EXIT_USER_ERROR and "adapter_model.safetensors" in err and err.count("\n") == 1
    # argparse's own errors follow the same one-line convention
    code = None
    with pytest.raises(SystemExit) as e:
        cli.main(["--reference-adapter", str(fixture_dir), "--task", "0", "--format", "peft", "--out", "x"])
    err = capsys.readouterr().err
    assert e.value.code == cli.EXIT_USER_ERROR and "--base" in err and err.count("\n") == 1
