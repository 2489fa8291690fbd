"""Training parity with the released PyTorch EPT: twelve optimizer steps of the release's own trainer.

For every ``set*/{t5,llama}`` under ``EPT_REFERENCE_TRAINING_FIXTURES`` (default: ``shared/fixtures/
reference_training``; its README documents every file and the release's training step), the ept_jax model is
built from ``base/``, the adapter imported from ``adapter_init.safetensors`` through the release-import path
(``ept_jax.checkpoints.reference.model_from_reference``), the optimizer, schedule, clipping and losses configured
from ``expected.json`` through the training config (``configs.common.base_config``), and the project's own
jitted training step (``train.steps.make_train_step``, as ``train.main`` builds it) runs the 12 recorded
batches. Every setting is read from the fixture files: nothing of the shared set is written here.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

_REPO = pathlib.Path(__file__).resolve().parents[2]
_ENV = os.environ.get("EPT_REFERENCE_TRAINING_FIXTURES", "")
_CANDIDATES = [_ENV] if _ENV else [_REPO / "shared" / "fixtures" / "reference_training",
                                   _REPO.parent / "shared" / "fixtures" / "reference_training"]
FIXTURES = next((pathlib.Path(c) for c in _CANDIDATES if c and pathlib.Path(c).is_dir()), None)
pytestmark = pytest.mark.skipif(FIXTURES is None, reason=f"reference training fixtures not found in {_CANDIDATES}")
CASES = sorted(str(p.parent.relative_to(FIXTURES)) for p in FIXTURES.glob("set*/*/expected.json")) if FIXTURES else []

# The tolerances for the float64 run; the float32 run: 10 x the float32-vs-float64 differences the
# fixture records for the release's own code.
F64_REL, F64_ABS = 1e-9, 1e-9
F32_FACTOR = 10.0
KINDS = {  # the release's tensor-name kinds of expected.json's *_by_kind fields
    "lora_A": ".lora_A.", "lora_B": ".lora_B.", "lora_gate.weight": ".lora_gate.0.weight",
    "lora_gate.bias": ".lora_gate.0.bias", "lora_task_embedding": ".lora_task_embedding.",
    "lora_expert_kernels": ".lora_expert_kernels.",
}


def _expected(case: str) -> dict:
    return json.loads((FIXTURES / case / "expected.json").read_text())


def _config(e: dict):
    """The training config of the fixture's run: base_config() with every setting of ``expected.json``."""
    from configs.common import base_config

    opt, sched, con = e["optimizer"], e["schedule"], e["contrastive"]
    unsupported = []
    if opt["name"] != "torch.optim.AdamW":
        unsupported.append(f"optimizer {opt['name']!r}")
    if sched["type"] != "linear":
        unsupported.append(f"schedule {sched['type']!r}")
    if int(e.get("gradient_accumulation_steps", 1)) != 1:
        unsupported.append(f"gradient_accumulation_steps={e['gradient_accumulation_steps']}")
    if float(e["lora_dropout"]) or float(e["model_dropout"]):
        unsupported.append("dropout (PyTorch's masks cannot be reproduced)")
    assert not unsupported, f"the fixture uses settings this test does not model: {unsupported}"
    c = base_config()
    c.model.family = e["kind"]
    c.adapter.contrastive_lambda = float(con["weight"])
    c.adapter.contrastive_divisor = float(con["divisor"]) if "divisor" in con else None
    c.adapter.contrastive_tau = float(con.get("temperature", 0.05))
    c.adapter.contrastive_stacks = tuple(con.get("stacks", ()))
    c.train.learning_rate = float(opt["lr"])
    c.train.adam_b1, c.train.adam_b2 = (float(b) for b in opt["betas"])
    c.train.adam_eps = float(opt["eps"])
    c.train.weight_decay = float(opt["weight_decay"])
    c.train.grad_clip = float(e.get("max_grad_norm") or 0.0)  # None or 0: the release does not clip
    c.train.warmup_steps = int(sched["warmup_steps"])
    c.train.steps = int(sched["total_steps"])
    c.train.unrouted_experts = "skip"  # the release's (and the reference configs') default
    c.train.seed = int(e["seeds"]["training_seed"])
    return c


