"""Importing adapters saved by the released PyTorch EPT, checked against its recorded routing (shared fixtures)."""

from __future__ import annotations

import json
import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ept_jax.adapters import pyramid
from ept_jax.adapters.base import AdaptedLinear
from ept_jax.adapters.config import AdapterConfig
from ept_jax.adapters.registry import make_adapter
from ept_jax.checkpoints.reference import load_reference_adapter, read_reference_adapter
from ept_jax.core.linear import Linear
from ept_jax.core.params import AdapterContext, AdapterParam

_REPO = pathlib.Path(__file__).resolve().parents[2]
_CANDIDATES = [
    os.environ.get("EPT_REFERENCE_FIXTURES", ""),
    _REPO / "shared" / "fixtures" / "reference_ept",
    _REPO.parent / "shared" / "fixtures" / "reference_ept",
]
FIXTURES = next((pathlib.Path(c) for c in _CANDIDATES if c and pathlib.Path(c).is_dir()), None)
pytestmark = pytest.mark.skipif(FIXTURES is None, reason=f"reference EPT fixtures not found in {_CANDIDATES}")
KINDS = ("t5", "llama")


def _fixture(kind: str) -> pathlib.Path:
    return FIXTURES / "set1" / kind


def _expected(kind: str) -> dict:
    with open(_fixture(kind) / "expected.json") as f:
        return json.load(f)


def _dims(kind: str, path: str) -> tuple[int, int]:
    """``(d_in, d_out)`` of a targeted Linear, from the fixture's base model config."""
    with open(_fixture(kind) / "base" / "config.json") as f:
        c = json.load(f)
    short = path.rsplit(".", 1)[1]
    if kind == "t5":
        inner = c["num_heads"] * c["d_kv"]
        table = {
            "q": (c["d_model"], inner),
            "k": (c["d_model"], inner),
            "v": (c["d_model"], inner),
            "o": (inner, c["d_model"]),
            "wi": (c["d_model"], c["d_ff"]),
            "wo": (c["d_ff"], c["d_model"]),
        }
    else:
        hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        h, kv, ff = c["hidden_size"], c["num_key_value_heads"] * hd, c["intermediate_size"]
        table = {
            "q_proj": (h, c["num_attention_heads"] * hd),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (c["num_attention_heads"] * hd, h),
            "up_proj": (h, ff),
            "down_proj": (ff, h),
        }
    return table[short]


class _Tree(nnx.Module):
    """A bag of AdaptedLinears named like a Hugging Face model's modules (what load_reference_adapter walks)."""

    def __init__(self, linears: list[AdaptedLinear]):
        self.linears = nnx.List(linears)

    def by_name(self, path: str) -> AdaptedLinear:
        return next(lin for lin in self.linears if lin.name == path)


def _abstract_tree(specs, cfg: AdapterConfig) -> _Tree:
    """An abstract tree (``nnx.eval_shape``): loading fills in the adapters, the base Linears stay shapes.

    One abstract (base, adapter) pair is traced per distinct shape and cloned, which keeps building a model
    of 32 adapted Linears cheap.
    """
    protos = {}
    lins = []
    for i, (path, d_in, d_out) in enumerate(specs):
        if (d_in, d_out) not in protos:
            protos[(d_in, d_out)] = nnx.eval_shape(
                lambda d_in=d_in, d_out=d_out: (
                    Linear(d_in, d_out, axes=(None, None), rngs=nnx.Rngs(0)),
                    make_adapter(cfg, d_in, d_out, rngs=nnx.Rngs(1)),
                )
            )
        base, adapter = (nnx.clone(m) for m in protos[(d_in, d_out)])
        lins.append(AdaptedLinear(base, adapter, name=path, stack=path.split(".")[0], contrastive=False, index=i))
    return _Tree(lins)


def _is_abstract(var) -> bool:
    return isinstance(var.get_value(), jax.ShapeDtypeStruct)


def _cfg(exp: dict, **kw) -> AdapterConfig:
    base = dict(
        r=exp["r"],
        alpha=float(exp["lora_alpha"]),
        expert_kernel_sizes=tuple(exp["expert_kernel_sizes"]),
        top_k=exp["top_k"],
        dropout=0.0,
    )
    base.update(kw)
    return AdapterConfig(**base)


def _specs(kind: str, paths):
    return [(p, *_dims(kind, p)) for p in paths]


