"""Text-encoder SAE data and training: prompt files, the shipped corpus, text-activation stores, store training
(whitened, resumable), on the MiniCanvas text encoder that ships with the package."""

from __future__ import annotations

import gzip

import pytest
import torch

from sae_core.config import TrainConfig
from sae_core.itd.collect import collect_text_store, prompts_fingerprint
from sae_core.itd.corpus import CORPUS_PATH, CORPUS_SIZE, build_corpus, default_corpus, write_corpus
from sae_core.itd.pipeline import REFERENCE_TEMPLATES
from sae_core.prompts import PromptFileError, read_prompt_file
from sae_core.store import ActivationReader, IncompleteStoreError
from sae_core.store_training import WHITENING_NAME, train_sae_on_store

torch.set_num_threads(1)

PROMPTS = ["an image of a star in striped style", "an image of a circle", "a star", "an image of a heart in neon style",
           "a picture of a ring in ocean style", "an image of a square in dotted style", "a cross", "mono style"]


# ---------------------------------------------------------------------------------------------
# prompt files and the corpus
# ---------------------------------------------------------------------------------------------


def test_prompt_file_reads_text_and_gzip(tmp_path):
    text = "\ufeff# a comment\na cat, oil painting\n\n  a dog  \na cat, oil painting\n"
    plain = tmp_path / "p.txt"
    plain.write_text(text, encoding="utf-8")
    packed = tmp_path / "p.txt.gz"
    packed.write_bytes(gzip.compress(text.encode("utf-8")))
    assert read_prompt_file(plain) == read_prompt_file(packed) == ["a cat, oil painting", "a dog"]


@pytest.mark.parametrize("content, message", [
    (b"", "holds no prompts"),
    (b"\n  \n# only a comment\n", "holds no prompts"),
    (b"a cat\n\xff\xfe broken\n", "line 2: not UTF-8"),
    (b"a cat\na dog\x00\x00\n", "line 2: contains a control character"),
    (b"ok\n" + b"x" * 5000 + b"\n", "line 2: 5000 characters"),
])
def test_prompt_file_errors_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(PromptFileError, match=message) as err:
        read_prompt_file(path)
    assert str(path) in str(err.value)


def test_prompt_file_missing_or_not_gzip(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompt_file(tmp_path / "none.txt")
    fake = tmp_path / "fake.txt.gz"
    fake.write_bytes(b"plain text, not gzip")
    with pytest.raises(PromptFileError, match="not a readable gzip file"):
        read_prompt_file(fake)


def test_shipped_corpus_is_ours_reproducible_and_covers_itd_tasks(tmp_path):
    corpus = default_corpus()
    assert len(corpus) == len(set(corpus)) == CORPUS_SIZE
    assert CORPUS_PATH.stat().st_size < 1_000_000
    # the generator writes the very same bytes again
    assert write_corpus(tmp_path / "again.txt.gz").read_bytes() == CORPUS_PATH.read_bytes()
    assert build_corpus(50, seed=1) == build_corpus(50, seed=1) != build_corpus(50, seed=2)
    words = set(corpus)
    # every reference calibration template of a painter, generic people and unsafe phrasings, captions
    assert all(t.replace("{}", "Claude Monet") in words for t in REFERENCE_TEMPLATES["artist"])
    assert all(t.replace("{}", "a famous actor") in words for t in REFERENCE_TEMPLATES["celebrity"])
    assert {"nudity", "naked", "erotic", "sexual"} <= words
    assert sum(p.startswith(("two ", "three ", "a group of ")) for p in corpus) > 2000
    assert "licence" in gzip.decompress(CORPUS_PATH.read_bytes()).decode("utf-8").splitlines()[4].lower()


# ---------------------------------------------------------------------------------------------
# text-activation stores
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def canvas():
    from sae_core.minicanvas.canvas import MiniCanvas

    return MiniCanvas.load(None, judges=False)


@pytest.fixture(scope="module")
def source(canvas):
    from sae_core.minicanvas.plugins.itd import text_source

    return text_source(canvas, layer=2, batch_size=3)


def test_collect_every_position_or_the_content(source, tmp_path):
    folder = collect_text_store(source, PROMPTS, tmp_path / "all", dtype="float32")
    reader = ActivationReader(folder)
    length = source.pad_to
    assert len(reader) == len(PROMPTS) * length and reader.d == 128
    assert reader.attrs["hookpoint"] == "text_model.encoder.layers.2" and reader.attrs["positions"] == "all"
    assert reader.attrs["prompts_fingerprint"] == prompts_fingerprint(PROMPTS)
    got = reader.read_all(columns=("prompt_index", "position"))
    assert got.meta["prompt_index"].tolist() == [i for i in range(len(PROMPTS)) for _ in range(length)]
    assert got.meta["position"].tolist() == list(range(length)) * len(PROMPTS)
    expected = source.residual(PROMPTS).hidden.reshape(-1, 128)
    torch.testing.assert_close(got.activations, expected, rtol=0, atol=0)  # the classifier's own residuals

    content = ActivationReader(collect_text_store(source, PROMPTS, tmp_path / "content", positions="content"))
    mask = source.residual(PROMPTS).content_mask
    assert len(content) == int(mask.sum()) < len(reader)  # BOS .. EOS of each prompt, no padding
    rows = content.read_all(columns=("position",))
    assert rows.meta["position"].tolist() == [p for m in mask for p in range(len(m)) if m[p]]


def test_interrupted_collection_leaves_no_usable_store(source, tmp_path):
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    assert collect_text_store(source, PROMPTS, tmp_path / "s", should_stop=stop) is None
    with pytest.raises(IncompleteStoreError, match="interrupted"):
        ActivationReader(tmp_path / "s")
    with pytest.raises(ValueError, match="empty"):
        collect_text_store(source, [], tmp_path / "e")


# ---------------------------------------------------------------------------------------------
# training on a store
# ---------------------------------------------------------------------------------------------


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 32, "k": 4, "num_latents": 256, "lr": 1e-3, "batch_topk": False,
                          "log_every": 5, "checkpoint_every": 0, **kw})


