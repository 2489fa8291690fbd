"""``python -m train.main --config configs/NAME.py --workdir DIR [--config.a.b=value ...]``: train or resume a run.

Flags:
  --config                an ml_collections config file (``get_config()``; ``file.py:arg`` passes ``arg``); every
                          ``--config.a.b=value`` override must name an existing key (the config is locked).
  --workdir               the run's directory; the same command again resumes the run from its last checkpoint.
  --allow_config_change   continue a run whose saved config differs from the command's.
  --verbose               full tracebacks on errors.

A problem with the command, the config or the input files is printed as one line on stderr (no traceback
unless ``--verbose``) and the program exits with status 2.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from train.configuration import load_config_file
from train.errors import EXIT_PEER_LOST, EXIT_USER_ERROR, USER_ERRORS, one_line

CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "directory of the run (created; reused to resume)")
VERBOSE = flags.DEFINE_bool("verbose", False, "print full tracebacks on errors")
ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                  "continue a run in --workdir although its saved config differs")
flags.mark_flag_as_required("config")
flags.mark_flag_as_required("workdir")



def fail(message: str) -> None:
    print(f"error: {message} (run with --verbose for the traceback)", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)




def peer_lost(error: BaseException) -> None:
    """A collective of a multi-process job failed (another process died or was killed): one line, then exit at once
    with :data:`EXIT_PEER_LOST`. ``os._exit`` skips the distributed runtime's shutdown, which would wait for the
    dead process's heartbeat to time out (about a minute) and then abort with a stack dump; the committed
    checkpoints are on disk, and the same launch command resumes from the last one."""
    import os

    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    print(f"error: a collective of this multi-process job failed, another process is gone ({first}); the same "
          "launch command resumes from the last checkpoint", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _explain_flag_error(argv: list[str], error: BaseException) -> str:
    """One line naming the bad flag: an unknown ``--config.`` key (with the keys accepted there) or the parse error."""
    spec = _flag_value(argv, "config")
    if spec:
        try:
            config = load_config_file(spec)
        except Exception as e:  # the config file itself is broken: that is the message
            return f"--config={spec!r} cannot be loaded: {one_line(e)}"
        for a in argv:
            if not a.startswith("--config."):
                continue
            key = a[len("--config."):].split("=", 1)[0]
            node, walked = config, []
            for part in key.split("."):
                children = list(node.keys()) if hasattr(node, "keys") else []
                if part not in children:
                    where = f"under {'.'.join(walked)!r}" if walked else "at the top level"
                    return (f"unknown config key {key!r} in {a!r}; keys accepted {where}: "
                            f"{', '.join(sorted(map(str, children))) or '(none: it is a value)'}")
                node, walked = node[part], walked + [part]
    return one_line(error)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line errors (see the module docstring)."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, *USER_ERRORS, AttributeError) as e:
        if "--verbose" in argv or "--verbose=true" in argv:
            raise
        fail(_explain_flag_error(argv, e))
    raise AssertionError("unreachable")


NOISY_LOGGERS = ("absl", "orbax", "jax._src", "etils", "datasets")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected positional arguments {argv[1:]}; all options are --flags")
    logging.getLogger().setLevel(logging.INFO)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # after flag parsing: importing JAX is slow, errors above should be fast
    from train import compile_cache, gc_policy, loop

    compile_cache.enable()
    gc_policy.settle()  # the imported libraries: out of the garbage collector's full collections

    import jax

    try:
        summary = loop.run(CONFIG.value, WORKDIR.value, allow_config_change=ALLOW_CHANGE.value)
    except USER_ERRORS as e:
        if VERBOSE.value:
            raise
        fail(one_line(e))
        return
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1 or VERBOSE.value:
            raise
        peer_lost(e)
    if summary.get("stopped"):
        print(f"stopped after the checkpoint at step {summary['step']}; run the same command to continue")
        return
    line = f"done: step {summary['step']}"
    if summary.get("best_dev_mean") is not None:
        what = "dev mean" if summary.get("selection", "eval_mean") == "eval_mean" else "held-out loss"
        value = summary["best_dev_mean"] if what == "dev mean" else -summary["best_dev_mean"]
        line += f", best {what} {value:.3f} at step {summary['best_step']}"
    if summary.get("test_mean") is not None:
        line += f", test mean {summary['test_mean']:.2f}"
    if summary.get("test_loss_mean") is not None:
        line += f", test answer loss {summary['test_loss_mean']:.3f}"
    if summary.get("choices") is not None:
        line += f", acc_norm ({summary['choices']['format']}) {summary['choices']['mean']['acc_norm']:.2f}"
    print(line + f"; see {WORKDIR.value}")


def cli(argv: Sequence[str]) -> int:
    """``python -m train.main *argv`` in this process: its exit status returned instead of exiting the process.
    What the command prints goes to ``sys.stdout`` / ``sys.stderr`` as they are at the call, its log records too
    (to ``sys.stderr``, as absl's handler sends them), so a caller that redirects them reads what a user of the
    command would; the flags are parsed afresh at every call and the logging levels restored afterwards. An
    unexpected exception propagates (the command would print its traceback and exit 1). (The tests of the
    command's refusals use it: a Python process for each would spend seconds importing.)"""
    argv = ["train.main", *map(str, argv)]
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", *NOISY_LOGGERS)}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname).1s %(name)s: %(message)s"))
    saved_argv, sys.argv = sys.argv, argv  # ml_collections reads the --config.* overrides from sys.argv
    flags.FLAGS.unparse_flags()
    root.addHandler(handler)
    try:
        main(parse_flags(argv))
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # as the interpreter does with a message
        return 1
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        sys.argv = saved_argv
        for name in [n for n in flags.FLAGS if n.startswith(f"{CONFIG.name}.")]:
            delattr(flags.FLAGS, name)  # the overrides' flags, which parsing --config defined: the next call's own
        flags.FLAGS.unparse_flags()
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
