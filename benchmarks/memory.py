"""Memory of a LoRA run on full-size SD 1.5, SDXL and Flux.1-dev, per precision of the frozen base.

Run (one architecture and precision per process, so each measures its own peaks)::

    PYTHONPATH=src python benchmarks/memory.py --arch flux --precision int8 --work /path/with/40GB
    PYTHONPATH=src python benchmarks/memory.py --table --work /path/with/40GB     # the table so far
    PYTHONPATH=src python benchmarks/memory.py --clean --work /path/with/40GB     # delete the weights

Each architecture is built from its real configs (written here; nothing is downloaded) with random
weights, written once to ``WORK/models/ARCH`` as a diffusers folder of safetensors shards — one
shard at a time, so writing never holds the model either. Then ``difftune train`` runs in a child
process as a user would: LoRA rank 16, batch 1, gradient checkpointing, cached latents and text
embeddings, bf16, two steps, ``model.quantize`` (and ``model.quantize_text_encoders``) set to the
precision. The figures come from the run's ``logs/performance.json``: the start-up peak (loading,
quantising, caching), the training peak and its breakdown, seconds per step; the benchmark also
samples the child's resident set itself as a cross-check. Results are appended to
``WORK/results.json``; ``--table`` prints them as the table in docs/memory.md.

Before a run it checks the machine's available memory and refuses a run that cannot fit (the bf16
Flux transformer alone is 23.8 GB), so it never pushes the machine into the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import torch

SHARD_BYTES = 5 * 10**9
PRECISIONS = ("bf16", "int8", "fp8", "int4", "nf4")

# --- the real configs ---------------------------------------------------------------------------

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              is_encoder_decoder=False, use_cache=False)
VAE_SD = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215)
UNET_SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8)
UNET_SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
VAE_FLUX = dict(VAE_SD, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)

#: Per architecture: the tiny builder (tokenizers, scheduler, model_index.json), the training resolution,
#: and each weight folder: (subfolder, class, config, library).
ARCHS = {
    "sd15": ("build_tiny_sd", 512, [("unet", "UNet2DConditionModel", UNET_SD15, "diffusers"),
                                    ("text_encoder", "CLIPTextModel", CLIP_L, "transformers"),
                                    ("vae", "AutoencoderKL", VAE_SD, "diffusers")]),
    "sdxl": ("build_tiny_sdxl", 1024, [("unet", "UNet2DConditionModel", UNET_SDXL, "diffusers"),
                                       ("text_encoder", "CLIPTextModel", CLIP_L, "transformers"),
                                       ("text_encoder_2", "CLIPTextModelWithProjection", CLIP_G, "transformers"),
                                       ("vae", "AutoencoderKL", dict(VAE_SD, scaling_factor=0.13025,
                                                                     sample_size=1024), "diffusers")]),
    "flux": ("build_tiny_flux", 512, [("transformer", "FluxTransformer2DModel", FLUX_DEV, "diffusers"),
                                      ("text_encoder", "CLIPTextModel", CLIP_L, "transformers"),
                                      ("text_encoder_2", "T5EncoderModel", T5_XXL, "transformers"),
                                      ("vae", "AutoencoderKL", VAE_FLUX, "diffusers")]),
}

#: Published figures to compare with (docs/memory.md says where they come from).
ANCHORS = {
    "flux": "SimpleTuner: >30 GB bf16, ~18 GB int8, ~13 GB int4, ~9 GB NF4 (rank-16 LoRA, GPU); "
            "~50 GB system RAM to quantise at start-up. kohya sd-scripts: 12/16/20 GB settings with fp8 + block swap",
}


# --- writing the random full-size folders ----------------------------------------------------------

def empty_component(cls_name: str, config: dict, library: str):
    from accelerate import init_empty_weights

    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, cls_name)
        with init_empty_weights():
            return cls.from_config(config)
    import transformers

    cls = getattr(transformers, cls_name)
    config_cls = transformers.T5Config if cls_name.startswith("T5") else transformers.CLIPTextConfig
    with init_empty_weights():
        return cls._from_config(config_cls(**config))


#: Random normals drawn once and tiled over every weight: drawing 17 B fresh normals takes tens of minutes
#: of a shared 2-core CPU, copying is disk-bound. A memory and speed benchmark needs finite activations,
#: not independent weights; the period (2**24 + 1, odd) keeps any two rows of a layer different.
POOL_SIZE = 2**24 + 1
_pools: dict[int, torch.Tensor] = {}


def random_like(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Weights that keep activations finite: 1/sqrt(fan-in) normals, unit norm scales, zero biases."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    fan_in = math.prod(shape[1:])
    if fan_in not in _pools:
        if not _pools:
            _pools[0] = torch.empty(POOL_SIZE, dtype=torch.float32).normal_(generator=generator)
        _pools[fan_in] = (_pools[0] / math.sqrt(fan_in)).to(torch.bfloat16)
    pool, flat = _pools[fan_in], torch.empty(math.prod(shape), dtype=torch.bfloat16)
    for start in range(0, flat.numel(), POOL_SIZE):
        chunk = flat[start:start + POOL_SIZE]
        chunk.copy_(pool[:chunk.numel()])
    return flat.view(shape)


def write_component(folder: Path, cls_name: str, config: dict, library: str, seed: int = 0) -> int:
    """Write one component's config and random bf16 weights shard by shard; return its parameter count."""
    from safetensors.torch import save_file

    model = empty_component(cls_name, config, library)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if library == "diffusers":
        model.save_config(folder)
        stem = "diffusion_pytorch_model"
    else:
        model.config.architectures = [cls_name]  # as a real checkpoint's config names it (diffusers' SDXL example reads it)
        model.config.save_pretrained(folder)
        stem = "model"
    state = model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        file = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            t = state[name]
            if t.device.type == "meta" or t.is_floating_point():
                tensors[name] = random_like(name, t.shape, generator)
            else:
                tensors[name] = t.clone()
            total += tensors[name].numel()
            weight_map[name] = file
        save_file(tensors, folder / file, {"format": "pt"})
        del tensors
        print(f"  {folder.name}: wrote {file}", flush=True)
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def build_model(work: Path, arch: str) -> Path:
    """``WORK/models/ARCH``: the tiny folder's tokenizers, scheduler and index with full-size components."""
    from difftune import tiny

    root = work / "models" / arch
    done = root / "complete.json"
    if done.is_file():
        return root
    builder, _, components = ARCHS[arch]
    if root.exists():
        shutil.rmtree(root)
    getattr(tiny, builder)(root)
    counts = {}
    for sub, cls_name, config, library in components:
        print(f"writing {arch}/{sub} ({cls_name})", flush=True)
        counts[sub] = write_component(root / sub, cls_name, config, library)
    tok2 = root / "tokenizer_2" / "tokenizer_config.json"
    if arch == "flux" and tok2.is_file():  # T5 prompts of Flux.1-dev: 512 tokens
        cfg = json.loads(tok2.read_text())
        cfg["model_max_length"] = 512
        tok2.write_text(json.dumps(cfg))
    done.write_text(json.dumps({"parameters": counts}))
    return root


