"""Adapter checkpoints with Orbax: the last N, the best, exact resumption, and no partial or silent restores.

Layout (``workdir/``)::

    checkpoints/<step>/params     adapter parameters (never the frozen base), nested by module path
    checkpoints/<step>/opt_state  the optimizer state, nested by its pytree path
    checkpoints/<step>/host       JSON: step, data-iterator state, skipped steps, best score so far, and the
                                  identity of the run (adapter config, tasks, model family)
    best/<step>/{params,host}     the best checkpoint by mean eval score (its own manager: rotation of the
                                  regular checkpoints never deletes it)
    checkpoints_corrupt/<step>    checkpoints that failed to restore, moved aside (kept for inspection)

Restoring compares, before reading a single array, the saved identity and the saved tree (every entry's path
and shape, from Orbax's metadata) with the model being trained; any difference is an error naming the entries
(never a partial restore; orbax#2972 describes how a lenient restore silently leaves entries at their init).
A checkpoint that cannot be read (truncated file, partial write) is reported, moved aside, and the previous one
is used. Orbax writes each checkpoint into a temporary directory and renames it when complete, so a process
killed mid-write leaves only a temporary directory, which is deleted on the next start.

``train.faults.FAULTS.kill_during_checkpoint = N`` (the reliability tests' seam) makes the process ``SIGKILL``
itself in the middle of writing regular checkpoint ``N``: once its host record is in Orbax's temporary directory
(the arrays are written beside it concurrently), before the checkpoint is committed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from train import faults
from train.errors import CheckpointMismatchError, DiskFullError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
IDENTITY_KEYS = ("format", "family", "tasks", "adapter")


# --------------------------------------------------------------------------------------------------- trees


def _key_str(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flat_paths(tree) -> dict[tuple[str, ...], Any]:
    """``{path: leaf}`` with string path components; the ``value`` attribute of nnx Variables is dropped."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(_key_str(k) for k in path)
        if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
            keys = keys[:-1]
        out[keys] = leaf
    return out


def to_nested(tree) -> dict:
    """``tree`` as nested dicts with string keys (the on-disk form; stable, readable by any tool)."""
    out: dict = {}
    for keys, leaf in flat_paths(tree).items():
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return out


def from_nested(like, nested: Mapping) -> Any:
    """The inverse of :func:`to_nested`: ``nested``'s leaves put into ``like``'s structure."""
    leaves = []
    for keys in flat_paths(like):
        node = nested
        for k in keys:
            node = node[k]
        leaves.append(node)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def saved_shapes(metadata) -> dict[str, tuple]:
    """``{"a/b/c": shape}`` of every array in an Orbax item's metadata."""
    tree = getattr(metadata, "tree", metadata)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(_key_str(k) for k in path)] = tuple(getattr(leaf, "shape", ()) or ())
    return out


def tree_mismatches(item: str, saved_metadata, target) -> list[str]:
    """Entries of ``target`` (a :func:`to_nested` tree) missing from, extra in, or shaped unlike the saved tree."""
    saved = saved_shapes(saved_metadata)
    wanted = {"/".join(k): tuple(v.shape) for k, v in flat_paths(target).items()}
    out = [f"{item}/{k}: missing from the checkpoint" for k in sorted(set(wanted) - set(saved))]
    out += [f"{item}/{k}: in the checkpoint but not in the model" for k in sorted(set(saved) - set(wanted))]
    out += [
        f"{item}/{k}: checkpoint shape {saved[k]}, model shape {wanted[k]}"
        for k in sorted(set(saved) & set(wanted))
        if saved[k] != wanted[k]
    ]
    return out


def _adapter_defaults() -> dict[str, Any]:
    """``AdapterConfig``'s defaults as JSON values: what a checkpoint written before a field existed meant."""
    import dataclasses
    import json

    from ept_jax.adapters.config import AdapterConfig

    return json.loads(json.dumps(dataclasses.asdict(AdapterConfig())))


