"""SAeUron (Cywinski & Deja, 2025): concept erasure by scaling concept-specific SAE latents of one
UNet block's output at sampling time.

* :mod:`.stats`: per-concept, per-step mean SAE codes (:class:`ConceptStats`, streaming builder).
* :mod:`.selection`: the concept score, per-step feature choice (top-N or the percentile rule)
  and the :class:`SelectionTable` the intervention applies.
* :mod:`.intervention`: the per-token edit and :class:`SAeUronHook`, plus timestep -> step
  index mapping.
* :mod:`.collect`: driving a sampler to collect block activations (SAE training data) and
  concept statistics.
* :mod:`.concept_params`: per-concept ``gamma`` and selection rule (text lines or a mapping).
* :mod:`.pipeline`: the orchestration both hosts (ComfyUI nodes, MiniCanvas plug-in) run: one
  :class:`ConceptBlockSettings`, a host interface, the block edit and the collection step.
"""

from .collect import (
    COLLECT_COLUMNS,
    collect_block_activations,
    concept_stats_from_store,
    gather_concept_stats,
    read_sampler_state,
)
from .concept_params import ConceptParams, format_concept_params, parse_concept_params
from .intervention import (
    ERROR_MODES,
    InterventionResult,
    SAeUronHook,
    SaeWeights32,
    intervene_tokens,
    map_step_index,
    step_index_from_timestep,
)
from .pipeline import (
    BRANCHES,
    OTHER_CONCEPT,
    SELECTION_RULES,
    SOURCES,
    BlockRef,
    CallPosition,
    ConceptBlockEdit,
    ConceptBlockSettings,
    SAeUronHost,
    build_concept_edit,
    collect_activations,
    features_step,
)
from .selection import (
    SCORE_EPS,
    SelectionTable,
    StepSelection,
    build_selection,
    concept_scores,
    percentile_feature_count,
    select_features,
)
from .stats import ConceptStats, ConceptStatsBuilder, encode_topk_fp32, sae_fingerprint

__all__ = [
    "BRANCHES",
    "COLLECT_COLUMNS",
    "OTHER_CONCEPT",
    "SELECTION_RULES",
    "SOURCES",
    "BlockRef",
    "CallPosition",
    "ConceptBlockEdit",
    "ConceptBlockSettings",
    "ConceptParams",
    "SAeUronHost",
    "build_concept_edit",
    "collect_activations",
    "features_step",
    "format_concept_params",
    "parse_concept_params",
    "ERROR_MODES",
    "SCORE_EPS",
    "ConceptStats",
    "ConceptStatsBuilder",
    "InterventionResult",
    "SAeUronHook",
    "SaeWeights32",
    "SelectionTable",
    "StepSelection",
    "build_selection",
    "collect_block_activations",
    "concept_scores",
    "concept_stats_from_store",
    "encode_topk_fp32",
    "gather_concept_stats",
    "intervene_tokens",
    "map_step_index",
    "percentile_feature_count",
    "read_sampler_state",
    "sae_fingerprint",
    "select_features",
    "step_index_from_timestep",
]
