"""A sharded (FSDP) checkpoint lives inside the atomic checkpoint folder: a kill -9 in the middle of
writing the shards leaves the previous checkpoint complete and loadable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from torch import nn

from difftune.training import checkpoint as ckpt
from difftune.training.distributed import load_sharded

SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    from torch import nn
    from difftune.training import checkpoint as ckpt
    from difftune.training.distributed import save_sharded

    root = Path(sys.argv[1])
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def step():
        model(torch.randn(2, 8)).square().sum().backward()
        opt.step()
        opt.zero_grad()

    def killed_midway(folder):
        save_sharded(folder, {"denoiser": model}, opt)  # the shards are written ...
        os.kill(os.getpid(), 9)  # ... and the process dies before the manifest and the rename

    for n, part in ((1, lambda f: save_sharded(f, {"denoiser": model}, opt)), (2, killed_midway)):
        step()
        if n == 1:
            torch.save(model.state_dict(), root / "expected.pt")
        ckpt.save_checkpoint(root / "checkpoints", n, ckpt.TrainingState(n, None, None, sched.state_dict()),
                             {"world_size": 1}, sharded=part)
""")


def test_kill_during_a_sharded_save_keeps_the_previous_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step-2" / "sharded").is_dir()  # the half-written save is there ...
    folder = ckpt.find_resumable(root, log=lambda _: None)
    assert folder == root / "step-1"  # ... but only the complete one is used
    assert not (root / ".tmp-step-2").exists()
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert "sharded/.metadata" in manifest and any(k.endswith(".distcp") for k in manifest)
    state = ckpt.load_checkpoint(folder)
    assert state.trainable is None and state.sharded == folder / "sharded"
    model = nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    load_sharded(state.sharded, {"denoiser": model}, opt)
    expected = torch.load(tmp_path / "expected.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert opt.state_dict()["state"][0]["step"].item() == 1  # the optimizer state came back too
