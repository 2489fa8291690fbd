"""`train.inspect`: parameter accounting from abstract shapes, checked against the paper's and the release's counts."""

import json
import subprocess
import sys

import ml_collections

from configs import archs
from train.inspect import summarize

GLUE = ["mnli", "qqp", "qnli", "sst2", "stsb", "mrpc", "rte", "cola"]


def _config(family, arch, targets, tasks, kind="ept"):
    c = ml_collections.ConfigDict()
    c.model = dict(family=family, name_or_path="not-a-local-dir", arch=arch, dtype="float32", param_dtype="float32")
    c.adapter = dict(kind=kind, variant="reference", r=8, alpha=32.0, expert_kernel_sizes=(2, 2, 4, 4, 6, 6, 8, 8),
                     top_k=2, dropout=0.1, targets=targets, contrastive_lambda=0.1)
    c.data = dict(tasks=tasks)
    c.train = dict(seed=0)
    return c


def test_t5_base_reference_counts():
    s = summarize(_config("t5", archs.T5_BASE, ("q", "k", "v", "o", "wi", "wo"), GLUE))
    assert s["by_kind"] == {"A": 811_008, "B": 811_008, "kernels": 1_622_016, "gate": 1_623_552,
                            "task_embedding": 1_622_016, "other": 0}
    assert s["trainable"] == 6_489_600
    assert s["trainable_per_task"] == 405_504  # the paper's 0.41M params/task
    assert s["adapted_linears"] == 12 * 6 + 12 * 10
    assert 220e6 < s["base"] < 225e6  # T5-base, tied embeddings


def test_llama2_7b_counts():
    s = summarize(_config("llama", archs.LLAMA2_7B, ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
                          ["boolq", "openbookqa", "arc_easy", "arc_challenge"]))
    assert s["by_kind"]["A"] + s["by_kind"]["B"] + s["by_kind"]["kernels"] == 16_120_320
    assert 6.7e9 < s["base"] < 6.8e9


def test_lora_counts_have_no_routing():
    s = summarize(_config("t5", archs.T5_BASE, ("q", "v"), GLUE, kind="lora"))
    n = 12 * 2 + 12 * 4  # q and v in encoder self-attn, decoder self- and cross-attn
    assert s["by_kind"]["A"] == n * 8 * 768 and s["by_kind"]["B"] == n * 768 * 8
    assert s["by_kind"]["gate"] == 0 and s["by_kind"]["kernels"] == 0


def test_cli_json_and_bad_target(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text(
        "import ml_collections\nfrom configs import archs\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.model = dict(family='t5', name_or_path='nowhere', arch=archs.T5_BASE, dtype='float32',"
        " param_dtype='float32')\n"
        "    c.adapter = dict(kind='ept', variant='reference', r=8, alpha=32.0, targets=('q', 'v'))\n"
        "    c.data = dict(tasks=['rte', 'mrpc'])\n"
        "    c.train = dict(seed=0)\n"
        "    return c\n"
    )
    out = subprocess.run([sys.executable, "-m", "train.inspect", f"--config={cfg}", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert s["trainable"] > 0 and "trainable_per_task" in s and "by_kind" in s
    bad = subprocess.run([sys.executable, "-m", "train.inspect", f"--config={cfg}", "--config.adapter.targets=('qq',)"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "qq" in bad.stderr and "Traceback" not in bad.stderr
