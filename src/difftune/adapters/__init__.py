"""Adapter files: what a weight file is, LoRA adapters in one in-memory form, the diffusers and kohya
formats, conversion, merging, reduction to plain LoRA, inspection and safe loading.

Importing this package is cheap; torch loads inside the functions that need it.
"""
