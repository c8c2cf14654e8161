"""train.distributed = "fsdp" with what runs beside the sharded trained weights: the EMA (kept per shard,
saved in the sharded checkpoint, gathered at export), validation images sampled during training, and the
frozen VAE and text encoder sharded because they run every step (no caches); on 2 CPU processes (gloo,
127.0.0.1), compared with one process trained on the same global batch."""

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
#: Validation images at step 2 and at the end (step 4), two seeds.
PREVIEWS = {"prompts": ["a red square"], "images_per_prompt": 2, "steps": 3, "every": 2}


def two_processes() -> list[str]:
    return torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()))


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    """The same EMA full fine-tune as 2 processes × batch 1 (fsdp) and 1 process × batch 2."""
    root = tmp_path_factory.mktemp("fsdp-ema")
    model, data = build_tiny_sd(root / "tiny-sd"), make_tiny_dataset(root / "data", n=4, size=64)
    common = {"adam_epsilon": 1e-4}  # rounding-level gradients (biases before a norm) do not become steps of lr
    sharded = run(two_processes(), write_config(root / "fsdp.toml", model, data, root / "fsdp", method=EMA,
                                                validation=PREVIEWS, train={"distributed": "fsdp", **common}))
    one = run([sys.executable], write_config(root / "one.toml", model, data, root / "one", method=EMA,
                                             validation=PREVIEWS,
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
                                             validation=PREVIEWS,
                                             train={"distributed": "fsdp", "resume": "latest", **common}))
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert losses(resumed) == losses(root / "fsdp")[2:]
    final = load_file(root / "fsdp" / UNET[0] / UNET[1] / UNET[2])
    again = load_file(resumed / UNET[0] / UNET[1] / UNET[2])
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)


@pytest.mark.slow
def test_fsdp_validation_images_equal_one_process_previews(ema_runs):
    """Every process samples from the sharded modules (each forward needs all of them); the images are
    those of one process trained on the same global batch, written once into samples/step-N."""
    import numpy as np
    from PIL import Image

    root = ema_runs[0]
    for step in (2, 4):
        names = sorted(p.name for p in (root / "fsdp" / "samples" / f"step-{step}").iterdir())
        assert names == ["00-seed0.png", "00-seed1.png", "grid.png"]
        for name in names:
            a = np.asarray(Image.open(root / "fsdp" / "samples" / f"step-{step}" / name), dtype=np.int16)
            b = np.asarray(Image.open(root / "one" / "samples" / f"step-{step}" / name), dtype=np.int16)
            assert a.shape == b.shape and np.abs(a - b).max() <= 1, (step, name)
    # the images changed with training (step 2 and step 4 differ), so equal previews mean equal models
    first = np.asarray(Image.open(root / "fsdp" / "samples" / "step-2" / "00-seed0.png"), dtype=np.int16)
    last = np.asarray(Image.open(root / "fsdp" / "samples" / "step-4" / "00-seed0.png"), dtype=np.int16)
    assert np.abs(first - last).max() > 1


@pytest.mark.slow
def test_frozen_modules_that_run_every_step_are_sharded(ema_runs):
    """Without caches the VAE and the text encoder run every step: each process holds half of them (what
    it reports holding after sharding, summing to every frozen parameter of the model); the losses are
    still those of one process (test above); the exported pipeline gathers them whole again."""
    import re

    root, model, _, _, sharded, _ = ema_runs
    found = re.findall(r"fsdp: process (\d) holds ([\d,]+) of ([\d,]+) frozen parameters of vae, text_encoder "
                       r"\(.*; they run every step\)", sharded.stdout)
    assert sorted(int(rank) for rank, _, _ in found) == [0, 1]
    held = [int(local.replace(",", "")) for _, local, _ in found]
    totals = {int(total.replace(",", "")) for _, _, total in found}
    frozen = sum(t.numel() for part in ("vae", "text_encoder") for t in load_file(
        next((model / part).glob("*.safetensors"))).values())
    assert totals == {frozen} and sum(held) == frozen
    assert all(abs(h / frozen - 0.5) < 0.05 for h in held)
    for part in ("vae", "text_encoder"):
        base = load_file(next((model / part).glob("*.safetensors")))
        exported = load_file(next((root / "fsdp" / "pipeline" / part).glob("*.safetensors")))
        assert exported.keys() == base.keys() and all(torch.equal(exported[k], base[k]) for k in base)


@pytest.mark.slow
def test_only_the_main_process_loads_the_denoiser(ema_runs):
    """The other processes build the denoiser on the meta device (no memory) and receive their shards from
    the main process, which alone reads the weights; the run still trains as one process does (the
    losses and the EMA export above)."""
    import re

    sharded = ema_runs[4]
    found = re.findall(r"fsdp: process (\d) loaded ([\d,]+) of ([\d,]+) parameters of the denoiser from the model",
                       sharded.stdout)
    loaded = {int(rank): (int(a.replace(",", "")), int(b.replace(",", ""))) for rank, a, b in found}
    assert sorted(loaded) == [0, 1]
    total = loaded[0][1]
    assert total > 0 and loaded[0] == (total, total) and loaded[1] == (0, total)
