"""The reference side of ``quality.py``: diffusers' own example scripts on a task's data and settings.

Each script runs in a child process through ``run_diffusers_example.py`` (which registers the
PIL/NumPy stand-in for the ``torchvision.transforms`` they import) with the task's steps,
resolution, batch size, learning rate (constant, no warm-up), LoRA rank, precision and seed. The scripts
are read from a diffusers checkout given with ``--diffusers-examples``; nothing of them is copied
into difftune. What each script can read differs from difftune:

- ``train_text_to_image_lora.py`` reads the task's folder with its ``metadata.jsonl`` captions
  (``datasets``' imagefolder): the same images and captions difftune trains on;
- ``train_dreambooth_lora.py`` takes one ``--instance_prompt`` for every image (no per-image
  captions): ``"a sks diamond"``, while difftune trains on the images' captions (``--instance-prompt``
  gives difftune that prompt too); its class images
  are difftune's (the same base, prompt, steps and seeds), copied into its ``--class_data_dir``;
- ``textual_inversion.py`` writes its own captions from templates ("a photo of a <brn>", ...;
  ``--learnable_property object``) where difftune reads the captions that contain the token.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "run_diffusers_example.py"


def images_only(folder: Path, target: Path) -> Path:
    """A copy of ``folder``'s images alone (the DreamBooth and TI scripts open every file as an image)."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            shutil.copy2(p, target / p.name)
    return target


def reference_args(task, s, seed: int, data: Path, out: Path, examples: Path) -> list[str]:
    from quality import BATCH, RESOLUTION, TOKEN

    common = ["--pretrained_model_name_or_path", _model_folder(s.model), "--output_dir", str(out),
              "--resolution", str(RESOLUTION), "--center_crop", "--train_batch_size", str(BATCH),
              "--max_train_steps", str(s.steps(task)), "--learning_rate", str(task.learning_rate),
              "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--mixed_precision", s.precision,
              "--seed", str(seed), "--dataloader_num_workers", "0", "--report_to", "tensorboard"]
    script = examples / task.reference
    if task.reference.endswith("train_text_to_image_lora.py"):
        return [str(script), *common, "--train_data_dir", str(data), "--caption_column", "text",
                "--rank", str(task.method.get("rank", 4))]
    if task.reference.endswith("train_dreambooth_lora.py"):
        instance = images_only(data, out.parent / f"{out.name}-instance")
        classes = images_only(task.class_folder(s.work), out.parent / f"{out.name}-class")
        return [str(script), *common, "--instance_data_dir", str(instance), "--instance_prompt", f"a {task.word}",
                "--with_prior_preservation", "--class_data_dir", str(classes), "--class_prompt", task.class_prompt,
                "--num_class_images", str(s.class_count()), "--prior_loss_weight", "1.0",
                "--rank", str(task.method.get("rank", 4)), "--checkpointing_steps", "100000",
                *(["--train_text_encoder"] if task.method.get("train_text_encoder") else [])]
    if task.reference.endswith("textual_inversion.py"):
        images = images_only(data, out.parent / f"{out.name}-images")
        return [str(script), *common, "--train_data_dir", str(images), "--placeholder_token", TOKEN,
                "--initializer_token", task.method["initializer_token"][0], "--learnable_property", "object",
                "--save_steps", "100000", "--checkpointing_steps", "100000"]
    raise ValueError(f"{task.name}: no reference script known for {task.reference}")


def _model_folder(model: str) -> str:
    from quality import _resolved

    return _resolved(model)


def run_reference(task, s, seed: int, data: Path, out: Path, examples: Path) -> float:
    """Train with the diffusers example; returns its wall seconds (the child process, load to save)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if task.prior:  # the script trains on the base's images of its class prompt, drawn before its clock starts
        from quality import class_prompt_images

        class_prompt_images(task, s, seed)
    args = reference_args(task, s, seed, data, out, examples)
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.run([sys.executable, str(RUNNER), *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=out, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode:
        tail = (out.parent / f"{out.name}.log").read_text().splitlines()[-5:]
        raise RuntimeError(f"{task.reference} failed ({proc.returncode}): " + " | ".join(tail))
    return seconds
