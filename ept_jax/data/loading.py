"""Loading raw splits from a ``datasets.load_from_disk`` directory or a ``datasets.load_dataset`` id.

``datasets`` is imported lazily so that importing the task registry (e.g. from :mod:`ept_jax.eval.metrics`)
stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from ept_jax.data.spec import Example, TaskSpec

logger = logging.getLogger(__name__)


def _is_saved(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def _saved_children(path: str) -> list[str]:
    return sorted(
        d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and _is_saved(os.path.join(path, d))
    )


def _raise_if_saved_empty(path: str, split: str, what: str) -> None:
    # datasets cannot load a saved split with no data files (IndexError deep inside); say what it is instead.
    state = os.path.join(path, "state.json")
    if os.path.isfile(state):
        with open(state) as f:
            if json.load(f).get("_data_files") == []:
                raise ValueError(f"{what}: split {split!r} saved at {path!r} is empty (0 rows)")


def _load_from_directory(base: str, split: str, what: str):
    """Split ``split`` of the ``save_to_disk`` output under ``base``, or None when ``base`` holds none."""
    import datasets

    split_dir = os.path.join(base, split)
    if os.path.isdir(split_dir) and _is_saved(split_dir):
        _raise_if_saved_empty(split_dir, split, what)
        obj = datasets.load_from_disk(split_dir)
        if isinstance(obj, datasets.DatasetDict):
            raise ValueError(f"{what}: {split_dir!r} is a DatasetDict, expected the saved split {split!r}")
        return obj
    if os.path.isfile(os.path.join(base, "dataset_dict.json")):
        obj = datasets.load_from_disk(base)
        if split not in obj:
            raise ValueError(f"{what}: split {split!r} not found in {base!r}; available splits: {sorted(obj)}")
        return obj[split]
    children = _saved_children(base)
    if children:
        raise ValueError(f"{what}: split {split!r} not found in {base!r}; available splits: {children}")
    return None


def load_split(source: str, split: str, *, subdir: str | None = None, config: str | None = None, what: str = ""):
    """Loads split ``split`` as a ``datasets.Dataset``.

    ``source`` is either a local directory written by ``save_to_disk`` or a ``load_dataset`` id. A
    directory is searched in ``source/subdir`` (when it exists) and then in ``source``; in each, a saved
    Dataset ``<dir>/split`` or a saved DatasetDict ``<dir>`` holding ``split`` is used. For an id,
    ``datasets.load_dataset(source, config, split=split)``.

    Args:
      source: directory or dataset id.
      split: split name (``"train"``, ``"validation"``, ``"validation_matched"`` ...).
      subdir: per-task sub-directory name to try inside a directory source (e.g. the GLUE task name).
      config: the dataset configuration passed to ``load_dataset`` for an id source.
      what: a label for error messages (e.g. ``"glue/rte"``).
    """
    import datasets

    what = what or source
    if os.path.isdir(source):
        nested = os.path.join(source, subdir) if subdir else None
        bases = [nested] if nested and os.path.isdir(nested) else []
        bases.append(source)
        for base in bases:
            dataset = _load_from_directory(base, split, what)
            if dataset is not None:
                return dataset
        raise ValueError(
            f"{what}: no saved split {split!r} under {source!r} (searched {bases}); expected <dir>/{split} "
            f"written by Dataset.save_to_disk or a DatasetDict directory"
        )
    if source.startswith((".", os.path.sep, "~")):
        raise FileNotFoundError(f"{what}: dataset directory {source!r} does not exist")
    try:
        return datasets.load_dataset(source, config, split=split)
    except Exception as e:  # the hub / builder errors are many; re-raise with what we tried
        raise RuntimeError(
            f"{what}: could not load split {split!r} with datasets.load_dataset({source!r}, {config!r}): {e}"
        ) from e


def check_dataset(dataset, spec: TaskSpec, split: str, source: str) -> None:
    """Raises a clear error when ``dataset`` lacks a column ``spec`` needs or has no rows."""
    columns = list(dataset.column_names)
    missing = [c for c in spec.required_columns if c not in columns]
    if missing:
        raise ValueError(
            f"task {spec.name!r}, split {split!r} from {source!r}: missing column(s) {missing}; "
            f"found columns {columns}; required: {list(spec.required_columns)}"
        )
    if len(dataset) == 0:
        raise ValueError(f"task {spec.name!r}: split {split!r} from {source!r} is empty (0 rows)")


def format_dataset(spec: TaskSpec, dataset, indices: Sequence[int] | None = None) -> list[Example]:
    """The rows ``indices`` (default all, in order) of ``dataset`` formatted by ``spec`` as :class:`Example`."""
    if indices is not None:
        dataset = dataset.select(list(indices))
    columns = dataset.select_columns(list(spec.required_columns)).to_dict()
    n = len(dataset)
    return [spec.format({c: columns[c][i] for c in spec.required_columns}) for i in range(n)]
