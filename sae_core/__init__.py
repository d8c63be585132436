"""sae_core: sparse autoencoders and concept-erasure maths for diffusion models.

This package never imports ComfyUI; the ComfyUI adapters live in ``nodes/``.
"""

__version__ = "0.1.0"
