"""Collect Text Activations: the training data of a text-encoder SAE (the SAE ItD's classifier needs).

The node encodes a prompt corpus with the wired CLIP, through ComfyUI's own tokenizer and padding (77 tokens
padded with EOS for SD1.x/SDXL ``clip_l``, with id 0 for SDXL's ``clip_g`` and SD2's ``clip_h``; 16 tokens padded
with ``<pad>`` for MiniCanvas), and streams the output of one layer of one encoder (the ``encoder`` input, as the
classifier's: ``auto`` is ``clip_l`` when the CLIP has one, else its only encoder) into an activation store in
``output/sae_activations/<name>/``: one row per token
position kept (``all``: every padded position, as the classifier scores them; ``content``: BOS..EOS), each with
its prompt index and position. **Train SAE** then trains the SAE on that store (``topk`` token and ``whiten`` on
for ItD's recipe). Both steps are the library's (``sae_core.itd.collect_text_store`` and
``sae_core.store_training.train_sae_on_store``), the same code the MiniCanvas ItD plug-in and
``python -m sae_core.itd.text_sae`` run.

The layer is chosen as the ItD Prompt Classifier chooses it: ``-1`` is two thirds of the way up the encoder
(layer 8 of CLIP-L's 12, 21 of OpenCLIP-bigG's 32, 16 of OpenCLIP-H's 24, 2 of MiniCanvas' 4), and the store records
the layer's module path as its hook point, which the trained SAE keeps, so the classifier finds the layer on its
own; the store also records the encoder's name (``encoder``). A layer after the one the conditioning is read from
(SDXL, SD2: the penultimate) is refused, as the classifier refuses it.

The corpus: the one that ships with the pack (``sae_core/itd/data``, 40,000 prompts, see its README), a text
file from ``ComfyUI/models/prompts/`` (one prompt per line, ``.txt`` or ``.txt.gz``), typed prompts, or a
file plus typed prompts. A complete store collected with the same settings is reused; Cancel leaves the
store unfinished (the next run collects it again: collection is an encoder pass, minutes at most).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch

from sae_core.artefacts import Action, tensor_fingerprint
from sae_core.itd import ItDTextHost, default_layer, layer_count
from sae_core.itd.collect import POSITIONS, collect_text_store, prompts_fingerprint
from sae_core.itd.corpus import CORPUS_PATH, CORPUS_SIZE
from sae_core.prompts import parse_prompts, read_prompt_file
from sae_core.store import ActivationReader

from .clip_patch import AUTO_ENCODER, ENCODERS, TextEncoderSite, output_layer, text_encoder_site
from .common import Progress, category, inp, interrupt_requested, node_id, throw_if_interrupted
from .folders import dataset_folder, decide_store, prompt_file_path, prompt_filenames

log = logging.getLogger("concept_erasure")

NODE_NAME = "Collect Text Activations"

DEFAULT_CORPUS = "default corpus (ships with the pack)"
"""Corpus choice: the shipped corpus."""

NO_CORPUS = "none (typed prompts only)"
"""Corpus choice: only the prompts typed into the node."""

COLLECT_BATCH = 32
"""Prompts per encoder call while collecting."""

__all__ = ["CollectTextActivations", "DEFAULT_CORPUS", "NO_CORPUS", "corpus_prompts", "text_host"]


def text_host(clip: Any, who: str = NODE_NAME, encoder: str = AUTO_ENCODER) -> tuple[ItDTextHost, TextEncoderSite]:
    """``(host, site)``: ItD's view of the CLIP's text encoder ``encoder`` (``auto``, ``clip_l``, ``clip_g``,
    ``clip_h``), the one the ItD Prompt Classifier calibrates with (:func:`.itd.comfy_text_host`), batched for
    collection."""
    from .itd import comfy_text_host

    site = text_encoder_site(clip, who, encoder)
    clip.load_model()
    return dataclasses.replace(comfy_text_host(clip, site), batch_size=COLLECT_BATCH), site


def corpus_prompts(corpus: str, prompts: str = "", max_prompts: int = 0) -> list[str]:
    """The corpus file's prompts (shipped, from ``models/prompts``, or none) followed by the typed ones, without
    duplicates; the first ``max_prompts`` of them (0: all)."""
    if corpus == DEFAULT_CORPUS:
        found = read_prompt_file(CORPUS_PATH)
    elif corpus == NO_CORPUS:
        found = []
    else:
        found = read_prompt_file(prompt_file_path(corpus))
    out = parse_prompts([*found, *parse_prompts(prompts)])
    if int(max_prompts) > 0:
        out = out[: int(max_prompts)]
    if not out:
        raise ValueError("prompts: no prompts to encode; pick a corpus or type prompts (one per line)")
    return out


class CollectTextActivations:
    """Encode a prompt corpus and store one text-encoder layer's output as SAE training data."""

    DESCRIPTION = (
        "Encodes a prompt corpus with the CLIP (ComfyUI's own tokenizer and padding) and stores the output of one "
        "text-encoder layer, one row per token position, in output/sae_activations/<name>: the training data of "
        "Train SAE for the SAE the ItD Prompt Classifier needs (Train SAE with topk = token and whiten on). "
        f"The default corpus ships with the pack ({CORPUS_SIZE} prompts: subjects, styles, painters, generic "
        "descriptions of famous people, unsafe phrasings); text files in models/prompts and typed prompts work too. "
        "SD1.x (clip_l), SD2.x (clip_h), SDXL (clip_l or clip_g: one store and one SAE per encoder), the SDXL "
        "refiner (clip_g) and MiniCanvas. A complete store with the same settings is reused."
    )
    CATEGORY = category("itd")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("dataset_path",)
    OUTPUT_TOOLTIPS = ("Folder of the activation store; wire it into Train SAE.",)
    FUNCTION = "collect"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": inp("CLIP", "The text encoder whose layer is recorded (not modified): the CLIP the ItD Prompt "
                                    "Classifier will edit."),
                "corpus": inp([DEFAULT_CORPUS, NO_CORPUS, *prompt_filenames()],
                              "Prompt list to encode: the corpus that ships with the pack, a text file from "
                              "models/prompts (one prompt per line), or none (only the typed prompts).",
                              default=DEFAULT_CORPUS),
                "prompts": inp("STRING", "More prompts, one per line, added after the corpus (e.g. the concepts "
                                         "you will erase, in several phrasings).", multiline=True, default=""),
                "layer": inp("INT", "Encoder layer to record (0-based). -1 = two thirds of the way up, as the "
                                    "classifier's default (layer 8 of CLIP-L, 2 of MiniCanvas).",
                             default=-1, min=-1, max=63, step=1),
                "positions": inp(list(POSITIONS), "Token positions stored: all = every padded position (as the "
                                                  "classifier scores them, and as ItD trains); content = BOS, the "
                                                  "words and EOS only (a smaller store).", default="all"),
                "max_prompts": inp("INT", "Use the first N prompts (0 = all). 10000 prompts at all 77 positions "
                                          "take about 1.2 GB as float16.", default=10000, min=0, max=10_000_000),
                "dataset_name": inp("STRING", "Name of the store folder in output/sae_activations.",
                                    default="itd/text_activations"),
                "store_dtype": inp(["float16", "float32"], "Precision of the stored activations (float16 halves "
                                                           "the disk space).", default="float16"),
                "overwrite": inp("BOOLEAN", "Replace an existing complete store of this name that was collected "
                                            "with other settings (otherwise that is an error).", default=False),
            },
            "optional": {
                "encoder": inp([AUTO_ENCODER, *ENCODERS], "Which text encoder is recorded: auto = clip_l when the "
                                                          "CLIP has one (SD1.x, SDXL), else its only encoder (SD2.x "
                                                          "clip_h, SDXL refiner clip_g, MiniCanvas). For SDXL's "
                                                          "clip_g, collect a second store with clip_g and train its "
                                                          "own SAE.", default=AUTO_ENCODER),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def collect(self, clip: Any, corpus: str, prompts: str, layer: int, positions: str, max_prompts: int,
                dataset_name: str, store_dtype: str = "float16", overwrite: bool = False,
                encoder: str = AUTO_ENCODER, unique_id: Optional[str] = None) -> tuple[str]:
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
        prompt_list = corpus_prompts(corpus, prompts, max_prompts)
        host, site = text_host(clip, encoder=encoder)
        family = site.family
        num_layers = layer_count(host.model)
        index = default_layer(num_layers) if int(layer) < 0 else int(layer)
        if not 0 <= index < num_layers:
            raise ValueError(f"layer: {index} is out of range; this text encoder has {num_layers} layers "
                             f"(0..{num_layers - 1})")
        last = output_layer(clip, host.model, num_layers)
        if last is not None and index > last:
            raise ValueError(f"layer: {site.name} layer {index} comes after layer {last}, the last one this {family} "
                             f"CLIP's conditioning is read from; an SAE there could not edit the token states. Pick "
                             f"a layer <= {last}.")
        source = host.source(index)
        folder = dataset_folder(dataset_name)
        weights = tensor_fingerprint(sorted(host.model.state_dict().items()), dtype=torch.float16, max_values=4096)
        settings = {"n_prompts": len(prompt_list), "prompts_fingerprint": prompts_fingerprint(prompt_list),
                    "layer": index, "hookpoint": source.layer_path, "positions": positions, "store_dtype": store_dtype,
                    "model_family": family, "text_encoder": weights, "pad_to": host.pad_to}
        decision = decide_store(NODE_NAME, folder, settings, overwrite)
        if decision.action is Action.REUSE:
            log.info("%s", decision.message)
            return (str(folder),)
        log.info("%s: %d prompts, %s %s layer %d (%s), positions %s -> %s", NODE_NAME, len(prompt_list), family,
                 site.name, index, source.layer_path, positions, folder)
        with Progress(len(prompt_list), desc="collect text activations", node_id=unique_id) as bar:
            done = collect_text_store(
                source, prompt_list, folder, positions=positions, dtype=store_dtype, overwrite=True,
                attrs={"model_family": family, "encoder": site.name, "settings": settings,
                       "origin": node_id("CollectTextActivations")},
                should_stop=interrupt_requested, on_progress=lambda n, total: bar.update_absolute(n))
        if done is None:
            throw_if_interrupted()
            raise RuntimeError(f"{NODE_NAME} stopped before the end; queue it again to collect the store")
        log.info("%s: %d rows -> %s", NODE_NAME, len(ActivationReader(folder)), folder)
        return (str(folder),)


NODE_CLASS_MAPPINGS = {node_id("CollectTextActivations"): CollectTextActivations}
NODE_DISPLAY_NAME_MAPPINGS = {node_id("CollectTextActivations"): NODE_NAME}
