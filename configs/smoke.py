"""A tiny random T5 on the synthetic multi-task data: the whole program (train, eval, checkpoints) in a minute on a CPU.

``python -m train.main --config configs/smoke.py --workdir runs/smoke``

Nothing is downloaded: the base model is a randomly initialised 2+2-layer T5 (d_model 64, ByT5's byte vocabulary
of 384) built from ``model.arch``, the tokenizer is ``ByT5Tokenizer()`` (needs no files) and the four synthetic
tasks of ``ept_jax.data.tasks.synthetic`` are generated from the seed. The adapters are the real EPT reference variant
(kernels that fit a 64-wide Linear, top-2 routing, contrastive loss); only they train, so the loss falls from the
uniform ``ln 384 = 5.95`` as the adapters steer the frozen random network.
"""

from configs.common import base_config

SMOKE_ARCH = {
    "model_type": "t5",
    "vocab_size": 384,
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


def get_config():
    c = base_config()
    c.model.name_or_path = "random-t5-smoke"
    c.model.random_init = True
    c.model.arch = dict(SMOKE_ARCH)

    c.adapter.expert_kernel_sizes = (2, 2, 4, 4)
    c.adapter.targets = ("q", "v")

    c.data.source = "synthetic"
    c.data.tasks = ("syn_copy", "syn_reverse", "syn_sort", "syn_sentiment")
    c.data.tokenizer = "byt5"
    c.data.max_source_length = 32
    c.data.max_target_length = 16

    c.train.steps = 100
    c.train.batch_size = 16
    c.train.learning_rate = 1e-2
    c.train.warmup_steps = 10
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 2

    c.eval.batch_size = 64
    c.eval.max_new_tokens = 12
    return c
