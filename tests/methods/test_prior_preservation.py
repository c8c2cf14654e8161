"""DreamBooth prior preservation: class images in every batch, the prior weight applied, images generated once."""

from __future__ import annotations

import random

import pytest
import torch

from difftune import load_config
from difftune.data import prior, sources
from difftune.errors import ConfigError
from difftune.tiny import make_tiny_dataset


def _config(run_config, tiny_sd, data, tmp_path, **pp):
    raw = run_config(tiny_sd, data, tmp_path / "out", data={"instance_prompt": "a photo of sks shape",
                                                            "caption_source": "instance_prompt"},
                     prior_preservation={"class_prompt": "a photo of a shape", "class_data": str(tmp_path / "cls"),
                                         "num_class_images": 2, "sample_steps": 2, **pp})
    return load_config(data=raw)


def test_batches_pair_instance_and_class_images_with_the_prior_weight(run_config, tiny_sd, shapes_data, tmp_path):
    config = _config(run_config, tiny_sd, shapes_data, tmp_path, loss_weight=0.25)
    classes = make_tiny_dataset(tmp_path / "cls", n=3, size=48, seed=1, captions=False)
    class_examples = [prior.Example(p, "a photo of a shape", p.name) for p in prior.class_images(classes)]
    from difftune.data.pipeline import build_training_data

    data = build_training_data(config, class_examples=class_examples)
    dataset, collate = data.dataset, data.collate
    batch = collate([dataset[(0, 0)], dataset[(0, 1)]])
    assert batch.pixels.shape[0] == 4 and batch.latent_mean is None
    assert batch.captions == ["a photo of sks shape"] * 2 + ["a photo of a shape"] * 2
    assert batch.is_class_image.tolist() == [False, False, True, True]
    assert batch.loss_weights.tolist() == [1.0, 1.0, 0.25, 0.25]


def test_the_loss_applies_per_image_weights(tiny_sd):
    from difftune.config.schema import Config
    from difftune.data.batch import Batch
    from difftune.models import detect_family, get_family
    from difftune.models.loading import resolve_source
    from difftune.objectives import OBJECTIVES
    from difftune.training.loss import micro_batch_loss

    source = resolve_source(str(tiny_sd), None, None, None)
    family = get_family(detect_family(source, "auto"))
    components = family.load(source, dtype=torch.float32)
    objective = OBJECTIVES.get(family.objective)(family.objective_settings(components), Config().train)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1

    def loss(weights=None):
        torch.manual_seed(0)
        batch = Batch(captions=["a", "b"], pixels=pixels, loss_weights=weights)
        return micro_batch_loss(family, components, objective, batch, torch.device("cpu"), trains_text=False)

    unweighted = loss()
    only_first, only_second = loss(torch.tensor([1.0, 0.0])), loss(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(only_first + only_second, unweighted)
    assert not torch.isclose(only_first, only_second)
    torch.testing.assert_close(loss(torch.tensor([1.0, 0.5])), only_first + 0.5 * only_second)


def test_class_images_are_generated_once_and_reused(train_run, tmp_path):
    settings = dict(
        data={"instance_prompt": "a photo of sks shape", "caption_source": "instance_prompt"},
        prior_preservation={"class_prompt": "a photo of a shape", "class_data": str(tmp_path / "cls"),
                            "num_class_images": 2, "sample_steps": 2, "loss_weight": 0.5},
        train={"max_steps": 2},
    )
    first = train_run("first", **settings)
    made = prior.class_images(tmp_path / "cls")
    assert [p.name for p in made] == ["class-00000.png", "class-00001.png"]
    assert prior.recorded_prompts(tmp_path / "cls") == {p.name: "a photo of a shape" for p in made}
    assert any("generating 2 class images" in m for m in first.messages)
    stamps = [p.stat().st_mtime_ns for p in made]

    second = train_run("second", **settings)
    assert not any("generating" in m for m in second.messages)
    assert [p.stat().st_mtime_ns for p in prior.class_images(tmp_path / "cls")] == stamps
    assert "Prior preservation" in (second.output_dir / "README.md").read_text()


def test_prior_preservation_config_errors(run_config, tiny_sd, shapes_data, tmp_path):
    base = run_config(tiny_sd, shapes_data, tmp_path)
    with pytest.raises(ConfigError, match="prior_preservation.class_data: required"):
        load_config(data={**base, "prior_preservation": {"class_prompt": "a dog"}})
    with pytest.raises(ConfigError, match="prior_preservation.class_prompt"):
        load_config(data={**base, "prior_preservation": {"class_prompt": "a dog", "class_data": "x"},
                          "method": {"type": "textual_inversion", "token": "<a>", "initializer_token": "dog"}})
    with pytest.raises(ConfigError, match="prior_preservation.class_prompt: required"):
        load_config(data={**base, "prior_preservation": {"class_data": "x"}})
    with pytest.raises(ConfigError, match="set either class_prompt .* or instance_word"):
        load_config(data={**base, "prior_preservation": {"class_prompt": "a dog", "instance_word": "sks",
                                                         "class_data": "x"}})
    with pytest.raises(ConfigError, match="prior_preservation.class_data: required with instance_word"):
        load_config(data={**base, "prior_preservation": {"instance_word": "sks"}})
    with pytest.raises(ConfigError, match="prior_preservation.instance_word: empty"):
        load_config(data={**base, "prior_preservation": {"instance_word": " ", "class_data": "x"}})
    with pytest.raises(ConfigError, match="prior_preservation.instance_word: method.type = 'textual_inversion'"):
        load_config(data={**base, "prior_preservation": {"instance_word": "sks", "class_data": "x"},
                          "method": {"type": "textual_inversion", "token": "<a>", "initializer_token": "dog"}})


def _captioned(folder, captions):
    """Tiny images captioned with ``captions`` (one image each)."""
    import json

    make_tiny_dataset(folder, n=len(captions), size=32, captions=False)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img_{i:03d}.png", "text": c}) + "\n"
                                                   for i, c in enumerate(captions)))
    return folder


