"""UCE and RECE: closed-form erasure of concepts from a UNet's cross-attention ``to_k`` / ``to_v`` weights.

Modules, one job each:

* :mod:`.closed_form` -- the UCE solve and RECE's adversarial embedding map (float64 Gram sums, Cholesky);
* :mod:`.epochs` -- token positions, the UCE start and the RECE epochs over already-encoded prompts;
* :mod:`.pipeline` -- :class:`RECESettings`, the :class:`RECEHost` interface and :func:`run_rece`, the one
  orchestration both the ComfyUI node and the MiniCanvas plug-in run.
"""

from .epochs import (
    RECE_PRESETS,
    RECEConfig,
    RECEResult,
    UCEStart,
    last_token_row,
    rece_edit,
    rece_token_rows,
    token_count,
    uce_preserve_scale,
    uce_start,
    uce_token_rows,
)
from .pipeline import (METHODS, UCE_TOKENS, RECEHost, RECERun, RECESettings, layer_changes, leak_probe,
                       relative_change, run_rece)

__all__ = [
    "METHODS",
    "RECE_PRESETS",
    "RECEConfig",
    "RECEHost",
    "RECEResult",
    "RECERun",
    "RECESettings",
    "UCEStart",
    "UCE_TOKENS",
    "last_token_row",
    "rece_edit",
    "rece_token_rows",
    "layer_changes",
    "leak_probe",
    "relative_change",
    "run_rece",
    "token_count",
    "uce_preserve_scale",
    "uce_start",
    "uce_token_rows",
]
