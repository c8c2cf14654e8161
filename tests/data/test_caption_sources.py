"""Where captions come from: metadata.jsonl, .txt files beside images, one instance prompt, or a dataset."""

from __future__ import annotations

import pytest
from PIL import Image

from difftune.config.schema import DataConfig
from difftune.data.sources import load_examples


def _images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 40), (i * 60, 10, 10)).save(folder / f"{i}.png")
    return folder


def test_txt_captions_beside_images(tmp_path):
    d = _images(tmp_path / "d")
    for i in range(3):
        (d / f"{i}.txt").write_text(f"caption number {i}\n")
    scan = load_examples(DataConfig(path=str(d), resolution=32))
    assert [e.caption for e in scan.examples] == [f"caption number {i}" for i in range(3)]


def test_instance_prompt_fills_missing_and_can_replace_all(tmp_path):
    d = _images(tmp_path / "d")
    (d / "0.txt").write_text("own caption")
    scan = load_examples(DataConfig(path=str(d), resolution=32, instance_prompt="a photo of sks dog"))
    assert [e.caption for e in scan.examples] == ["own caption", "a photo of sks dog", "a photo of sks dog"]
    scan = load_examples(DataConfig(path=str(d), resolution=32, instance_prompt="a photo of sks dog",
                                    caption_source="instance_prompt"))
    assert {e.caption for e in scan.examples} == {"a photo of sks dog"}


def test_local_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (48, 40), (200, 10 * i, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"picture": images, "prompt": ["one", "two", "three"]},
                                    features=datasets.Features({"picture": datasets.Image(),
                                                                "prompt": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(path=str(tmp_path / "ds"), image_column="picture", caption_column="prompt", resolution=32)
    scan = load_examples(cfg)
    assert [e.caption for e in scan.examples] == ["one", "two", "three"]
    assert scan.examples[0].size in ((40, 48), (48, 40))


def test_hugging_face_dataset_with_a_wrong_column_names_it(tmp_path):
    datasets = pytest.importorskip("datasets")
    from difftune.errors import ConfigError

    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (32, 32))], "text": ["x"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ConfigError, match=r"data.caption_column: 'caption' is not a column of .* \(image, text\)"):
        load_examples(DataConfig(path=str(tmp_path / "ds"), caption_column="caption", resolution=32))
