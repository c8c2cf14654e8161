"""Sampler choices for ``difftune generate`` (kept free of heavy imports: the CLI parser reads it)."""

#: ``--scheduler`` choices -> diffusers scheduler class names ("default": the family's sampling scheduler).
SCHEDULERS = {
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}
