"""Prompts with known answers, sampling them from a pipeline, and scoring the images with the judge.

Used by ``difftune demo``, the tests and the benchmarks (``benchmarks/world.py``); the quality
benchmark (issue 14) builds its tasks from the same pieces.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difftune.world import grammar as g
from difftune.world.scene import Scene

#: Sampling settings the figures in docs/world.md were measured with.
SAMPLE_STEPS = 20
GUIDANCE = 5.0


@dataclass(frozen=True)
class Prompt:
    """A prompt and the attributes an image drawn from it must show (only the ones it states)."""

    text: str
    expected: dict[str, str] = field(default_factory=dict)


def prompt_for(scene: Scene, *, mention: Sequence[str] = ("size", "colour", "background", "position"),
               shape_word: str | None = None) -> Prompt:
    """A prompt in canonical words stating the shape and ``mention``, with what it states.

    ``shape_word`` replaces the shape's name (a trigger word); the expected shape stays the scene's.
    """
    keep = set(mention)
    expected = {"shape": scene.shape, **{k: getattr(scene, k) for k in mention}}
    if scene.style != "filled":
        expected["style"] = scene.style
    return Prompt(_compose(_canonical_parts(scene, shape_word), keep), expected)


def _canonical_parts(scene: Scene, shape_word: str | None) -> dict[str, str]:
    return {
        "size": g.SIZE_WORDS[scene.size][0],
        "colour": scene.colour,
        "noun": shape_word or scene.shape,
        "background": g.BACKGROUND_PHRASES[scene.background][0],
        "position": g.POSITION_PHRASES[scene.position][0],
        "style": scene.style,
    }


def _compose(parts: dict[str, str], keep: set[str]) -> str:
    words = [parts[k] for k in ("size", "colour") if k in keep] + [parts["noun"]]
    thing = " ".join(words)
    text = f"{g.article(thing)} {thing}"
    if parts["style"] == "outline":
        text = f"an outline drawing of {text}"
    if "background" in keep:
        text += " " + parts["background"]
    if "position" in keep:
        text += ", " + parts["position"]
    return text


def unseen_combination_prompts(n: int = 64, seed: int = 0) -> list[Prompt]:
    """``n`` prompts whose shape/colour pair was held out of pretraining (other attributes at random)."""
    rng = random.Random(f"unseen/{seed}")
    pairs = g.held_out_pairs()
    prompts = []
    for i in range(n):
        shape, colour = pairs[i % len(pairs)]
        scene = Scene(shape=shape, colour=colour, size=rng.choice(g.SIZES), position=rng.choice(g.POSITIONS),
                      background=rng.choice(g.BACKGROUNDS))
        mention = [k for k in ("size", "background", "position") if rng.random() < 0.5]
        prompts.append(prompt_for(scene, mention=("colour", *mention)))
    return prompts


@contextlib.contextmanager
def _libraries_quiet() -> Iterator[None]:
    """diffusers' and transformers' load-time notices (no torchvision, no text-encoder LoRA keys) off."""
    import diffusers
    import transformers

    levels = diffusers.logging.get_verbosity(), transformers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])


def load_pipeline(folder: str | Path, lora: str | Path | None = None):
    """A plain diffusers ``StableDiffusionPipeline`` of ``folder`` (fp32), with a LoRA run folder loaded."""
    from diffusers import StableDiffusionPipeline

    with _libraries_quiet():
        pipe = StableDiffusionPipeline.from_pretrained(str(folder))
        if lora is not None:
            pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = SAMPLE_STEPS,
           guidance: float = GUIDANCE, batch_size: int = 16, size: int = 64) -> list:
    """One image per (prompt, seed) pair, in order; each image's noise comes from its own seed."""
    images = []
    pipe.set_progress_bar_config(disable=True)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:start + batch_size]]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                   height=size, width=size)
        images.extend(out.images)
    return images


def score(judge, images: Sequence, prompts: Sequence[Prompt]) -> tuple[list[dict[str, str]], dict[str, float]]:
    """The judge's verdicts and, per attribute, the fraction of images that show what was asked."""
    from difftune.world.judge import agreement

    verdicts = judge(images)
    return verdicts, agreement(verdicts, [p.expected for p in prompts])


def other_attributes_right(verdicts: Sequence[dict[str, str]], prompts: Sequence[Prompt],
                           skip: Sequence[str] = ("shape",)) -> float:
    """Fraction of stated attributes (except ``skip``) that the images show, over all images."""
    right = total = 0
    for verdict, prompt in zip(verdicts, prompts, strict=True):
        for name, value in prompt.expected.items():
            if name not in skip:
                total += 1
                right += verdict[name] == value
    return right / total if total else float("nan")
