"""Multi-process JAX on CPU: two processes on localhost, two CPU devices each, through
``ept_jax.sharding.maybe_initialize_distributed`` (which passes ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` on:
``jax.distributed.initialize()`` alone reads only the coordinator address and fails without a detected cluster)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ept_jax.sharding import distributed_arguments

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
from ept_jax.sharding import maybe_initialize_distributed
info = maybe_initialize_distributed()
x = multihost_utils.process_allgather(jnp.asarray([info.process_index + 1.0]))
print("RESULT", info.process_index, info.process_count, jax.device_count(), jax.local_device_count(),
      sorted(float(v) for v in x.ravel()), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_two_cpu_devices_each_meet_and_gather():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2", "JAX_NUM_PROCESSES": "2",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}"}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("RESULT"))
    assert results == ["RESULT 0 2 4 2 [1.0, 2.0]", "RESULT 1 2 4 2 [1.0, 2.0]"]


@pytest.mark.parametrize("environ, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "set both"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be integers"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, r"not in \[0, "),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "without JAX_COORDINATOR_ADDRESS"),
])
def test_distributed_arguments_refuse_bad_environments(environ, message):
    with pytest.raises(ValueError, match=message):
        distributed_arguments(environ)


def test_distributed_arguments_pass_the_process_layout_on():
    assert distributed_arguments({}) == {}
    assert distributed_arguments({"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
                                  "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == {"num_processes": 4,
                                                                                    "process_id": 3}
