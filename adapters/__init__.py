"""Backends (numpy, torch, mlx) and engine integrations (transformers, mlx-lm).

Nothing here is imported by ``import refreekv``: each module imports its framework, and is
loaded only when an array of that framework reaches refreekv or a user imports it.
"""
