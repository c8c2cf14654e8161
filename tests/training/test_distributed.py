"""train.distributed = "fsdp" on 2 CPU processes (gloo, 127.0.0.1): what really runs, sharded checkpoints,
resuming in another number of processes, export, two launches as two nodes, and refused launches.

Launches are checked by what they print and write (strategy, world size, parameters per process,
losses, weights), never by the exit code alone: a misconfigured launch can exit 0.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_run_config

from difftune.config.loader import dump_toml
from difftune.tiny import build_tiny_sd, make_tiny_dataset
from difftune.training.run_folder import LOCK

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
for _name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)
DIFFTUNE = ["-m", "difftune", "train"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def accelerate_launch(processes: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def run(cmd: list[str], config, env=ENV) -> subprocess.CompletedProcess:
    proc = subprocess.run([*cmd, *DIFFTUNE, str(config)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def write_config(path, model, dataset, out, **sections):
    cfg = tiny_run_config(model, dataset, out, **sections)
    cfg["train"].update({"max_steps": 4, "checkpoint_every": 2, "learning_rate": 1e-3})
    cfg["train"].update(sections.get("train", {}))
    path.write_text(dump_toml(cfg))
    return path


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def held(stdout: str) -> dict[int, tuple[int, int]]:
    """Parameters each process reported holding after sharding: rank → (local, total)."""
    found = re.findall(r"fsdp: process (\d+) holds ([\d,]+) of ([\d,]+) parameters", stdout)
    return {int(r): (int(a.replace(",", "")), int(b.replace(",", ""))) for r, a, b in found}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return build_tiny_sd(root / "tiny-sd"), make_tiny_dataset(root / "data", n=4, size=64), root


#: Random draws per image besides the noise and timestep: the noise offset and input perturbation.
PER_SAMPLE_DRAWS = {"noise_offset": 0.05, "input_perturbation": 0.1}


@pytest.fixture(scope="module")
def full_runs(world):
    """One full fine-tune sharded (accelerate launch, FSDP) and the same data-parallel (torchrun)."""
    model, data, root = world
    fsdp = write_config(root / "fsdp.toml", model, data, root / "fsdp", method={"type": "full"},
                        train={"distributed": "fsdp", **PER_SAMPLE_DRAWS})
    ddp = write_config(root / "ddp.toml", model, data, root / "ddp", method={"type": "full"}, train=PER_SAMPLE_DRAWS)
    sharded = run(accelerate_launch(2), fsdp)
    plain = run(torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())),
                ddp)
    return root, fsdp, sharded, plain


@pytest.mark.slow
def test_fsdp_full_fine_tune_shards_and_matches_ddp(full_runs):
    root, _, sharded, plain = full_runs
    assert "processes: strategy fsdp, world size 2, 2 per node on 1 node(s), backend gloo" in sharded.stdout
    assert "processes: strategy ddp, world size 2, 2 per node on 1 node(s), backend gloo" in plain.stdout
    counts = held(sharded.stdout)
    assert sorted(counts) == [0, 1]
    total = counts[0][1]
    assert sum(local for local, _ in counts.values()) == total > 0
    assert all(abs(local / total - 0.5) < 0.02 for local, _ in counts.values())
    assert len(losses(root / "fsdp")) == 4
    assert losses(root / "fsdp") == pytest.approx(losses(root / "ddp"), abs=1e-6)
    # The export is gathered on the main process: the same pipeline folder as a data-parallel run.
    from diffusers import UNet2DConditionModel

    unet, info = UNet2DConditionModel.from_pretrained(root / "fsdp" / "pipeline", subfolder="unet",
                                                      output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    a = load_file(root / "fsdp" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(root / "ddp" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    base = load_file(root / "tiny-sd" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained
    # Adam turns the rounding differences of near-zero gradients (biases before a norm) into steps of
    # up to lr, so the two reductions agree to about lr/2 after 4 steps, not bit for bit.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-4
    assert not list((root / "fsdp").rglob(".tmp-*"))  # no staging folder left behind


@pytest.mark.slow
def test_two_processes_train_as_one_process_with_the_same_global_batch(full_runs):
    """2 processes × batch 1 (FSDP full fine-tune) give the per-step losses of 1 process × batch 2: the global
    batch of each step is the same images, and each image draws its latent sample, noise, timestep, noise
    offset and perturbation from its own seed (its place in the global batch), not from its process's."""
    root, _, _, _ = full_runs
    one = run([sys.executable], write_config(root / "one-full.toml", *world_paths(root), root / "one-full",
                                             method={"type": "full"},
                                             train={"batch_size": 2, "checkpoint_every": 0, **PER_SAMPLE_DRAWS}))
    assert "batch 2×1×1" in one.stdout
    assert len(losses(root / "one-full")) == 4
    assert losses(root / "fsdp") == pytest.approx(losses(root / "one-full"), abs=1e-6)
    assert losses(root / "ddp") == pytest.approx(losses(root / "one-full"), abs=1e-6)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_exactly_and_in_one_process(full_runs):
    root, fsdp, _, _ = full_runs
    step2 = root / "fsdp" / "checkpoints" / "step-2"
    manifest = json.loads((step2 / "manifest.json").read_text())["files"]
    # Each process wrote its own shard (and random state), all covered by the manifest; no whole-weights file.
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata", "rng-0.pt", "rng-1.pt"} <= set(manifest)
    assert "trainable.safetensors" not in manifest
    final = load_file(root / "fsdp" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    resumed = root / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    # only step 2: the run's last step (4) is checkpointed too, and would leave nothing to train
    subprocess.run(["cp", "-r", str(step2), str(resumed / "checkpoints")], check=True)
    proc = run(torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())),
               write_config(root / "resume.toml", *world_paths(root), resumed, method={"type": "full"},
                            train={"distributed": "fsdp", "resume": "latest", **PER_SAMPLE_DRAWS}))
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    again = load_file(resumed / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(again[k], final[k]) for k in final)
    assert losses(resumed) == losses(root / "fsdp")[2:]
    # A 2-process sharded checkpoint resumes in one process (data-parallel, whole weights).
    one = root / "one"
    (one / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(step2), str(one / "checkpoints")], check=True)
    proc = run([sys.executable], write_config(root / "one.toml", *world_paths(root), one, method={"type": "full"},
                                              train={"resume": "latest", "batch_size": 2, **PER_SAMPLE_DRAWS}))
    assert "processes: strategy ddp, world size 1" in proc.stdout and "at step 2" in proc.stdout
    assert "written by 2 process(es), this run has 1" in proc.stdout
    single = load_file(one / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert single.keys() == final.keys()
    # The same global batch (1 process × 2 images): it continues as the 2-process run did.
    assert losses(one) == pytest.approx(losses(root / "fsdp")[2:], abs=1e-6)
    assert max((single[k] - final[k]).abs().max().item() for k in final) < 5e-4


def world_paths(root):
    return root / "tiny-sd", root / "data"


@pytest.mark.slow
def test_two_nodes_train_one_lora_run_like_one_node_ddp(world):
    """Two torchrun launches (one process each, c10d rendezvous on 127.0.0.1) are one sharded LoRA run."""
    model, data, root = world
    cached = {"cache_latents": True, "cache_text": True, "cache_dir": str(root / "cache")}
    cfg = write_config(root / "nodes.toml", model, data, root / "nodes", data=cached,
                       train={"distributed": "fsdp", "checkpoint_every": 0})
    port = free_port()
    nodes = [subprocess.Popen(
        torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                 f"127.0.0.1:{port}", "--rdzv_id", "nodes", *DIFFTUNE, str(cfg)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    stdout = "".join(out for out, _ in outputs)
    assert "processes: strategy fsdp, world size 2, 1 per node on 2 node(s), backend gloo" in stdout
    counts = held(stdout)
    assert sorted(counts) == [0, 1] and all(abs(local / total - 0.5) < 0.02 for local, total in counts.values())
    assert stdout.count("done: 4 steps") == 1  # one run, written once
    assert "frozen parameters" not in stdout  # with both caches the VAE and text encoder only fill them: whole
    # The caches were filled once, half by each process: 4 latents and 4 captions in all.
    assert "latent cache" in stdout and ": 0 reused, 2 computed by process 0 of 2" in stdout
    assert len(list((root / "cache" / "latents").rglob("*.safetensors"))) == 4
    ddp = run(accelerate_launch(2), write_config(root / "lora-ddp.toml", model, data, root / "lora-ddp",
                                                 data=cached, train={"checkpoint_every": 0}))
    assert ": 2 reused, 0 computed by process 0 of 2" in ddp.stdout  # read by every process, not refilled
    assert "all 2 processes hold identical trainable weights" in ddp.stdout
    assert losses(root / "nodes") == pytest.approx(losses(root / "lora-ddp"), abs=1e-6)
    # ... and both equal one process with the whole global batch (2 images per step).
    one = run([sys.executable], write_config(root / "lora-one.toml", model, data, root / "lora-one", data=cached,
                                             train={"checkpoint_every": 0, "batch_size": 2}))
    assert "batch 2×1×1" in one.stdout
    assert losses(root / "lora-ddp") == pytest.approx(losses(root / "lora-one"), abs=1e-6)
    a = load_file(root / "nodes" / "pytorch_lora_weights.safetensors")
    b = load_file(root / "lora-ddp" / "pytorch_lora_weights.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-4
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.load_lora_weights(root / "nodes")
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


@pytest.mark.slow
def test_degraded_launches_are_refused(world):
    model, data, root = world
    cfg = write_config(root / "refused.toml", model, data, root / "refused")
    # accelerate launch --cpu --num_processes 2 starts one plain process that would train alone.
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                           "--main_process_port", str(free_port()), *DIFFTUNE, str(cfg)],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode != 0
    assert "started this one as a single process" in proc.stderr and "torchrun --nproc_per_node N" in proc.stderr
    assert not (root / "refused" / "checkpoints").exists()
    # Two runs would write one output folder: a 2-process launch into a folder another run holds stops
    # on every process (none waits for the others), naming the holder.
    busy = root / "busy"
    busy.mkdir()
    with open(busy / LOCK, "w") as held_lock:
        fcntl.flock(held_lock, fcntl.LOCK_EX)
        proc = subprocess.run([*torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                                         str(free_port())), *DIFFTUNE, str(cfg), "--set", f"output.dir={busy}"],
                              capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode != 0
    # Each rank refuses; under load torchrun may end the second before it prints (seen in a loaded CI run), so
    # at least one says so, and nothing is written.
    assert proc.stderr.count(f"output.dir: {busy} is in use by a running difftune run") >= 1
    assert sorted(p.name for p in busy.iterdir()) == [LOCK]


def refused(args: list[str], cfg, env=ENV) -> str:
    proc = subprocess.run([sys.executable, *DIFFTUNE, str(cfg), *args], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_fsdp_in_one_process_and_accelerates_own_plugin_are_refused(tiny_sd, shapes_data, tmp_path):
    cfg = write_config(tmp_path / "c.toml", tiny_sd, shapes_data, tmp_path / "out", train={"distributed": "fsdp"})
    assert "torchrun --nproc_per_node 2" in refused([], cfg)
    err = refused(["--set", "train.distributed=ddp"], cfg, {**ENV, "ACCELERATE_USE_FSDP": "true"})
    assert "ACCELERATE_USE_FSDP" in err and 'train.distributed = "fsdp"' in err
