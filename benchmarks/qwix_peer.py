"""The JAX peer no project of ours wrote: LoRA from `qwix <https://github.com/google/qwix>`_ (the LoRA of Tunix and
MaxText) on ept_jax's own plain model, one optax AdamW step.

``qwix.apply_lora_to_model`` takes the built model (no ept_jax adapters) and intercepts, while the model runs, its
``jax.numpy.dot`` / ``jax.lax.dot_general`` / ``jax.numpy.einsum`` calls in the modules whose path (``model/layers/
0/self_attn/q_proj``) matches ``module_path``: ept_jax's :class:`~ept_jax.core.linear.Linear` computes
``jnp.dot(x, kernel)``, which qwix routes to its LoRA ``dot_general`` (``y + dropout(x) @ A @ B * alpha / r``;
``A`` He-uniform, ``B`` zero, both ``nnx.LoRAParam`` created on the Linear as ``kernel_lora_a`` / ``kernel_lora_b``).
The regex names the same Linears as ept_jax's LoRA row (checked: the adapted paths are ept_jax's
:func:`~ept_jax.adapters.inject.linears` that its targets select), at the same rank, alpha and dropout.

The step: ``jax.jit`` of the masked token cross-entropy (``train.steps.forward`` / ``cross_entropy``, as the
ept_jax rows), ``jax.value_and_grad`` with respect to the ``nnx.LoRAParam`` state only (the base weights are an
undifferentiated argument), then ``optax.clip_by_global_norm(train.grad_clip)`` and ``optax.adamw`` (the config's
learning rate, betas, epsilon, weight decay on matrices only); the LoRA parameters and the AdamW state are donated,
as in ``train.steps.make_train_step``. The dropout key is ``fold_in(PRNGKey(train.seed), step)``, given to qwix as a
fresh ``nnx.Rngs`` on every adapted module inside the step (qwix draws LoRA dropout masks from the module's
``qwix_rngs``, which it clears after initialisation).

Layers run unrolled (``model.scan_layers=False``): qwix writes each module's path on it as a static attribute
(``qwix_path``), so no two layers are the same program any more and :func:`ept_jax.models.layer_scan.scan_plan`
would unroll them anyway (one scanned body could not carry a per-layer path). The ept_jax rows scan their layers
unless ``--unrolled-layers``; the row's ``notes`` say so.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import measure, setups
from benchmarks.setups import ModelSpec

QWIX_PIN = "qwix==0.1.8"  # the version of the test extra (pyproject.toml)


def unavailable() -> str | None:
    """Why the qwix row cannot run here (None when it can)."""
    try:
        import qwix  # noqa: F401
    except ImportError:
        return f"qwix is not installed (pip install {QWIX_PIN}, part of the test extra)"
    return None


def module_regex(targets: tuple[str, ...]) -> str:
    """qwix's ``module_path`` for ept_jax's short target names: any module path whose last part is one of them."""
    return "(?:.*/)?(?:" + "|".join(re.escape(t) for t in targets) + ")"


def _inputs(family: str, batch: dict[str, Any]) -> tuple:
    """The model's positional arguments as ``train.steps.forward`` passes them (no adapter context)."""
    if family == "t5":
        return batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], None, None
    return batch["input_ids"], batch["attention_mask"], None


def plain_model(spec: ModelSpec, tensors, *, dtype: str):
    """ept_jax's model of ``spec`` without adapters (the limit row's config), layers unrolled, holding ``tensors``."""
    config = setups.bench_config(spec, None, dtype=dtype)
    config.model.scan_layers = False
    return setups.jax_model(config, tensors)


