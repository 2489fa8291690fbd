"""The LLaMA family's mapping table: our parameter paths <-> Hugging Face ``LlamaForCausalLM`` tensor names.

Our modules mirror the Hugging Face module tree (``model.layers.{i}.self_attn.q_proj`` ...), so every rule maps a
path onto the same name; the only transformation is the Linear kernel layout (ours ``(d_in, d_out)``, PyTorch
``(d_out, d_in)``). The table is used by ``from_pretrained`` (through ``hf.load_into``) and by export (through
``hf.export_from``); GGUF files are first renamed into Hugging Face names (``ept_jax.checkpoints.gguf``) and then
go through this same table.
"""

from __future__ import annotations

from ept_jax.checkpoints.hf import Rule, identity, transpose
from ept_jax.models.llama.config import LlamaConfig

# Buffers older transformers versions saved with the weights: recomputed from the config, never read.
HF_IGNORE: tuple[str, ...] = (r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",)

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def linear_names(cfg: LlamaConfig | None = None) -> list[str]:
    """Short Hugging Face names of the Linears adapters can go into (``lm_head`` is never adapted)."""
    return [*ATTENTION_LINEARS, *MLP_LINEARS]


def _linear_rules(prefix: str, name: str, bias: bool) -> list[Rule]:
    rules = [Rule(f"{prefix}.{name}.kernel", f"{prefix}.{name}.weight", transpose, transpose)]
    if bias:
        rules.append(Rule(f"{prefix}.{name}.bias", f"{prefix}.{name}.bias", identity, identity))
    return rules


def hf_rules(cfg: LlamaConfig) -> tuple[Rule, ...]:
    """The mapping table for ``cfg`` (biases only where the config has them; ``lm_head`` only when untied)."""
    layer = "model.layers.{i}"
    rules = [Rule("model.embed_tokens.embedding", "model.embed_tokens.weight")]
    for name in ATTENTION_LINEARS:
        rules += _linear_rules(f"{layer}.self_attn", name, cfg.attention_bias)
    for name in MLP_LINEARS:
        rules += _linear_rules(f"{layer}.mlp", name, cfg.mlp_bias)
    rules += [
        Rule(f"{layer}.input_layernorm.weight", f"{layer}.input_layernorm.weight"),
        Rule(f"{layer}.post_attention_layernorm.weight", f"{layer}.post_attention_layernorm.weight"),
        Rule("model.norm.weight", "model.norm.weight"),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.kernel", "lm_head.weight", transpose, transpose))
    return tuple(rules)


def hf_ignore(cfg: LlamaConfig) -> tuple[str, ...]:
    """Hugging Face keys that may be present but unused for ``cfg``: :data:`HF_IGNORE`, plus ``lm_head.weight``
    when the embeddings are tied (some exporters write the tied copy; transformers ignores it then too)."""
    return HF_IGNORE + ((r"^lm_head\.weight$",) if cfg.tie_word_embeddings else ())