def test_class_prompts_come_from_each_caption_without_the_instance_word(run_config, tiny_sd, tmp_path):
    data = _captioned(tmp_path / "data", ["a red sks dog on grass", "a blue sks dog", "a red sks dog on grass",
                                          "a cat on a sofa"])
    raw = run_config(tiny_sd, data, tmp_path / "out",
                     prior_preservation={"instance_word": "sks", "class_data": str(tmp_path / "cls")})
    messages = []
    assert prior.class_prompts(load_config(data=raw), messages.append) == ["a red dog on grass", "a blue dog"]
    assert messages == ["prior preservation: 1 image(s) without 'sks' in the caption are not the subject's; "
                        "no class prompt is drawn from them"]
    # The word given as data.trigger (added to the captions at training time) marks every image.
    raw["data"]["trigger"] = "sks"
    raw["data"]["path"] = str(_captioned(tmp_path / "plain", ["a red dog", "a dog, sitting"]))
    assert prior.class_prompts(load_config(data=raw), messages.append) == ["a red dog", "a dog, sitting"]
    assert prior.class_plan(["a", "b"], 5) == ["a", "b", "a", "b", "a"]


def test_instance_word_found_in_no_caption_or_only_word_is_refused(run_config, tiny_sd, tmp_path):
    section = {"instance_word": "sks", "class_data": str(tmp_path / "cls")}
    raw = run_config(tiny_sd, _captioned(tmp_path / "a", ["a red dog", "a blue dog"]), tmp_path / "out",
                     prior_preservation=section)
    with pytest.raises(ConfigError, match="no caption contains 'sks'"):
        prior.class_prompts(load_config(data=raw))
    raw = run_config(tiny_sd, _captioned(tmp_path / "b", ["a red sks dog", "sks"]), tmp_path / "out",
                     prior_preservation=section)
    with pytest.raises(ConfigError, match="the caption of img_001.png is only 'sks'"):
        prior.class_prompts(load_config(data=raw))


def test_class_images_drawn_from_the_captions_are_captioned_with_their_prompt(train_run, tmp_path, monkeypatch):
    """Each class image is generated from, recorded with and trained on its own prompt; images drawn for
    another prompt (an earlier run's class_prompt) stay in the folder and are not used. The data folder
    is scanned once: the class prompts and the training data share the scan."""
    data = _captioned(tmp_path / "data", ["a red sks shape", "a blue sks shape on black", "a red sks shape"])
    common = dict(data={"resolution": 32}, train={"max_steps": 2})
    cls = tmp_path / "cls"
    train_run("fixed", data_path=data, prior_preservation={"class_prompt": "a shape", "class_data": str(cls),
                                                           "num_class_images": 2, "sample_steps": 2}, **common)
    section = {"instance_word": "sks", "class_data": str(cls), "num_class_images": 3, "sample_steps": 2}
    probed = []
    probe = sources.probe_image
    monkeypatch.setattr(sources, "probe_image", lambda path, **kw: probed.append(path.name) or probe(path, **kw))
    result = train_run("captions", data_path=data, prior_preservation=section, **common)
    assert sorted(probed) == sorted(p.name for p in data.glob("*.png")), probed
    recorded = prior.recorded_prompts(cls)
    assert sorted(recorded.values()) == ["a blue shape on black", "a red shape", "a red shape", "a shape", "a shape"]
    assert any("generating 3 class images for 2 prompts from the captions" in m for m in result.messages)
    assert any("2 image(s) in" in m and "are not used" in m for m in result.messages), result.messages
    assert "the captions without `sks`" in (result.output_dir / "README.md").read_text()
    config = load_config(result.output_dir / "config.toml")
    examples = prior.class_examples(config, None, None, torch.device("cpu"), is_main=False)
    assert sorted(ex.caption for ex in examples) == ["a blue shape on black", "a red shape", "a red shape"]
    assert all(recorded[ex.name] == ex.caption for ex in examples)


