"""LoRA under autocast: plain LoRA layers skip peft's input casts (bit-identical), variant layers keep them."""

from __future__ import annotations

import torch

from difftune.methods.lora import skip_input_casts

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def _lora_unet(tiny_sd):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet", torch_dtype=torch.bfloat16)
    unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            p.data.normal_(0, 0.05)  # lora_B starts at zero; give every path a gradient
    return unet


def _view(unet):
    """The training view of a run whose only trainable module is ``unet``."""
    from difftune.models.base import Components

    return Components(denoiser=unet, vae=None, text_encoders=[None], tokenizers=[], noise_scheduler=None,
                      source=None, encoder_names=["text_encoder"])


def _lora_step(unet) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Output, LoRA gradients and the number of dtype conversions of one bf16-autocast step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                CountCasts.casts += 1
            return func(*args, **(kwargs or {}))

    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, unet.config.in_channels, 16, 16, generator=generator)
    text = torch.randn(1, 8, unet.config.cross_attention_dim, generator=generator)
    with CountCasts():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(sample, torch.tensor([500]), encoder_hidden_states=text, return_dict=False)[0]
        out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    unet.zero_grad(set_to_none=True)
    return out.detach(), grads, CountCasts.casts


def test_skipping_peft_input_casts_under_autocast_changes_no_bit(tiny_sd):
    unet = _lora_unet(tiny_sd)
    out_before, grads_before, casts_before = _lora_step(unet)
    assert skip_input_casts(_view(unet)) == len([m for m in unet.modules() if hasattr(m, "lora_A")])
    out_after, grads_after, casts_after = _lora_step(unet)
    assert casts_after < casts_before  # the activation copies are gone ...
    assert torch.equal(out_after, out_before)  # ... and nothing else changed, to the bit
    assert grads_after.keys() == grads_before.keys() and grads_before
    for name, grad in grads_before.items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(grads_after[name], grad), name


def test_dora_layers_keep_peft_input_casts(tiny_sd):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, use_dora=True, target_modules=["to_q"]))
    assert skip_input_casts(_view(unet)) == 0
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in unet.modules())