def _run(case: str, dtype: str, tmp_path, *, grads: bool = True) -> dict:
    """Runs the fixture's steps with the project's training step; returns everything the checks compare."""
    from ept_jax.adapters.base import adapted_linears
    from ept_jax.checkpoints.reference import model_from_reference, reference_state_dict
    from ept_jax.core import sharding
    from ept_jax.data.batching import from_hf_batch
    from ept_jax.models import layer_scan
    from train import state as state_lib
    from train import steps
    from train.optim import find_adamw_state

    d = FIXTURES / case
    e = _expected(case)
    config = _config(e)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_model.safetensors").symlink_to(d / "adapter_init.safetensors")
    (adapter_dir / "adapter_config.json").symlink_to(d / "adapter_config.json")
    model, n_rows = model_from_reference(
        adapter_dir, d / "base", top_k=int(e["top_k"]), dtype=dtype,
        contrastive_stacks=tuple(config.adapter.contrastive_stacks) if config.adapter.contrastive_lambda else (),
        contrastive_tau=config.adapter.contrastive_tau)
    assert n_rows == int(e["n_task_embeddings"])
    names = [lin.name for _, lin in adapted_linears(model)]
    assert sorted(names) == sorted(e["adapted_modules"])
    assert all(tuple(lin.adapter.pyramid.kernel_sizes) == tuple(e["expert_kernel_sizes"])
               for _, lin in adapted_linears(model))
    layer_scan.set_scan_layers(model, bool(config.model.scan_layers))  # as train.state.build_model
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    tx, schedule = state_lib.make_optimizer(config)
    state = state_lib.create_train_state(model, tx, mesh)
    step = steps.make_train_step(state, tx, schedule, mesh, **state_lib.step_options(config))
    raw = load_file(d / "batches.safetensors")
    n_steps = int(e["n_steps"])
    batches = [from_hf_batch({k: v[s] for k, v in raw.items()}, family=e["kind"]) for s in range(n_steps)]

    out = {"metrics": [], "routes": [], "names": names}
    if grads:  # the step's own loss function, differentiated before step 1
        out["grads1"] = reference_state_dict(state.model(), step.gradients(state, batches[0], np.int32(0))[2])
    flat = step.flatten(state)
    for s in range(n_steps):
        step.sync(flat, state)
        task = int(batches[s]["task_ids"][0])
        out["routes"].append({lin.name: tuple(np.asarray(a) for a in lin.adapter.route(task))
                              for _, lin in adapted_linears(state.model())})
        m = step.advance(flat, batches[s], np.int32(s))
        out["metrics"].append({k: float(v) for k, v in jax.device_get(m).items()})
    step.sync(flat, state)
    out["final"] = reference_state_dict(state.model())
    counts = find_adamw_state(state.opt_state).counts
    counts_model = nnx.merge(state.graphdef, counts, state.frozen)
    out["counts"] = {lin.name: [int(k.get_value()) for k in lin.adapter.kernels]
                     for _, lin in adapted_linears(counts_model)}
    # weight decay: exactly the tensors the release decays (all but those in its no_weight_decay list)
    decayed = state_lib.decay_mask(state.trainable)
    dm = nnx.merge(state.graphdef, decayed, state.frozen)
    exempt = sorted(k for k, v in _named_flags(dm).items() if not v)
    out["exempt"] = exempt
    return out


def _named_flags(model) -> dict[str, bool]:
    """``{release key: flag}`` of a model whose adapter Variables hold one Python/array boolean each."""
    from ept_jax.adapters.base import adapted_linears
    from ept_jax.checkpoints.reference import PREFIX

    out = {}
    for _, lin in adapted_linears(model):
        a = lin.adapter
        for entry, key in (("A", "lora_A.weight"), ("B", "lora_B.weight"), ("gate_w", "lora_gate.0.weight"),
                           ("gate_b", "lora_gate.0.bias"), ("task_embedding", "lora_task_embedding.weight")):
            out[f"{PREFIX}{lin.name}.{key}"] = bool(getattr(a, entry).get_value())
        for i, k in enumerate(a.kernels):
            out[f"{PREFIX}{lin.name}.lora_expert_kernels.{i}"] = bool(k.get_value())
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else abs(a - b)


def _release_name(name: str) -> str:
    """A ``no_weight_decay`` entry without PEFT's adapter-name component (``lora_gate.default.0.bias``)."""
    return name.replace(".default.", ".")


