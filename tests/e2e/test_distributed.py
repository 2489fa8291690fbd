"""Multi-process JAX on CPU: two processes on localhost, two CPU devices each, through
``ept_jax.core.sharding.maybe_initialize_distributed`` (which passes ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` on:
``jax.distributed.initialize()`` alone reads only the coordinator address and fails without a detected cluster)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from child_env import set_xla_flags

from ept_jax.core.sharding import distributed_arguments, heartbeat_argument

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from ept_jax.core.sharding import maybe_initialize_distributed
info = maybe_initialize_distributed()
x = multihost_utils.process_allgather(jnp.asarray([info.process_index + 1.0]))
print("RESULT", info.process_index, info.process_count, jax.device_count(), jax.local_device_count(),
      sorted(float(v) for v in x.ravel()), flush=True)
# the trainer's last step: the best and the regular checkpoint of one step saved together (their commits overlap)
import random, time
from train.checkpointing import Checkpointer
ckpt = Checkpointer(sys.argv[1], 2)
random.seed(info.process_index)
for step in range(1, 11):
    params = {"a": {"kernel": np.full((4, 3), float(step), np.float32)}}
    ckpt.save_best(step, params, {"step": step})
    time.sleep(random.random() * 0.02)  # the processes reach the next save at different moments, as they do
    ckpt.save(step, params, {"mu": {"a": {"kernel": np.zeros((4, 3), np.float32)}}}, {"step": step})
ckpt.wait()
params, host = ckpt.restore_best({"a": {"kernel": np.zeros((4, 3), np.float32)}}, {})
ckpt.close()
print("CHECKPOINTS", ckpt.steps(), host["step"], float(params["a"]["kernel"].mean()), flush=True)
"""

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_two_cpu_devices_each_meet_gather_and_checkpoint(tmp_path):
    """... and save a best and a regular checkpoint of the same step together, as the trainer's last step does
    (with Orbax's default barrier names their commits met at one barrier and the job was aborted: a CI failure)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2", "JAX_NUM_PROCESSES": "2",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}"}
    set_xla_flags(env)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], cwd=REPO,
                              env={**env, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("RESULT"))
    assert results == ["RESULT 0 2 4 2 [1.0, 2.0]", "RESULT 1 2 4 2 [1.0, 2.0]"]
    saved = [line for out, _ in outs for line in out.splitlines() if line.startswith("CHECKPOINTS")]
    assert saved == ["CHECKPOINTS [9, 10] 10 10.0"] * 2, outs


@pytest.mark.parametrize("environ, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "set both"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be integers"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, r"not in \[0, "),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "without JAX_COORDINATOR_ADDRESS"),
])
def test_distributed_arguments_refuse_bad_environments(environ, message):
    with pytest.raises(ValueError, match=message):
        distributed_arguments(environ)


def test_heartbeat_timeout_from_the_environment():
    assert heartbeat_argument({}) == {} == heartbeat_argument({"EPT_HEARTBEAT_TIMEOUT_S": " "})
    assert heartbeat_argument({"EPT_HEARTBEAT_TIMEOUT_S": "20"}) == {"heartbeat_timeout_seconds": 20}
    for bad in ("4", "ten", "-1", "2.5"):
        with pytest.raises(ValueError, match=f"EPT_HEARTBEAT_TIMEOUT_S='{bad}': must be an integer number of "
                                             "seconds >= 5"):
            heartbeat_argument({"EPT_HEARTBEAT_TIMEOUT_S": bad})


def test_distributed_arguments_pass_the_process_layout_on():
    assert distributed_arguments({}) == {} == distributed_arguments({"JAX_NUM_PROCESSES": "1"})
    assert distributed_arguments({"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
                                  "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == {"num_processes": 4,
                                                                                    "process_id": 3}


# 12 steps, checkpoints every 2 (stops at 2 and 4) or every 4 (a kill -9 before step 7, clear of both checkpoints)
RUN = ["--config", "configs/smoke.py", "--config.train.steps=12", "--config.train.warmup_steps=1",
       "--config.train.log_every=1", "--config.train.eval_every=12", "--config.train.checkpoint_every=2",
       "--config.eval.max_examples=8"]
STEPS = 12


def _adapters(workdir):
    import jax
    from flax import nnx

    from ept_jax.core.params import TRAINABLE
    from train.export import restore_for_export

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(restore_for_export(workdir, step=STEPS).model, TRAINABLE))]


def test_launcher_prefixes_output_and_fails_fast(tmp_path):
    """A process that exits non-zero stops the others (which would sleep a minute) and sets the launcher's status;
    every line comes back prefixed with its process."""
    import time

    (tmp_path / "worker_mod.py").write_text(
        "import os, sys, time\n"
        "pid = int(os.environ['JAX_PROCESS_ID'])\n"
        "print('hello from', pid, os.environ['JAX_NUM_PROCESSES'], os.environ['JAX_NUM_CPU_DEVICES'], flush=True)\n"
        "print('flags', os.environ['XLA_FLAGS'], flush=True)\n"
        "if pid == 1:\n    sys.exit(3)\n"
        "time.sleep(60)\n")
    # the launcher drops a simulated device count (--cpu-devices decides) and keeps the other XLA flags
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/nowhere"}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "train.launch", "--processes", "2", "--cpu-devices", "3",
                          "--module", "worker_mod", "--grace", "2"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    assert time.time() - t0 < 30
    assert "[p0] hello from 0 2 3" in out.stdout and "[p1] hello from 1 2 3" in out.stdout
    assert "[p0] flags --xla_dump_to=/nowhere\n" in out.stdout
    assert "[launch] process 1 exited with status 3; stopping the others" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "train.launch", "--processes", "0"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--processes=0: must be >= 1" in bad.stderr


ENCODED = re.compile(r"process (\d): tokenised (\d+) of (\d+) training examples \(its (\d+) rows of every batch of "
                     r"(\d+)\)")


def _encoded(text: str, prefix: str = "") -> tuple[int, int, int, int, int]:
    """``(process, examples tokenised, training examples, rows, batch)`` of the one log line of a process."""
    found = ENCODED.findall("\n".join(x for x in text.splitlines() if x.startswith(prefix)))
    assert len(found) == 1, (prefix, text[-3000:])
    return tuple(int(v) for v in found[0])


def test_two_processes_train_as_one_survive_kill_9_and_move_checkpoints_between_process_counts(tmp_path):
    """Two processes against one with as many CPU devices (the smoke run, 12 steps, checkpoints every 2), on
    both meshes, each ending with the losses of an uninterrupted 1-process run on its mesh (rtol 1e-6) and its final
    adapters (a reference on the other mesh is not one: its gradient sums add in another order, and after 12 AdamW
    steps an adapter entry whose gradient is near zero differed by 7e-6 from the fsdp chain's once XLA:CPU's emitters
    changed):

    * data-parallel mesh, 2 processes x 1 device, checkpoints every 4, ``kill -9``: process 1 ``SIGKILL`` s itself
      before update 7, once checkpoint 4 is committed (``tests/e2e/faulty.py --kill_before_step=7``: a kill from
      outside raced the commit of checkpoint 4, which then never completed, or caught process 0 in a checkpoint's
      barrier, which is no collective and hangs until JAX's heartbeat timeout aborts it: both seen in CI);
      process 0's next collective fails and it exits 3 at once (measured 0.2 s) with one line, without waiting for a
      pending checkpoint write (whose commit barrier the dead process never reaches); the same two commands then
      resume from checkpoint 4 and finish. Their evaluation and test pass (on 2 processes) give the 1-process
      run's scores. Bound asserted: 130 s. (A 20 s ``EPT_HEARTBEAT_TIMEOUT_S`` made the coordination service abort
      a live, CPU-starved job at shutdown in CI: the test keeps JAX's default.)
    * fsdp mesh, 2 processes x 2 devices, checkpoints crossing process counts: 1 process stops after the
      checkpoint at step 2 (``EPT_STOP_AFTER_STEP``), ``train.launch --processes 2`` continues and both stop after
      the one at step 4, 1 process finishes.

    Each of the 2 processes tokenised only its own rows: half of every batch of each step it ran (the unit test
    ``tests/unit/test_sampling.py`` shows which examples)."""
    import json
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    set_xla_flags(env)
    env.pop("EPT_STOP_AFTER_STEP", None)
    meshes = {"data": [], "fsdp": ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]}
    devices = {"data": 2, "fsdp": 4}  # all the devices of the job, in one process

    def one(workdir, mesh, extra=None, args=()):
        return subprocess.run([sys.executable, "-m", "train.main", *RUN, *meshes[mesh], *args, f"--workdir={workdir}"],
                              cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices[mesh]),
                                             **(extra or {})}, capture_output=True, text=True, timeout=900)

    def losses(d):
        return [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]

    # the uninterrupted reference of each mesh, in one process; checkpointed at the end only (saving changes no
    # value; on 4 simulated devices each save cost ~1 s of CPU)
    full = {}
    for mesh in meshes:
        full[mesh] = tmp_path / f"full_{mesh}"
        out = one(full[mesh], mesh, args=[f"--config.train.checkpoint_every={STEPS}"])
        assert out.returncode == 0, out.stderr[-3000:]
        p, n, total, rows, batch = _encoded(out.stderr)
        assert (p, n, rows, batch) == (0, 16 * STEPS, 16, 16)  # 16 rows a step, no example twice

    # data mesh, 2 processes x 1 device: kill -9 of process 1, then the same two commands resume. (With 2 CPU
    # devices per process, the survivor's collective blocks in gloo until the heartbeat timeout and the coordination
    # service aborts it: docs/training.md.)
    a = tmp_path / "data_killed"
    two_env = {**env, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1", "JAX_NUM_PROCESSES": "2"}

    def start(port, kill_1_before_step=None):
        fault = [str(REPO / "tests/e2e/faulty.py"), f"--kill_before_step={kill_1_before_step}", "--"]
        return [subprocess.Popen([sys.executable, *(fault if i == 1 and kill_1_before_step else ["-m"]),
                                  "train.main", *RUN, "--config.train.checkpoint_every=4", f"--workdir={a}"],
                                 cwd=REPO, env={**two_env, "JAX_PROCESS_ID": str(i),
                                                "JAX_COORDINATOR_ADDRESS": f"localhost:{port}"},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]

    procs = start(_free_port(), kill_1_before_step=7)
    _, err1 = procs[1].communicate(timeout=600)
    assert procs[1].returncode == -signal.SIGKILL, err1[-3000:]
    t0 = time.time()
    _, err = procs[0].communicate(timeout=300)
    assert time.time() - t0 < 130
    assert procs[0].returncode == 3, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "another process is gone" in lines[0] and "Traceback" not in err
    resumed = start(_free_port())
    outs = [p.communicate(timeout=600) for p in resumed]
    assert [p.returncode for p in resumed] == [0, 0], outs[0][1][-3000:]
    at = re.search(r"resumed from \S+ at step (\d+)", outs[0][1])
    assert at and int(at.group(1)) == 4, outs[0][1][-3000:]
    for p in (0, 1):  # the steps after the checkpoint, its 8 rows of each (one device holds them)
        assert _encoded(outs[p][1]) == (p, 8 * (STEPS - int(at.group(1))), total, 8, 16)

    # fsdp mesh: 1 process -> 2 processes -> 1 process
    b = tmp_path / "fsdp_one_two_one"
    first = one(b, "fsdp", {"EPT_STOP_AFTER_STEP": "2"})
    assert first.returncode == 0 and len(losses(b)) == 2, first.stderr[-3000:]
    middle = subprocess.run([sys.executable, "-m", "train.launch", "--processes", "2", "--cpu-devices", "2", "--",
                             *RUN, *meshes["fsdp"], f"--workdir={b}"], cwd=REPO,
                            env={**env, "EPT_STOP_AFTER_STEP": "4"}, capture_output=True, text=True, timeout=900)
    assert middle.returncode == 0, middle.stdout[-3000:]
    for p in (0, 1):
        assert f"[p{p}] stopped after the checkpoint at step 4" in middle.stdout, middle.stdout[-3000:]
        assert _encoded(middle.stdout, f"[p{p}] ") == (p, 16, total, 8, 16)  # 2 steps x its 8 rows
    assert len(losses(b)) == 4
    last = one(b, "fsdp", args=[f"--config.train.checkpoint_every={STEPS}"])  # a mutable key: saves only at the end
    assert last.returncode == 0, last.stderr[-3000:]

    for d, mesh in ((a, "data"), (b, "fsdp")):
        np.testing.assert_allclose(losses(d), losses(full[mesh]), rtol=1e-6, err_msg=mesh)
        # float32 adapters after 12 AdamW steps agree to ~1e-6 absolute: the cross-process gradient sum (gloo) adds
        # in another order than one process's, and Adam's first steps (update ~ lr * g / |g|) magnify that on
        # entries whose gradient is near zero
        for x, y in zip(_adapters(d), _adapters(full[mesh]), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=5e-6, err_msg=mesh)
    # evaluation under 2 processes (the resumed data-mesh job's step-12 dev evaluation and its final test pass ran
    # there): the greedy generations score as one process's, the held-out losses agree to float32 rounding
    ref = full["data"]
    final = {d: json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (a, ref)}
    results = {d: json.loads((d / "results.json").read_text()) for d in (a, ref)}
    assert final[a]["eval"] == final[ref]["eval"] and final[a]["eval"]
    np.testing.assert_allclose(list(final[a]["eval_loss"].values()), list(final[ref]["eval_loss"].values()),
                               rtol=1e-5)
    assert results[a]["test"] == results[ref]["test"] and results[a]["test"]


def test_a_process_with_another_config_is_refused_naming_the_keys(tmp_path):
    """Process 1 launched with another learning rate: both processes exit 2 before training, process 1's error
    names the key and both values, process 0's names process 1."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1",
           "JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}"}
    set_xla_flags(env)
    procs = [subprocess.Popen([sys.executable, "-m", "train.main", *RUN, f"--workdir={tmp_path / 'run'}",
                               *(["--config.train.learning_rate=0.5"] if i == 1 else [])], cwd=REPO,
                              env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [o[1][-2000:] for o in outs]
    assert "process 1 runs another config than process 0 (train.learning_rate: process 0 0.01, this process 0.5)" \
        in outs[1][1]
    assert "process(es) [1] run another config than process 0" in outs[0][1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
