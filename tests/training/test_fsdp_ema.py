"""train.distributed = "fsdp" with what runs beside the sharded weights: the EMA (kept per shard, saved in
the sharded checkpoint, gathered at export) on 2 CPU processes (gloo, 127.0.0.1), compared with one
process trained on the same global batch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tests.training.test_distributed import free_port, losses, run, torchrun, write_config

from difftune.tiny import build_tiny_sd, make_tiny_dataset

#: A full fine-tune with an EMA whose average visibly lags the weights after 4 steps.
EMA = {"type": "full", "ema": True, "ema_decay": 0.5}
UNET = ("pipeline", "unet", "diffusion_pytorch_model.safetensors")


def two_processes() -> list[str]:
    return torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()))


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    """The same EMA full fine-tune as 2 processes × batch 1 (fsdp) and 1 process × batch 2."""
    root = tmp_path_factory.mktemp("fsdp-ema")
    model, data = build_tiny_sd(root / "tiny-sd"), make_tiny_dataset(root / "data", n=4, size=64)
    common = {"adam_epsilon": 1e-4}  # rounding-level gradients (biases before a norm) do not become steps of lr
    sharded = run(two_processes(), write_config(root / "fsdp.toml", model, data, root / "fsdp", method=EMA,
                                                train={"distributed": "fsdp", **common}))
    one = run([sys.executable], write_config(root / "one.toml", model, data, root / "one", method=EMA,
                                             train={"batch_size": 2, "checkpoint_every": 0, **common}))
    return root, model, data, common, sharded, one


@pytest.mark.slow
def test_fsdp_exports_the_ema_of_a_one_process_run(ema_runs):
    root, model, _, _, sharded, one = ema_runs
    assert "processes: strategy fsdp, world size 2" in sharded.stdout and "batch 2×1×1" in one.stdout
    assert losses(root / "fsdp") == pytest.approx(losses(root / "one"), abs=1e-6)
    a, b = load_file(root / "fsdp" / UNET[0] / UNET[1] / UNET[2]), load_file(root / "one" / UNET[0] / UNET[1] / UNET[2])
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-6
    # What was exported is the average, not the last weights: the sharded checkpoint of the last step
    # holds both, and the exported tensors are its EMA tensors.
    trained, ema = sharded_checkpoint(root / "fsdp" / "checkpoints" / "step-4")
    assert max((a[k] - ema[f"denoiser.{k}"]).abs().max().item() for k in a) == 0
    assert max((a[k] - trained[f"denoiser.{k}"]).abs().max().item() for k in a) > 1e-4
    base = load_file(root / "tiny-sd" / "unet" / "diffusion_pytorch_model.safetensors")
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4  # the average moved from the base


def sharded_checkpoint(folder) -> tuple[dict, dict]:
    """(trained weights, EMA weights) of a sharded checkpoint, read whole in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder / "sharded", folder.parent / f"{folder.name}.pt")
    state = torch.load(folder.parent / f"{folder.name}.pt", weights_only=False)
    return state["model"], state["ema"]["weights"]


@pytest.mark.slow
def test_sharded_checkpoint_with_ema_resumes_exactly(ema_runs):
    root, model, data, common, _, _ = ema_runs
    resumed = root / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(root / "fsdp" / "checkpoints" / "step-2"), str(resumed / "checkpoints")],
                   check=True)
    proc = run(two_processes(), write_config(root / "resume.toml", model, data, resumed, method=EMA,
                                             train={"distributed": "fsdp", "resume": "latest", **common}))
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert losses(resumed) == losses(root / "fsdp")[2:]
    final = load_file(root / "fsdp" / UNET[0] / UNET[1] / UNET[2])
    again = load_file(resumed / UNET[0] / UNET[1] / UNET[2])
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)
