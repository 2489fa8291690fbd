"""T5-base, multi-task EPT on the eight GLUE tasks: the EPT release's settings.

``python -m train.main --config configs/t5_glue.py --workdir runs/t5_glue``

EPT "reference" variant (what the released code computes), r 8, alpha 32, kernels [2,2,4,4,6,6,8,8], top-2
routing, adapters in q, k, v, o, wi, wo, dropout 0.1, contrastive loss lambda 0.1 / tau 0.05 on the encoder
(the sum of its 72 per-module terms / 72, as the release), trained as the release trains (torch's clipping, AdamW
that does not step expert kernels no route chose; README, "Reference training");
AdamW lr 3e-4, weight decay 0.01, 500 warm-up steps then linear decay, batch 128, max length 128, 74,148 steps
(ten passes over the task mixture at batch 128, as the release ran), evaluation every 1,000 steps keeping the
best checkpoint by the mean GLUE score; the "reference" evaluation protocol. A local model or dataset copy:
``--config.model.name_or_path=/path/to/t5-base --config.data.path=/path/to/glue``.
"""

from configs.common import base_config


def get_config():
    return base_config()
