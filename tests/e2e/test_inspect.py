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
    from configs import llama_commonsense

    config = llama_commonsense.get_config()  # the paper's LLaMA setting, from its recorded architecture only
    s = summarize(config)
    assert s["by_kind"]["A"] + s["by_kind"]["B"] + s["by_kind"]["kernels"] == 16_120_320
    assert s["adapted_linears"] == 32 * 6 and s["n_tasks"] == 4
    assert 6.7e9 < s["base"] < 6.8e9
    # planning a mesh: fsdp 4 x tensor 2 over 8 devices holds an eighth of the bfloat16 base on each device
    with config.unlocked():
        config.mesh.update(data=1, fsdp=4, tensor=2)
    mem = summarize(config, devices=8)["memory_per_device"]
    assert mem["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert abs(mem["frozen_weights"] - s["base"] * 2 / 8) < 0.001 * s["base"] * 2 / 8
    assert mem["adapter_gradients_and_adam_moments"] == 3 * mem["adapters"]
    assert mem["total_without_activations"] == mem["frozen_weights"] + 4 * mem["adapters"]


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


def test_ablation_configs_resolve_and_trex_counts_on_t5_base():
    """Every named ablation loads; the competitors' entries select their kinds; T-REX on T5-base counts as its
    closed form: per Linear A (4, d_in), B (d_out, 8), router (32, d_in) and two scalars."""
    from configs import t5_glue_ablation

    kinds = {name: t5_glue_ablation.get_config(name).adapter.kind for name in t5_glue_ablation.ABLATIONS}
    assert kinds["more"] == kinds["more_paper"] == "more" and kinds["trex"] == "trex"
    assert t5_glue_ablation.get_config("more_paper").adapter.variant == "paper"
    assert t5_glue_ablation.get_config("moelora_release").adapter.r == 16

    s = summarize(t5_glue_ablation.get_config("trex"))
    d, f = 768, 3072

    def per_linear(d_in, d_out):
        return {"A": 4 * d_in, "B": d_out * 8, "gate": 32 * d_in, "other": 2}

    shapes = [(d, d)] * 4 + [(d, f), (f, d)] + [(d, d)] * 8 + [(d, f), (f, d)]  # one encoder + one decoder block
    want = {k: 12 * sum(per_linear(*sh)[k] for sh in shapes) for k in ("A", "B", "gate", "other")}
    assert {k: v for k, v in s["by_kind"].items() if v} == want
    assert s["trainable"] == 8_921_472 and s["trainable_per_task"] == 304_128
