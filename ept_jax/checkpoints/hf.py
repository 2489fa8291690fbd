"""Hugging Face checkpoints <-> ept_jax parameters: reading tensors and one mapping table per architecture.

Reading (:func:`read_tensors`) turns any supported checkpoint into one flat ``{pytorch_name: np.ndarray}`` dict in
PyTorch naming and layout, whatever the source:

* ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (memory-mapped, bfloat16 included);
* legacy Hugging Face Flax ``flax_model.msgpack`` (``kernel`` -> ``weight`` transposed, ``embedding``/``scale`` ->
  ``weight``), which the hub still serves for T5;
* ``pytorch_model.bin`` when torch is installed.

GGUF files are read by ``ept_jax.checkpoints.gguf``.

Mapping (MaxText style): an architecture is described by a tuple of :class:`Rule` s, each naming one of our
parameter paths (a pattern with ``{i}`` for layer indices), the Hugging Face key(s) it comes from, and a named
transformation with its inverse. :func:`load_into` applies the table strictly (a missing, unexpected or wrongly
shaped tensor is an error naming it; nothing stays at its random init) and :func:`export_from` applies it in
reverse, so import and export cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from ept_jax.core.params import AdapterParam

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "flax_model.msgpack", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint does not match the model (missing, unexpected or wrongly shaped tensors) or cannot be read."""


# --------------------------------------------------------------------------------------------------- locating


def resolve_model_dir(name_or_path: str | os.PathLike, *, allow_patterns: Sequence[str] | None = None) -> Path:
    """A local model directory for ``name_or_path``: the directory itself, or a hub snapshot downloaded for an id.

    Raises:
      CheckpointError: the path does not exist locally and the hub id cannot be fetched (offline, unknown id).
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"model path {str(p)!r} is a file; expected a Hugging Face model directory or hub id")
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise CheckpointError(f"model directory {text!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        patterns = list(allow_patterns) if allow_patterns else [
            "*.json", "*.safetensors", "*.model", "*.txt", "flax_model.msgpack", "tokenizer*",
        ]
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # offline, gated or unknown ids all end here
        raise CheckpointError(
            f"cannot find model {text!r}: not a local directory, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def read_config(model_dir: str | os.PathLike) -> dict:
    """``config.json`` of a model directory as a dict."""
    f = Path(model_dir) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"model directory {str(model_dir)!r} has no config.json")
    return json.loads(f.read_text())


# --------------------------------------------------------------------------------------------------- reading

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file, memory-mapped (no copy until used), bfloat16 via ml_dtypes."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > data.shape[0]:
            raise CheckpointError(f"{path}: tensor {name!r} lies past the end of the file (truncated file?)")
        dt = np.dtype(_ST_DTYPES[info["dtype"]])
        out[name] = data[start:end].view(dt).reshape(info["shape"])
    return out


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = np.asarray(v)
    return out


def flax_to_pytorch_names(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face Flax naming/layout -> PyTorch naming/layout (the rules of transformers' PT<->Flax converter).

    ``*.kernel`` (2-D, ``(in, out)``) -> ``*.weight`` transposed; ``*.embedding`` and ``*.scale`` -> ``*.weight``.
    """
    out = {}
    for k, v in flat.items():
        if k.endswith(".kernel") and v.ndim == 2:
            out[k[: -len("kernel")] + "weight"] = np.ascontiguousarray(v.T)
        elif k.endswith(".embedding") or k.endswith(".scale"):
            out[k.rsplit(".", 1)[0] + ".weight"] = v
        else:
            out[k] = v
    return out


def read_tensors(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every weight of a Hugging Face model directory, PyTorch names and layout (see module docstring).

    Raises:
      CheckpointError: no weight file, a shard listed in the index is missing, or a file cannot be parsed.
    """
    d = Path(model_dir)
    if (d / "model.safetensors").is_file():
        return read_safetensors(d / "model.safetensors")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if not (d / shard).is_file():
                raise CheckpointError(f"shard {shard!r} listed in {index} is missing")
            out.update(read_safetensors(d / shard))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise CheckpointError(f"{index} lists tensors absent from its shards: {missing[:5]}")
        return out
    if (d / "flax_model.msgpack").is_file():
        from flax import serialization

        tree = serialization.msgpack_restore((d / "flax_model.msgpack").read_bytes())
        return flax_to_pytorch_names(_flatten(tree))
    if (d / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(f"{d} holds only pytorch_model.bin; install torch to read it") from e
        sd = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}
    raise CheckpointError(
        f"model directory {str(d)!r} has no weights; expected one of {', '.join(WEIGHT_FILES)}"
    )


# --------------------------------------------------------------------------------------------------- mapping


def transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))


def identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a mapping table.

    Attributes:
      ours: our parameter path with ``{i}`` placeholders for integer path parts, ``.``-joined
        (e.g. ``"encoder.blocks.{i}.attn.q.kernel"``). Paths of adapted Linears (``....q.base.kernel``) are matched
        with the ``base`` part removed.
      hf: the Hugging Face key pattern(s), same placeholders in the same order. A tuple lists alternatives: the
        first present is read on import (tied copies), the first is written on export.
      to_ours / to_hf: the named transformation and its inverse (numpy, e.g. :func:`transpose`).
    """

    ours: str
    hf: str | tuple[str, ...]
    to_ours: Callable[[np.ndarray], np.ndarray] = identity
    to_hf: Callable[[np.ndarray], np.ndarray] = identity

    @property
    def hf_keys(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else self.hf

    def regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.ours).replace(r"\{i\}", r"(\d+)") + "$")


