"""Import adapters saved by the released PyTorch implementation of EPT (a modified PEFT LoRA layer).

The release saves a PEFT-style state dict (``adapter_model.safetensors``, or ``adapter_model.bin``) with, per
adapted Linear (``<prefix> = base_model.model.<Hugging Face module path>``), PyTorch layout:

* ``<prefix>.lora_A.weight`` ``(r, d_in // 2)`` -> ``A``
* ``<prefix>.lora_B.weight`` ``(d_out // 2, r)`` -> ``B``
* ``<prefix>.lora_expert_kernels.<e>`` ``(1, d_out // k_e, k_e, 1)`` -> ``kernels[e]`` ``(d_out // k_e, k_e)``
* ``<prefix>.lora_gate.0.weight`` ``(n_experts, d_in)`` and ``.bias`` ``(n_experts,)`` -> ``gate_w``, ``gate_b``
* ``<prefix>.lora_task_embedding.weight`` ``(8, d_in)`` -> ``task_embedding``

(PEFT's ``.default`` adapter-name component, when present, is ignored.) Our :class:`EPTAdapter` stores the
same layout, so only the kernels are reshaped (``(1, h, k, 1) -> (h, k)``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ept_jax.adapters.base import adapted_linears
from ept_jax.adapters.ept import EPTAdapter
from ept_jax.checkpoints import hf
from ept_jax.core.params import AdapterParam

PREFIX = "base_model.model."
_KEY = re.compile(
    r"^base_model\.model\.(?P<path>.+?)\."
    r"(?P<name>lora_A|lora_B|lora_expert_kernels|lora_gate|lora_task_embedding)"
    r"(?:\.default)?\.(?P<rest>.+)$"
)
# tensor name inside one module -> (our entry, how to convert it)
_TENSORS = {
    ("lora_A", "weight"): "A",
    ("lora_B", "weight"): "B",
    ("lora_gate", "0.weight"): "gate_w",
    ("lora_gate", "0.bias"): "gate_b",
    ("lora_task_embedding", "weight"): "task_embedding",
}
MODULE_ENTRIES = ("A", "B", "kernels", "gate_w", "gate_b", "task_embedding")


def _load_state_dict(directory: str) -> dict[str, np.ndarray]:
    st = os.path.join(directory, "adapter_model.safetensors")
    if os.path.exists(st):
        from safetensors.numpy import load_file

        return dict(load_file(st))
    binf = os.path.join(directory, "adapter_model.bin")
    if os.path.exists(binf):
        import torch  # only needed for the release's older pickle format

        sd = torch.load(binf, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in sd.items()}
    raise FileNotFoundError(
        f"no adapter_model.safetensors or adapter_model.bin in {directory!r}: expected a directory written by "
        "the released EPT implementation (PEFT save_pretrained)"
    )


def read_reference_adapter(directory: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Reads a release adapter directory into per-module arrays in our layout.

    Args:
      directory: holds ``adapter_model.safetensors`` (or ``.bin``) and optionally ``adapter_config.json``.
    Returns:
      ``meta``: the PEFT ``adapter_config.json`` contents (empty if absent) plus ``expert_kernel_sizes`` (read
      off the kernel shapes; a tuple, or None when modules disagree) and ``unrecognized_keys`` (a list);
      ``modules``: ``{hf_module_path: {"A": (r, d_in//2), "B": (d_out//2, r), "kernels": [(d_out//k, k), ...],
      "gate_w": (n_experts, d_in), "gate_b": (n_experts,), "task_embedding": (8, d_in)}}`` as float numpy
      arrays (entries missing from the file are absent).
    Raises:
      FileNotFoundError: no state dict in ``directory``.
      ValueError: a kernel that is not ``(1, h, k, 1)`` or an expert index gap, naming the key.
    """
    meta: dict[str, Any] = {}
    cfg_path = os.path.join(directory, "adapter_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            meta.update(json.load(f))
    state = _load_state_dict(directory)
    modules: dict[str, dict[str, Any]] = {}
    kernels: dict[str, dict[int, np.ndarray]] = {}
    unrecognized: list[str] = []
    for key in sorted(state):
        match = _KEY.match(key)
        if match is None:
            unrecognized.append(key)
            continue
        path, name, rest = match["path"], match["name"], match["rest"]
        value = np.asarray(state[key])
        if name == "lora_expert_kernels":
            if not rest.isdigit():
                unrecognized.append(key)
                continue
            if value.ndim != 4 or value.shape[0] != 1 or value.shape[3] != 1:
                raise ValueError(f"{key}: expert kernel of shape {value.shape}, expected (1, d_out // k, k, 1)")
            kernels.setdefault(path, {})[int(rest)] = value[0, :, :, 0]
            modules.setdefault(path, {})
            continue
        entry = _TENSORS.get((name, rest))
        if entry is None:
            unrecognized.append(key)
            continue
        modules.setdefault(path, {})[entry] = value
    sizes = set()
    for path, ks in kernels.items():
        n = len(ks)
        if sorted(ks) != list(range(n)):
            raise ValueError(f"{PREFIX}{path}.lora_expert_kernels: expert indices {sorted(ks)} are not 0..{n - 1}")
        modules[path]["kernels"] = [ks[e] for e in range(n)]
        sizes.add(tuple(int(ks[e].shape[1]) for e in range(n)))
    meta["expert_kernel_sizes"] = sizes.pop() if len(sizes) == 1 else None
    meta["unrecognized_keys"] = unrecognized
    return meta, modules


def _expected_shapes(adapter: EPTAdapter) -> dict[str, Any]:
    return {
        "A": adapter.A.shape,
        "B": adapter.B.shape,
        "kernels": [k.shape for k in adapter.kernels],
        "gate_w": adapter.gate_w.shape,
        "gate_b": adapter.gate_b.shape,
        "task_embedding": adapter.task_embedding.shape,
    }


def _key_of(path: str, entry: str, e: int | None = None) -> str:
    return {
        "A": f"{PREFIX}{path}.lora_A.weight",
        "B": f"{PREFIX}{path}.lora_B.weight",
        "kernels": f"{PREFIX}{path}.lora_expert_kernels.{e}",
        "gate_w": f"{PREFIX}{path}.lora_gate.0.weight",
        "gate_b": f"{PREFIX}{path}.lora_gate.0.bias",
        "task_embedding": f"{PREFIX}{path}.lora_task_embedding.weight",
    }[entry]


def load_reference_adapter(model: nnx.Module, directory: str, strict: bool = True) -> list[str]:
    """Assigns a release adapter's tensors to every :class:`~ept_jax.adapters.base.AdaptedLinear` of ``model``, in
    place.

    Each adapted Linear is matched by its ``name`` (the Hugging Face module path) and must hold an
    :class:`EPTAdapter` of the reference variant with ALP on (the release's layout). Nothing is assigned unless
    every check passes. The model may be abstract (built under ``nnx.eval_shape``): the loaded adapter
    parameters become concrete, so no random initialisation is spent on them.

    Args:
      model: an NNX module tree containing AdaptedLinears.
      directory: see :func:`read_reference_adapter`.
      strict: when True, a module of the model that the file lacks (or lacks a tensor of), a module or tensor
        of the file that the model lacks, or a rank / ``lora_alpha`` that differs from the adapter config is an
        error. A wrongly shaped tensor is always an error.
    Returns:
      the module paths that were loaded.
    Raises:
      ValueError: naming the offending module path or tensor key and the expected shape.
    """
    meta, modules = read_reference_adapter(directory)
    targets = [lin for _, lin in adapted_linears(model)]
    problems: list[str] = []
    if strict and meta["unrecognized_keys"]:
        problems.append(f"unexpected tensors in the file: {meta['unrecognized_keys']}")
    assignments: list[tuple[nnx.Variable, np.ndarray]] = []
    loaded: list[str] = []
    for lin in targets:
        adapter, path = lin.adapter, lin.name
        if not (isinstance(adapter, EPTAdapter) and adapter.routed and adapter.pyramid.expansion == "reference"
                and adapter.cfg.alp):
            raise ValueError(
                f"{path}: holds {type(adapter).__name__} (variant={getattr(adapter.cfg, 'variant', None)!r}); "
                "release checkpoints load only into EPT adapters with variant='reference' and alp=True"
            )
        if strict:
            if "r" in meta and int(meta["r"]) != adapter.cfg.r:
                problems.append(f"{path}: the file has r={meta['r']}, the adapter config r={adapter.cfg.r}")
            if "lora_alpha" in meta and float(meta["lora_alpha"]) != float(adapter.cfg.alpha):
                problems.append(
                    f"{path}: the file has lora_alpha={meta['lora_alpha']}, "
                    f"the adapter config alpha={adapter.cfg.alpha}"
                )
        tensors = modules.pop(path, None)
        if tensors is None:
            if strict:
                problems.append(f"{path}: no tensors for this module in {directory!r} (missing {_key_of(path, 'A')})")
            continue
        shapes = _expected_shapes(adapter)
        for entry in MODULE_ENTRIES:
            if entry not in tensors:
                if strict:
                    problems.append(f"missing tensor {_key_of(path, entry, 0)}")
                continue
            if entry == "kernels":
                got, want = tensors["kernels"], shapes["kernels"]
                if len(got) != len(want):
                    problems.append(
                        f"{_key_of(path, 'kernels', len(got) - 1)}: the file has {len(got)} experts, the adapter "
                        f"{len(want)}"
                    )
                    continue
                for e, (g, w) in enumerate(zip(got, want, strict=True)):
                    if tuple(g.shape) != tuple(w):
                        problems.append(
                            f"{_key_of(path, 'kernels', e)}: shape (1, {g.shape[0]}, {g.shape[1]}, 1) does not match "
                            f"the adapter's (1, {w[0]}, {w[1]}, 1)"
                        )
                    else:
                        assignments.append((adapter.kernels[e], g))
                continue
            got = tensors[entry]
            if tuple(got.shape) != tuple(shapes[entry]):
                problems.append(
                    f"{_key_of(path, entry)}: shape {tuple(got.shape)} does not match the adapter's "
                    f"{tuple(shapes[entry])}"
                )
                continue
            assignments.append((getattr(adapter, entry), got))
        loaded.append(path)
    if strict and modules:
        problems.append(f"unexpected modules in the file (no AdaptedLinear named so): {sorted(modules)}")
    if problems:
        raise ValueError(f"cannot load the reference adapter from {directory!r}:\n  " + "\n  ".join(problems))
    for var, value in assignments:
        # set_value also fills abstract variables (a model built with nnx.eval_shape)
        var.set_value(jnp.asarray(value, dtype=var.dtype))
    return loaded


def reference_state_dict(model: nnx.Module, grads: nnx.State | None = None) -> dict[str, np.ndarray]:
    """The release's PEFT state dict of ``model``'s EPT adapters (the inverse of :func:`load_reference_adapter`).

    Keys ``base_model.model.<module path>.lora_A.weight`` ..., arrays in the release's layout (kernels
    ``(1, d_out // k, k, 1)``), in the parameters' dtype. With ``grads`` (a state like ``model``'s trainable
    one, e.g. :meth:`train.steps.TrainStep.gradients`), the same keys hold those gradients instead.

    Raises:
      ValueError: an adapted Linear whose adapter is not EPT's reference variant with ALP on.
    """
    if grads is not None:
        graphdef, _, rest = nnx.split(model, AdapterParam, ...)
        model = nnx.merge(graphdef, grads, rest)
    out: dict[str, np.ndarray] = {}
    for _, lin in adapted_linears(model):
        adapter, path = lin.adapter, lin.name
        if not (isinstance(adapter, EPTAdapter) and adapter.routed and adapter.pyramid.expansion == "reference"
                and adapter.cfg.alp):
            raise ValueError(f"{path}: holds {type(adapter).__name__}; the release's layout exists only for EPT "
                             "adapters with variant='reference' and alp=True")
        for entry in MODULE_ENTRIES:
            if entry == "kernels":
                for e, k in enumerate(adapter.kernels):
                    out[_key_of(path, "kernels", e)] = np.asarray(k[...])[None, :, :, None]
            else:
                out[_key_of(path, entry)] = np.asarray(getattr(adapter, entry)[...])
    return out


# --------------------------------------------------------------------------------------------------- a model to export

# The released implementation trains with top-2 routing; the file does not record it (kernel sizes are read off
# the saved tensors).
RELEASE_TOP_K = 2


def model_from_reference(
    adapter_dir: str | os.PathLike,
    base: str | os.PathLike,
    *,
    expert_kernel_sizes: tuple[int, ...] | None = None,
    top_k: int | None = RELEASE_TOP_K,
    dtype: str = "float32",
    contrastive_stacks: tuple[str, ...] = ("encoder",),
    contrastive_tau: float = 0.05,
) -> tuple[nnx.Module, int]:
    """Loads ``base`` with the adapter the released PyTorch EPT saved in ``adapter_dir`` (ready to export).

    The release's own delta cannot be merged (its shape is wrong); ours can, and the reference variant's task
    delta is exactly of rank ``r * top_k``. The model gets ``AdapterConfig(kind="ept", variant="reference")``
    with ``r`` and ``lora_alpha`` from the release's ``adapter_config.json``, the adapted Linears and the
    number of task rows from its tensors, and the adapter imported by
    ``checkpoints.reference.load_reference_adapter``.

    Args:
      adapter_dir: the release's directory (``adapter_model.safetensors`` or ``.bin``,
        ``adapter_config.json``).
      base: the base model directory (or hub id) the adapter was trained on.
      expert_kernel_sizes: the experts' kernel sizes; None reads them off the saved kernels (given, they must
        agree with them).
      top_k: experts mixed per task (the release trains with 2; the file does not record it); None = dense.
      dtype: the model's compute and parameter dtype (``"float32"``, ``"bfloat16"``, or ``"float64"`` with
        ``jax_enable_x64``).
      contrastive_stacks / contrastive_tau: where the contrastive loss is sown and its temperature (the release:
        the encoder's Linears, 0.05; a LLaMA model has no encoder, so none), for training the imported model.
    Returns:
      ``(model, n_task_rows)``: every task-embedding row is a task id ``0 <= id < n_task_rows``.
    Raises:
      ExportError: missing files or settings, or kernel sizes that contradict the file.
      ValueError / CheckpointError: the adapter does not fit the base (named by ``load_reference_adapter``).
    """
    from ept_jax.adapters.config import AdapterConfig
    from ept_jax.adapters.inject import Injection
    from ept_jax.checkpoints.export import ExportError
    from ept_jax.checkpoints.load import from_pretrained

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ExportError(f"reference adapter directory {str(adapter_dir)!r} does not exist")
    try:
        meta, modules = read_reference_adapter(str(adapter_dir))
    except FileNotFoundError as e:
        raise ExportError(str(e)) from e
    if not modules:
        raise ExportError(
            f"{adapter_dir}: the adapter file holds no EPT module (no lora_A / lora_expert_kernels keys)"
        )
    missing = [k for k in ("r", "lora_alpha") if k not in meta]
    if missing:
        raise ExportError(
            f"{adapter_dir / 'adapter_config.json'} is missing or lacks {missing}: the release writes r and "
            "lora_alpha there, and the adapter's scale lora_alpha / r cannot be recovered from the tensors"
        )
    found = meta["expert_kernel_sizes"]
    if expert_kernel_sizes is None:
        if found is None:
            raise ExportError(
                f"{adapter_dir}: the modules' expert kernels disagree; pass the kernel sizes explicitly"
            )
        expert_kernel_sizes = tuple(found)
    elif found is not None and tuple(expert_kernel_sizes) != tuple(found):
        raise ExportError(
            f"expert kernel sizes {list(expert_kernel_sizes)} contradict the saved kernels, whose sizes are "
            f"{list(found)}"
        )
    rows = {int(m["task_embedding"].shape[0]) for m in modules.values() if "task_embedding" in m}
    if len(rows) != 1:
        raise ExportError(f"{adapter_dir}: task embeddings of {sorted(rows)} rows; expected one row count")
    n_rows = rows.pop()
    cfg = AdapterConfig(
        kind="ept",
        variant="reference",
        r=int(meta["r"]),
        alpha=float(meta["lora_alpha"]),
        expert_kernel_sizes=tuple(int(k) for k in expert_kernel_sizes),
        top_k=top_k,
        n_tasks=n_rows,
        n_task_rows=n_rows,
        dropout=0.0,
        contrastive_tau=float(contrastive_tau),
        param_dtype=dtype,
    )
    targets = tuple(sorted({path.rsplit(".", 1)[-1] for path in modules}))
    # the release's tensors replace every adapter parameter: the adapters are left abstract, not initialised
    injection = Injection(adapter=cfg, targets=targets, contrastive_stacks=tuple(contrastive_stacks))
    model = from_pretrained(base, injection=injection, dtype=dtype, param_dtype=dtype, abstract_adapters=True)
    load_reference_adapter(model, str(adapter_dir))
    abstract = [
        hf.path_str(p)
        for p, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)
    ]
    if abstract:  # load_reference_adapter is strict, so this would be a bug, not a user error
        raise RuntimeError(f"parameters left unset after loading the reference adapter: {abstract[:5]}")
    return model, n_rows
