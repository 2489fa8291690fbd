"""The T5 family's mapping table: our parameter paths <-> Hugging Face ``T5ForConditionalGeneration`` tensor
names.

Our module tree mirrors the Hugging Face one (``shared``, ``encoder.block.{i}.layer.0.SelfAttention.q``,
``decoder.block.{i}.layer.1.EncDecAttention.k``, ``decoder.block.{i}.layer.2.DenseReluDense.wi_0`` ...), so
each rule maps a path onto the same name; the transformations are the Linear kernel layout (ours ``(d_in,
d_out)``, PyTorch ``(d_out, d_in)``) and the embedding/bias tables' attribute name (``embedding`` vs
``weight``). The table serves ``from_pretrained`` (``hf.load_into``) and export (``hf.export_from``); legacy
Flax ``flax_model.msgpack`` files are renamed into these PyTorch names by ``hf.read_tensors`` first.

Tied copies: checkpoints written by transformers 4 hold ``encoder.embed_tokens.weight`` and
``decoder.embed_tokens.weight`` (and, for tied T5 v1.0, often ``lm_head.weight``) besides ``shared.weight``;
they are the same matrix and are accepted as alternatives or ignored, as transformers does.
"""

from __future__ import annotations

from ept_jax.checkpoints.hf import Rule, identity, transpose
from ept_jax.models.t5.config import T5Config, ff_linears

# transformers' ``_keys_to_ignore_on_load_unexpected`` for T5: a bias table some old exports carry although
# cross-attention never uses one.
HF_IGNORE: tuple[str, ...] = (
    r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",
)

ATTENTION_LINEARS = ("q", "k", "v", "o")
ALL_LINEARS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")


def linear_names(cfg: T5Config | None = None) -> list[str]:
    """Short Hugging Face names of the Linears adapters can go into (``lm_head`` is never adapted).

    With ``cfg`` the names that exist in that architecture (``wi`` or ``wi_0``/``wi_1``); without, every name
    any T5 variant has.
    """
    if cfg is None:
        return list(ALL_LINEARS)
    return [*ATTENTION_LINEARS, *ff_linears(cfg)]


def _linear(path: str) -> Rule:
    return Rule(f"{path}.kernel", f"{path}.weight", transpose, transpose)


def _stack_rules(cfg: T5Config, stack: str) -> list[Rule]:
    block = f"{stack}.block.{{i}}"
    attn = [("0", "SelfAttention")] + ([("1", "EncDecAttention")] if stack == "decoder" else [])
    ff_layer = str(len(attn))
    rules = []
    for layer, name in attn:
        rules += [_linear(f"{block}.layer.{layer}.{name}.{p}") for p in ATTENTION_LINEARS]
        norm = f"{block}.layer.{layer}.layer_norm.weight"
        rules.append(Rule(norm, norm))
    bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
    rules.append(Rule(f"{bias}.embedding", f"{bias}.weight", identity, identity))
    rules += [_linear(f"{block}.layer.{ff_layer}.DenseReluDense.{p}") for p in ff_linears(cfg)]
    norm = f"{block}.layer.{ff_layer}.layer_norm.weight"
    rules.append(Rule(norm, norm))
    rules.append(Rule(f"{stack}.final_layer_norm.weight", f"{stack}.final_layer_norm.weight"))
    return rules


def hf_rules(cfg: T5Config) -> tuple[Rule, ...]:
    """The mapping table for ``cfg`` (``wi`` or ``wi_0``/``wi_1`` by ``feed_forward_proj``; ``lm_head`` when
    untied).

    The shared embedding is read from the first of ``shared.weight``, ``encoder.embed_tokens.weight``,
    ``decoder.embed_tokens.weight`` that is present (all three are the same tied matrix); export writes
    ``shared.weight``.
    """
    tied_copies = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    rules = [Rule("shared.embedding", tied_copies)]
    rules += _stack_rules(cfg, "encoder")
    rules += _stack_rules(cfg, "decoder")
    if not cfg.tie_word_embeddings:
        rules.append(_linear("lm_head"))
    return tuple(rules)


def hf_ignore(cfg: T5Config) -> tuple[str, ...]:
    """Hugging Face keys that may be present but unused for ``cfg``: :data:`HF_IGNORE`, plus
    ``lm_head.weight`` when the embeddings are tied (transformers 4 exports write the tied copy and
    transformers reads it as tied)."""
    return HF_IGNORE + ((r"^lm_head\.weight$",) if cfg.tie_word_embeddings else ())
