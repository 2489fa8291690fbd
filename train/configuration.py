"""Checking a training config, saving it into the workdir, and refusing to mix two runs in one workdir.

The config is an ``ml_collections.ConfigDict`` with the schema of ``configs/common.py``. :func:`validate` checks
the values the program itself interprets (the adapter and model options are checked where they are used, by
``ept_jax.adapters.validate`` and the model constructors, with the same kind of one-line messages).
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from train.errors import ConfigMismatchError, UserError
from train.rundir import write_json_atomic

CONFIG_FILE = "config.json"
FAMILIES = ("t5", "llama")
SOURCES = ("glue", "commonsense", "synthetic")
NAN_POLICIES = ("skip", "stop")
UNROUTED_EXPERTS = ("skip", "update")  # see train.optim
SAMPLING = ("release", "uniform", "mixed")
AVERAGES = ("paper", "release")
# Keys a restarted run may change without --allow_config_change: they do not change what is being trained
# (train.steps changes the schedule's end, which is the point of extending a run).
MUTABLE_PREFIXES = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.nan_policy",
    "eval.",
    "mesh.",
    "model.scan_layers",
    "compare.",  # train.compare's per-method settings: applied before a run, not read by it
)


def to_dict(config) -> dict[str, Any]:
    """A plain JSON-serialisable dict of ``config`` (tuples become lists)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(raw, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _positive_int(value, name: str, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise UserError(f"{name}={value!r}: must be an integer {'>= 0' if allow_zero else '> 0'}")


def _choice(value, name: str, accepted) -> None:
    if value not in accepted:
        raise UserError(f"{name}={value!r} is not accepted; accepted: {', '.join(map(str, accepted))}")


def validate(config) -> None:
    """Raises :class:`UserError` naming the first bad value (and what is accepted) among the program's options."""
    from ept_jax.data import get_task

    _choice(config.model.family, "model.family", FAMILIES)
    scan = config.model.get("scan_layers", True)
    if not isinstance(scan, bool):
        raise UserError(f"model.scan_layers={scan!r}: must be True or False")
    if not config.model.random_init and not config.model.name_or_path:
        raise UserError("model.name_or_path is empty; give a Hugging Face model directory or hub id")
    if config.model.random_init and not config.model.arch:
        raise UserError("model.random_init=True needs model.arch (the config.json fields of the model to build)")

    _choice(config.data.source, "data.source", SOURCES)
    _choice(config.data.sampling, "data.sampling", SAMPLING)
    tasks = list(config.data.tasks)
    if not tasks:
        raise UserError("data.tasks is empty; name at least one task")
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise UserError(f"data.tasks names {duplicates} more than once; each task needs one task id")
    for name in tasks:
        spec = get_task(name)  # an unknown name raises listing the accepted ones
        if spec.family != config.data.source:
            raise UserError(
                f"data.tasks: task {name!r} belongs to the {spec.family!r} family but data.source="
                f"{config.data.source!r}; set data.source={spec.family!r} or choose {config.data.source} tasks"
            )
    _positive_int(config.data.max_source_length, "data.max_source_length")
    _positive_int(config.data.max_target_length, "data.max_target_length")
    if config.data.max_train_examples is not None:
        _positive_int(config.data.max_train_examples, "data.max_train_examples")

    t = config.train
    _positive_int(t.steps, "train.steps", allow_zero=True)  # 0: evaluate the untrained model and stop
    for name in ("batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _positive_int(t[name], f"train.{name}")
    _positive_int(t.warmup_steps, "train.warmup_steps", allow_zero=True)
    _positive_int(t.seed, "train.seed", allow_zero=True)
    if not (isinstance(t.learning_rate, (int, float)) and t.learning_rate > 0):
        raise UserError(f"train.learning_rate={t.learning_rate!r}: must be a number > 0")
    if not (isinstance(t.weight_decay, (int, float)) and t.weight_decay >= 0):
        raise UserError(f"train.weight_decay={t.weight_decay!r}: must be a number >= 0")
    if not (isinstance(t.grad_clip, (int, float)) and t.grad_clip >= 0):
        raise UserError(f"train.grad_clip={t.grad_clip!r}: must be a number >= 0 (0 disables clipping)")
    from train.state import parse_lr_multipliers

    parse_lr_multipliers(t.get("lr_multipliers", ""))
    _choice(t.nan_policy, "train.nan_policy", NAN_POLICIES)
    _choice(t.unrouted_experts, "train.unrouted_experts", UNROUTED_EXPERTS)
    for name, lo, hi in (("adam_b1", 0.0, 1.0), ("adam_b2", 0.0, 1.0)):
        v = t[name]
        if not (isinstance(v, (int, float)) and lo <= v < hi):
            raise UserError(f"train.{name}={v!r}: must be a number in [{lo}, {hi})")
    if not (isinstance(t.adam_eps, (int, float)) and t.adam_eps > 0):
        raise UserError(f"train.adam_eps={t.adam_eps!r}: must be a number > 0")
    lam = config.adapter.contrastive_lambda
    if not (isinstance(lam, (int, float)) and lam >= 0):
        raise UserError(f"adapter.contrastive_lambda={lam!r}: must be a number >= 0")
    div = config.adapter.contrastive_divisor
    if div is not None and not (isinstance(div, (int, float)) and div > 0):
        raise UserError(f"adapter.contrastive_divisor={div!r}: must be a number > 0, or None (the mean)")

    e = config.eval
    _positive_int(e.batch_size, "eval.batch_size")
    _positive_int(e.max_new_tokens, "eval.max_new_tokens")
    if e.max_examples is not None:
        _positive_int(e.max_examples, "eval.max_examples")
    _choice(e.average, "eval.average", AVERAGES)
    _choice(config.data.get("prompt_format", "letters"), "data.prompt_format", ("letters", "cloze"))
    if config.data.get("prompt_format", "letters") == "cloze" and str(config.data.source) != "commonsense":
        raise UserError(f"data.prompt_format='cloze' has templates for commonsense tasks only; data.source is "
                        f"{config.data.source!r}")
    if not e.get("generation", True) and not e.get("answer_loss", True):
        raise UserError("eval.generation=False and eval.answer_loss=False leave the evaluation nothing to select the "
                        "best step by; enable one of them")
    fmt = e.get("choice_format")
    if fmt is not None:
        _choice(fmt, "eval.choice_format", ("cloze", "letters"))
        if str(config.data.source) != "commonsense":
            raise UserError(f"eval.choice_format={fmt!r} scores commonsense tasks; data.source is "
                            f"{config.data.source!r}")
        _positive_int(e.get("choice_max_length", 256), "eval.choice_max_length")


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two :func:`to_dict` configs, except :data:`MUTABLE_PREFIXES`."""
    a, b = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p) for p in MUTABLE_PREFIXES):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: saved {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}")
    return out


def reconcile(workdir: Path, config, *, allow_change: bool, write: bool) -> list[str]:
    """Compares ``config`` with the one saved in ``workdir`` and saves it (when ``write``).

    Returns the differences that were accepted (mutable keys are not listed; with ``allow_change`` every
    difference is accepted and listed).

    Raises:
      ConfigMismatchError: the saved config differs in a key that changes what is trained, without
        ``allow_change``.
    """
    current = to_dict(config)
    path = workdir / CONFIG_FILE
    diffs: list[str] = []
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); remove it or use another --workdir") from e
        diffs = differences(saved, current)
        if diffs and not allow_change:
            shown = "; ".join(diffs[:5]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 5 else "")
            raise ConfigMismatchError(
                f"--workdir {str(workdir)!r} holds a run with another config ({shown}); use the same config, "
                "another --workdir, or --allow_config_change to continue this run with the new values"
            )
    if write:
        write_json_atomic(path, current)
    return diffs


def check_same_across_processes(config) -> None:
    """Of a multi-process job: every process runs process 0's config, else every process raises one line naming
    the keys that differ (a process launched with other flags would otherwise train something else, or hang).

    Raises:
      ConfigMismatchError: this or another process's config differs from process 0's.
    """
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = json.dumps(to_dict(config), sort_keys=True).encode()
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(mine))))
    buf = np.frombuffer(mine, np.uint8) if jax.process_index() == 0 else np.zeros(n, np.uint8)
    first = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf)))
    diffs = []
    if first != mine:  # every key counts here, the mutable ones too (another train.steps would hang the job)
        a, b = flatten(json.loads(first)), flatten(to_dict(config))
        diffs = [f"{k}: process 0 {a.get(k, '<absent>')!r}, this process {b.get(k, '<absent>')!r}"
                 for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")] or ["(format)"]
    flags = np.asarray(multihost_utils.process_allgather(np.int32(bool(diffs)))).ravel()
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 5 else "")
        raise ConfigMismatchError(f"process {jax.process_index()} runs another config than process 0 ({shown}); "
                                  "launch every process with the same command")
    if flags.any():
        bad = [i for i, f in enumerate(flags) if f]
        raise ConfigMismatchError(f"process(es) {bad} run another config than process 0 (their error names the "
                                  "keys); launch every process with the same command")


def load_config_file(spec: str):
    """The ConfigDict of ``--config`` ``spec``: ``file.py`` (``get_config()``) or ``file.py:arg`` (``get_config(arg)``).
    The one config loader of the command-line programs."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_ept_config", path)
    if module_spec is None or module_spec.loader is None:
        raise OSError(f"--config={spec!r}: cannot load {path!r} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def parse_assignments(text: str) -> dict[str, Any]:
    """``"a.b=1 c='x'"`` -> ``{"a.b": 1, "c": "x"}`` (values are Python literals; a bare word is a string)."""
    out = {}
    for item in text.split():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-3")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def apply(config, assignments: dict[str, Any]) -> None:
    """Sets each dotted key of ``assignments`` in ``config`` (an existing key only: a typo is an error)."""
    with config.unlocked():
        for key, value in assignments.items():
            node = config
            *path, last = key.split(".")
            for part in path:
                if part not in node:
                    raise ValueError(f"the config has no key {key!r}")
                node = node[part]
            if last not in node:
                raise ValueError(f"the config has no key {key!r}")
            node[last] = tuple(value) if isinstance(value, list) else value
