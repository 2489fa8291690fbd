"""T5-base GLUE multi-task EPT as the paper describes it (the release's other settings unchanged).

``python -m train.main --config configs/t5_glue_paper.py --workdir runs/t5_glue_paper``

Differences from ``configs/t5_glue.py``, each as the paper's text states it:

* ``adapter.variant = "paper"``: experts expand the meta seed with a ``k x k`` transposed convolution
  (a Kronecker product; every kernel size divides T5-base's 768 and 3072), Gaussian ``A``/``B`` and zero
  kernels, so the adapted model equals the base model at step 0;
* ``adapter.dim_scaling = True``: each expert's output scaled by the paper's dimension-aware ``d_t / T``;
* ``data.sampling = "uniform"``: each batch's task drawn with probability ``1 / T``;
* ``adapter.contrastive_divisor = None``: the contrastive term is the mean over the encoder's adapted Linears
  (the release divides their sum by a hard-coded 72, the mean only for 12-block T5-base with all six targets).
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.adapter.variant = "paper"
    c.adapter.dim_scaling = True
    c.data.sampling = "uniform"
    c.adapter.contrastive_divisor = None
    return c