def test_a_broken_line_in_the_class_prompts_file_is_named(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "class-00000.png", "text": "a dog"}\nnot json\n')
    with pytest.raises(prior.DifftuneError, match=r"metadata.jsonl, line 2: not a"):
        prior.recorded_prompts(tmp_path)


def test_class_images_are_cached_with_the_instance_images(run_config, tiny_sd, shapes_data, tmp_path):
    """With both caches on, class images come from the caches too: every batch is all latents."""
    from difftune.data.pipeline import build_training_data
    from difftune.models import detect_family, get_family
    from difftune.models.loading import resolve_source

    config = _config(run_config, tiny_sd, shapes_data, tmp_path)
    config.data.cache_latents = config.data.cache_text = True
    config.data.cache_dir = str(tmp_path / "cache")
    make_tiny_dataset(tmp_path / "cls", n=3, size=48, seed=1, captions=False)
    # The folder is full: nothing to generate (is_main=False would not generate either way).
    class_examples = prior.class_examples(config, None, None, torch.device("cpu"), is_main=False)
    assert len(class_examples) == 2  # prior_preservation.num_class_images
    assert len({ex.digest for ex in class_examples}) == 2 and all(ex.size == (48, 48) for ex in class_examples)
    source = resolve_source(str(tiny_sd))
    family = get_family(detect_family(source))
    components = family.load(source, dtype=torch.float32)

    data = build_training_data(config, family, components, class_examples=class_examples)
    instances = len(data.scan.examples)
    flips = 2 if config.data.random_flip else 1
    assert data.latent_stats.misses == (instances + len(class_examples)) * flips  # one bucket size here
    batch = data.collate([data.dataset[(0, 0)], data.dataset[(0, 1)]])
    assert batch.pixels is None and batch.latent_mean.shape[0] == 4
    assert batch.is_class_image.tolist() == [False, False, True, True]
    # The class rows are the VAE's latents of the class images and the class prompt's embeddings.
    pair = data.dataset[(0, 1)][1]
    class_image = data.dataset.classes.examples[1 % len(class_examples)]  # epoch 0, instance 1
    from difftune.data.transforms import prepare_image

    assert not config.data.random_flip
    pixels = prepare_image(class_image.image, pair.target_size, center_crop=True, flip=False,
                           rng=random.Random(0)).pixels
    expected, _ = family.latent_distribution(components, pixels[None])
    torch.testing.assert_close(pair.latent_mean, expected[0], rtol=1e-4, atol=1e-4)
    other = data.dataset.classes.examples[0]
    assert other.digest != class_image.digest  # and it is not just any class image's latents:
    assert not torch.allclose(data.dataset[(0, 0)][1].latent_mean, pair.latent_mean)
    embeds = family.encode_prompt(components, ["a photo of a shape"])
    assert pair.is_class_image and pair.caption == "a photo of a shape"
    for key, value in pair.conditioning.items():
        torch.testing.assert_close(value, embeds[key][0])

    # A second build reuses every entry, class images included.
    again = build_training_data(config, family, components, class_examples=class_examples)
    assert again.latent_stats.misses == 0 and again.text_stats.misses == 0


def test_difftune_cache_fills_class_images_that_training_then_reuses(train_run, run_config, tiny_sd, shapes_data,
                                                                     tmp_path):
    from difftune.training.setup import fill_caches

    sections = dict(
        data={"instance_prompt": "a photo of sks shape", "caption_source": "instance_prompt",
              "cache_latents": True, "cache_text": True, "cache_dir": str(tmp_path / "cache")},
        prior_preservation={"class_prompt": "a photo of a shape", "class_data": str(tmp_path / "cls"),
                            "num_class_images": 2, "sample_steps": 2},
        train={"max_steps": 3},
    )
    filled = fill_caches(load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "out", **sections)),
                         log=lambda _m: None)
    assert len(prior.class_images(tmp_path / "cls")) == 2  # generated by `difftune cache`
    assert filled.latent_stats.misses == len(filled.scan.examples) + 2
    result = train_run("out", **sections)
    assert any(m.startswith("latent cache") and "0 computed" in m for m in result.messages), result.messages
    assert any(m.startswith("text cache") and "0 computed" in m for m in result.messages)
    assert result.losses and all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
