"""Text-to-image, offline: captions from labels, the word tokenizer, the transformer encoder,
guidance on condition dicts, and a tiny run sampled from prompts end to end."""

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from difflab.cli import _hydra, schema
from difflab.data.captions import DIGIT_HELD_OUT_TEMPLATES, Captions, WordTokenizer
from difflab.diffusion.guidance import ClassifierFreeGuidance
from difflab.models.conditioning import ConditionError
from difflab.models.text import TextTransformer, check_vocabulary
from difflab.training.tasks import TextToImage, probe_conditions

pytestmark = pytest.mark.usefixtures("one_thread")
_hydra.setup()
CONF = Path(_hydra.config_dir())
DIGITS = [str(i) for i in range(10)]


def test_digit_captions_use_words_and_numerals_and_only_training_templates():
    captions = Captions(DIGITS)
    assert captions.digits and captions.caption(7, "a handwritten {word}") == "a handwritten seven"
    assert captions.caption(7, "the digit {numeral}") == "the digit 7"
    drawn = captions.sample(torch.arange(10).repeat(20), "train", torch.Generator().manual_seed(0))
    held_out = {captions.caption(k, t) for k in range(10) for t in DIGIT_HELD_OUT_TEMPLATES}
    assert not held_out & set(drawn)
    assert len({c.replace("seven", "X") for c in drawn if "seven" in c}) > 3  # several templates per class


def test_held_out_prompts_are_new_sentences_of_known_words():
    captions = Captions(DIGITS)
    tokenizer = WordTokenizer(captions.vocabulary())
    prompts = captions.sample(torch.arange(10), "held_out", torch.Generator().manual_seed(1))
    assert tokenizer.unknown_words(prompts) == []
    assert not set(prompts) & {captions.caption(k, t) for k in range(10) for t in captions.train_templates}


def test_other_datasets_caption_their_class_names():
    captions = Captions(["t-shirt/top", "trouser", "ankle boot"])
    assert not captions.digits
    assert captions.caption(2, "a photo of a {word}") == "a photo of a ankle boot"


def test_tokenizer_pads_marks_unknown_words_and_warns(caplog):
    tokenizer = WordTokenizer(["a", "seven", "handwritten"], max_length=4)
    ids = tokenizer(["a handwritten seven", "seven", ""])
    assert ids.shape == (3, 3)
    assert ids[1].tolist() == [tokenizer.ids["seven"], 0, 0] and ids[2].tolist() == [0, 0, 0]
    with caplog.at_level(logging.WARNING, logger="difflab.data"):
        unknown = tokenizer(["a purple seven"], warn=True)
    assert unknown[0, 1].item() == 1 and "purple" in caplog.text
    assert tokenizer(["a a a a a a"]).shape == (1, 4)  # capped at max_length


def test_text_transformer_masks_padding_and_survives_the_empty_prompt():
    torch.manual_seed(0)
    encoder = TextTransformer(vocab_size=10, dim=16, depth=2, heads=4, max_length=6).eval()
    short = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[3, 4, 5, 0, 0]])
    with torch.no_grad():
        a, b = encoder.embed(short), encoder.embed(padded)
        empty = encoder.embed(torch.zeros(2, 4, dtype=torch.long))
    torch.testing.assert_close(a["tokens"], b["tokens"][:, :3], atol=1e-5, rtol=1e-5)  # padding never attended
    assert b["token_mask"].tolist() == [[True, True, True, False, False]]
    # the empty prompt is zero tokens: exactly what condition dropout gives
    assert torch.equal(empty["tokens"], torch.zeros_like(empty["tokens"])) and not empty["token_mask"].any()
    with pytest.raises(ConditionError, match="max_length=6"):
        encoder.embed(torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ConditionError, match="word ids"):
        encoder.embed(torch.ones(1, 3))
    with pytest.raises(ValueError, match="raise model.conditioner's vocab_size"):
        check_vocabulary(encoder, 11)
    check_vocabulary(encoder, 10)


