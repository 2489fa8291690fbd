"""``python -m train.launch --processes N [--cpu-devices K] [--port P] [--module M] -- ARGS``: N processes on
this machine, one multi-process JAX job.

Starts ``python -m M ARGS`` (``M`` default ``train.main``) N times with the environment of a JAX multi-process
launch (``JAX_COORDINATOR_ADDRESS=localhost:P``, ``JAX_NUM_PROCESSES=N``, ``JAX_PROCESS_ID=i``; with
``--cpu-devices K`` also ``JAX_PLATFORMS=cpu`` and ``JAX_NUM_CPU_DEVICES=K``), streams every process's output
line by line prefixed with ``[p<i>]``, and fails fast: when a process exits non-zero, the others are stopped
(SIGTERM, then SIGKILL after ``--grace`` seconds) and the launcher exits with that status. It exits 0 when every
process did. What a cluster (Slurm, a TPU pod, GKE) does for a real multi-host job, for testing on one machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from train.errors import EXIT_USER_ERROR


def free_port() -> int:
    """A TCP port free on localhost now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
        out.flush()
    stream.close()


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def without_device_count(xla_flags: str) -> str:
    """``xla_flags`` (an ``XLA_FLAGS`` value) without its simulated CPU device count, the other flags kept."""
    return " ".join(f for f in xla_flags.split() if not f.startswith(DEVICE_COUNT_FLAG))


def launch(n: int, args: list[str], *, module: str = "train.main", cpu_devices: int | None = None,
           port: int | None = None, grace: float = 10.0, out=None) -> int:
    """Runs the job (module docstring); returns the exit status (0, or the first non-zero one)."""
    if n < 1:
        raise ValueError(f"--processes={n}: must be >= 1")
    out = sys.stdout if out is None else out
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port or free_port()}", "JAX_NUM_PROCESSES": str(n)}
    if cpu_devices is not None:
        env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(cpu_devices))
        # --xla_force_host_platform_device_count would fight JAX_NUM_CPU_DEVICES; the user's other XLA flags stay
        env["XLA_FLAGS"] = without_device_count(env.get("XLA_FLAGS", ""))
    procs, pumps = [], []
    for i in range(n):
        p = subprocess.Popen([sys.executable, "-u", "-m", module, *args], env={**env, "JAX_PROCESS_ID": str(i)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        procs.append(p)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}]", out), daemon=True)
        t.start()
        pumps.append(t)
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, status = failed[0]
                out.write(f"[launch] process {i} exited with status {status}; stopping the others\n")
                out.flush()
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    finally:
        _stop(procs, grace)
        for t in pumps:
            t.join(timeout=5)
    return status


def _stop(procs, grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m train.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--cpu-devices", type=int, default=None, help="CPU devices per process (JAX_NUM_CPU_DEVICES)")
    p.add_argument("--port", type=int, default=None, help="coordinator port on localhost (default: a free one)")
    p.add_argument("--module", default="train.main")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL when stopping")
    args = p.parse_args(own)
    try:
        return launch(args.processes, rest, module=args.module, cpu_devices=args.cpu_devices, port=args.port,
                      grace=args.grace)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
