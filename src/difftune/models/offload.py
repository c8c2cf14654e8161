"""Block offloading of a frozen denoiser (``model.offload = "blocks"``): weights visit the GPU only while used.

The frozen weights of each block live in host memory; hooks copy them to the device just before the
block runs and drop the device copy right after — in the forward pass, in the recomputation that
gradient checkpointing does during the backward pass, and in the backward pass itself (a linear
layer's input gradient needs its weight again). Trainable parameters (LoRA) are never moved: they stay
on the device with their gradients and optimizer state, which is why diffusers' group offloading
(which moves every parameter of a block, and restores them from a host copy taken when the hooks
were set) is not used for training.

Because the host copy is the master and frozen weights never change, "offloading" is only freeing
the device copy: nothing is copied back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: Transformer denoisers: their repeated blocks (each returns a flat tuple of tensors).
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
#: UNets: the layers inside their down, mid and up blocks. A UNet block returns its skip connections in
#: a nested tuple, which module backward hooks do not see, so the unit of offloading is one level down.
UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks")
UNET_LAYERS = ("resnets", "attentions", "downsamplers", "upsamplers")


def offloadable_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules whose frozen weights are moved one at a time (the rest stays on the device)."""
    blocks: list[nn.Module] = []
    for name in BLOCK_LISTS:
        blocks += list(getattr(model, name, None) or [])
    for name in UNET_BLOCKS:
        found = getattr(model, name, None)
        for block in (found if isinstance(found, nn.ModuleList) else [found] if found is not None else []):
            for layer in UNET_LAYERS:
                blocks += list(getattr(block, layer, None) or [])
    return blocks


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class BlockOffload:
    """The hooks for one block; ``onload``/``offload`` swap its frozen tensors between host and device.

    ``to_device`` makes the device copy of a host tensor (``tensor.to(device, non_blocking=True)`` on
    a GPU); tests pass a function that makes offloaded weights unusable, so any use of one fails.
    """

    def __init__(self, block: nn.Module, to_device: Callable[[torch.Tensor], torch.Tensor],
                 placeholder: Callable[[torch.Tensor], torch.Tensor], checkpointed: bool) -> None:
        self.block, self.checkpointed = block, checkpointed
        self.to_device, self.placeholder = to_device, placeholder
        self.frozen = [p for p in block.parameters() if not p.requires_grad]
        self.trainable = [p for p in block.parameters() if p.requires_grad]
        self.host = {id(p): p.data for p in self.frozen}
        self.loaded = True
        self.inputs_need_grad = False
        self.grads_done = 0
        self.offload()
        self.handles = [
            block.register_forward_pre_hook(self.before_forward, with_kwargs=True),
            block.register_forward_hook(lambda *_: self.after_forward()),
            block.register_full_backward_pre_hook(lambda *_: self.onload()),
            block.register_full_backward_hook(lambda *_: self.after_backward()),
            *(p.register_post_accumulate_grad_hook(lambda _: self.trainable_grad_done()) for p in self.trainable),
        ]

    def before_forward(self, _module, args, kwargs) -> None:
        if not _in_backward():
            tensors = [*args, *kwargs.values()]
            self.inputs_need_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
        self.onload()

    def after_backward(self) -> None:
        # With no input that needs a gradient, torch calls this hook before the block's own backward has
        # run (there is no input gradient to wait for); the trainable weights' gradients say when it is done.
        if self.inputs_need_grad:
            self.offload()

    def trainable_grad_done(self) -> None:
        self.grads_done += 1
        if self.grads_done == len(self.trainable):
            self.grads_done = 0
            if not self.inputs_need_grad:
                self.offload()

    def after_forward(self) -> None:
        # Kept while the backward pass needs them: when this forward is gradient checkpointing's
        # recomputation (the block's backward follows at once), or when it saved tensors for the backward
        # (no checkpointing). Otherwise the block's backward pre-hook brings them back when needed.
        if _in_backward() or (torch.is_grad_enabled() and not self.checkpointed):
            return
        self.offload()

    def onload(self) -> None:
        if not self.loaded:
            for p in self.frozen:
                p.data = self.to_device(self.host[id(p)])
            self.loaded = True

    def offload(self) -> None:
        if self.loaded:
            for p in self.frozen:
                p.data = self.placeholder(self.host[id(p)])
            self.loaded = False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for p in self.frozen:
            p.data = self.host[id(p)]


def offload_blocks(model: nn.Module, device: torch.device, *, checkpointed: bool,
                   to_device: Callable | None = None, placeholder: Callable | None = None) -> list[BlockOffload]:
    """Keep ``model``'s frozen block weights on the host and bring each block to ``device`` only while it runs.

    Everything outside the blocks (embeddings, final layers, trainable parameters) goes to ``device``.
    """
    to_device = to_device or (lambda t: t.to(device, non_blocking=True))
    placeholder = placeholder or (lambda t: torch.empty(0, dtype=t.dtype, device=device))
    blocks = offloadable_blocks(model)
    inside = {id(p) for b in blocks for p in b.parameters() if not p.requires_grad}
    for p in model.parameters():
        if id(p) not in inside:
            p.data = p.data.to(device)
    for b in model.buffers():
        b.data = b.data.to(device)
    return [BlockOffload(block, to_device, placeholder, checkpointed) for block in blocks]