def test_whitened_training_resumes_exactly_after_a_stop(source, tmp_path):
    reader = ActivationReader(collect_text_store(source, PROMPTS * 4, tmp_path / "store", dtype="float32"))
    straight = train_sae_on_store(reader, _cfg(), 30, whiten=True, checkpoint_dir=tmp_path / "a")
    assert (tmp_path / "a" / WHITENING_NAME).is_file()
    assert straight.sae.cfg.extra.get("whitened") and not straight.sae.cfg.batch_topk

    steps: list[int] = []
    first = train_sae_on_store(reader, _cfg(), 30, whiten=True, checkpoint_dir=tmp_path / "b",
                               should_stop=lambda: len(steps) >= 12, on_step=lambda s, n, m: steps.append(s))
    assert first.trainer.interrupted and first.trainer.step == 12
    resumed = train_sae_on_store(reader, _cfg(), 30, whiten=True, checkpoint_dir=tmp_path / "b")
    assert resumed.trainer.step == 30
    for a, b in zip(straight.sae.state_dict().values(), resumed.sae.state_dict().values()):
        assert torch.equal(a, b)
    # the returned SAE reads raw rows: it reconstructs them as the trained (whitened-space) SAE does whitened ones
    x = reader.read_all()
    w = resumed.whitening
    inner = resumed.trainer.export()(w.apply(x)).sae_out @ w.inverse + w.mean
    torch.testing.assert_close(resumed.sae(x).sae_out, inner, rtol=1e-4, atol=1e-4)


def test_store_smaller_than_a_batch_is_refused(source, tmp_path):
    reader = ActivationReader(collect_text_store(source, PROMPTS[:1], tmp_path / "tiny"))
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_sae_on_store(reader, _cfg(batch_size=4096), 5)


def test_command_line_collects_and_trains_like_the_nodes(tmp_path, capsys):
    from sae_core.formats import load_sae
    from sae_core.itd.text_sae import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 2) + "\n", encoding="utf-8")
    store, sae_dir = tmp_path / "store", tmp_path / "sae"
    assert main(["collect", "--model", "minicanvas", "--corpus", str(prompts), "--out", str(store),
                 "--dtype", "float32"]) == 0
    reader = ActivationReader(store)
    assert len(reader) == len(PROMPTS) * 16 and reader.attrs["hookpoint"] == "text_model.encoder.layers.2"
    assert main(["train", "--store", str(store), "--out", str(sae_dir), "--preset", "minicanvas", "--steps", "6",
                 "--batch-size", "32"]) == 0
    sae = load_sae(sae_dir)
    assert (sae.num_latents, sae.cfg.k, sae.cfg.hookpoint) == (1024, 8, "text_model.encoder.layers.2")
    assert sae.cfg.extra.get("whitened") and (tmp_path / "sae.ckpt" / WHITENING_NAME).is_file()
    assert main(["collect", "--model", "minicanvas", "--corpus", str(tmp_path / "none.txt"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "prompt file not found" in capsys.readouterr().err
