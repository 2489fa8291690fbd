"""The held-out answer loss (train.evaluation.heldout_loss) is the training loss on the evaluation examples."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from train import evaluation, steps
from train import state as state_lib
from train.data import build_data


def test_heldout_loss_equals_the_training_loss_of_the_same_examples():
    from configs.smoke import get_config
    from ept_jax.core import sharding
    from ept_jax.data.batching import collate_seq2seq

    config = get_config()
    config.adapter.dropout = 0.0  # the training loss without dropout is the teacher-forced held-out loss
    config.eval.max_examples = 5
    config.eval.batch_size = 4  # two batches, the second padded: padding rows must not count
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    model = state_lib.build_model(config)
    tokenizer = state_lib.load_tokenizer(config)
    data = build_data(config, tokenizer, 0)
    tx, _ = state_lib.make_optimizer(config)
    state = state_lib.create_train_state(model, tx, mesh)
    got = evaluation.heldout_loss(state, data.dev, mesh, config)
    assert set(got) == {es.name for es in data.dev}
    for es in data.dev[:2]:
        batch = collate_seq2seq([es.encoded], [(0, i) for i in range(len(es.encoded))],
                                max_source_length=int(config.data.max_source_length),
                                max_target_length=int(config.data.max_target_length))
        batch["task_ids"][:] = es.task_id
        _, parts = steps.loss_fn(state.trainable, state.frozen, state.graphdef,
                                 {k: jax.numpy.asarray(v) for k, v in batch.items()}, jax.random.PRNGKey(0),
                                 family="t5", contrastive_lambda=0.0)
        assert got[es.name] == pytest.approx(float(parts["ce"]), rel=1e-5), es.name
        assert np.isfinite(got[es.name]) and got[es.name] > 0
