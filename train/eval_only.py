"""``train.steps=0``: evaluate the model as configured, without training, and stop.

``python -m train.main --config CONFIG --workdir DIR --config.train.steps=0 --config.adapter.kind=none`` scores
the base model (no adapters) on the test sets with exactly the evaluation code of a training run (prompts,
truncation, greedy generation, answer parsing, metrics), and writes ``DIR/results.json`` (``steps`` 0,
``test``, ``test_mean``, ``eval_seconds``; ``test_loss`` with ``eval.answer_loss``; ``choices`` with
``eval.choice_format``) and ``DIR/config.json``. With adapters configured it scores their initialisation (the
EPT "reference" variant is not zero at step 0, so that is not the base model). Nothing is trained, no optimizer
state is built and no checkpoint is written.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from ept_jax.core import sharding as sharding_lib
from ept_jax.core.params import TRAINABLE
from train import configuration, evaluation, rundir
from train import state as state_lib
from train.data import build_data

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


def untrained_state(model: nnx.Module, mesh) -> state_lib.TrainState:
    """A :class:`~train.state.TrainState` of ``model`` for evaluation only: no optimizer state (``None``).

    ``trainable`` holds the adapter parameters (empty without adapters); both states are placed on ``mesh`` by
    their logical axes, as in training.
    """
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    tr_sh, fr_sh = state_lib.sharding_tree(trainable, mesh), state_lib.sharding_tree(frozen, mesh)
    trainable, frozen = jax.device_put(trainable, tr_sh), jax.device_put(frozen, fr_sh)
    return state_lib.TrainState(graphdef, trainable, frozen, None, (tr_sh, None, fr_sh))


def run(config, workdir: str | Path, *, allow_config_change: bool = False, devices=None) -> dict[str, Any]:
    """Evaluates ``config``'s untrained model on its test sets (module docstring); returns the summary.

    Returns:
      ``{"step": 0, "stopped": False, "steps": 0, "eval_only": True, "test": {set: {metric: value}},
      "test_mean": float, "eval_seconds": float}``.
    Raises:
      UserError / ValueError / ...: as :func:`train.loop.run` (bad config, input files, workdir of another run).
    """
    workdir = Path(workdir)
    sharding_lib.maybe_initialize_distributed()
    is_main = rundir.is_writer()
    configuration.validate(config)
    configuration.check_same_across_processes(config)
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    configuration.reconcile(workdir, config, allow_change=allow_config_change, write=False)
    mesh_cfg = config.mesh.to_dict() if hasattr(config.mesh, "to_dict") else dict(config.mesh)
    mesh = sharding_lib.make_mesh(mesh_cfg, devices)

    t0 = time.time()
    model = state_lib.build_model(config)
    tokenizer = state_lib.load_tokenizer(config)
    state_lib.check_tokenizer(tokenizer, model)
    data = build_data(config, tokenizer, getattr(model.cfg, "decoder_start_token_id", 0), workdir=workdir)
    state = untrained_state(model, mesh)
    del model
    logger.info("eval only (train.steps=0): model and data ready in %.1fs", time.time() - t0)
    if is_main:
        configuration.reconcile(workdir, config, allow_change=True, write=True)

    t1 = time.time()
    out: dict[str, Any] = {"steps": 0, "eval_only": True,
                           "eval_examples": {es.name: len(es.encoded) for es in data.test}}
    if config.eval.get("generation", True):
        results = evaluation.evaluate(state, data.test, tokenizer, mesh, config)
        out["test"] = results
        out["test_mean"] = evaluation.mean_score(results, data.test, str(config.eval.average))
    if config.eval.get("answer_loss", True):
        out["test_loss"] = evaluation.heldout_loss(state, data.test, mesh, config)
        out["test_loss_mean"] = sum(out["test_loss"].values()) / len(out["test_loss"])
    out["eval_seconds"] = time.time() - t1
    if config.eval.get("choice_format") is not None:
        from train import score

        out["choices"] = score.choice_scores(config, state.model(), tokenizer)
    logger.info("eval only: %s in %.1fs", ", ".join(f"{k} {out[k]:.3f}" for k in ("test_mean", "test_loss_mean")
                                                   if k in out), time.time() - t1)
    if is_main:
        rundir.write_json_atomic(workdir / RESULTS_FILE, out)
    return {"step": 0, "stopped": False, **out}
