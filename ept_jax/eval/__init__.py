"""Evaluation: log-likelihood multiple-choice scoring (:mod:`ept_jax.eval.multiple_choice`)."""
