"""MiniCanvas: a miniature UnlearnCanvas that ships with sae_core.

Procedural 32x32 images of objects x styles, a small SD-structured text-to-image model
(CLIP-architecture text encoder + UNet with SpatialTransformers), object/style judges,
the UnlearnCanvas metrics and a registry of erasure methods. Entry points:

* :class:`MiniCanvas` (``MiniCanvas.load()``): sample, judge, and the interfaces methods use;
* :mod:`.metrics`: UA / IRA / CRA as pure functions;
* :mod:`.methods`: the method registry (``get_method``), over the plug-ins in :mod:`.plugins`;
* :mod:`.cli`: ``python -m sae_core demo`` and ``bench``;
* ``python -m sae_core.minicanvas.train``: retrain the shipped weights.
"""

from .canvas import JudgeOutput, MiniCanvas, PromptSpec, evaluation_prompts
from .data import OBJECTS, STYLES, styled_prompt, unstyled_prompt
from .diffusion import SamplingContext
from .methods import get_method, register_method, registered_methods
from .metrics import ErasureMetrics, EvalTable

__all__ = [
    "MiniCanvas", "JudgeOutput", "PromptSpec", "evaluation_prompts", "OBJECTS", "STYLES",
    "styled_prompt", "unstyled_prompt", "SamplingContext", "register_method", "get_method",
    "registered_methods", "ErasureMetrics", "EvalTable",
]
