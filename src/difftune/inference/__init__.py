"""Using trained results: load a base model with adapters and embeddings, and generate images.

Importing this package is cheap; torch and diffusers load inside the functions that need them.
"""
