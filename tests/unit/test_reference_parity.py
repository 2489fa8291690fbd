"""Parity with the released PyTorch EPT implementation, on the fixtures it produced.

Reads every fixture set in ``$EPT_REFERENCE_FIXTURES`` (default ``../shared/fixtures/reference_ept`` next to the
repository), imports each set's adapter, and matches ``base_logits`` (adapters off), every case's ``logits`` (that
case's task id) and every module's routed experts and mixing weights. A missing fixture directory FAILS: these tests
are how we know ept_jax computes what the release computes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from ept_jax.adapters.base import adapted_linears
from ept_jax.adapters.config import AdapterConfig
from ept_jax.adapters.inject import Injection
from ept_jax.checkpoints.load import from_pretrained
from ept_jax.checkpoints.reference import load_reference_adapter
from ept_jax.core.params import AdapterContext

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("EPT_REFERENCE_FIXTURES", ROOT.parent / "shared" / "fixtures" / "reference_ept"))


def _fixture_dirs() -> list[Path]:
    if not FIXTURES.is_dir():
        return []
    return sorted(p for s in FIXTURES.iterdir() if s.is_dir() for p in s.iterdir() if (p / "expected.json").is_file())


FIXTURE_DIRS = _fixture_dirs()


def test_fixtures_present():
    assert FIXTURES.is_dir(), f"reference fixtures not found at {FIXTURES} (set EPT_REFERENCE_FIXTURES)"
    assert FIXTURE_DIRS, f"no fixture sets (*/t5, */llama with expected.json) under {FIXTURES}"


def _load(d: Path):
    expected = json.loads((d / "expected.json").read_text())
    cfg = AdapterConfig(
        kind="ept",
        variant="reference",
        r=expected["r"],
        alpha=float(expected["lora_alpha"]),
        expert_kernel_sizes=tuple(expected["expert_kernel_sizes"]),
        top_k=expected["top_k"],
        n_tasks=max(c["task_id"] for c in expected["cases"]) + 1,
        dropout=0.0,
    )
    injection = Injection(adapter=cfg, targets=tuple(expected["target_modules"]))
    model = from_pretrained(d / "base", injection=injection)
    load_reference_adapter(model, str(d))
    return expected, model


def _forward(model, expected, ctx):
    ids = jnp.asarray(expected["input_ids"], jnp.int32)
    mask = jnp.ones_like(ids)
    if expected["kind"] == "t5":
        dec = jnp.asarray(expected["decoder_input_ids"], jnp.int32)
        return model(ids, mask, dec, jnp.ones_like(dec), ctx=ctx)
    return model(ids, mask, ctx=ctx)


def _torch_base_logits(d: Path, expected: dict) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    ids = torch.tensor(expected["input_ids"])
    with torch.no_grad():
        if expected["kind"] == "t5":
            m = AutoModelForSeq2SeqLM.from_pretrained(d / "base", dtype=torch.float32).eval()
            return m(input_ids=ids, decoder_input_ids=torch.tensor(expected["decoder_input_ids"])).logits.numpy()
        m = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32).eval()
        return m(input_ids=ids).logits.numpy()


@pytest.mark.parametrize("d", FIXTURE_DIRS, ids=lambda p: f"{p.parent.name}-{p.name}")
def test_reference_logits_and_routes(d):
    expected, model = _load(d)
    ids = np.asarray(expected["input_ids"])
    base = np.asarray(_forward(model, expected, None))
    fixture_base = np.asarray(expected["base_logits"])
    same_as_case = [c["task_id"] for c in expected["cases"] if np.array_equal(np.asarray(c["logits"]), fixture_base)]
    if same_as_case:
        # The release's "adapters off" pass left EPT's branch on (set1/llama: base_logits are bit-identical to the
        # logits of task 3, the last task it set). Those numbers are not a base model's, so check the base against
        # transformers itself instead, and keep asserting the quirk so a corrected fixture set takes the strict path.
        np.testing.assert_allclose(base, _torch_base_logits(d, expected), atol=1e-4, rtol=0)
    else:
        np.testing.assert_allclose(base, fixture_base, atol=1e-4, rtol=0)
    modules = dict((m.name, m) for _, m in adapted_linears(model))
    for case in expected["cases"]:
        t = case["task_id"]
        ctx = AdapterContext(task_ids=jnp.full((ids.shape[0],), t, jnp.int32))
        logits = _forward(model, expected, ctx)
        np.testing.assert_allclose(
            np.asarray(logits), np.asarray(case["logits"]), atol=1e-4, rtol=0, err_msg=f"{d} task {t}"
        )
        # the adapter must matter in this fixture, or the comparison above proves nothing
        assert np.abs(np.asarray(case["logits"]) - base).max() > 1e-3
        assert set(case["routes"]) == set(modules), "adapted modules differ from the release's"
        for name, route in case["routes"].items():
            weights, idx = modules[name].adapter.routing()
            got_experts = [int(e) for e in np.asarray(idx[t])]
            assert got_experts == route["experts"], f"{name} task {t}: experts {got_experts} != {route['experts']}"
            got_w = np.asarray(weights[t])[got_experts]
            np.testing.assert_allclose(got_w, route["weights"], atol=1e-5, err_msg=f"{name} task {t}")
