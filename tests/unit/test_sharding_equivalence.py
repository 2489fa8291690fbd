"""Sharded = single-device: forward logits and the gradient of the training loss with respect to the adapter
state, for a tiny T5 and a tiny LLaMA with EPT (reference variant) injected, on 8 simulated CPU devices.

Meshes ``(data=4, tensor=2)`` and ``(fsdp=8)``: the states are placed by their logical-axis shardings
(``ept_jax.core.sharding.state_shardings``), the batch by ``batch_sharding``, and the computations are jitted with
those in/out shardings, as ``train/steps.py`` does. The dimensions are chosen so that every mesh axis divides
what it is assigned (d_model 64 over fsdp=8, attention / MLP / vocabulary widths over tensor=2); the test checks
on the placed arrays that kernels are really split, and that the results span all 8 devices.

The 8 devices exist only when ``XLA_FLAGS`` is set before JAX is imported, so the computation runs in a
subprocess (this file run as a script); the parent collects its JSON report and asserts on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-5  # float32; relative to the largest magnitude of each compared array
MESHES = {"data4_tensor2": {"data": 4, "fsdp": 1, "tensor": 2}, "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1}}

T5_ARCH = dict(model_type="t5", vocab_size=128, d_model=64, d_kv=8, d_ff=128, num_layers=1, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="relu",
               tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
LLAMA_ARCH = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
# Linears whose base kernel and adapter the test inspects: (input, output) axes (embed, joined_kv) and
# (mlp, embed), so both the fsdp and the tensor axis have something to split.
WATCHED = {
    "t5": ("encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.1.DenseReluDense.wo"),
    "llama": ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"),
}
# One layer and two adapted Linear kinds per model keep the 12 compilations (2 models x 3 placements x forward
# and gradient) to seconds.
TARGETS = {"t5": ("q", "wo"), "llama": ("q_proj", "down_proj")}
N_TASKS, BATCH, LS, LT = 4, 8, 12, 6
DROPOUT = 0.1


# ------------------------------------------------------------------------------------- the subprocess side


def _batch(family: str, rng) -> dict:
    """A training batch in the format of ``ept_jax.data`` (left padding for LLaMA, right for T5)."""
    import numpy as np

    ids = rng.integers(3, 128, (BATCH, LS)).astype(np.int32)
    lengths = rng.integers(LS // 2, LS + 1, BATCH)
    pos = np.arange(LS)[None]
    mask = (pos < lengths[:, None]) if family == "t5" else (pos >= LS - lengths[:, None])
    out = {"input_ids": np.where(mask, ids, 0).astype(np.int32), "attention_mask": mask.astype(np.int32),
           "task_ids": rng.integers(0, N_TASKS, BATCH).astype(np.int32)}
    if family == "t5":
        out["decoder_input_ids"] = rng.integers(3, 128, (BATCH, LT)).astype(np.int32)
        out["labels"] = rng.integers(3, 128, (BATCH, LT)).astype(np.int32)
        out["label_mask"] = (np.arange(LT)[None] < rng.integers(2, LT + 1, BATCH)[:, None]).astype(np.int32)
    else:
        out["labels"] = np.roll(out["input_ids"], -1, axis=1)
        out["label_mask"] = (mask & (pos >= LS - 4)).astype(np.int32)
    return out


def _model(family: str):
    from flax import nnx

    from ept_jax.adapters.config import AdapterConfig
    from ept_jax.adapters.inject import Injection
    from ept_jax.checkpoints.load import build

    adapter = AdapterConfig(kind="ept", variant="reference", r=4, alpha=16.0, expert_kernel_sizes=(2, 2, 4, 4),
                            n_tasks=N_TASKS, dropout=DROPOUT)
    stacks = ("encoder",) if family == "t5" else ("decoder",)
    inj = Injection(adapter, targets=TARGETS[family], contrastive_stacks=stacks)
    return build(family, T5_ARCH if family == "t5" else LLAMA_ARCH, injection=inj, rngs=nnx.Rngs(0))


def _rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)) if b.size else 0.0


def _key(path) -> str:
    return "/".join(map(str, path))


def _sharding_facts(x) -> dict:
    return {"spec": [None if s is None else (list(s) if isinstance(s, tuple) else s) for s in x.sharding.spec],
            "devices": len(x.sharding.device_set), "shape": list(x.shape),
            "shard_shape": list(x.addressable_shards[0].data.shape)}


def _check_family(family: str) -> dict:
    """Runs one family on one device and on each mesh; returns errors and sharding facts (JSON-able)."""
    import jax
    import numpy as np
    from flax import nnx

    from ept_jax.adapters.base import adapted_linears
    from ept_jax.core import sharding as sharding_lib
    from ept_jax.core.params import TRAINABLE, AdapterContext
    from train import steps

    model = _model(family)
    linears = {lin.name: path for path, lin in adapted_linears(model)}
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    batch = _batch(family, np.random.default_rng(0))
    rng = jax.random.PRNGKey(7)

    def step(trainable, frozen, batch, rng):
        """Deterministic logits (adapters routed, no dropout), and the training loss (dropout and the
        contrastive term on) with its gradient with respect to the adapter state."""
        m = nnx.merge(graphdef, trainable, frozen)
        logits = steps.forward(family, m, batch, AdapterContext(task_ids=batch["task_ids"]))
        (loss, _), grads = jax.value_and_grad(steps.loss_fn, has_aux=True)(
            trainable, frozen, graphdef, batch, rng, family=family, contrastive_lambda=0.1)
        return logits, loss, grads

    one = jax.devices()[0]
    put1 = lambda t: jax.device_put(t, one)
    ref_logits, ref_loss, ref_grads = jax.jit(step)(put1(trainable), put1(frozen), put1(batch), rng)
    assert len(ref_logits.sharding.device_set) == 1
    ref_flat = {_key(k): np.asarray(v[...]) for k, v in nnx.to_flat_state(ref_grads)}
    out: dict = {"ref_loss": float(ref_loss), "leaves": sorted(ref_flat), "meshes": {},
                 "nonzero": sorted(k for k, v in ref_flat.items() if np.abs(v).max() > 0)}
    for name, sizes in MESHES.items():
        mesh = sharding_lib.make_mesh(sizes)
        tr_sh = sharding_lib.state_shardings(trainable, mesh)
        fr_sh = sharding_lib.state_shardings(frozen, mesh)
        b_sh, rep = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
        tr, fr = jax.device_put(trainable, tr_sh), jax.device_put(frozen, fr_sh)
        b = jax.device_put(batch, b_sh)
        logits, loss, grads = jax.jit(step, in_shardings=(tr_sh, fr_sh, b_sh, rep),
                                      out_shardings=(b_sh, rep, tr_sh))(tr, fr, b, rng)
        flat = {_key(k): v[...] for k, v in nnx.to_flat_state(grads)}
        placed = {_key(k): v[...] for k, v in [*nnx.to_flat_state(tr), *nnx.to_flat_state(fr)]}
        watched = {}
        for lin_name in WATCHED[family]:
            p = _key(linears[lin_name])
            watched[lin_name] = {
                "kernel": _sharding_facts(placed[f"{p}/base/kernel"]),
                "A": _sharding_facts(placed[f"{p}/adapter/A"]),
                "grad_A": _sharding_facts(flat[f"{p}/adapter/A"]),
                "grad_B": _sharding_facts(flat[f"{p}/adapter/B"]),
            }
        grad_errs = {k: _rel_err(flat[k], v) for k, v in ref_flat.items()}
        worst = max(grad_errs, key=grad_errs.get)
        out["meshes"][name] = {
            "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "logits_err": _rel_err(logits, ref_logits),
            "loss_err": _rel_err(loss, ref_loss),
            "grad_err": grad_errs[worst],
            "worst_grad": worst,
            "leaves": sorted(flat),
            "nonzero": sorted(k for k, v in flat.items() if float(np.abs(np.asarray(v)).max()) > 0),
            "logits": _sharding_facts(logits),
            "watched": watched,
        }
    return out


def _child_main() -> None:
    import jax

    assert jax.device_count() == 8, jax.devices()
    print("RESULT " + json.dumps({family: _check_family(family) for family in ("t5", "llama")}))


# ------------------------------------------------------------------------------------- the pytest side


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The 8-device report, computed once for the session (every worker reads it: shared_runs.once)."""
    from shared_runs import once  # not at the top: this file also runs as the child script, without tests/ on its path

    return once(tmp_path_factory, "sharding_report", lambda _: _report())


