"""The smoke run of ``python -m train.main`` on 8 simulated CPU devices, with ``mesh.data=4, mesh.tensor=2`` and with
``mesh.fsdp=8``, logs the same training metrics (loss, its parts, gradient norm, learning rate) at every logged step
as the same run on one device (relative 1e-4).

Each 8-device run is a subprocess, as a user runs it; the 8 devices come from ``XLA_FLAGS`` set in its environment
(the one-device run is in this process). The runs are short (20 steps, one evaluation of 4 examples per set at the
end) and share one persistent compilation cache, so the model's initialisers are compiled once.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from child_env import set_xla_flags
from e2e_helpers import cache_env
from in_process import smoke_args, train_main
from shared_runs import once

from train.logger import read_metrics

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
OVERRIDES = [
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=5",
    f"--config.train.eval_every={STEPS}",
    f"--config.train.checkpoint_every={STEPS}",
    "--config.eval.max_examples=4",
    "--config.eval.final_test=False",
]
MESHES = {
    "data4_tensor2": {"data": 4, "fsdp": 1, "tensor": 2},
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
}
COMPARED = ("loss", "ce", "contrastive", "grad_norm", "lr")
RTOL = 1e-4


def train(workdir: Path, cache_dir: Path, mesh: dict) -> subprocess.CompletedProcess:
    """Runs the smoke config on 8 simulated devices with these mesh sizes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", **cache_env(cache_dir))
    set_xla_flags(env)
    env.pop("EPT_STOP_AFTER_STEP", None)
    set_xla_flags(env, devices=8)
    args = [f"--config.mesh.{axis}={size}" for axis, size in mesh.items()]
    cmd = [sys.executable, "-m", "train.main", *smoke_args(workdir, args, overrides=OVERRIDES)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mesh_jax_cache")


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    def make(root: Path) -> list:  # in this process (one device): tests/in_process.py
        out = train_main(*smoke_args(root / "one_device", overrides=OVERRIDES))
        assert out.returncode == 0, out.stderr[-4000:]
        assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in out.stderr
        return read_metrics(root / "one_device")

    return once(tmp_path_factory, "mesh_single_device", make)  # once for the session (every worker reads it)


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_run_logs_the_single_device_losses(name, single_device, tmp_path, cache_dir):
    mesh = MESHES[name]
    out = train(tmp_path / name, cache_dir, mesh)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"done: step {STEPS}" in out.stdout
    # the run really used the 8-device mesh (train.loop logs it once the state is placed)
    assert f"mesh {mesh}" in out.stderr, out.stderr[-2000:]
    got, want = read_metrics(tmp_path / name), single_device
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(5, STEPS + 1, 5))
    for g, w in zip(got, want, strict=True):
        for key in COMPARED:
            assert g[key] == pytest.approx(w[key], rel=RTOL), (name, g["step"], key, g[key], w[key])
        assert g["skipped_steps"] == w["skipped_steps"] == 0
    # the loss moved: equal losses are not two runs that both did nothing
    assert want[-1]["loss"] < want[0]["loss"] - 0.3, [r["loss"] for r in want]
    assert set(got[-1]["eval"]) == set(want[-1]["eval"]) and got[-1]["best"] and want[-1]["best"]
