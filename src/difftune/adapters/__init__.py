"""Using trained adapters: generate, merge, convert, inspect and push — with safe, loud loading.

Importing this package is cheap; torch and diffusers load only inside the commands.
"""
