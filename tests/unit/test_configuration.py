"""Config refusals of the evaluation and comparison options (in-process: ``configuration.validate`` and
``train.compare.method_config`` raise one ``UserError`` naming the bad value)."""

from __future__ import annotations

import pytest

from configs import smoke
from train import compare, configuration
from train.configuration import apply
from train.errors import UserError


def _config(**values):
    c = smoke.get_config()
    apply(c, values)
    return c


@pytest.mark.parametrize("values, message", [
    ({"data.prompt_format": "mc"}, "data.prompt_format='mc' is not accepted; accepted: letters, cloze"),
    ({"data.prompt_format": "cloze"}, "data.prompt_format='cloze' has templates for commonsense tasks only"),
    ({"eval.generation": False, "eval.answer_loss": False}, "leave the evaluation nothing to select"),
    ({"eval.choice_format": "lettres"}, "eval.choice_format='lettres' is not accepted"),
    ({"eval.choice_format": "cloze"},
     "eval.choice_format='cloze' scores commonsense tasks; data.source is 'synthetic'"),
])
def test_refusals_name_the_value(values, message):
    configuration.validate(_config())  # the smoke config itself passes
    with pytest.raises(UserError, match=message):
        configuration.validate(_config(**values))


def test_method_config_applies_each_methods_own_settings():
    c = _config(**{"compare.ept": "train.learning_rate=3e-2 adapter.top_k=None", "compare.lora": "train.seed=3"})
    ept, lora, base = (compare.method_config(c, m) for m in ("ept", "lora", "base"))
    assert (ept.train.learning_rate, ept.adapter.top_k, ept.adapter.kind) == (3e-2, None, "ept")
    assert (lora.train.learning_rate, lora.train.seed, lora.adapter.kind) == (c.train.learning_rate, 3, "lora")
    assert (base.adapter.kind, base.train.steps) == ("none", 0)
    assert c.train.learning_rate != 3e-2  # the given config is not changed
    # a per-method setting changes no other method's saved config in a way that blocks its rerun
    assert configuration.differences(configuration.to_dict(c), configuration.to_dict(
        _config(**{"compare.lora": "train.seed=4"}))) == []
    with pytest.raises(UserError, match=r"compare.ept='train.lr=1': the config has no key 'train.lr'"):
        compare.method_config(_config(**{"compare.ept": "train.lr=1"}), "ept")
    with pytest.raises(UserError, match="--methods: 'qlora' is not accepted"):
        compare.method_config(c, "qlora")
