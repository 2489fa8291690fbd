"""train.logger: metrics.jsonl and TensorBoard events, written without importing PyTorch."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TFRecord event files in ``tb_dir`` (length-prefixed records of ``Event`` protos)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_logger_writes_metrics_and_tensorboard_without_importing_torch(tmp_path):
    """In a fresh interpreter (torch is installed in the test environment): two records reach metrics.jsonl and the
    TensorBoard event file, and ``torch`` is not in ``sys.modules`` afterwards (its import cost 1.5 s per run)."""
    code = (
        "import sys\n"
        "from train.logger import MetricsLogger\n"
        f"log = MetricsLogger({str(tmp_path)!r}, start_step=0, total_steps=2, is_main=True)\n"
        "log.write({'step': 1, 'loss': 2.5, 'lr': 0.1})\n"
        "log.write({'step': 2, 'loss': 1.5, 'lr': 0.05})\n"
        "log.close()\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TORCH False" in out.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.5), (2, 1.5)]
    scalars = _scalars(tmp_path / "tb")
    loss = next(v for k, v in scalars.items() if k.endswith("loss"))
    assert loss == [(1, 2.5), (2, 1.5)]
