"""The diffusion loss, computed the same way by the training step and the held-out evaluation."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from difftune.data.batch import Batch
from difftune.models.base import Components, ModelFamily
from difftune.objectives.base import NoisedBatch, Objective


def batch_latents(family: ModelFamily, components: Components, batch: Batch, device: torch.device) -> torch.Tensor:
    """The batch's latents: sampled from the cached distribution (with this step's seed), or encoded now."""
    if batch.latent_mean is not None:
        mean = batch.latent_mean.to(device)
        return mean + batch.latent_std.to(device) * torch.randn_like(mean)
    with torch.no_grad():
        return family.encode_images(components, batch.pixels.to(device))


def batch_conditioning(family: ModelFamily, components: Components, batch: Batch, device: torch.device,
                       trains_text: bool) -> dict[str, torch.Tensor]:
    """The prompts' conditioning: cached embeddings, or encoded now (keeping the graph if a text encoder trains)."""
    if batch.conditioning is not None:
        return {k: v.to(device) for k, v in batch.conditioning.items()}
    with contextlib.nullcontext() if trains_text else torch.no_grad():
        return family.encode_prompt(components, batch.captions)


def diffusion_losses(family: ModelFamily, components: Components, objective: Objective, latents: torch.Tensor,
                     conditioning: dict[str, torch.Tensor], batch: Batch, *, timesteps: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image loss: noise the latents, let the denoiser predict, weight as the objective says.

    Random timesteps and noise unless given (the held-out loss fixes both).
    """
    noised = objective.noise(latents.float(), timesteps=timesteps, noise=noise)
    return predicted_losses(family, components, objective, noised, conditioning, batch)


def predicted_losses(family: ModelFamily, components: Components, objective: Objective, noised: NoisedBatch,
                     conditioning: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """Per-image loss of the denoiser's prediction on already noised latents."""
    prediction = family.predict(components, components.denoiser, noised.noisy_latents, noised.timesteps,
                                conditioning, batch)
    return objective.per_sample_loss(prediction, noised)


def seeded_noising(family: ModelFamily, components: Components, objective: Objective, batch: Batch,
                   device: torch.device) -> NoisedBatch:
    """The batch's latents sampled and noised image by image, each from its own seed (``batch.seeds``).

    Image ``i`` reseeds the torch RNG with ``batch.seeds[i]`` and draws its latent sample, noise and
    timestep from it, so what an image gets does not depend on the other images of its batch.
    """
    if batch.latent_mean is not None:
        mean, std = batch.latent_mean.to(device), batch.latent_std.to(device)
    else:
        with torch.no_grad():
            mean, std = (t.to(device) for t in family.latent_distribution(components, batch.pixels.to(device)))
    # Contiguous: a channels-last VAE's output would make the draws follow its memory layout, which for
    # one image need not be the layout it has within a batch.
    mean, std = mean.float().contiguous(), std.float().contiguous()
    parts = []
    for i, seed in enumerate(batch.seeds):
        torch.manual_seed(seed)
        latent = mean[i:i + 1] + std[i:i + 1] * torch.randn(mean[i:i + 1].shape, device=device)
        parts.append(objective.noise(latent))
    return NoisedBatch(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(NoisedBatch)))


def micro_batch_loss(family: ModelFamily, components: Components, objective: Objective, batch: Batch,
                     device: torch.device, trains_text: bool) -> torch.Tensor:
    """Mean loss of one micro-batch, with the data's per-image weights (e.g. prior preservation).

    With ``batch.seeds`` each image draws its latent sample, noise and timestep from its own seed."""
    conditioning = batch_conditioning(family, components, batch, device, trains_text)
    noised = (objective.noise(batch_latents(family, components, batch, device).float()) if batch.seeds is None
              else seeded_noising(family, components, objective, batch, device))
    losses = predicted_losses(family, components, objective, noised, conditioning, batch)
    if batch.loss_weights is not None:
        losses = losses * batch.loss_weights.to(losses.device)
    return losses.mean()


def trains_text(components: Components) -> bool:
    """True if any text-encoder weight trains (then prompt encoding keeps its graph)."""
    return any(p.requires_grad for encoder in components.text_encoders if encoder is not None
               for p in encoder.parameters())
