"""ItD (Interpret then Deactivate): SAE concept erasure in a CLIP text encoder.

An SAE trained on one text-encoder layer's residual stream maps each concept to a feature set
(*interpret*); at encode time a hook flips and amplifies those features (``s = -8``) and the
mean squared change it causes serves as a zero-shot classifier: only prompts scoring
``>= tau`` are replaced by the steered reconstruction, all others pass bit-exact (*deactivate*).

Modules, one job each:

* :mod:`.text` -- the hooked layer, deployment tokenisation, residual capture, training stream;
* :mod:`.steering` -- fp32 SAE maths, the steering edit, scores and the per-sequence gate;
* :mod:`.interpret` -- ``a(p)``, ``Top_n`` (positive only) and the set difference;
* :mod:`.concepts` -- :class:`ItDConcepts` (features, tau, layer, padding, SAE fingerprint) I/O;
* :mod:`.patch` -- the forward-hook patch for a transformers ``CLIPTextModel``;
* :mod:`.pipeline` -- SAE training, ``build_concepts`` (interpret + calibrate), classifier report, and
  :func:`run_itd` (:class:`ItDSettings` + :class:`ItDTextHost`), the one orchestration the ComfyUI node and
  the MiniCanvas plug-in both run.

Typical use::

    source = TextLayerSource(text_model, 8, clip_tokenize_fn(tokenizer, pad_to=77), pad_to=77)
    concepts = build_concepts(sae, source, {"van gogh": prompts}, retain_prompts, top_n=256)
    concepts.save("van_gogh.itd.safetensors")
    with patch_text_encoder(text_model, sae, concepts) as patch:
        embeds = text_model(input_ids=ids).last_hidden_state
        print(patch.last.scores, patch.last.detected)
"""

from .concepts import Calibration, ItDConcepts, sae_fingerprint
from .interpret import ConceptFeatures, max_latent_activations, prompt_top_features, select_features, top_features
from .patch import ItDCall, ItDPatch, patch_text_encoder
from .pipeline import (
    PLACEHOLDER,
    REFERENCE_TEMPLATES,
    ClassifierReport,
    ItDRun,
    ItDSettings,
    ItDTextHost,
    build_concepts,
    calibrate,
    Whitening,
    classifier_report,
    fit_whitening,
    fold_whitening,
    interpret,
    prompt_tops,
    run_itd,
    score_prompts,
    templated,
    train_text_sae,
)
from .steering import ERROR_MODES, GateOutput, ItDGate, SaeMath, steer, steering_scores
from .text import (
    PromptBatch,
    Residual,
    TextLayerSource,
    choose_layer,
    clip_tokenize_fn,
    default_layer,
    hookpoint_layer,
    layer_count,
    module_width,
    residual_token_batches,
    resolve_layer,
)

__all__ = [
    "PLACEHOLDER",
    "REFERENCE_TEMPLATES",
    "Calibration",
    "ClassifierReport",
    "ConceptFeatures",
    "ERROR_MODES",
    "GateOutput",
    "ItDCall",
    "ItDConcepts",
    "ItDGate",
    "ItDPatch",
    "ItDRun",
    "ItDSettings",
    "ItDTextHost",
    "PromptBatch",
    "Residual",
    "SaeMath",
    "TextLayerSource",
    "Whitening",
    "build_concepts",
    "calibrate",
    "choose_layer",
    "classifier_report",
    "clip_tokenize_fn",
    "default_layer",
    "fit_whitening",
    "fold_whitening",
    "hookpoint_layer",
    "interpret",
    "layer_count",
    "max_latent_activations",
    "module_width",
    "patch_text_encoder",
    "prompt_top_features",
    "prompt_tops",
    "residual_token_batches",
    "resolve_layer",
    "run_itd",
    "sae_fingerprint",
    "score_prompts",
    "select_features",
    "steer",
    "steering_scores",
    "templated",
    "top_features",
    "train_text_sae",
]
