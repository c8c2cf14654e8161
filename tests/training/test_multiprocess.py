"""Two CPU processes through ``accelerate launch``: gradients are synchronised, one writer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def test_two_processes_end_with_identical_adapters(tmp_path, tiny_sd, shapes_data):
    out = tmp_path / "out"
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'[model]\npath = "{tiny_sd}"\n[method]\nrank = 4\ndropout = 0.1\n'
        f'[data]\npath = "{shapes_data}"\nresolution = 32\nrandom_flip = true\n'
        '[train]\nmax_steps = 3\ncheckpoint_every = 2\nlog_every = 1\nlearning_rate = 1e-2\n'
        f'[logging]\nreport_to = "none"\n[output]\ndir = "{out}"\n'
    )
    # A free rendezvous port, so parallel runs on the same machine cannot meet each other.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "difftune", "train", str(cfg)],
        capture_output=True, text=True, timeout=420, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch 1×1×2" in proc.stdout
    # The loop gathers a fingerprint of every process's weights and fails the run on a mismatch.
    assert "all 2 processes hold identical trainable weights" in proc.stdout
    # Only the main process writes: one adapter, the checkpoints (step 2 and the last step), no stray temporary
    # folders; the run folder's lock was taken by the main process alone.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    # ... but each process saved its own random state into it, covered by the manifest.
    assert {"rng-0.pt", "rng-1.pt"} <= {p.name for p in (out / "checkpoints" / "step-2").iterdir()}
    assert {"rng-0.pt", "rng-1.pt"} <= set(json.loads((out / "checkpoints" / "step-2" / "manifest.json")
                                                      .read_text())["files"])
    adapter = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k or "lora.up" in k)
    assert proc.stdout.count("done: 3 steps") == 1
    assert torch.isfinite(torch.cat([v.flatten() for v in adapter.values()])).all()