def test_the_empty_prompt_gives_the_unconditional_prediction():
    from difflab.models import UNet
    from difflab.models.conditioning import Conditioner

    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(), num_groups=4,
               attention_head_dim=8, conditioner=Conditioner([TextTransformer(vocab_size=10, dim=16, p_drop=0.0)]),
               cross_attention_levels=(1,)).eval()
    for module in net.modules():  # zero-initialised outputs: make every path matter
        if isinstance(module, torch.nn.Linear) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.2)
    torch.nn.init.normal_(net.conv_out.weight, std=0.2)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        empty = net(x, t, {"text": torch.zeros(2, 3, dtype=torch.long)})
        null = net(x, t, None)
        prompt = net(x, t, {"text": torch.tensor([[3, 4, 0], [5, 0, 0]])})
    torch.testing.assert_close(empty, null, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(prompt, null)


def test_guidance_on_condition_dicts_combines_the_two_predictions():
    from difflab.diffusion.guidance import DROP_KEY

    def net(x, t, cond=None):  # 0 unconditionally, 1 + the row's mean token id with its prompt
        if cond is None:
            return x * 0
        value = 1.0 + cond["text"].float().mean(dim=1)
        if DROP_KEY in cond:  # the doubled batch: its second half is the unconditional one
            value = torch.where(cond[DROP_KEY], torch.zeros_like(value), value)
        return x * 0 + value.view(-1, 1, 1, 1)

    x, t, cond = torch.zeros(2, 1, 2, 2), torch.tensor([1, 2]), {"text": torch.ones(2, 3, dtype=torch.long)}
    for scale, expected in ((0.0, 0.0), (1.0, 2.0), (3.0, 6.0)):
        out = ClassifierFreeGuidance(net, None, scale, dict_conditions=True)(x, t, cond)
        torch.testing.assert_close(out, torch.full_like(out, expected))
    with pytest.raises(ValueError, match="needs a class-conditional network"):
        ClassifierFreeGuidance(net, None, 3.0)


def test_text_task_captions_labels_and_needs_them():
    task = TextToImage(DIGITS, max_length=12)
    cond = task.inputs(torch.zeros(4, 1, 8, 8), torch.Generator().manual_seed(0), labels=torch.tensor([1, 2, 3, 4]))
    assert cond["text"].dtype == torch.long and cond["text"].shape[0] == 4
    assert probe_conditions(task, None, (6, 1, 8, 8))["text"].shape[0] == 6
    with pytest.raises(ValueError, match="labels"):
        task.inputs(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="class_names"):
        TextToImage(None)


def _compose(name, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from difflab.cli.train import train_run

    root = tmp_path_factory.mktemp("text")
    run = root / "run"
    run.mkdir()
    cfg = _compose("train", ["experiment=mnist5k_text", "data=digits", "data.batch_size=64", "model=unet_tiny",
                             "first_stage=identity", "model.cross_attention_levels=[1]", "trainer.max_epochs=2",
                             "trainer.max_time=null", "trainer.precision=32-true", "channels_last=false",
                             "callbacks.progress_bar=null", "callbacks.fid.num_samples=40",
                             "callbacks.fid.batch_size=40", "callbacks.sample_grid.num_samples=20",
                             "callbacks.sample_grid.nrow=10", f"paths.output_dir={run}", f"paths.root_dir={root}"])
    with pytest.MonkeyPatch.context() as patch:
        for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
            patch.delenv(key, raising=False)
        metrics, outcome = train_run(cfg)
    return run, metrics, outcome


def test_text_run_logs_prompt_accuracy_and_records_its_classes(text_run):
    run, metrics, outcome = text_run
    assert outcome["status"] == "ok"
    assert 0.0 <= metrics["eval/class_accuracy"] <= 1.0  # captions of balanced labels, at the run's guidance
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["task"]["class_names"] == DIGITS


def test_sample_draws_from_prompts_and_warns_about_unknown_words(text_run, tmp_path, caplog):
    from difflab.cli.sample import sample

    ckpt = text_run[0] / "checkpoints" / "ema.pt"
    common = [f"ckpt={ckpt}", "sampler=ddim", "sampler.steps=4", "progress=false", "precision=32-true"]
    written = sample(_compose("sample", [*common, "prompts=[a handwritten seven,the digit 3]", "nrow=3",
                                         f"paths.output_dir={tmp_path / 'rows'}"]))
    data = np.load(written["npz"])
    assert data["images"].shape == (6, 8, 8, 1)
    assert list(data["prompts"]) == ["a handwritten seven"] * 3 + ["the digit 3"] * 3
    with caplog.at_level(logging.WARNING, logger="difflab.data"):
        written = sample(_compose("sample", [*common, "prompt=a purple seven", "n=2", "guidance.scale=2",
                                             f"paths.output_dir={tmp_path / 'one'}"]))
    assert "purple" in caplog.text and np.load(written["npz"])["images"].shape[0] == 2


def test_interpolation_runs_each_row_under_its_prompt(text_run, tmp_path):
    from difflab.cli.sample import sample

    ckpt = text_run[0] / "checkpoints" / "ema.pt"
    written = sample(_compose("sample", [f"ckpt={ckpt}", "mode=interpolate", "columns=3", "sampler=ddim",
                                         "sampler.steps=3", "progress=false", "precision=32-true", "nrow=1",
                                         "prompts=[a handwritten seven,the digit 3]",
                                         f"paths.output_dir={tmp_path}"]))
    from PIL import Image

    assert Image.open(written["interpolate"]).size == (3 * 10 + 2, 2 * 10 + 2)  # 2 prompts x 3 columns, 8px


def test_interpolation_repeats_each_rows_condition_along_its_row():
    from difflab.cli.sample_modes import repeat_rows

    text = torch.tensor([[5, 6, 0], [7, 0, 0], [9, 9, 9]])
    rows = repeat_rows({"text": text}, rows=2, columns=3, device="cpu")
    assert rows["text"].tolist() == [[5, 6, 0]] * 3 + [[7, 0, 0]] * 3
    assert repeat_rows(torch.tensor([4, 2, 1]), 2, 2, "cpu").tolist() == [4, 4, 2, 2]
    assert repeat_rows(None, 2, 2, "cpu") is None


def test_prompts_on_a_model_without_text_are_refused():
    from difflab.cli import prompts

    cfg = _compose("sample", ["ckpt=x", "prompt=a seven"])
    with pytest.raises(schema.ConfigError, match="need a text-to-image model"):
        prompts.prompt_conditions(cfg, None, "x.pt", 8)
    with pytest.raises(schema.ConfigError, match="not both"):
        OmegaConf.to_object(_compose("sample", ["ckpt=x", "prompt=a", "prompts=[b]", "paths.output_dir=x"])).validate()
    for empty in ("prompts=[]", "prompts=['  ']"):  # an empty list is not the default (no prompts given)
        with pytest.raises(schema.ConfigError, match=r"prompts=\[\] has no prompt"):
            OmegaConf.to_object(_compose("sample", ["ckpt=x", empty, "paths.output_dir=x"])).validate()
    OmegaConf.to_object(_compose("sample", ["ckpt=x", "paths.output_dir=x"])).validate()


def test_evaluate_scores_prompt_accuracy_on_held_out_templates(text_run, tmp_path):
    from difflab.cli.evaluate import evaluate

    cfg = _compose("eval", [f"ckpt={text_run[0] / 'checkpoints' / 'ema.pt'}", "n=40", "batch_size=40",
                            "samplers=[ddim]", "steps=[4]", "guidance_scales=[0,3]", "prompt_templates=held_out",
                            "progress=false", "grid_images=0", "real_baseline=false", "precision=32-true",
                            f"paths.output_dir={tmp_path}"])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        rows = evaluate(cfg)
    assert [r["guidance_scale"] for r in rows] == [0.0, 3.0]
    assert all(math.isfinite(r["fid"]) and 0.0 <= r["class_accuracy"] <= 1.0 for r in rows)


def test_wordllama_vectors_know_that_seven_is_7():
    pytest.importorskip("wordllama")
    from difflab.models.text import wordllama_vectors

    vectors = torch.nn.functional.normalize(wordllama_vectors(["seven", "7", "sneaker"]), dim=1)
    assert vectors.shape == (3, 256)
    assert vectors[0] @ vectors[1] > 0.5 > vectors[0] @ vectors[2]


def test_frozen_word_vectors_bind_the_captions_words_and_travel_in_the_state():
    pytest.importorskip("wordllama")
    from difflab.models.text import FrozenWordVectors

    tokenizer = WordTokenizer(Captions(DIGITS).vocabulary())
    encoder = FrozenWordVectors(vocab_size=64, dim=16)
    encoder.bind_vocabulary(tokenizer.words)
    assert not encoder.vectors[:2].any() and encoder.vectors[2:tokenizer.vocab_size].abs().sum(1).gt(0).all()
    assert not any(p.requires_grad for p in [encoder.vectors]) and encoder.project.weight.requires_grad
    again = FrozenWordVectors(vocab_size=64, dim=16)
    again.load_state_dict(encoder.state_dict())  # a checkpoint needs neither the extra nor the words
    ids = tokenizer(["a handwritten seven", ""])
    out, back = encoder.embed(ids), again.embed(ids)
    torch.testing.assert_close(out["tokens"], back["tokens"])
    assert not out["tokens"][1].any()  # the empty prompt: zero tokens, the dropped condition


def test_wordllama_without_the_extra_says_how_to_install_it(monkeypatch):
    import sys

    from difflab.models.text import TextExtraMissing, wordllama_vectors

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the text extra were not installed
    with pytest.raises(TextExtraMissing, match=r"pip install -e '\.\[text\]'"):
        wordllama_vectors(["seven"])