def identity_mismatches(saved: Mapping, expected: Mapping) -> list[str]:
    """Identity fields (adapter config, tasks, family, format) that differ between a checkpoint and the run.

    An adapter option absent from the checkpoint (written before the option existed) counts as its default.
    """
    out = []
    for key in IDENTITY_KEYS:
        a, b = saved.get(key), expected.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            if key == "adapter":
                a = {**{k: v for k, v in _adapter_defaults().items() if k not in a and k in b}, **a}
            out += [
                f"{key}.{k}: checkpoint {a.get(k)!r}, run {b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            out.append(f"{key}: checkpoint {a!r}, run {b!r}")
    return out


def _abstract(tree) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


# --------------------------------------------------------------------------------------------------- manager


def _faulty_json_handler(kill_step: int | None, full_step: int | None) -> ocp.JsonCheckpointHandler:
    """The ``host`` item's handler under the faults of :mod:`train.faults`: at ``full_step`` the write of the host
    record fails with ``OSError(ENOSPC)``, as on a full disk; at ``kill_step``, once it has written the host record
    into Orbax's temporary directory (the arrays are then being written beside it, and the checkpoint is not
    committed before every item is done), it SIGKILLs the process. The write of the instance is wrapped rather than
    the class subclassed: Orbax finds a handler's args by its exact type."""
    handler = ocp.JsonCheckpointHandler()
    real_write = handler._save_fn  # the background write of the JSON file (Orbax 0.12)

    async def write_then_kill(record, directory):
        if int(record.get("step", -1)) == full_step:
            logger.warning("fault disk_full_at_checkpoint=%d: the write of %s fails", full_step, directory)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        await real_write(record, directory)
        if int(record.get("step", -1)) == kill_step:
            logger.warning("fault kill_during_checkpoint=%d: killing the process while it writes %s", kill_step,
                           directory)
            os.kill(os.getpid(), signal.SIGKILL)

    handler._save_fn = write_then_kill
    return handler


def _nbytes(tree) -> int:
    """Bytes of the arrays of ``tree`` (what a checkpoint of it writes, before compression)."""
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def _disk_full(error: BaseException | None, seen=None) -> OSError | None:
    """The ENOSPC / EDQUOT ``OSError`` in ``error``'s causes, contexts or exception group, if any."""
    seen = seen if seen is not None else set()
    if error is None or id(error) in seen:
        return None
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return error
    for inner in (*getattr(error, "exceptions", ()), error.__cause__, error.__context__):
        found = _disk_full(inner, seen)
        if found is not None:
            return found
    return None


class _DiskFullLogFilter(logging.Filter):
    """Drops Orbax's own error records (with tracebacks, from its background threads) of a write that failed on a
    full disk: :class:`~train.errors.DiskFullError` reports it as one line. After that report, also the record of
    Orbax's metadata thread finding its executor shut down (the same failed save, as the program exits)."""

    reported = False

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if _disk_full(error) is not None or "No space left on device" in record.getMessage():
            return False
        after_shutdown = isinstance(error, RuntimeError) and "after shutdown" in str(error)
        return not (self.reported and (after_shutdown or "after shutdown" in record.getMessage()))


_DISK_FULL_LOGS = _DiskFullLogFilter()


def orbax_manager(directory: Path, items: tuple[str, ...], *, keep: int | None = None, read_only: bool = False,
                  kill_step: int | None = None, full_step: int | None = None) -> ocp.CheckpointManager:
    """The one way this project opens an Orbax checkpoint directory: the ``host`` item JSON, the others arrays.

    Writable (the trainer): keeps the last ``keep``, creates the directory, deletes temporary directories of
    interrupted writes. ``read_only`` (export, inspection): creates and cleans nothing, so reading while a run is
    still training cannot disturb a checkpoint being written. Handlers are registered up front, so a fresh manager
    can read the metadata of existing checkpoints.
    """
    # The barriers of a multi-process save are named after the manager's directory: the regular and the best
    # manager both save the final step, concurrently, and with Orbax's default (unprefixed) names their commit
    # threads met at the same barrier and the coordination service aborted the job.
    processes = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=directory.name)
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, multiprocessing_options=processes)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               multiprocessing_options=processes)
    faulty = kill_step is not None or full_step is not None
    json_handler = _faulty_json_handler(kill_step, full_step) if faulty else ocp.JsonCheckpointHandler()
    handlers = {item: json_handler if item == "host" else ocp.StandardCheckpointHandler() for item in items}
    return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=handlers)


