"""Device meshes and the one table that maps logical axis names onto them (t5x style: sharding as data).

Every parameter carries logical axis names (``ept_jax.core.params.param``). :data:`LOGICAL_RULES` maps each name onto
mesh axes of a mesh with axes ``("data", "fsdp", "tensor")``:

* ``batch`` is split over ``data`` and ``fsdp`` (both are data parallel for activations);
* ``embed`` (d_model) is split over ``fsdp``: parameters are fully sharded and all-gathered per use;
* ``mlp``, ``joined_kv``, ``heads`` and ``vocab`` are split over ``tensor`` (Megatron-style tensor parallelism);
* adapter-only axes (rank, experts, tasks, kernel sizes, relative-position buckets) are replicated.

A dimension that its mesh axes do not divide is replicated instead (tiny models, kernel sizes of 6); the plan
records each such fallback so it can be logged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ept_jax.core.params import logical_axes

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("joined_kv", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("lora_rank", None),
    ("experts", None),
    ("tasks", None),
    ("kernel", None),
    ("rel_buckets", None),
)


def mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int) -> tuple[int, int, int]:
    """Resolves mesh sizes (one of them may be -1: it takes what is left) for ``n_devices`` devices.

    Raises:
      ValueError: sizes that are not positive (or -1), more than one -1, or whose product is not ``n_devices``.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, s in sizes.items():
        if not isinstance(s, int) or (s < 1 and s != -1):
            raise ValueError(f"mesh.{name}={s!r}: mesh sizes must be positive integers or -1 (fill)")
    fill = [n for n, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh sizes {sizes}: at most one may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if n_devices % known:
            raise ValueError(f"mesh sizes {sizes}: {n_devices} devices are not divisible by {known}")
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(
            f"mesh sizes data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = "
            f"{math.prod(sizes.values())} do not match the {n_devices} available device(s)"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_cfg: Mapping | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over ``devices`` (all devices by default) from ``mesh_cfg`` sizes.

    ``mesh_cfg`` has keys ``data``, ``fsdp``, ``tensor`` (missing keys mean 1, except ``data`` which means -1).
    """
    devices = list(devices if devices is not None else jax.devices())
    cfg = dict(mesh_cfg or {})
    shape = mesh_shape(cfg.get("data", -1), cfg.get("fsdp", 1), cfg.get("tensor", 1), len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
    )


def logical_to_spec(
    axes: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = LOGICAL_RULES,
) -> PartitionSpec:
    """The ``PartitionSpec`` for logical ``axes`` under ``rules``.

    A mesh axis is used at most once per spec (the first dimension that asks for it gets it). With ``shape`` and
    ``mesh`` given, a dimension whose size the assigned mesh axes do not divide is replicated.

    Raises:
      ValueError: a logical axis name that ``rules`` do not know.
    """
    if axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = table[name]
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
        if shape is not None and mesh is not None and mesh_axes:
            if shape[dim] % math.prod(mesh.shape[a] for a in mesh_axes):
                mesh_axes = ()
        used.update(mesh_axes)
        out.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
    return PartitionSpec(*out)


def device_bytes(state: nnx.State, sizes: Mapping[str, int], rules=LOGICAL_RULES) -> int:
    """Bytes of ``state`` (Variables with concrete or ``jax.ShapeDtypeStruct`` values) held by ONE device of a mesh
    of ``sizes`` (``{"data": d, "fsdp": f, "tensor": t}``) under ``rules``: each array divided by the product of the
    mesh axes its dimensions are split over (the largest shard; replicated dimensions are whole). No device is
    needed: for planning a mesh (``python -m train.inspect --devices N``)."""

    class _Sizes:  # what logical_to_spec reads of a mesh
        shape = dict(sizes)

    total = 0
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        shape = tuple(getattr(value, "shape", ()))
        spec = logical_to_spec(logical_axes(var) if isinstance(var, nnx.Variable) else None, shape, _Sizes, rules)
        n = math.prod(shape) * jax.numpy.dtype(value.dtype).itemsize
        for dim, axes in enumerate(spec):
            if axes is not None:
                split = math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))
                n = n // shape[dim] * -(-shape[dim] // split)
        total += n
    return int(total)


def state_shardings(state: nnx.State, mesh: Mesh, rules=LOGICAL_RULES) -> nnx.State:
    """A pytree like ``state`` (an ``nnx.State`` of Variables) holding a ``NamedSharding`` per leaf."""

    def one(var):
        value = var[...] if isinstance(var, nnx.Variable) else var
        shape = getattr(value, "shape", ())
        axes = logical_axes(var) if isinstance(var, nnx.Variable) else None
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array: leading dimension over ``data`` x ``fsdp``, the rest replicated."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def process_rows(sharding: NamedSharding, global_rows: int) -> list[int]:
    """The rows of a ``(global_rows, ...)`` array under ``sharding`` (e.g. :func:`batch_sharding`) that this
    process's devices hold, increasing: what the process must provide of every global batch."""
    held = sharding.addressable_devices_indices_map((global_rows,))
    rows = set()
    for index in held.values():
        rows.update(range(*index[0].indices(global_rows)))
    return sorted(rows)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    process_index: int
    process_count: int


def distributed_arguments(environ) -> dict[str, int]:
    """``num_processes`` / ``process_id`` for ``jax.distributed.initialize`` from ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID`` (``initialize()`` itself reads only ``JAX_COORDINATOR_ADDRESS`` and otherwise needs a cluster
    it detects: Slurm, MPI, a TPU pod); ``{}`` when neither is set.

    Raises:
      ValueError: one without the other, a value that is not an integer, a process id outside ``[0, n)``, or no
        ``JAX_COORDINATOR_ADDRESS`` to meet at.
    """
    n, pid = environ.get("JAX_NUM_PROCESSES"), environ.get("JAX_PROCESS_ID")
    if (n is None or n.strip() == "1") and pid is None:  # one process: nothing to meet
        return {}
    if n is None or pid is None:
        raise ValueError(f"JAX_NUM_PROCESSES={n!r} and JAX_PROCESS_ID={pid!r}: set both (or neither, on a cluster "
                         "jax.distributed detects)")
    try:
        n_i, pid_i = int(n), int(pid)
    except ValueError as e:
        raise ValueError(f"JAX_NUM_PROCESSES={n!r} / JAX_PROCESS_ID={pid!r} must be integers") from e
    if n_i < 1 or not 0 <= pid_i < n_i:
        raise ValueError(f"JAX_PROCESS_ID={pid_i} is not in [0, JAX_NUM_PROCESSES={n_i})")
    if n_i > 1 and not environ.get("JAX_COORDINATOR_ADDRESS"):
        raise ValueError(f"JAX_NUM_PROCESSES={n_i} without JAX_COORDINATOR_ADDRESS (host:port of process 0)")
    return {"num_processes": n_i, "process_id": pid_i}


HEARTBEAT_ENV = "EPT_HEARTBEAT_TIMEOUT_S"


def heartbeat_argument(environ) -> dict[str, int]:
    """``heartbeat_timeout_seconds`` from ``EPT_HEARTBEAT_TIMEOUT_S`` (``{}`` when unset: JAX's 100 s). A process
    whose peer dies learns it at its next collective at once, but inside a coordination-service barrier (an Orbax
    checkpoint commit) only when the dead process's heartbeat times out: this bounds that wait.

    Raises:
      ValueError: not an integer >= 5 (shorter risks declaring a busy, live process dead).
    """
    value = environ.get(HEARTBEAT_ENV)
    if value is None or not value.strip():
        return {}
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 5:
        raise ValueError(f"{HEARTBEAT_ENV}={value!r}: must be an integer number of seconds >= 5")
    return {"heartbeat_timeout_seconds": seconds}


def maybe_initialize_distributed(enabled: bool | None = None) -> DistributedInfo:
    """Calls ``jax.distributed.initialize()`` when launched as several processes (once per process).

    ``enabled=None`` detects a multi-process launch from the environment (``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, SLURM, or a TPU pod); the same program then spans hosts unchanged. ``JAX_NUM_PROCESSES``
    / ``JAX_PROCESS_ID`` are passed on (:func:`distributed_arguments`), so a plain launch of N processes on
    machines without a cluster manager (e.g. localhost) works; ``EPT_HEARTBEAT_TIMEOUT_S`` sets the heartbeat
    timeout (:func:`heartbeat_argument`).
    """
    import os

    kwargs = distributed_arguments(os.environ)
    if enabled is None:
        enabled = bool(
            os.environ.get("JAX_COORDINATOR_ADDRESS")
            or kwargs.get("num_processes", 1) > 1
            or os.environ.get("SLURM_NTASKS", "1").strip() not in ("", "1")
        )
    if enabled and not jax.distributed.is_initialized():
        jax.distributed.initialize(**kwargs, **heartbeat_argument(os.environ))
    return DistributedInfo(jax.process_index(), jax.process_count())
