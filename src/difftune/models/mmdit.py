"""What SD3 and Flux share: an MMDiT transformer over latent patches, trained by flow matching."""

from __future__ import annotations

from difftune.models.base import ModelFamily

#: LoRA targets of MMDiT denoisers: the attention projections of both streams (image and text).
MMDIT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class MMDiTFamily(ModelFamily):
    """A family whose denoiser is an MMDiT ``transformer`` trained with the ``flow_match`` objective."""

    objective = "flow_match"
    denoiser_name = "transformer"
    default_lora_targets = MMDIT_LORA_TARGETS
    sampling_scheduler = "FlowMatchEulerDiscreteScheduler"
    #: ``transformer_blocks.N`` is block N (kind ""), Flux's ``single_transformer_blocks.N`` is ``single.N``.
    block_pattern = r"^(single)_transformer_blocks\.(\d+)\.|^transformer_blocks\.(\d+)\."