class Checkpointer:
    """The regular and the best checkpoint managers of one workdir (module docstring)."""

    def __init__(self, workdir: str | Path, keep: int):
        self.workdir = Path(workdir)
        self.dir = self.workdir / "checkpoints"
        self.best_dir = self.workdir / "best"
        self.corrupt_dir = self.workdir / "checkpoints_corrupt"
        self.keep = keep
        self._mgr = orbax_manager(self.dir, ("params", "opt_state", "host"), keep=keep,
                                  kill_step=faults.FAULTS.kill_during_checkpoint,
                                  full_step=faults.FAULTS.disk_full_at_checkpoint)
        self._writing: tuple[int, int] | None = None  # (step, bytes) of the regular checkpoint last saved
        for name in ("absl", "orbax"):  # Orbax logs through absl's logger
            if _DISK_FULL_LOGS not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_DISK_FULL_LOGS)
        self._best = orbax_manager(self.best_dir, ("params", "host"), keep=1)

    # -- saving --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _disk_full_is_one_line(self):
        """Turns a full disk met while a checkpoint is written (Orbax reports an asynchronous write's failure at
        the next save or wait) into :class:`DiskFullError`: the checkpoint, its path, the bytes it needs, the free
        bytes and the intact previous checkpoint."""
        try:
            yield
        except BaseException as e:
            full = _disk_full(e)
            if full is None or self._writing is None:
                raise
            step, needed = self._writing
            free = shutil.disk_usage(self.dir).free if self.dir.exists() else 0
            done = [s for s in self.steps() if s < step]
            previous = (f"the previous checkpoint ({self.dir / str(done[-1])}) is intact" if done
                        else "no earlier checkpoint exists")
            _DISK_FULL_LOGS.reported = True
            raise DiskFullError(
                f"no space left on the device writing checkpoint {step} to {self.dir / str(step)} "
                f"({full.strerror}): it needs about {needed:,} bytes, {free:,} are free; {previous}. Free space "
                "and run the same command: it resumes from the last checkpoint") from e

    def save(self, step: int, trainable, opt_state, host: Mapping[str, Any]) -> None:
        """Saves adapter parameters, optimizer state and ``host`` (JSON) as checkpoint ``step`` (asynchronously:
        the arrays are copied before this returns, so they may be donated right after). A full disk raises
        :class:`~train.errors.DiskFullError` (here, for the previous save, or from :meth:`wait`)."""
        with self._disk_full_is_one_line():
            self._replace(self._mgr, step)
            self._mgr.wait_until_finished()  # the previous save's failure belongs to the previous step
        self._writing = (step, _nbytes(trainable) + _nbytes(opt_state))
        with self._disk_full_is_one_line():
            self._mgr.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(to_nested(trainable)),
                opt_state=ocp.args.StandardSave(to_nested(opt_state)),
                host=ocp.args.JsonSave(dict(host)),
            ), force=True)

    def save_best(self, step: int, trainable, host: Mapping[str, Any]) -> None:
        """Replaces the best checkpoint with ``trainable`` at ``step`` (``host`` holds its scores)."""
        self._replace(self._best, step)
        self._best.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(to_nested(trainable)), host=ocp.args.JsonSave(dict(host)),
        ), force=True)

    @staticmethod
    def _replace(mgr: ocp.CheckpointManager, step: int) -> None:
        # A resumed run replays steps an interrupted one may already have saved (a best checkpoint written
        # just before a kill); the replay is identical, so the old copy is dropped and written again.
        if step in mgr.all_steps():
            mgr.wait_until_finished()
            mgr.delete(step)

    def wait(self) -> None:
        """Blocks until every pending save is on disk (a full disk: :class:`~train.errors.DiskFullError`)."""
        with self._disk_full_is_one_line():
            self._mgr.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()
        self._best.close()

    # -- restoring -----------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def _quarantine(self, step: int, error: BaseException) -> None:
        src = self.dir / str(step)
        logger.warning("checkpoint %s cannot be read (%s: %s); moving it to %s and using the previous one",
                       src, type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "",
                       self.corrupt_dir)
        if jax.process_index() == 0 and src.exists():
            self.corrupt_dir.mkdir(parents=True, exist_ok=True)
            dst = self.corrupt_dir / str(step)
            n = 1
            while dst.exists():
                dst = self.corrupt_dir / f"{step}.{n}"
                n += 1
            shutil.move(str(src), str(dst))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self._mgr.reload()

    def _check(self, mgr: ocp.CheckpointManager, step: int, host: Mapping, expected: Mapping,
               targets: Mapping[str, Any], where: Path) -> None:
        problems = identity_mismatches(host, expected)
        metadata = mgr.item_metadata(step)
        for item, target in targets.items():
            problems += tree_mismatches(item, metadata[item], target)
        if problems:
            shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
            raise CheckpointMismatchError(
                f"checkpoint {where / str(step)} was written for another model or adapter ({shown}); nothing was "
                "restored. Use the run's own config, or another --workdir"
            )

    def restore_latest(self, trainable, opt_state, expected: Mapping) -> tuple[Any, Any, dict] | None:
        """The latest readable checkpoint as ``(trainable, opt_state, host)`` shaped like the given states
        (their shardings kept), or None when there is none.

        Raises:
          CheckpointMismatchError: the checkpoint belongs to another model / adapter (entries named).
        """
        targets = {"params": to_nested(_abstract(trainable)), "opt_state": to_nested(_abstract(opt_state))}
        for step in reversed(self.steps()):
            try:
                host = self._mgr.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))["host"]
                self._check(self._mgr, step, host, expected, targets, self.dir)
                restored = self._mgr.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(targets["params"]),
                    opt_state=ocp.args.StandardRestore(targets["opt_state"]),
                ))
            except CheckpointMismatchError:
                raise
            except Exception as e:  # any read failure: truncated or partial files, bad JSON
                self._quarantine(step, e)
                continue
            return from_nested(trainable, restored["params"]), from_nested(opt_state, restored["opt_state"]), host
        return None

    def restore_best(self, trainable, expected: Mapping) -> tuple[Any, dict] | None:
        """``(trainable, host)`` of the best checkpoint, or None when none was saved."""
        step = self._best.latest_step()
        if step is None:
            return None
        target = to_nested(_abstract(trainable))
        host = self._best.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))["host"]
        self._check(self._best, step, host, expected, {"params": target}, self.best_dir)
        restored = self._best.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        return from_nested(trainable, restored["params"]), host

    def best_host(self) -> dict | None:
        """The host record (score, step, metrics) of the best checkpoint, or None."""
        step = self._best.latest_step()
        if step is None:
            return None
        return self._best.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))["host"]
