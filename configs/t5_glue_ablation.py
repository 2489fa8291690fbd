"""The paper's ablations and baselines on T5-base GLUE, one name each: ``--config configs/t5_glue_ablation.py:NAME``.

Every entry is ``configs/t5_glue.py`` (the release's settings) with only the listed change, so rows of a table
differ in exactly one thing. The README's Training section maps them to the paper's ablations.

=================  =====================================================================================
name               change
=================  =====================================================================================
ept2 ept4 ...      homogeneous pyramids: eight experts of one kernel size (2, 4, 6 or 8): EPT-2/4/6/8
no_alp             ``adapter.alp=False``: no Adaptive LoRA Pruner; each expert owns its own low-rank factors
no_topk            ``adapter.top_k=None``: every task mixes all experts (dense softmax routing)
init_default       ``adapter.init='default'``: A and B get PyTorch's default Linear init
init_gaussian      ``adapter.init='gaussian'``: A and B drawn from N(0, (1/r)^2)
lora_r8 lora_r16   LoRA of rank 8 / 16 in the same Linears (alpha 32 as EPT; no routing, no contrastive loss)
moelora            MoE-LoRA: 8 LoRA experts sharing the rank-8 budget, dense per-task softmax gate
dcft               DCFT: one kernel-2 expert expanding the meta seed, no routing
more               MoRE (release mode): nested rank-prefix experts, argmax task routing fixed at first use
more_paper         MoRE (paper mode): the gate trained through a straight-through argmax
moelora_release    MOELoRA as released (mmoeloraS): r 16, 8 experts, one task table + gate for the whole model
trex               T-REX: 4 x 8 rank-one experts, per-token routing with k-means semantic vectors
=================  =====================================================================================
"""

from configs.common import base_config

ABLATIONS = (
    "ept2", "ept4", "ept6", "ept8", "no_alp", "no_topk", "init_default", "init_gaussian",
    "lora_r8", "lora_r16", "moelora", "dcft", "more", "more_paper", "moelora_release", "trex",
)


def get_config(name: str | None = None):
    if name not in ABLATIONS:
        raise ValueError(
            f"ablation {name!r} is unknown; use --config configs/t5_glue_ablation.py:NAME with NAME one of "
            f"{', '.join(ABLATIONS)}"
        )
    c = base_config()
    a = c.adapter
    if name in ("ept2", "ept4", "ept6", "ept8"):
        a.expert_kernel_sizes = (int(name[3:]),) * 8
    elif name == "no_alp":
        a.alp = False
    elif name == "no_topk":
        a.top_k = None
    elif name in ("init_default", "init_gaussian"):
        a.init = name.split("_")[1]
    elif name in ("lora_r8", "lora_r16"):
        a.kind = "lora"
        a.r = int(name.split("_r")[1])
    elif name == "moelora":
        a.kind = "moelora"
        a.n_moe_experts = 8
    elif name in ("more", "more_paper"):
        a.kind = "more"
        a.variant = "paper" if name == "more_paper" else "reference"
    elif name == "moelora_release":
        a.kind = "moelora_release"
        a.r = 16  # the release's defaults: r 16, 8 experts, alpha 32, dropout 0.1
        a.n_moe_experts = 8
    elif name == "trex":
        a.kind = "trex"
    elif name == "dcft":
        a.kind = "dcft"
        a.expert_kernel_sizes = (2,)
        a.top_k = None
    return c
