"""The built-in task families, registered from one table: GLUE, the commonsense tasks, the synthetic smoke tasks.

Each family module (:mod:`~ept_jax.data.tasks.glue`, :mod:`~ept_jax.data.tasks.commonsense`,
:mod:`~ept_jax.data.tasks.synthetic`) defines its task specs and loaders and imports only the layer below
(:mod:`ept_jax.data.spec`, :mod:`ept_jax.data.loading`); the registry (:mod:`ept_jax.data.spec`) knows no family.
"""

from ept_jax.data.spec import (
    Example,
    TaskData,
    TaskSpec,
    choice_letter_parser,
    get_task,
    label_word_parser,
    normalize_text,
    parse_exact,
    parse_score,
    parse_yes_no,
    register_task,
    task_names,
)
from ept_jax.data.tasks import commonsense, glue, synthetic

FAMILIES = {"glue": glue, "commonsense": commonsense, "synthetic": synthetic}

for _family in FAMILIES.values():
    for _spec in _family.task_specs():
        register_task(_spec, overwrite=True)

__all__ = [
    "FAMILIES", "Example", "TaskData", "TaskSpec", "choice_letter_parser", "get_task", "label_word_parser",
    "normalize_text", "parse_exact", "parse_score", "parse_yes_no", "register_task", "task_names",
]
