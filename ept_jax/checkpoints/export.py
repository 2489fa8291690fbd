"""Export adapted models back to PyTorch: merged Hugging Face models and exact PEFT LoRA adapters.

Two formats, one task at a time (EPT's delta depends on the task, so each task is its own deployable model):

* ``"merged"`` (:func:`write_merged`): a Hugging Face model directory (``config.json``,
  ``model.safetensors``, the base's tokenizer and generation files) whose Linear weights carry that task's
  delta, ``W + merge(task)``. The weights go through the architecture's mapping table (``hf.export_from``
  and the same :class:`~ept_jax.checkpoints.hf.Rule` s ``from_pretrained`` reads with), so import and export
  cannot drift apart. Adapters never touch the embeddings or ``lm_head``, so T5 v1.0's tied embeddings stay
  tied (one ``shared.weight``).
* ``"peft"`` (:func:`write_peft`): a standard PEFT LoRA adapter (``adapter_config.json``,
  ``adapter_model.safetensors``) for the unmodified base, built from each adapter's exact factors
  ``to_lora(task) -> (B (d_out, R), A (R, d_in))`` with ``B @ A == merge(task)``. PEFT scales by
  ``lora_alpha / r``; every module gets ``lora_alpha = r = R`` (``rank_pattern`` / ``alpha_pattern`` list
  the modules whose ``R`` differs from the most common one), so the scale is 1 and the adapter's own scale
  lives in ``B``. Keys carry the ``base_model.model.`` prefix: PEFT loads a wrongly prefixed adapter with
  only a warning.

:func:`export_adapter` writes either format for one task or for several (one subdirectory each) into a
directory that appears atomically (:func:`atomic_directory`): a failed export leaves nothing behind, and an
existing non-empty directory is only replaced when asked to.
:func:`ept_jax.checkpoints.reference.model_from_reference` loads an adapter saved by the released PyTorch EPT,
which cannot merge its own adapters, so that it can be exported too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from ept_jax.adapters.base import AdaptedLinear, adapted_linears
from ept_jax.checkpoints import hf

FORMATS = ("merged", "peft")
# Output dtypes by name; "base" (the dtype the base's config.json declares) resolves to one of these.
DTYPES: dict[str, Any] = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DTYPE_CHOICES = (*DTYPES, "base")
PEFT_PREFIX = "base_model.model."
# What a Hugging Face model directory holds besides weights and config that a served model needs: tokenizers
# (sentencepiece, BPE, WordPiece, fast), their configs and chat templates; and the generation defaults.
TOKENIZER_FILES = tuple(
    "tokenizer.json tokenizer_config.json special_tokens_map.json added_tokens.json spiece.model "
    "tokenizer.model sentencepiece.bpe.model vocab.json merges.txt vocab.txt chat_template.jinja "
    "chat_template.json".split()
)
GENERATION_FILES = ("generation_config.json",)


class ExportError(ValueError):
    """An export that cannot be done as asked (bad task, non-mergeable adapter, existing output, ...)."""


# --------------------------------------------------------------------------------------------------- models


def family(model: nnx.Module) -> str:
    """``"t5"`` or ``"llama"``: the family of an ept_jax model (by its config class)."""
    from ept_jax.models.llama.config import LlamaConfig
    from ept_jax.models.t5.config import T5Config

    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, T5Config):
        return "t5"
    if isinstance(cfg, LlamaConfig):
        return "llama"
    raise ExportError(
        f"cannot export a {type(model).__name__}: expected an ept_jax T5Model or LlamaModel (a model with a "
        "T5Config or LlamaConfig as .cfg)"
    )


def _rules(model: nnx.Module) -> tuple[hf.Rule, ...]:
    if family(model) == "t5":
        from ept_jax.checkpoints.t5_map import hf_rules
    else:
        from ept_jax.checkpoints.llama_map import hf_rules
    return hf_rules(model.cfg)


def _task_type(model: nnx.Module) -> str:
    return "SEQ_2_SEQ_LM" if family(model) == "t5" else "CAUSAL_LM"


def _adapted(model: nnx.Module, task: int) -> list[tuple[tuple, AdaptedLinear]]:
    """The model's adapted Linears after checking that ``task`` can be exported from every one of them."""
    lins = adapted_linears(model)
    if not lins:
        raise ExportError("the model has no adapters (no AdaptedLinear): there is nothing to export")
    if isinstance(task, bool) or not isinstance(task, (int, np.integer)):
        raise ExportError(f"task={task!r}: expected an integer task id")
    for _, lin in lins:
        adapter = lin.adapter
        if not getattr(adapter, "mergeable", True):
            raise ExportError(
                f"{lin.name}: {type(adapter).__name__} is not mergeable (its delta depends on each token, so "
                "no per-task weight delta exists); it cannot be exported as a merged model or a LoRA adapter"
            )
        n_tasks = getattr(getattr(adapter, "cfg", None), "n_tasks", None)
        if n_tasks is not None and not 0 <= int(task) < n_tasks:
            raise ExportError(
                f"task id {int(task)} is out of range: the adapters know tasks 0..{n_tasks - 1}"
            )
    return lins


