"""Bad input to ``python -m train.main`` (run in this process: :func:`in_process.train_main`): a bad config override,
dataset or model directory exits 2 with exactly one line on stderr naming the bad value, no traceback, and leaves
nothing behind (no workdir). Refusals that need an existing run (another config in its workdir, a checkpoint of
another adapter) are in ``tests/e2e/test_reliability.py``."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from in_process import assert_one_line_refusal, smoke_args, train_main

BAD_OVERRIDES = {
    "unknown_key": (["--config.train.stepz=3"], ["unknown config key 'train.stepz'", "checkpoint_every"]),
    "reference_kernel_1": (["--config.adapter.expert_kernel_sizes=(1,2)"],
                           ["expert_kernel_sizes=(1, 2)", "must be >= 2"]),
    "paper_kernel_3": (["--config.adapter.variant=paper", "--config.adapter.expert_kernel_sizes=(2,3)"],
                       ["expert_kernel_sizes=(2, 3)", "[3] do not divide d_in=64 and d_out=64"]),
    "top_k": (["--config.adapter.top_k=5"], ["top_k=5", "accepted 1..4"]),
    "task_rows": (["--config.adapter.n_task_rows=3"], ["n_tasks=4 > n_task_rows=3"]),
    "unknown_task": (["--config.data.tasks=('syn_copy','syn_nope')"], ["unknown task 'syn_nope'", "syn_reverse"]),
    "tokenizer_vocab": (["--config.model.arch.vocab_size=300"],
                        ["has 384 tokens but the model's vocabulary holds 300"]),
    "tokenizer_eos": (["--config.model.arch.eos_token_id=2"], ["eos_token_id=1", "eos_token_id=2"]),
}


@pytest.mark.parametrize("case", list(BAD_OVERRIDES))
def test_bad_config_is_one_line_and_leaves_nothing(case, tmp_path):
    args, needles = BAD_OVERRIDES[case]
    workdir = tmp_path / "run"
    out = train_main(*smoke_args(workdir, args))
    assert_one_line_refusal(out, *needles)
    assert not workdir.exists(), sorted(p.name for p in workdir.rglob("*"))


def _glue_dir(root: Path, *, drop: str | None = None, validation_rows: int = 6) -> Path:
    """A tiny saved ``rte`` DatasetDict (``root/rte``), optionally without a column or with fewer rows."""
    import datasets

    def split(n):
        cols = {"sentence1": [f"a{i}." for i in range(n)], "sentence2": [f"b{i}." for i in range(n)],
                "label": [i % 2 for i in range(n)], "idx": list(range(n))}
        if drop:
            cols.pop(drop)
        return datasets.Dataset.from_dict(cols)

    datasets.DatasetDict({"train": split(16), "validation": split(validation_rows)}).save_to_disk(str(root / "rte"))
    return root


@pytest.mark.parametrize(
    "kind, needles",
    [
        ("missing_column", ["task 'rte'", "missing column(s) ['sentence2']", "required:"]),
        ("empty_split", ["'validation'", "is empty (0 rows)"]),
    ],
    ids=["missing_column", "empty_split"],
)
def test_bad_dataset_is_one_line(kind, needles, tmp_path):
    data = _glue_dir(tmp_path / "glue", drop="sentence2" if kind == "missing_column" else None,
                     validation_rows=0 if kind == "empty_split" else 6)
    glue = ["--config.data.source=glue", "--config.data.tasks=('rte',)", f"--config.data.path={data}"]
    workdir = tmp_path / "run"
    out = train_main(*smoke_args(workdir, glue))
    assert_one_line_refusal(out, *needles)
    assert not workdir.exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The smoke T5 as a Hugging Face directory (config.json + model.safetensors), loadable as it is."""
    from safetensors.numpy import save_file

    from configs.smoke import SMOKE_ARCH
    from ept_jax.checkpoints.hf import export_from
    from ept_jax.checkpoints.load import from_pretrained
    from ept_jax.checkpoints.t5_map import hf_rules
    from ept_jax.models.t5 import T5Config, T5Model

    root = tmp_path_factory.mktemp("model") / "t5"
    root.mkdir()
    cfg = T5Config.from_hf(dict(SMOKE_ARCH))
    from flax import nnx

    save_file(export_from(T5Model(cfg, rngs=nnx.Rngs(0)), hf_rules(cfg)), str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(SMOKE_ARCH))
    from_pretrained(root)  # the intact directory loads: the defects below are the only ones
    return root


@pytest.mark.parametrize("defect", ["no_weights", "wrong_shape"])
def test_bad_model_directory_is_one_line(defect, model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    if defect == "no_weights":
        (bad / "model.safetensors").unlink()
        needles = [f"model directory {str(bad)!r} has no weights", "model.safetensors"]
    else:
        tensors = load_file(str(bad / "model.safetensors"))
        key = "encoder.block.0.layer.0.SelfAttention.q.weight"
        tensors[key] = np.zeros((32, 64), np.float32)
        save_file(tensors, str(bad / "model.safetensors"))
        needles = ["does not match the model", f"{key}: checkpoint (64, 32) (after conversion), model (64, 64)"]
    workdir = tmp_path / "run"
    out = train_main(*smoke_args(workdir, ["--config.model.random_init=False", f"--config.model.name_or_path={bad}"]))
    assert_one_line_refusal(out, *needles)
    assert not workdir.exists()


def test_in_process_command_parses_each_call_afresh_and_restores_the_process(tmp_path):
    """:func:`train.main.cli` (what these tests run): each call reads its own overrides (the flags the previous call's
    ``--config`` defined are gone), and the process's argv and logging levels are as before."""
    import logging
    import sys

    from absl import flags

    argv, level = list(sys.argv), logging.getLogger().level
    first = train_main(*smoke_args(tmp_path / "a", ["--config.adapter.top_k=5"]))
    second = train_main(*smoke_args(tmp_path / "b", ["--config.adapter.n_task_rows=3"]))
    assert "top_k=5" in first.stderr and "n_task_rows=3" in second.stderr, (first.stderr, second.stderr)
    assert sys.argv == argv and logging.getLogger().level == level
    assert not [name for name in flags.FLAGS if name.startswith("config.")]
