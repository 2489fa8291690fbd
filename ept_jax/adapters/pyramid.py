"""Expert Pyramid Tuning (EPT) math as pure ``jnp`` functions: the one place the EPT formula lives.

An adapted Linear maps ``d_in -> d_out``. EPT keeps a shared low-rank *meta seed* ``(A, B)`` (PyTorch layout:
``A (r, seed_in)``, ``B (seed_out, r)``), a list of experts with kernel sizes ``k_e``, and per task a routing
over the experts. Expert ``e`` reads the *Adaptive LoRA Pruner (ALP)* slice of the seed,

    A_e = A[:, :m],  B_e = B[:h],   m = d_in // k_e,  h = d_out // k_e,

and expands ``Z_e = B_e @ A_e`` (``h x m``) back to ``d_out x d_in`` with a learnable kernel ``K_e``. Two
expansions exist (``Pyramid.expansion``):

* ``"reference"`` (the released PyTorch implementation). ``K_e`` is ``(h, k)``; the expansion is a depthwise
  transposed convolution over the ``h`` rows with a ``k x 1`` kernel and stride ``k``:
  ``dW_e[c*k + j, i] = K_e[c, j] * Z_e[c, i]`` for ``c < h, j < k, i < m``, zero elsewhere (the zero padding
  covers ``h*k < d_out`` and ``m < d_in``). Each expert is exactly rank ``r``.
* ``"paper"`` (as the paper describes it). ``K_e`` is ``(k, k)``; ``dW_e = ConvTranspose2d(Z_e, K_e, stride k)``
  which is the Kronecker product ``Z_e (x) K_e`` (requires ``k | d_in`` and ``k | d_out``). Each expert has rank
  ``r * k`` (at most).

A task ``t`` mixes its experts with dense weights ``w[t]`` (:func:`route`: zeros off the top-k), so the task's
delta is ``dW[t] = sum_e w[t, e] * dW_e`` (the adapter folds its ``alpha / r`` scale and any per-expert
scaling into ``w``). Every expansion is linear in ``K_e``, so experts that share a kernel size (and, with ALP,
their seed slice) are combined *before* expanding, through the effective kernel
``Keff_k = sum_{e: k_e = k} w[e] K_e``. The fast training paths (:mod:`ept_jax.adapters.pyramid_fast`) never
materialise ``dW`` and cost about what a LoRA of the same rank costs (reference) or ``r * (d_in + d_out)`` per
distinct kernel size (paper).

Paths provided for both expansions, all exact to rounding (see ``tests/unit/test_pyramid.py``):

* definition with ``jax.lax.conv_transpose`` (:func:`expert_delta` with ``method="conv"``);
* explicit materialised deltas (:func:`expert_delta`, :func:`mixture_delta`, :func:`forward_materialized`);
* the fast path (:func:`ept_jax.adapters.pyramid_fast.forward_fast`, in its own module);
* exact low-rank factors for PEFT export (:func:`lora_factors`).

Also here: task routing (:func:`route`), the per-expert ``d_t / T`` scaling option (:func:`expert_scales`) and
the contrastive task-embedding loss (:func:`contrastive_loss`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

EXPANSIONS = ("reference", "paper")


# ----------------------------------------------------------------------------------------------------------
# Geometry: kernel sizes, ALP slicing, groups of experts that can be combined before expansion.
# ----------------------------------------------------------------------------------------------------------


def alp_dims(k: int, d_in: int, d_out: int) -> tuple[int, int]:
    """The ALP slice sizes ``(m, h) = (d_in // k, d_out // k)`` an expert with kernel size ``k`` reads."""
    return d_in // k, d_out // k


def alp_slice(A: Array, B: Array, k: int, d_in: int, d_out: int) -> tuple[Array, Array]:
    """Adaptive LoRA Pruner: the meta-seed slice of an expert with kernel size ``k``.

    Args:
      A: ``(r, seed_in)`` meta-seed down projection (``seed_in >= d_in // k``).
      B: ``(seed_out, r)`` meta-seed up projection (``seed_out >= d_out // k``).
    Returns:
      ``(A[:, :m] (r, m), B[:h] (h, r))`` with ``m = d_in // k``, ``h = d_out // k``.
    """
    m, h = alp_dims(k, d_in, d_out)
    if A.shape[1] < m or B.shape[0] < h:
        raise ValueError(
            f"meta seed A {A.shape} / B {B.shape} is too small for kernel size {k} on {d_in}->{d_out}: "
            f"needs A with >= {m} columns and B with >= {h} rows"
        )
    return A[:, :m], B[:h]


@dataclasses.dataclass(frozen=True)
class Pyramid:
    """Static description of one adapted Linear's expert pyramid (hashable: safe as a jit static argument).

    Attributes:
      expansion: ``"reference"`` or ``"paper"`` (see the module docstring).
      d_in, d_out: the Linear's dimensions.
      kernel_sizes: one kernel size per expert.
      alp: True: experts slice one shared meta seed ``A (r, seed_in)``, ``B (seed_out, r)``. False (ablation):
        expert ``e`` owns independent factors ``A_e (r, d_in // k_e)``, ``B_e (d_out // k_e, r)`` of exactly the
        sizes its slice would have; parameters ``A``/``B`` are then sequences with one entry per expert.
    """

    expansion: str
    d_in: int
    d_out: int
    kernel_sizes: tuple[int, ...]
    alp: bool = True

    def __post_init__(self):
        if self.expansion not in EXPANSIONS:
            raise ValueError(f"expansion={self.expansion!r}: accepted values are {EXPANSIONS}")
        if not self.kernel_sizes:
            raise ValueError("kernel_sizes is empty: an expert pyramid needs at least one expert")
        for k in self.kernel_sizes:
            if k < 1 or k > min(self.d_in, self.d_out):
                lim = min(self.d_in, self.d_out)
                raise ValueError(f"kernel size {k} is out of range for {self.d_in}->{self.d_out}: accepted 1..{lim}")
            if self.expansion == "reference" and self.alp and k < 2:
                raise ValueError(
                    f"kernel size {k}: the reference expansion slices a meta seed of d_in // 2 columns, so "
                    "every kernel size must be >= 2"
                )
            if self.expansion == "paper" and (self.d_in % k or self.d_out % k):
                raise ValueError(
                    f"kernel size {k} does not divide d_in={self.d_in} and d_out={self.d_out}: the paper "
                    "expansion (Kronecker product) needs k | d_in and k | d_out"
                )

    @property
    def n_experts(self) -> int:
        return len(self.kernel_sizes)

    @property
    def seed_shape(self) -> tuple[int, int]:
        """``(seed_in, seed_out)``: columns of ``A`` and rows of ``B`` of the shared meta seed (ALP on).

        The release always stores ``d_in // 2`` / ``d_out // 2`` (its smallest supported kernel is 2); the
        paper expansion stores exactly what the smallest kernel reads.
        """
        if self.expansion == "reference":
            return self.d_in // 2, self.d_out // 2
        k_min = min(self.kernel_sizes)
        return self.d_in // k_min, self.d_out // k_min

    def kernel_shape(self, e: int) -> tuple[int, int]:
        """Shape of expert ``e``'s kernel: ``(d_out // k, k)`` (reference) or ``(k, k)`` (paper)."""
        k = self.kernel_sizes[e]
        return (self.d_out // k, k) if self.expansion == "reference" else (k, k)

    @property
    def groups(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """``((k, expert_ids), ...)``: experts whose expansions can be summed through one effective kernel.

        With ALP, experts with equal kernel sizes read the same seed slice, so they form one group per
        distinct ``k``; without ALP each expert has its own factors and its own group.
        """
        if not self.alp:
            return tuple((k, (e,)) for e, k in enumerate(self.kernel_sizes))
        out: dict[int, list[int]] = {}
        for e, k in enumerate(self.kernel_sizes):
            out.setdefault(k, []).append(e)
        return tuple((k, tuple(ids)) for k, ids in out.items())


def expert_seed(p: Pyramid, A, B, e: int) -> tuple[Array, Array]:
    """``(A_e (r, m), B_e (h, r))`` of expert ``e``: its ALP slice, or its own factors when ALP is off."""
    if p.alp:
        return alp_slice(A, B, p.kernel_sizes[e], p.d_in, p.d_out)
    return A[e], B[e]


def group_seed(p: Pyramid, A, B, members: tuple[int, ...]) -> tuple[Array, Array]:
    return expert_seed(p, A, B, members[0])


def expert_scales(p: Pyramid) -> tuple[float, ...]:
    """The paper's "dimension-aware ``d_t / T`` scaling", one factor per expert.

    The release does not implement it and the paper leaves ``d_t`` and ``T`` implicit; we read ``d_t`` as the
    width of the meta-seed slice expert ``t`` reads (``d_in // k_t``) and ``T`` as the width of the whole meta
    seed (``seed_in``). So the finest expert (which reads the whole seed) keeps scale 1 and a coarser expert,
    which reconstructs ``d_out x d_in`` from a ``k`` times narrower slice, is damped in proportion to the
    fraction of the shared subspace it uses (``k_min / k`` when the dimensions divide). This keeps ``alpha``
    meaning the scale of the finest expert, so enabling the option does not require retuning ``alpha``.

    Returns:
      ``n_experts`` Python floats.
    """
    seed_in = p.seed_shape[0] if p.alp else max(p.d_in // k for k in p.kernel_sizes)
    return tuple((p.d_in // k) / seed_in for k in p.kernel_sizes)


# ----------------------------------------------------------------------------------------------------------
# Routing.
# ----------------------------------------------------------------------------------------------------------


def route(gate_w: Array, gate_b: Array | None, task_embedding: Array, top_k: int | None) -> tuple[Array, Array]:
    """Per-task routing: dense mixing weights over experts for every task-embedding row.

    ``p = softmax(E @ gate_w.T + gate_b)``; with ``top_k``: ``(v, idx) = top_k(p)`` and the mixing weights are
    a second softmax ``softmax(v)`` over the selected probabilities (as the release does); without top-k
    (``None``, ablation) every expert is mixed with ``p``.

    Args:
      gate_w: ``(n_experts, d)`` gate weight (PyTorch layout).
      gate_b: ``(n_experts,)`` gate bias or None.
      task_embedding: ``(n_rows, d)`` task embedding rows.
      top_k: number of experts per task, or None for a dense softmax mixture.
    Returns:
      ``weights (n_rows, n_experts)`` (zeros for unselected experts; rows sum to 1) and
      ``idx (n_rows, top_k)`` the selected experts in descending probability (``(n_rows, n_experts)`` of
      ``arange`` when ``top_k`` is None).
    """
    logits = task_embedding @ gate_w.T
    if gate_b is not None:
        logits = logits + gate_b
    probs = jax.nn.softmax(logits, axis=-1)
    n_rows, n_experts = probs.shape
    if top_k is None:
        return probs, jnp.broadcast_to(jnp.arange(n_experts), (n_rows, n_experts))
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be in 1..{n_experts} (the number of experts) or None")
    _, idx = lax.top_k(lax.stop_gradient(probs), top_k)
    # The selected probabilities and their scatter back to every expert as products with the one-hot selection
    # (exact: the other terms are zeros): their gradients are products too, where top_k's own gradient and a
    # gather's are scatters, which XLA compiles as loops (one per adapted Linear).
    onehot = jax.nn.one_hot(idx, n_experts, dtype=probs.dtype)  # (n_rows, top_k, n_experts)
    values = jnp.einsum("rke,re->rk", onehot, probs)
    mix = jax.nn.softmax(values, axis=-1)
    dense = jnp.einsum("rk,rke->re", mix, onehot)
    return dense, idx


# ----------------------------------------------------------------------------------------------------------
# Per-expert expansions: explicit, conv_transpose definitions, exact factors.
# ----------------------------------------------------------------------------------------------------------


def _pad_to(a: Array, shape: tuple[int, ...]) -> Array:
    """Zero-pads the trailing dims of ``a`` up to ``shape`` (the release's padding when ``k`` does not divide)."""
    tail = a.shape[a.ndim - len(shape) :]
    widths = [(0, 0)] * (a.ndim - len(shape)) + [(0, s - d) for d, s in zip(tail, shape, strict=True)]
    if all(w == (0, 0) for w in widths):
        return a
    # lax.pad itself: jnp.pad traces a nested jit (and a cast of the fill value) into every caller's program
    return lax.pad(a, jnp.zeros((), a.dtype), [(lo, hi, 0) for lo, hi in widths])


def reference_expand(z: Array, kernel: Array, d_out: int) -> Array:
    """The release's depthwise ``k x 1`` transposed convolution with stride ``k``, on activations.

    ``y[..., c*k + j] = kernel[..., c, j] * z[..., c]`` for ``c < h``, ``j < k``; zeros up to ``d_out``.

    Args:
      z: ``(..., h)``.
      kernel: broadcastable to ``(..., h, k)`` (a per-example effective kernel broadcasts over tokens).
      d_out: output width (``>= h * k``).
    Returns:
      ``(..., d_out)``.
    """
    y = z[..., :, None] * kernel
    h, k = y.shape[-2:]
    return _pad_to(y.reshape(*y.shape[:-2], h * k), (d_out,))


def _depthwise_transpose_1xk(lhs: Array, kernel: Array) -> Array:
    """Depthwise transposed conv, stride = kernel length, via ``lax.conv_transpose``.

    ``lhs (h, N, W)``: channel ``c`` is a ``(N, 1 x W)`` image; ``kernel (h, k)``: channel ``c``'s ``k x 1``
    kernel. Returns ``(h, N, k, W)`` with ``out[c, n, j, i] = kernel[c, j] * lhs[c, n, i]``.
    """
    k = kernel.shape[-1]

    def one_channel(img: Array, ker: Array) -> Array:
        # NHWC image (N, 1, W, 1), HWIO kernel (k, 1, 1, 1); transpose_kernel=True gives PyTorch's
        # ConvTranspose semantics (no spatial flip).
        out = lax.conv_transpose(
            img[:, None, :, None],
            ker[:, None, None, None],
            strides=(k, 1),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            transpose_kernel=True,
        )
        return out[..., 0]

    # vmap over channels turns into a grouped (depthwise) convolution: one kernel per channel.
    return jax.vmap(one_channel)(lhs, kernel)


def reference_expand_conv(z: Array, kernel: Array, d_out: int) -> Array:
    """:func:`reference_expand` written as the release writes it: a depthwise ``lax.conv_transpose``.

    Args:
      z: ``(N, h)``; kernel: ``(h, k)``. Returns ``(N, d_out)``.
    """
    out = _depthwise_transpose_1xk(z.T[:, :, None], kernel)  # (h, N, k, 1)
    h, n, k = out.shape[:3]
    return _pad_to(jnp.transpose(out[..., 0], (1, 0, 2)).reshape(n, h * k), (d_out,))


def reference_expert_delta(A_e: Array, B_e: Array, kernel: Array, d_in: int, d_out: int) -> Array:
    """Materialised reference expert: ``dW[c*k + j, i] = kernel[c, j] * (B_e @ A_e)[c, i]``, zero-padded.

    Args:
      A_e: ``(r, m)``; B_e: ``(h, r)``; kernel: ``(h, k)``.
    Returns:
      ``(d_out, d_in)`` (PyTorch layout).
    """
    z = B_e @ A_e
    h, m = z.shape
    k = kernel.shape[1]
    dw = (kernel[:, :, None] * z[:, None, :]).reshape(h * k, m)
    return _pad_to(dw, (d_out, d_in))


def reference_expert_delta_conv(A_e: Array, B_e: Array, kernel: Array, d_in: int, d_out: int) -> Array:
    """Definition of the reference expert: depthwise ``lax.conv_transpose`` of ``Z = B_e @ A_e``.

    Row ``c`` of ``Z`` is a ``1 x m`` image on its own channel; a ``k x 1`` kernel with stride ``(k, 1)``
    turns it into ``k x m``. Args/returns as :func:`reference_expert_delta`.
    """
    z = B_e @ A_e
    h, m = z.shape
    k = kernel.shape[1]
    out = _depthwise_transpose_1xk(z[:, None, :], kernel)  # (h, 1, k, m)
    return _pad_to(out.reshape(h * k, m), (d_out, d_in))


def reference_expert_factors(A_e: Array, B_e: Array, kernel: Array, d_in: int, d_out: int) -> tuple[Array, Array]:
    """Exact rank-``r`` factors of a reference expert: ``F_B @ F_A == reference_expert_delta(...)``.

    ``dW = (D @ B_e) @ [A_e, 0]`` with ``D (h*k, h)`` the expansion ``D[c*k + j, c] = kernel[c, j]``, i.e.
    ``F_B[c*k + j] = kernel[c, j] * B_e[c]``.

    Returns:
      ``F_B (d_out, r)``, ``F_A (r, d_in)``.
    """
    h, r = B_e.shape
    k = kernel.shape[1]
    f_b = (kernel[:, :, None] * B_e[:, None, :]).reshape(h * k, r)
    return _pad_to(f_b, (d_out, r)), _pad_to(A_e, (r, d_in))


def paper_expert_delta(A_e: Array, B_e: Array, kernel: Array) -> Array:
    """Materialised paper expert: ``dW = (B_e @ A_e) (x) kernel`` (Kronecker product).

    Args:
      A_e: ``(r, m)``; B_e: ``(h, r)``; kernel: ``(k, k)``.
    Returns:
      ``(h*k, m*k) = (d_out, d_in)``.
    """
    return jnp.kron(B_e @ A_e, kernel)


def paper_expert_delta_conv(A_e: Array, B_e: Array, kernel: Array) -> Array:
    """Definition of the paper expert: ``ConvTranspose2d(Z = B_e @ A_e, kernel, stride k)``.

    ``Z`` is one ``h x m`` single-channel image; the ``k x k`` kernel with stride ``(k, k)`` never overlaps,
    so the result equals :func:`paper_expert_delta`. Returns ``(h*k, m*k)``.
    """
    z = B_e @ A_e
    k = kernel.shape[0]
    out = lax.conv_transpose(
        z[None, :, :, None],
        kernel[:, :, None, None],
        strides=(k, k),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        transpose_kernel=True,
    )
    return out[0, :, :, 0]


def paper_expert_factors(A_e: Array, B_e: Array, kernel: Array) -> tuple[Array, Array]:
    """Exact rank-``r*k`` factors of a paper expert: ``Z (x) K = (B_e (x) I_k) @ (A_e (x) K)``.

    Returns:
      ``F_B (h*k, r*k)``, ``F_A (r*k, m*k)``.
    """
    k = kernel.shape[0]
    return jnp.kron(B_e, jnp.eye(k, dtype=B_e.dtype)), jnp.kron(A_e, kernel)


def expert_delta(p: Pyramid, A, B, kernels: Sequence[Array], e: int, method: str = "explicit") -> Array:
    """Expert ``e``'s unscaled ``(d_out, d_in)`` delta; ``method`` is ``"explicit"`` or ``"conv"`` (definition)."""
    a_e, b_e = expert_seed(p, A, B, e)
    if method not in ("explicit", "conv"):
        raise ValueError(f"method={method!r}: accepted values are 'explicit', 'conv'")
    if p.expansion == "reference":
        fn = reference_expert_delta_conv if method == "conv" else reference_expert_delta
        return fn(a_e, b_e, kernels[e], p.d_in, p.d_out)
    fn = paper_expert_delta_conv if method == "conv" else paper_expert_delta
    return fn(a_e, b_e, kernels[e])


def expert_deltas(p: Pyramid, A, B, kernels: Sequence[Array], method: str = "explicit") -> Array:
    """All experts' unscaled deltas stacked: ``(n_experts, d_out, d_in)``."""
    return jnp.stack([expert_delta(p, A, B, kernels, e, method) for e in range(p.n_experts)])


def effective_kernel(kernels: Sequence[Array], members: tuple[int, ...], w: Array) -> Array:
    """``sum_{e in members} w[..., e] * kernels[e]``: ``w (..., n_experts)`` -> ``(..., *kernel_shape)``."""
    stacked = jnp.stack([kernels[e] for e in members])  # (g, a, b)
    lo = members[0]
    # contiguous members (a pyramid's groups are): a static slice, not a gather (with its index normalisation)
    cols = slice(lo, lo + len(members)) if tuple(members) == tuple(range(lo, lo + len(members))) else list(members)
    return jnp.einsum("...g,gab->...ab", w[..., cols], stacked)


def mixture_delta(p: Pyramid, A, B, kernels: Sequence[Array], w: Array) -> Array:
    """A task's materialised delta ``sum_e w[e] * dW_e`` (computed once per group through ``Keff``).

    Args:
      w: ``(n_experts,)`` mixing weights with every scale already folded in.
    Returns:
      ``(d_out, d_in)``.
    """
    out = jnp.zeros((p.d_out, p.d_in), jnp.result_type(w, *kernels))
    for _, members in p.groups:
        a_g, b_g = group_seed(p, A, B, members)
        keff = effective_kernel(kernels, members, w)
        if p.expansion == "reference":
            out = out + reference_expert_delta(a_g, b_g, keff, p.d_in, p.d_out)
        else:
            out = out + paper_expert_delta(a_g, b_g, keff)
    return out


# ----------------------------------------------------------------------------------------------------------
# Forward paths.
# ----------------------------------------------------------------------------------------------------------


def apply_task_deltas(x: Array, deltas: Array, task_ids: Array) -> Array:
    """``y[b] = x[b] @ deltas[task_ids[b]].T``: ``x (B, ..., d_in)``, ``deltas (n_rows, d_out, d_in)``."""
    per_example = deltas[task_ids]  # (B, d_out, d_in)
    return jnp.einsum("b...i,boi->b...o", x, per_example)


def forward_materialized(
    p: Pyramid, x: Array, A, B, kernels: Sequence[Array], row_weights: Array, task_ids: Array
) -> Array:
    """Materialise every task row's delta (:func:`mixture_delta`), then ``y = x @ dW[task].T``.

    Args:
      x: ``(B, ..., d_in)``; row_weights: ``(n_rows, n_experts)`` (scales folded in); task_ids: ``(B,)``.
    Returns:
      ``(B, ..., d_out)``.
    """
    deltas = jax.vmap(lambda w: mixture_delta(p, A, B, kernels, w))(row_weights)
    return apply_task_deltas(x, deltas.astype(x.dtype), task_ids)


def forward_conv(
    p: Pyramid, x: Array, A, B, kernels: Sequence[Array], row_weights: Array, task_ids: Array
) -> Array:
    """The definition: every expert's ``dW_e`` by ``lax.conv_transpose``, mixed per task row, then applied.

    Args/returns as :func:`forward_materialized`.
    """
    per_expert = expert_deltas(p, A, B, kernels, method="conv")
    deltas = jnp.einsum("te,eoi->toi", row_weights, per_expert)
    return apply_task_deltas(x, deltas.astype(x.dtype), task_ids)


# ----------------------------------------------------------------------------------------------------------
# Exact low-rank factors (PEFT export).
# ----------------------------------------------------------------------------------------------------------


def lora_factors(
    p: Pyramid, A, B, kernels: Sequence[Array], w: Array, experts: Array | Sequence[int]
) -> tuple[Array, Array]:
    """Exact low-rank factors ``(F_B, F_A)`` of a task's delta from its routed experts.

    Reference: each expert contributes its rank-``r`` factors (:func:`reference_expert_factors`) with its
    weight folded into ``F_B``; the result has rank ``r * len(experts)`` (``r * top_k``). ``experts`` may be a
    traced array (the factors of all experts are stacked and gathered).

    Paper: each expert contributes ``r * k_e`` (:func:`paper_expert_factors`), total
    ``r * sum(k_e for e in experts)``; the ranks differ per expert, so ``experts`` must be concrete.

    Args:
      w: ``(n_experts,)`` the task's mixing weights (all scales folded in).
      experts: the routed experts (``(top_k,)``).
    Returns:
      ``F_B (d_out, R)``, ``F_A (R, d_in)`` with ``F_B @ F_A == mixture_delta(p, A, B, kernels, w)`` whenever
      ``w`` is zero outside ``experts``.
    """
    if p.expansion == "reference":
        factors = [
            reference_expert_factors(*expert_seed(p, A, B, e), kernels[e], p.d_in, p.d_out)
            for e in range(p.n_experts)
        ]
        fbs, fas = [f[0] for f in factors], [f[1] for f in factors]
        idx = jnp.asarray(experts)
        f_b = jnp.stack(fbs)[idx] * w[idx][:, None, None]  # (K, d_out, r)
        f_a = jnp.stack(fas)[idx]  # (K, r, d_in)
        n, _, r = f_b.shape
        return jnp.transpose(f_b, (1, 0, 2)).reshape(p.d_out, n * r), f_a.reshape(n * r, p.d_in)
    try:
        ids = [int(e) for e in np.asarray(experts).reshape(-1)]
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as err:
        raise ValueError(
            "paper-expansion LoRA factors have a rank that depends on which experts are routed, so the task "
            "must be concrete (a Python int or a concrete array), not traced under jit"
        ) from err
    fbs, fas = [], []
    for e in ids:
        f_b, f_a = paper_expert_factors(*expert_seed(p, A, B, e), kernels[e])
        fbs.append(f_b * w[e])
        fas.append(f_a)
    return jnp.concatenate(fbs, axis=1), jnp.concatenate(fas, axis=0)


# ----------------------------------------------------------------------------------------------------------
# Contrastive task-embedding loss.
# ----------------------------------------------------------------------------------------------------------


def _l2_normalize(a: Array, eps: float = 1e-12) -> Array:
    """``a / max(||a||, eps)`` along the last axis, as ``torch.nn.functional.normalize``."""
    return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)


def contrastive_loss(x0: Array, task_embedding: Array, task_ids: Array, tau: float) -> Array:
    """EPT's contrastive loss: cross-entropy of ``cos(x0, E[j]) / tau`` over all rows ``j`` against the task.

    Args:
      x0: ``(B, d)`` the Linear's input at token position 0 (the release uses the input before dropout).
      task_embedding: ``(n_rows, d)``.
      task_ids: ``(B,)`` int.
      tau: temperature (0.05 in the release).
    Returns:
      scalar, mean over the batch.
    """
    logits = _l2_normalize(x0) @ _l2_normalize(task_embedding).T / tau  # (B, n_rows)
    logp = jax.nn.log_softmax(logits, axis=-1)
    # the target's log-probability as a product with its one-hot (exact: the other terms are zeros, logp is finite
    # as |logits| <= 1 / tau): its gradient is a product, a gather's a scatter (a loop in XLA's program)
    return -jnp.mean(jnp.sum(logp * jax.nn.one_hot(task_ids, logp.shape[-1], dtype=logp.dtype), axis=-1))
