"""UCE and RECE: closed-form erasure of concepts from a UNet's cross-attention ``to_k`` / ``to_v`` weights.

Modules, one job each:

* :mod:`.closed_form` -- the UCE solve and RECE's adversarial embedding map (float64 Gram sums, Cholesky);
* :mod:`.epochs` -- token positions, the UCE start and the RECE epochs over already-encoded prompts;
* :mod:`.pooled` -- the same edit of a pooled text input (SDXL's clip_g vector in the ADM input ``label_emb``);
* :mod:`.pipeline` -- :class:`RECESettings`, the :class:`RECEHost` interface and :func:`run_rece`, the one
  orchestration both the ComfyUI node and the MiniCanvas plug-in run.
"""

from .closed_form import LowRankDeltas
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
from .pipeline import (
    METHODS,
    UCE_TOKENS,
    PooledRECEHost,
    RECEHost,
    RECERun,
    RECESettings,
    layer_changes,
    leak_probe,
    relative_change,
    run_rece,
)
from .pooled import PooledEdit, PooledInput, edit_pooled_input

__all__ = [
    "METHODS",
    "RECE_PRESETS",
    "UCE_TOKENS",
    "LowRankDeltas",
    "PooledEdit",
    "PooledInput",
    "PooledRECEHost",
    "RECEConfig",
    "RECEHost",
    "RECEResult",
    "RECERun",
    "RECESettings",
    "UCEStart",
    "edit_pooled_input",
    "last_token_row",
    "layer_changes",
    "leak_probe",
    "rece_edit",
    "rece_token_rows",
    "relative_change",
    "run_rece",
    "token_count",
    "uce_preserve_scale",
    "uce_start",
    "uce_token_rows",
]