def _numpy(x: jax.Array) -> np.ndarray:
    # float64 on the host: sums of a float32 base and a float32 delta are rounded once, at the final cast.
    return np.asarray(jax.device_get(x), dtype=np.float64)


# One compiled program per adapter structure (equally shaped adapters have equal graphdefs), the task traced:
# op-by-op execution would compile every primitive of the EPT formulas for every new shape instead.
@functools.partial(jax.jit, static_argnums=0)
def _merge_jit(graphdef, state, task):
    return nnx.merge(graphdef, state).merge(task)


@functools.partial(jax.jit, static_argnums=0)
def _lora_jit(graphdef, state, task):
    return nnx.merge(graphdef, state).to_lora(task)


def adapter_delta(adapter: nnx.Module, task: int) -> np.ndarray:
    """``adapter.merge(task)`` ``(d_out, d_in)`` as float64 numpy, computed under ``jit``."""
    graphdef, state = nnx.split(adapter)
    return _numpy(_merge_jit(graphdef, state, np.int32(task)))


def adapter_factors(adapter: nnx.Module, task: int) -> tuple[np.ndarray, np.ndarray]:
    """``adapter.to_lora(task)`` = ``(B (d_out, R), A (R, d_in))`` as float64 numpy.

    Under ``jit`` where the rank is static; EPT's paper variant has a rank that depends on the routing
    (computed from the parameters), which it reports with a ValueError under tracing: then eagerly.
    """
    graphdef, state = nnx.split(adapter)
    try:
        b, a = _lora_jit(graphdef, state, np.int32(task))
    except ValueError:
        b, a = adapter.to_lora(int(task))
    return _numpy(b), _numpy(a)


def resolve_dtype(dtype: str, base_config: Mapping[str, Any] | None = None) -> str:
    """The output dtype name for ``dtype`` (one of :data:`DTYPE_CHOICES`); ``"base"`` reads the base's config.

    Raises:
      ExportError: an unknown name, or ``"base"`` with a base config declaring another dtype than
        float32 / bfloat16 / float16.
    """
    if dtype not in DTYPE_CHOICES:
        raise ExportError(f"dtype={dtype!r}: accepted {list(DTYPE_CHOICES)}")
    if dtype != "base":
        return dtype
    declared = (base_config or {}).get("dtype") or (base_config or {}).get("torch_dtype") or "float32"
    if declared not in DTYPES:
        raise ExportError(
            f"the base config declares dtype {declared!r}; accepted {list(DTYPES)} (or pass float32)"
        )
    return str(declared)


# --------------------------------------------------------------------------------------------------- tensors