def path_str(path: Iterable) -> str:
    """A flat nnx state path as a ``.``-joined string, with the ``base`` part of adapted Linears removed."""
    s = ".".join(str(p) for p in path)
    return re.sub(r"\.base\.(kernel|bias)$", r".\1", s)


def base_params(model: nnx.Module) -> dict[str, nnx.Variable]:
    """``{path: variable}`` of every frozen base parameter (``nnx.Param`` but not ``AdapterParam``)."""
    out = {}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and not isinstance(var, AdapterParam):
            out[path_str(path)] = var
    return out


def match_tensors(rules: Sequence[Rule], ours: str) -> tuple[Rule, tuple[str, ...]]:
    """The first rule whose pattern matches our parameter path ``ours``, with the matched groups (layer numbers)."""
    for rule in rules:
        m = rule.regex().match(ours)
        if m:
            return rule, m.groups()
    raise CheckpointError(f"no mapping rule for parameter {ours!r} (a bug in the architecture's table)")


def fill_key(pattern: str, groups: Sequence[str]) -> str:
    """``pattern`` with each ``{i}`` replaced by the next of ``groups`` (a Hugging Face tensor name)."""
    it = iter(groups)
    return re.sub(r"\{i\}", lambda _: next(it), pattern)


def _head(items: Sequence[str], sep: str = ", ", n: int = 8) -> str:
    return sep.join(items[:n]) + (" ..." if len(items) > n else "")


def load_into(
    model: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    *,
    ignore: Sequence[str] = (),
    source: str = "checkpoint",
) -> None:
    """Sets every frozen base parameter of ``model`` from ``tensors`` (PyTorch names) through ``rules``, strictly.

    Args:
      model: an NNX model whose base parameters are all covered by ``rules``.
      tensors: ``{hf_name: array}`` as returned by :func:`read_tensors`.
      rules: the architecture's mapping table.
      ignore: regexes of Hugging Face keys that may stay unused (buffers such as ``rotary_emb.inv_freq``, tied copies).
      source: shown in error messages.

    Raises:
      CheckpointError: naming every missing, unexpected or wrongly shaped tensor. The model is left unchanged.
    """
    params = base_params(model)
    used: set[str] = set()
    missing, bad_shape, updates = [], [], {}
    for ours, var in params.items():
        rule, groups = match_tensors(rules, ours)
        keys = [fill_key(k, groups) for k in rule.hf_keys]
        key = next((k for k in keys if k in tensors), None)
        if key is None:
            missing.append(keys[0])
            continue
        used.update(k for k in keys if k in tensors)
        value = rule.to_ours(np.asarray(tensors[key]))
        if tuple(value.shape) != tuple(var.shape):
            bad_shape.append(f"{key}: checkpoint {tuple(value.shape)} (after conversion), model {tuple(var.shape)}")
            continue
        updates[ours] = value
    ignore_re = [re.compile(p) for p in ignore]
    unexpected = sorted(k for k in tensors if k not in used and not any(r.search(k) for r in ignore_re))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_head(missing)}")
    if bad_shape:
        problems.append(f"wrong shape: {_head(bad_shape, '; ')}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_head(unexpected)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    for ours, value in updates.items():
        var = params[ours]
        var[...] = jnp.asarray(value, dtype=var.dtype)


def export_from(model: nnx.Module, rules: Sequence[Rule], *, dtype=np.float32) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_into`: ``{hf_name: array}`` of every frozen base parameter, PyTorch layout."""
    out = {}
    for ours, var in base_params(model).items():
        rule, groups = match_tensors(rules, ours)
        value = np.asarray(jax.device_get(var[...]), dtype=dtype)
        out[fill_key(rule.hf_keys[0], groups)] = np.asarray(rule.to_hf(value))
    return out
