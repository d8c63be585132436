"""Selective Amnesia: forget a concept with a LoRA trained on a surrogate, generative replay and EWC.

One package, one job per module:

``config``     :class:`AmnesiaConfig`, the one settings object (node inputs and bench options use its names)
``pipeline``   the host-neutral orchestration both hosts call (Fisher, training data, the LoRA) and the
               host interface (:class:`~sae_core.amnesia.pipeline.AmnesiaHost`)
``lora``       LoRA / LoCon layers and weight functions, target presets, LoRA files
``ewc``        the exact EWC penalty on LoRA deltas
``fisher``     the diagonal Fisher estimator and Fisher files
``convert``    converter of a pickled Fisher (the published SD v1.4 one): ``python -m sae_core.amnesia.convert``
``samples``    sample sets: drawn from the base model, stored, cached
``trainer``    the training objective, its loop and checkpoints, the loss curve
``resumable``  the loop shape and reuse / resume / refuse rule the trainer and the Fisher share

The ComfyUI glue is ``nodes/amnesia.py``; the MiniCanvas plug-in is
``sae_core/minicanvas/plugins/amnesia.py``.
"""

from .config import PRECISIONS, REPLAY_TARGETS, AmnesiaConfig
from .samples import SAMPLES_FORMAT, SampleSet, cached_samples, generate_samples, load_samples, noise_samples, save_samples
from .trainer import CHECKPOINT_FORMAT, LOSS_TERMS, AmnesiaResult, AmnesiaTrainer, loss_curve_image, step_generator

__all__ = [
    "AmnesiaConfig",
    "PRECISIONS",
    "REPLAY_TARGETS",
    "SAMPLES_FORMAT",
    "CHECKPOINT_FORMAT",
    "LOSS_TERMS",
    "SampleSet",
    "AmnesiaResult",
    "AmnesiaTrainer",
    "step_generator",
    "generate_samples",
    "noise_samples",
    "save_samples",
    "load_samples",
    "cached_samples",
    "loss_curve_image",
]