def lora_model(spec: ModelSpec, tensors, config, *, dtype: str, seed: int = 0):
    """``(plain, lora)``: the plain model and qwix's LoRA model made from it (a copy; ``plain`` is left as it was).

    ``config`` is ept_jax's LoRA row's config (rank ``adapter.r``, ``adapter.alpha``, ``adapter.dropout``,
    ``adapter.targets``). Raises RuntimeError when qwix adapted other Linears than ept_jax's targets select.
    """
    import qwix

    from ept_jax.adapters.inject import linears, matches

    a = config.adapter
    plain = plain_model(spec, tensors, dtype=dtype)
    provider = qwix.LoraProvider(module_path=module_regex(tuple(a.targets)), rank=int(a.r), alpha=float(a.alpha),
                                 dropout=float(a.dropout))
    batch = {k: jnp.asarray(v) for k, v in setups.train_batch(spec, spec.seq).items()}
    model = qwix.apply_lora_to_model(plain, provider, *_inputs(spec.family, batch), rngs=nnx.Rngs(seed))
    adapted = {".".join(str(p) for p in path[:-1]) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    expected = {p for _, _, p in linears(plain) if any(matches(t, p) for t in a.targets)}
    if adapted != expected:
        raise RuntimeError(f"qwix adapted {sorted(adapted)}; ept_jax's LoRA adapts {sorted(expected)}")
    return plain, model


def optimizer(config):
    """optax's own AdamW after global-norm clipping, at the config's settings (constant learning rate)."""
    import optax

    t = config.train
    adamw = optax.adamw(float(t.learning_rate), b1=float(t.get("adam_b1", 0.9)), b2=float(t.get("adam_b2", 0.999)),
                        eps=float(t.get("adam_eps", 1e-8)), weight_decay=float(t.weight_decay),
                        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    clip = float(t.grad_clip)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw


def logits_fn(graphdef, family: str, dropout: float):
    """``logits(lora, frozen, batch, key)``: the teacher-forced logits of the qwix model ``merge(graphdef, lora,
    frozen)`` (``train.steps.forward``, no adapter context), LoRA dropout masks drawn from ``key``."""
    from train import steps

    def logits(lora, frozen, batch, key):
        model = nnx.merge(graphdef, lora, frozen)
        if dropout > 0:
            rngs = nnx.Rngs(dropout=key)
            for _, m in nnx.iter_modules(model):
                if hasattr(m, "qwix_path"):
                    m.qwix_rngs = rngs
        return steps.forward(family, model, batch, None)

    return logits


def loss_fn(graphdef, family: str, dropout: float):
    """``loss(lora, frozen, batch, key)``: the masked token cross-entropy (``train.steps.cross_entropy``) of
    :func:`logits_fn`."""
    from train import steps

    logits = logits_fn(graphdef, family, dropout)
    return lambda lora, frozen, batch, key: steps.cross_entropy(logits(lora, frozen, batch, key), batch["labels"],
                                                                batch["label_mask"])


def train_call(spec: ModelSpec, tensors, config, *, dtype: str):
    """``(call, compiled, compile_s, info)`` of the qwix LoRA training step at the main shapes.

    ``call()`` runs one step (its outputs, the LoRA parameters and the AdamW state, feed the next);
    ``info``: ``{"lora": state, "frozen": state}`` (the latest LoRA parameters, the base weights).
    """
    import optax

    _, model = lora_model(spec, tensors, config, dtype=dtype)
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    del model
    tx = optimizer(config)
    opt_state = tx.init(lora)
    loss = loss_fn(graphdef, spec.family, float(config.adapter.dropout))
    seed = int(config.train.seed)

    def step_fn(lora, opt_state, frozen, batch, step):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        value, grads = jax.value_and_grad(loss)(lora, frozen, batch, key)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, {"loss": value}

    jitted = jax.jit(step_fn, donate_argnums=(0, 1))
    batch = {k: jnp.asarray(v) for k, v in setups.train_batch(spec, spec.seq).items()}
    step = jnp.asarray(1000, jnp.int32)
    compiled, compile_s = measure.compile_jit(jitted, lora, opt_state, frozen, batch, step)
    info = {"lora": lora, "opt_state": opt_state, "frozen": frozen}

    def call():
        info["lora"], info["opt_state"], metrics = compiled(info["lora"], info["opt_state"], frozen, batch, step)
        return info["lora"], metrics

    return call, compiled, compile_s, info


NOTES = ("qwix {version} LoraProvider(module_path={regex!r}) on ept_jax's plain model; layers unrolled "
         "(model.scan_layers=False: qwix stores each module's path on it, so the layers are no longer one program "
         "and ept_jax's layer scan cannot apply){scan}; optax clip_by_global_norm + adamw; LoRA dropout masks "
         "from jax.random (qwix's nnx.Dropout)")


def qwix_row(spec: ModelSpec, tensors, config, *, reps: int, warmup: int, dtype: str,
             base_row: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``qwix_lora`` row of ``spec`` (skipped, with the reason, when qwix is not installed).

    ``base_row`` (the limit row) supplies ``flops_per_call``: the same frozen model, the same count.
    """
    from benchmarks import jax_rows

    shapes = spec.shapes()
    r = jax_rows.row(spec, "qwix_lora", "train", shapes, tokens=setups.tokens(spec, shapes), framework="jax")
    reason = unavailable()
    if reason is not None:
        r.update(status="skipped", reason=reason)
        return r
    call, compiled, compile_s, info = train_call(spec, tensors, config, dtype=dtype)
    timing = measure.time_calls(call, reps=reps, warmup=warmup, sampler=jax_rows.rss_sampler())
    a = config.adapter
    regex = module_regex(tuple(a.targets))
    scan = "" if not setups.SCAN_LAYERS else "; the ept_jax rows of this run have model.scan_layers=True"
    r.update(params={"base": setups.count(info["frozen"]), "trainable": setups.count(info["lora"])},
             flops_per_call=(base_row or {}).get("flops_per_call"), scan_layers=False,
             versions={"qwix": measure.package_version("qwix")},
             adapter={"kind": "qwix_lora", "rank": int(a.r), "alpha": float(a.alpha), "dropout": float(a.dropout),
                      "module_path": regex},
             notes=NOTES.format(version=measure.package_version("qwix"), regex=regex, scan=scan))
    return jax_rows.finish_row(r, timing, compiled, compile_s, dtype)