def _report() -> dict:
    from child_env import set_xla_flags  # lazily, as shared_runs

    env = set_xla_flags(dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
                             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])), devices=8)
    out = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("family", ["t5", "llama"])
@pytest.mark.parametrize("mesh", list(MESHES))
def test_logits_and_adapter_gradients_match_one_device(report, family, mesh):
    r = report[family]["meshes"][mesh]
    assert r["mesh"] == MESHES[mesh]
    assert r["logits_err"] <= RTOL, r["logits_err"]
    assert r["loss_err"] <= RTOL, (r["loss_err"], report[family]["ref_loss"])
    assert r["grad_err"] <= RTOL, (r["worst_grad"], r["grad_err"])
    # every adapter leaf was compared, and the gradient is not trivially zero: only the kernels of experts that
    # no task of the batch routes to get none (top-2 of 4), the same leaves on every placement
    leaves, nonzero = report[family]["leaves"], report[family]["nonzero"]
    assert r["leaves"] == leaves and leaves
    assert r["nonzero"] == nonzero and len(nonzero) > len(leaves) // 2
    assert all("/kernels/" in k for k in set(leaves) - set(nonzero)), sorted(set(leaves) - set(nonzero))


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_kernels_and_adapters_are_really_split(report, family):
    """tensor=2 splits the output (attention / MLP width) of in-projections and the input of out-projections;
    fsdp=8 splits d_model; the adapters' A and their gradients follow their base kernel's input axis."""
    into, outof = WATCHED[family]
    tp = report[family]["meshes"]["data4_tensor2"]["watched"]
    assert tp[into]["kernel"]["spec"] == [None, "tensor"]
    assert tp[into]["kernel"]["shard_shape"] == [64, tp[into]["kernel"]["shape"][1] // 2]
    assert tp[outof]["kernel"]["spec"] == ["tensor", None]
    assert tp[outof]["A"]["spec"] == [None, "tensor"] and tp[outof]["grad_A"]["spec"] == [None, "tensor"]
    assert tp[into]["grad_B"]["spec"] == ["tensor", None]
    fs = report[family]["meshes"]["fsdp8"]["watched"]
    assert fs[into]["kernel"]["spec"] == ["fsdp", None] and fs[into]["kernel"]["shard_shape"][0] == 64 // 8
    assert fs[outof]["kernel"]["spec"] == [None, "fsdp"]
    assert fs[into]["A"]["spec"] == [None, "fsdp"] and fs[into]["grad_A"]["spec"] == [None, "fsdp"]
    for mesh in MESHES:
        for lin in (into, outof):
            assert report[family]["meshes"][mesh]["watched"][lin]["kernel"]["devices"] == 8


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_computation_is_distributed(report, family):
    """The outputs live on all 8 devices, each holding its slice of the batch."""
    data_parallel = {"data4_tensor2": 4, "fsdp8": 8}
    for mesh, ways in data_parallel.items():
        logits = report[family]["meshes"][mesh]["logits"]
        assert logits["devices"] == 8
        assert logits["shard_shape"][0] == BATCH // ways and logits["shape"][0] == BATCH


if __name__ == "__main__":
    _child_main()