def dataset(work: Path, resolution: int) -> Path:
    import numpy as np
    from PIL import Image

    folder = work / "data" / str(resolution)
    if not (folder / "metadata.jsonl").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        pixels = (rng.random((resolution, resolution, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / "0.png")
        (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a photo of sks"}) + "\n")
    return folder


# --- one measured run ----------------------------------------------------------------------------

def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def bf16_bytes(model: Path, subfolders: list[str]) -> int:
    params = json.loads((model / "complete.json").read_text())["parameters"]
    return sum(2 * params[s] for s in subfolders)


#: The run is stopped if the machine's available memory falls below this (other jobs share it).
RESERVE_BYTES = 1.5 * 2**30


def sample_rss(child: subprocess.Popen, peak: list[int], stop: threading.Event, aborted: list[str]) -> None:
    """Sample the child's resident set; kill it before the machine runs out of memory."""
    status = Path(f"/proc/{child.pid}/status")
    while not stop.is_set():
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except OSError:
            return
        if available_bytes() < RESERVE_BYTES:
            aborted.append(f"stopped: the machine had under {RESERVE_BYTES / 2**30:.1f} GiB available "
                           f"(this run's RSS {peak[0] / 2**30:.1f} GiB)")
            child.kill()
            return
        stop.wait(0.2)


def measure(command: list[str], env: dict, log_path: Path) -> tuple[int, int, list[str], float]:
    """Run ``command`` with its output in ``log_path``, sampling its resident set: (exit code, peak RSS
    bytes, why it was stopped if it was, wall seconds)."""
    started = time.time()
    with log_path.open("w") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak, stop, aborted = [0], threading.Event(), []
        sampler = threading.Thread(target=sample_rss, args=(child, peak, stop, aborted), daemon=True)
        sampler.start()
        code = child.wait()
        stop.set()
        sampler.join()
    return code, peak[0], aborted, round(time.time() - started, 1)


def run(work: Path, arch: str, precision: str, steps: int) -> dict:
    _, resolution, components = ARCHS[arch]
    model = build_model(work, arch)
    denoiser = components[0][0]
    need = bf16_bytes(model, [denoiser]) if precision == "bf16" else 0
    free = available_bytes()
    if need and need > free:
        return {"arch": arch, "precision": precision, "skipped":
                f"the bf16 {denoiser} alone is {need / 1e9:.1f} GB, more than the {free / 1e9:.1f} GB available"}
    out = work / "runs" / f"{arch}-{precision}"
    if out.exists():
        shutil.rmtree(out)
    quant = "none" if precision == "bf16" else precision
    config = {
        "model": {"path": str(model), "quantize": quant, "quantize_text_encoders": quant},
        "method": {"type": "lora", "rank": 16},
        "data": {"path": str(dataset(work, resolution)), "resolution": resolution, "center_crop": True,
                 "cache_latents": True, "cache_text": True, "cache_dir": str(work / "cache" / f"{arch}-{precision}")},
        "train": {"max_steps": steps, "batch_size": 1, "gradient_checkpointing": True, "mixed_precision": "bf16",
                  "checkpoint_every": 0, "log_every": 1},
        "logging": {"report_to": "none"},
        "output": {"dir": str(out)},
    }
    from difftune.config.loader import dump_toml

    toml = work / f"{arch}-{precision}.toml"
    toml.write_text(dump_toml(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    code, peak, aborted, seconds = measure([sys.executable, "-m", "difftune", "train", str(toml)], env,
                                           work / f"{arch}-{precision}.log")
    row = {"arch": arch, "precision": precision, "resolution": resolution, "date": date.today().isoformat(),
           "wall_seconds": seconds, "sampled_peak_rss_bytes": peak,
           "bf16_denoiser_bytes": bf16_bytes(model, [denoiser]), "exit_code": code}
    perf = out / "logs" / "performance.json"
    if aborted or code != 0 or not perf.is_file():
        tail = (work / f"{arch}-{precision}.log").read_text().strip().splitlines()[-2:]
        row["failed"] = aborted[0] if aborted else " | ".join(tail)
        return row
    report = json.loads(perf.read_text())
    row.update(load_peak_bytes=report["load_peak_memory_bytes"], train_peak_bytes=report["peak_memory_bytes"],
               step_seconds=report["step_seconds"], breakdown=report.get("peak_memory_breakdown_bytes", {}),
               memory_kind=report["peak_memory_kind"])
    return row


# --- diffusers' example scripts, for comparison ----------------------------------------------------

#: The diffusers example that trains the same LoRA, per architecture (Flux's loads the bf16
#: transformer, 23.8 GB, and cannot run in this machine's 24 GB).
REFERENCE_SCRIPTS = {"sd15": "text_to_image/train_text_to_image_lora.py",
                     "sdxl": "text_to_image/train_text_to_image_lora_sdxl.py"}


def run_reference(work: Path, arch: str, examples: Path, steps: int) -> dict:
    """The diffusers example script on the same model, image, resolution, rank, batch, bf16 and
    gradient checkpointing, in a child process whose resident set is sampled like difftune's."""
    _, resolution, _ = ARCHS[arch]
    script = examples / REFERENCE_SCRIPTS[arch]
    out = work / "runs" / f"{arch}-diffusers"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, str(Path(__file__).with_name("run_diffusers_example.py")), str(script),
               "--pretrained_model_name_or_path", str(build_model(work, arch)),
               "--train_data_dir", str(dataset(work, resolution)), "--caption_column", "text",
               "--resolution", str(resolution), "--center_crop", "--train_batch_size", "1",
               "--max_train_steps", str(steps), "--gradient_checkpointing", "--mixed_precision", "bf16",
               "--rank", "16", "--learning_rate", "1e-4", "--seed", "0", "--checkpointing_steps", "100000",
               "--output_dir", str(out), "--report_to", "tensorboard"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(work / "hf-datasets"))
    code, peak, aborted, seconds = measure(command, env, work / f"{arch}-diffusers.log")
    row = {"arch": arch, "tool": "diffusers", "script": REFERENCE_SCRIPTS[arch], "resolution": resolution,
           "date": date.today().isoformat(), "wall_seconds": seconds, "sampled_peak_rss_bytes": peak,
           "exit_code": code}
    text = (work / f"{arch}-diffusers.log").read_text()
    rates = re.findall(r"([\d.]+)s/it", text)  # its progress bar: seconds per step, smoothed
    if rates:
        row["step_seconds"] = float(rates[-1])
    if aborted or code != 0 or not (out / "pytorch_lora_weights.safetensors").is_file():
        tail = text.strip().splitlines()[-2:]
        row["failed"] = aborted[0] if aborted else " | ".join(tail)
    return row


def reference_table(rows: list[dict]) -> str:
    """difftune (bf16 base) beside diffusers' script: whole-command wall time and sampled peak RSS."""
    lines = ["| model | tool | peak RSS, whole run (GiB) | s/step | wall time, load + steps (s) | date |",
             "|---|---|---|---|---|---|"]
    latest = {}
    for r in rows:
        if r.get("tool") == "diffusers" or r.get("precision") == "bf16":
            latest[(r["arch"], r.get("tool", "difftune"))] = r
    for (arch, tool), r in sorted(latest.items(), key=lambda kv: (list(ARCHS).index(kv[0][0]), kv[0][1] != "difftune")):
        if not any(x[0] == arch and x[1] == "diffusers" for x in latest):
            continue
        name = {"sd15": "SD 1.5 @512", "sdxl": "SDXL @1024", "flux": "Flux.1-dev @512"}[arch]
        label = f"diffusers `{r['script'].rsplit('/', 1)[1]}`" if tool == "diffusers" else "difftune"
        steps = r.get("step_seconds")
        per_step = "—" if not steps else f"{(sum(steps) / len(steps) if isinstance(steps, list) else steps):.1f}"
        result = (f"failed: {r['failed']} |||" if "failed" in r
                  else f"{gb(r['sampled_peak_rss_bytes'])} | {per_step} | {r['wall_seconds']:.0f}")
        lines.append(f"| {name} | {label} | {result} | {r['date']} |")
    return "\n".join(lines)


# --- the table -------------------------------------------------------------------------------------

def gb(n: int | None) -> str:
    return "—" if not n else f"{n / 2**30:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | base | load peak (GiB) | train peak (GiB) | weights / trainable / optimizer / rest (GiB) "
             "| s/step | date |", "|---|---|---|---|---|---|---|"]
    order = {a: i for i, a in enumerate(ARCHS)}
    latest = {}
    for r in rows:
        latest[(r["arch"], r["precision"])] = r
    for (arch, precision), r in sorted(latest.items(), key=lambda kv: (order[kv[0][0]], PRECISIONS.index(kv[0][1]))):
        name = {"sd15": "SD 1.5 @512", "sdxl": "SDXL @1024", "flux": "Flux.1-dev @512"}[arch]
        if "skipped" in r or "failed" in r:
            lines.append(f"| {name} | {precision} | {r.get('skipped') or 'failed: ' + r['failed']} |||||")
            continue
        b = r["breakdown"]
        parts = " / ".join(gb(b.get(k)) for k in ("weights", "trainable", "optimizer", "activations_and_other"))
        steps = r["step_seconds"]
        lines.append(f"| {name} | {precision} | {gb(r['load_peak_bytes'])} | {gb(r['train_peak_bytes'])} | {parts} "
                     f"| {sum(steps) / len(steps):.0f} | {r['date']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the random weights (~40 GB for Flux)")
    parser.add_argument("--arch", choices=tuple(ARCHS), action="append")
    parser.add_argument("--precision", choices=PRECISIONS, action="append")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--write-only", action="store_true", help="only write the random model folders")
    parser.add_argument("--table", action="store_true", help="print the table of WORK/results.json")
    parser.add_argument("--clean", action="store_true", help="delete WORK/models (the random weights)")
    parser.add_argument("--reference", type=Path, metavar="EXAMPLES",
                        help="also run diffusers' example script for each --arch (SD 1.5, SDXL) from this "
                             "diffusers examples/ folder, for comparison with the bf16 row")
    parser.add_argument("--reference-only", action="store_true", help="with --reference: run only the example scripts")
    args = parser.parse_args()
    results = args.work / "results.json"
    if args.clean:
        shutil.rmtree(args.work / "models", ignore_errors=True)
        return
    rows = json.loads(results.read_text()) if results.is_file() else []
    if not args.table:
        args.work.mkdir(parents=True, exist_ok=True)
        for arch in args.arch or list(ARCHS):
            if args.write_only:
                build_model(args.work, arch)
                continue
            jobs = [] if args.reference_only else [(precision, run) for precision in (args.precision or PRECISIONS)]
            if args.reference and arch in REFERENCE_SCRIPTS:
                jobs.append(("diffusers", lambda work, arch, _precision, steps: run_reference(work, arch, args.reference, steps)))
            for precision, job in jobs:
                print(f"{arch} {precision}: running (available memory {available_bytes() / 2**30:.1f} GiB)", flush=True)
                row = job(args.work, arch, precision, args.steps)
                print(json.dumps(row), flush=True)
                # Re-read: another invocation (another architecture) may have added rows meanwhile.
                rows = json.loads(results.read_text()) if results.is_file() else []
                rows.append(row)
                results.write_text(json.dumps(rows, indent=1))
    print(table([r for r in rows if "tool" not in r]))
    print()
    print(reference_table(rows))
    for arch, text in ANCHORS.items():
        print(f"anchors ({arch}): {text}")


if __name__ == "__main__":
    main()