@pytest.mark.parametrize("case", CASES)
def test_float64_trajectory_equals_the_release(case, x64, tmp_path):
    e = _expected(case)
    got = _run(case, "float64", tmp_path)
    has_contrastive = float(e["contrastive"]["weight"]) > 0
    for s, (want, m, routes) in enumerate(zip(e["steps"], got["metrics"], got["routes"], strict=True)):
        assert m["finite"] == 1, f"step {s + 1}: non-finite"
        for k in ("lr", "loss", "ce", "contrastive", "grad_norm"):
            assert _rel(m[k], float(want[k])) <= F64_REL, f"step {s + 1} {k}: {m[k]!r} vs the release's {want[k]!r}"
        if not has_contrastive:
            assert m["contrastive"] == 0.0
        assert set(routes) == set(want["routes"]), f"step {s + 1}: routed modules differ"
        for name, (experts, weights) in routes.items():
            w = want["routes"][name]
            assert list(map(int, experts)) == list(w["experts"]), f"step {s + 1} {name}: experts"
            np.testing.assert_allclose(weights, w["weights"], rtol=0, atol=1e-12, err_msg=f"step {s + 1} {name}")
        # the release's unselected kernels are those no route of the step chose
        unselected = sum(len(e["expert_kernel_sizes"]) - len(set(map(int, r[0]))) for r in routes.values())
        assert unselected == int(want["n_params_without_grad"]), f"step {s + 1}: kernels without a gradient"

    grads1 = load_file(FIXTURES / case / "grads_step1.safetensors")
    for key, g in got["grads1"].items():
        if key in grads1:
            np.testing.assert_allclose(g, grads1[key], rtol=0, atol=F64_ABS, err_msg=f"step-1 gradient {key}")
        else:  # a kernel the release left without a gradient: no route chose it, so ours is exactly zero
            assert ".lora_expert_kernels." in key, f"{key}: missing from grads_step1"
            assert not np.any(g), f"{key}: no gradient in the release, nonzero here"
    assert set(grads1) <= set(got["grads1"])

    final = load_file(FIXTURES / case / "adapter_final.safetensors")
    assert set(final) == set(got["final"])
    for key, want in final.items():
        np.testing.assert_allclose(got["final"][key], want, rtol=0, atol=F64_ABS, err_msg=f"final {key}")
    for kind, marker in KINDS.items():  # the manifest's own summary, as a cross-check of the key mapping
        norm = math.sqrt(sum(float(np.sum(np.square(v))) for k, v in got["final"].items() if marker in k))
        assert _rel(norm, float(e["final_param_norm_by_kind"][kind])) <= F64_REL, kind

    counts = e["optimizer"]["adam_step_counts_final"]
    assert got["counts"] == {name: list(c) for name, c in counts.items()}
    assert got["exempt"] == sorted(_release_name(n) for n in e["optimizer"]["no_weight_decay"])


@pytest.mark.parametrize("case", CASES)
def test_float32_run_is_within_the_release_float32_error(case, x64, tmp_path):
    """The float32 step against the float64 trajectory: within 10 x what the release's own float32 code differs."""
    e = _expected(case)
    diff = e["float32_vs_float64"]
    got = _run(case, "float32", tmp_path, grads=False)
    for s, (want, m, routes) in enumerate(zip(e["steps"], got["metrics"], got["routes"], strict=True)):
        for k in ("loss", "ce", "contrastive", "grad_norm"):
            tol = F32_FACTOR * float(diff[k])
            assert _rel(m[k], float(want[k])) <= tol, \
                f"step {s + 1} {k}: {m[k]!r} vs {want[k]!r} (rel. {_rel(m[k], float(want[k])):.2e} > {tol:.2e})"
        assert _rel(m["lr"], float(want["lr"])) <= 1e-6
        if diff.get("routes_equal"):
            for name, (experts, _) in routes.items():
                assert list(map(int, experts)) == list(want["routes"][name]["experts"]), f"step {s + 1} {name}"
    final = load_file(FIXTURES / case / "adapter_final.safetensors")
    tol = F32_FACTOR * float(diff["final_params_max_abs"])
    worst = max(float(np.max(np.abs(got["final"][k].astype(np.float64) - v))) for k, v in final.items())
    assert worst <= tol, f"final adapter: max abs difference {worst:.2e} > {tol:.2e}"