def merged_state_dict(model: nnx.Module, task: int, *, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Every base weight with task ``task``'s delta added, Hugging Face names and PyTorch layout.

    Each adapted Linear's kernel ``(d_in, d_out)`` becomes ``kernel + merge(task).T`` and then goes through
    its mapping rule like any other weight (so the file holds ``weight + merge(task)``, ``(d_out, d_in)``).

    Args:
      model: an ept_jax ``T5Model`` or ``LlamaModel`` with mergeable adapters.
      task: the task id, ``0 <= task < n_tasks``.
      dtype: a name from :data:`DTYPES`; sums are formed in float64 and rounded once.
    Returns:
      ``{hf_name: array}`` (what ``from_pretrained`` reads back, minus tied copies).
    Raises:
      ExportError: a bad task id or dtype, a model without adapters, or a non-mergeable adapter.
    """
    out_dtype = DTYPES[resolve_dtype(dtype)]
    rules = _rules(model)
    lins = _adapted(model, task)
    tensors = {k: v.astype(out_dtype) for k, v in hf.export_from(model, rules, dtype=np.float64).items()}
    for path, lin in lins:
        ours = hf.path_str((*path, "base", "kernel"))
        rule, groups = hf.match_tensors(rules, ours)
        key = hf.fill_key(rule.hf_keys[0], groups)
        delta = adapter_delta(lin.adapter, int(task))
        kernel = _numpy(lin.base.kernel[...])
        if delta.shape != kernel.T.shape:
            raise ExportError(
                f"{lin.name}: merge() gave {delta.shape}, expected (d_out, d_in) = {kernel.T.shape}"
            )
        tensors[key] = np.asarray(rule.to_hf(kernel + delta.T)).astype(out_dtype)
    return tensors


def lora_state_dict(
    model: nnx.Module, task: int, *, dtype: str = "float32"
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Task ``task``'s exact LoRA factors in PEFT's naming.

    Returns:
      ``tensors``: ``{"base_model.model.<module path>.lora_A.weight": (R, d_in),
      "base_model.model.<module path>.lora_B.weight": (d_out, R)}``
      with ``lora_B @ lora_A == merge(task)`` (the adapter's scale folded into ``lora_B``);
      ``ranks``: ``{module path: R}``.
    Raises:
      ExportError: as :func:`merged_state_dict`, or factors of the wrong shape.
    """
    out_dtype = DTYPES[resolve_dtype(dtype)]
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    for _, lin in _adapted(model, task):
        b, a = adapter_factors(lin.adapter, int(task))
        d_in, d_out = lin.base.kernel.shape
        if a.ndim != 2 or a.shape[1] != d_in or b.shape != (d_out, a.shape[0]):
            raise ExportError(
                f"{lin.name}: to_lora() gave B {b.shape}, A {a.shape}; expected B (d_out={d_out}, R), "
                f"A (R, d_in={d_in})"
            )
        tensors[f"{PEFT_PREFIX}{lin.name}.lora_A.weight"] = np.ascontiguousarray(a.astype(out_dtype))
        tensors[f"{PEFT_PREFIX}{lin.name}.lora_B.weight"] = np.ascontiguousarray(b.astype(out_dtype))
        ranks[lin.name] = int(a.shape[0])
    return tensors, ranks


def peft_config(ranks: Mapping[str, int], *, task_type: str, base_model_name_or_path: str) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` dict (``adapter_config.json``) for modules of ranks ``{module path: R}``.

    ``r`` is the most common rank; modules of another rank are listed in ``rank_pattern``. ``lora_alpha``
    equals each module's rank (``alpha_pattern`` mirrors ``rank_pattern``), so PEFT's scale ``lora_alpha / r``
    is 1. ``target_modules`` is the exact list of module paths: nothing else of the base gets a LoRA layer.
    """
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r0 = max(sorted(counts), key=lambda r: counts[r])
    pattern = {name: r for name, r in sorted(ranks.items()) if r != r0}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": r0,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


# --------------------------------------------------------------------------------------------------- files


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes ``tensors`` to a ``.safetensors`` file with ``{"format": "pt"}`` metadata (transformers
    requires it)."""
    from safetensors.numpy import save_file

    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=meta)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON with a trailing newline."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _remove_created(dirs: list[Path]) -> None:
    for d in reversed(dirs):
        with contextlib.suppress(OSError):
            d.rmdir()  # only if still empty: never removes anything but what this export created


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory next to ``out`` that becomes ``out`` when the block succeeds.

    The temporary directory lies in ``out``'s parent (so the final step is a same-filesystem rename); on
    success every file in it is fsynced, then it is renamed to ``out``. An existing non-empty ``out`` is
    replaced only with ``overwrite=True``, by moving it aside first and deleting it after the new directory is
    in place (renaming it back if that fails). On any exception the temporary directory and any parent
    directories created for it are removed and the exception propagates: ``out`` is never half written.

    Raises:
      ExportError: ``out`` is a file, or a non-empty directory and ``overwrite`` is False.
    """
    out = Path(out).expanduser().absolute()
    if out.is_file() or out.is_symlink():
        raise ExportError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(
            f"output directory {str(out)!r} exists and is not empty; pass --overwrite to replace it"
        )
    created: list[Path] = []
    for parent in reversed(out.parents):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except BaseException:
        _remove_created(created)
        raise
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for f in files:
                _fsync(Path(root) / f)
            _fsync(Path(root))
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is an ordinary directory
        if out.is_dir() and any(out.iterdir()):
            holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, holder / "old")
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(holder / "old", out)
                shutil.rmtree(holder, ignore_errors=True)
                raise
            shutil.rmtree(holder, ignore_errors=True)
        else:
            os.replace(tmp, out)  # onto nothing or an empty directory: one atomic rename
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _base_config(model: nnx.Module, base_dir: str | os.PathLike | None) -> dict[str, Any]:
    if base_dir is not None:
        return hf.read_config(base_dir)
    # No base directory (a randomly initialised base): the model's own config is what transformers needs.
    return dict(model.cfg.to_hf())


def write_merged(
    model: nnx.Module,
    task: int,
    directory: str | os.PathLike,
    *,
    base_dir: str | os.PathLike | None = None,
    dtype: str = "float32",
    metadata: Mapping[str, str] | None = None,
    tokenizer: Any = None,
) -> None:
    """Writes task ``task``'s merged model into the existing directory ``directory`` (module docstring).

    Args:
      model: an ept_jax model with mergeable adapters and its base weights loaded.
      base_dir: the base model's local directory: its ``config.json`` is copied (with the dtype entry set to
        what is written) and so are its tokenizer files (:data:`TOKENIZER_FILES`) and generation defaults
        (:data:`GENERATION_FILES`). None writes the model's own config (a randomly initialised base).
      dtype: a name from :data:`DTYPE_CHOICES` (``"base"``: the base config's declared dtype).
      metadata: extra string entries for the safetensors header (provenance).
      tokenizer: a tokenizer to save instead of the base's tokenizer files (one with ``save_pretrained``: the
        tokenizer a run was trained with when it is not the base model's own).
    """
    directory = Path(directory)
    config = _base_config(model, base_dir)
    dtype = resolve_dtype(dtype, config)
    tensors = merged_state_dict(model, task, dtype=dtype)
    # transformers' default dtype="auto" loads in the config's declared dtype: it must match the file.
    config["dtype"] = dtype
    config["torch_dtype"] = dtype
    write_json(directory / "config.json", config)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    if base_dir is not None:
        for name in GENERATION_FILES + (TOKENIZER_FILES if tokenizer is None else ()):
            if (Path(base_dir) / name).is_file():
                shutil.copyfile(Path(base_dir) / name, directory / name)
    write_safetensors(directory / "model.safetensors", tensors, metadata)


def write_peft(
    model: nnx.Module,
    task: int,
    directory: str | os.PathLike,
    *,
    base_model_name_or_path: str,
    dtype: str = "float32",
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes task ``task``'s exact PEFT LoRA adapter into the existing directory ``directory``.

    Args:
      base_model_name_or_path: recorded in ``adapter_config.json`` (what ``AutoPeftModel`` loads as the base).
      dtype: a name from :data:`DTYPES` for the factors.
    """
    directory = Path(directory)
    tensors, ranks = lora_state_dict(model, task, dtype=dtype)
    cfg = peft_config(
        ranks, task_type=_task_type(model), base_model_name_or_path=str(base_model_name_or_path)
    )
    write_json(directory / "adapter_config.json", cfg)
    write_safetensors(directory / "adapter_model.safetensors", tensors, metadata)


def export_adapter(
    model: nnx.Module,
    out: str | os.PathLike,
    task: int | Mapping[str, int],
    *,
    format: str,
    base_dir: str | os.PathLike | None = None,
    base_model_name_or_path: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
    tokenizer: Any = None,
) -> list[Path]:
    """Exports one task into ``out``, or several tasks into ``out/<name>`` each, atomically.

    Args:
      model: an ept_jax ``T5Model`` / ``LlamaModel`` with mergeable adapters (base weights loaded).
      out: the output directory; it appears only when every task was written.
      task: a task id (written into ``out`` itself) or ``{subdirectory name: task id}``.
      format: ``"merged"`` or ``"peft"``.
      base_dir: the base model's local directory (config, tokenizer files; see :func:`write_merged`).
      base_model_name_or_path: PEFT's ``base_model_name_or_path``; default ``base_dir``.
      dtype: a name from :data:`DTYPE_CHOICES`.
      overwrite: replace an existing non-empty ``out``.
      metadata: extra safetensors header entries; ``ept_jax.task`` is added per task.
      tokenizer: merged format: a tokenizer to save instead of copying the base's (see :func:`write_merged`).
    Returns:
      the directories written (final paths).
    Raises:
      ExportError: an unknown format or dtype, a bad task, a non-mergeable adapter, an existing ``out``, a
        subdirectory name that is not a plain name, or PEFT export without any base name.
    """
    if format not in FORMATS:
        raise ExportError(f"format={format!r}: accepted {list(FORMATS)}")
    if dtype not in DTYPE_CHOICES:
        raise ExportError(f"dtype={dtype!r}: accepted {list(DTYPE_CHOICES)}")
    if base_dir is not None and not (Path(base_dir) / "config.json").is_file():
        raise ExportError(f"base model directory {str(base_dir)!r} has no config.json")
    name = base_model_name_or_path if base_model_name_or_path is not None else base_dir
    if format == "peft" and not name:
        raise ExportError(
            "a PEFT adapter needs the base model's name or path (base_model_name_or_path or base_dir)"
        )
    jobs = {"": task} if not isinstance(task, Mapping) else dict(task)
    if not jobs:
        raise ExportError("no task to export")
    for sub in jobs:
        if sub and (sub in (".", "..") or os.sep in sub or (os.altsep and os.altsep in sub)):
            raise ExportError(f"task subdirectory {sub!r} is not a plain directory name")
    for t in jobs.values():  # every task is checked before anything is written
        _adapted(model, t)
    dtype = resolve_dtype(dtype, _base_config(model, base_dir))
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for sub, t in jobs.items():
            d = tmp / sub if sub else tmp
            d.mkdir(exist_ok=True)
            meta = {**(metadata or {}), "ept_jax.task": str(int(t)), "ept_jax.format": format}
            if format == "merged":
                write_merged(
                    model, int(t), d, base_dir=base_dir, dtype=dtype, metadata=meta, tokenizer=tokenizer
                )
            else:
                write_peft(model, int(t), d, base_model_name_or_path=str(name), dtype=dtype, metadata=meta)
    return [out / sub if sub else out for sub in jobs]