@pytest.fixture(scope="module", params=KINDS)
def loaded(request):
    """``(kind, expected, tree)``: every module of the fixture, imported into a fresh tree."""
    kind = request.param
    exp = _expected(kind)
    tree = _abstract_tree(_specs(kind, exp["cases"][0]["routes"]), _cfg(exp))
    names = load_reference_adapter(tree, str(_fixture(kind)))
    assert sorted(names) == sorted(exp["cases"][0]["routes"])
    adapter_vars = jax.tree.leaves(nnx.state(tree), is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert not any(_is_abstract(v) for v in adapter_vars if isinstance(v, AdapterParam))  # every tensor loaded
    return kind, exp, tree


def test_read_reference_adapter_layout():
    for kind, n_modules in (("t5", 32), ("llama", 12)):
        meta, modules = read_reference_adapter(str(_fixture(kind)))
        assert meta["r"] == 4 and meta["lora_alpha"] == 16
        assert meta["expert_kernel_sizes"] == (2, 2, 4, 4, 6, 6, 8, 8)
        assert meta["unrecognized_keys"] == []
        assert len(modules) == n_modules
        for path, t in modules.items():
            d_in, d_out = _dims(kind, path)
            chex.assert_shape(
                (t["A"], t["B"], t["gate_w"], t["gate_b"], t["task_embedding"]),
                [(4, d_in // 2), (d_out // 2, 4), (8, d_in), (8,), (8, d_in)],
            )
            chex.assert_shape(t["kernels"], [(d_out // k, k) for k in (2, 2, 4, 4, 6, 6, 8, 8)])


def test_imported_tensors_equal_the_file(loaded):
    kind, _, tree = loaded
    from safetensors.numpy import load_file

    state = load_file(str(_fixture(kind) / "adapter_model.safetensors"))
    for lin in tree.linears:
        prefix = f"base_model.model.{lin.name}"
        a = lin.adapter
        np.testing.assert_array_equal(a.A[...], state[f"{prefix}.lora_A.weight"])
        np.testing.assert_array_equal(a.B[...], state[f"{prefix}.lora_B.weight"])
        np.testing.assert_array_equal(a.gate_w[...], state[f"{prefix}.lora_gate.0.weight"])
        np.testing.assert_array_equal(a.gate_b[...], state[f"{prefix}.lora_gate.0.bias"])
        np.testing.assert_array_equal(a.task_embedding[...], state[f"{prefix}.lora_task_embedding.weight"])
        for e, kern in enumerate(a.kernels):
            np.testing.assert_array_equal(kern[...], state[f"{prefix}.lora_expert_kernels.{e}"][0, :, :, 0])


def test_routing_reproduces_the_release(loaded):
    kind, exp, tree = loaded
    for path in exp["cases"][0]["routes"]:
        a = tree.by_name(path).adapter
        w, idx = pyramid.route(a.gate_w[...], a.gate_b[...], a.task_embedding[...], exp["top_k"])
        w, idx = np.asarray(w), np.asarray(idx)
        for case in exp["cases"]:
            t, want = case["task_id"], case["routes"][path]
            assert idx[t].tolist() == want["experts"], (kind, t, path)
            np.testing.assert_allclose(w[t, want["experts"]], want["weights"], atol=1e-5)
            assert np.abs(w[t]).sum() == pytest.approx(1.0, abs=1e-5)  # nothing off the top-k


def _torch_release_forward(torch, x, t, sd, prefix, d_out, r, alpha, top_k):
    """The release's adapter branch written with torch ops (ConvTranspose2d with groups), as an independent check."""
    F = torch.nn.functional
    g = lambda n: torch.tensor(sd[f"{prefix}.{n}"])  # noqa: E731
    probs = torch.softmax(g("lora_task_embedding.weight")[t] @ g("lora_gate.0.weight").T + g("lora_gate.0.bias"), -1)
    v, idx = torch.topk(probs, top_k)
    w = torch.softmax(v, -1)
    x = torch.tensor(x).reshape(-1, x.shape[-1])
    a, b = g("lora_A.weight"), g("lora_B.weight")
    out = torch.zeros(x.shape[0], d_out)
    for j, e in enumerate(idx.tolist()):
        kern = g(f"lora_expert_kernels.{e}")  # (1, h, k, 1)
        h, k = kern.shape[1], kern.shape[2]
        m = x.shape[1] // k
        z = x[:, :m] @ a[:, :m].T @ b[:h].T  # (N, h)
        y = F.conv_transpose2d(z.view(-1, h, 1, 1), kern.view(h, 1, k, 1), stride=(k, 1), groups=h)  # (N, h, k, 1)
        out[:, : h * k] += w[j] * y.reshape(-1, h * k)
    return (alpha / r) * out


@pytest.mark.parametrize(
    "kind,path",
    [
        ("t5", "encoder.block.0.layer.0.SelfAttention.q"),  # 64 -> 64: 6 pads both dims
        ("llama", "model.layers.0.self_attn.k_proj"),  # 64 -> 32
        ("llama", "model.layers.1.mlp.down_proj"),  # 128 -> 64
    ],
)
def test_adapter_output_matches_a_torch_rendering_of_the_release(kind, path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    exp = _expected(kind)
    tree = _abstract_tree(_specs(kind, [path]), _cfg(exp))
    load_reference_adapter(tree, str(_fixture(kind)), strict=False)
    a = tree.linears[0].adapter
    d_in, d_out = _dims(kind, path)
    sd = load_file(str(_fixture(kind) / "adapter_model.safetensors"))
    x = np.random.default_rng(0).standard_normal((2, 5, d_in)).astype(np.float32)
    for t in (0, 3):
        y = a(jnp.asarray(x), AdapterContext(task_ids=jnp.array([t, t])))
        want = _torch_release_forward(
            torch, x, t, sd, f"base_model.model.{path}", d_out, exp["r"], exp["lora_alpha"], exp["top_k"]
        )
        np.testing.assert_allclose(np.asarray(y).reshape(-1, d_out), want.numpy(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- failures

T5_Q = "encoder.block.0.layer.0.SelfAttention.q"
T5_WO = "encoder.block.0.layer.1.DenseReluDense.wo"


def test_shape_mismatch_names_the_tensor_and_assigns_nothing():
    exp = _expected("t5")
    specs = _specs("t5", [T5_Q, T5_WO])
    specs[1] = (T5_WO, 128, 48)  # the file's wo writes 64 outputs
    tree = _abstract_tree(specs, _cfg(exp))
    for strict in (True, False):
        with pytest.raises(ValueError, match=rf"base_model\.model\.{T5_WO}\.lora_B\.weight: shape \(32, 4\)"):
            load_reference_adapter(tree, str(_fixture("t5")), strict=strict)
    assert _is_abstract(tree.linears[0].adapter.A)  # nothing was assigned, not even the well-shaped module


def test_missing_and_unexpected_modules():
    exp = _expected("t5")
    extra = "encoder.block.7.layer.0.SelfAttention.q"
    tree = _abstract_tree(_specs("t5", [T5_Q]) + [(extra, 64, 64)], _cfg(exp))
    with pytest.raises(ValueError) as err:
        load_reference_adapter(tree, str(_fixture("t5")))
    msg = str(err.value)
    assert f"{extra}: no tensors for this module" in msg  # missing from the file
    assert "unexpected modules in the file" in msg and T5_WO in msg  # in the file, not in the model
    assert load_reference_adapter(tree, str(_fixture("t5")), strict=False) == [T5_Q]


def test_config_mismatch_and_wrong_adapter_kind():
    exp = _expected("t5")
    tree = _abstract_tree(_specs("t5", [T5_Q]), _cfg(exp, r=8))
    with pytest.raises(ValueError, match="the file has r=4, the adapter config r=8"):
        load_reference_adapter(tree, str(_fixture("t5")), strict=True)
    tree = _abstract_tree(_specs("t5", [T5_Q]), _cfg(exp, alpha=32.0))
    with pytest.raises(ValueError, match="lora_alpha=16, the adapter config alpha=32.0"):
        load_reference_adapter(tree, str(_fixture("t5")), strict=True)
    tree = _abstract_tree(_specs("t5", [T5_Q]), _cfg(exp, variant="paper", expert_kernel_sizes=(2, 4)))
    with pytest.raises(ValueError, match="variant='reference' and alp=True"):
        load_reference_adapter(tree, str(_fixture("t5")), strict=False)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        read_reference_adapter(str(tmp_path))


def test_unrecognized_keys_and_peft_default_names(tmp_path):
    from safetensors.numpy import load_file, save_file

    state = load_file(str(_fixture("t5") / "adapter_model.safetensors"))
    prefix = f"base_model.model.{T5_Q}."
    renamed = {
        k.replace(".lora_A.weight", ".lora_A.default.weight"): v for k, v in state.items() if k.startswith(prefix)
    }
    renamed["base_model.model.something.else.weight"] = np.zeros((2,), np.float32)
    save_file(renamed, str(tmp_path / "adapter_model.safetensors"))
    meta, modules = read_reference_adapter(str(tmp_path))
    assert list(modules) == [T5_Q] and "A" in modules[T5_Q]
    assert meta["unrecognized_keys"] == ["base_model.model.something.else.weight"]
    tree = _abstract_tree(_specs("t5", [T5_Q]), _cfg(_expected("t5")))
    with pytest.raises(ValueError, match="unexpected tensors in the file"):
        load_reference_adapter(tree, str(tmp_path))
    assert load_reference_adapter(tree, str(tmp_path), strict=False) == [T5_Q]
    np.testing.assert_array_equal(tree.linears[0].adapter.A[...], state[prefix + "lora_A.weight"])


def test_jit_forward_after_import_is_finite(loaded):
    _, _, tree = loaded
    lin = tree.linears[0]
    graphdef, state = nnx.split(lin.adapter)
    fn = jax.jit(lambda s, x, t: nnx.merge(graphdef, s)(x, AdapterContext(task_ids=t)))
    y = fn(state, jnp.ones((2, 3, lin.adapter.d_in)), jnp.array([0, 3]))
    assert bool(jnp.all(jnp.isfinite(y))) and float(jnp.abs(y).max()) > 0
