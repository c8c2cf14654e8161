"""``difftune push``: exactly which files go up, a card the Hub can parse, and a clear offline error."""

from __future__ import annotations

import pytest

from difftune.cli import main
from difftune.errors import DifftuneError
from difftune.publish.push import card_base_model, files_to_push


def test_files_to_push_lists_adapter_card_and_samples_only(trained_run):
    files = files_to_push(trained_run)
    assert "README.md" in files and "pytorch_lora_weights.safetensors" in files
    assert "lora_for_comfyui_a1111_forge.safetensors" in files  # the file the card names for the tools
    samples = [f for f in files if f.startswith("samples/")]
    assert samples and all(f.endswith(".png") and (trained_run / f).is_file() for f in samples)
    assert (trained_run / "checkpoints").is_dir() and (trained_run / "config.toml").is_file()
    assert not any(f.startswith(("checkpoints", "logs")) or f == "config.toml" for f in files)


def test_card_parses_and_names_the_base_model(trained_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained_run / "README.md")
    assert card.data.base_model  # the card writer records it ...
    with pytest.raises(DifftuneError, match="--base-model"):  # ... but a local path is not a Hub id
        card_base_model(trained_run)
    card = card_base_model(trained_run, "someone/tiny-sd")
    assert ModelCard(str(card)).data.base_model == "someone/tiny-sd"


def test_dry_run_lists_files(trained_run, capsys):
    assert main(["push", str(trained_run), "--repo", "me/thing", "--base-model", "someone/tiny-sd", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "base_model someone/tiny-sd" in out and "pytorch_lora_weights.safetensors" in out
    assert "checkpoints" not in out


def test_offline_push_fails_with_a_clear_message(trained_run, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(trained_run), "--repo", "me/thing", "--base-model", "someone/tiny-sd"]) == 1
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "Traceback" not in err


def test_network_failure_is_one_line(trained_run, capsys, monkeypatch):
    from huggingface_hub import HfApi, constants

    def refuse(*args, **kwargs):
        raise ConnectionError("Failed to resolve huggingface.co")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "create_repo", refuse)
    assert main(["push", str(trained_run), "--repo", "me/thing", "--base-model", "someone/tiny-sd"]) == 1
    assert "push to me/thing failed: Failed to resolve huggingface.co" in capsys.readouterr().err


def test_upload_uses_allow_patterns(trained_run, monkeypatch):
    from huggingface_hub import HfApi, constants

    from difftune.publish.push import push

    seen = {}

    def fake_upload(self, **kwargs):
        seen.update(kwargs)
        seen["staged"] = sorted(p.relative_to(kwargs["folder_path"]).as_posix()
                                for p in kwargs["folder_path"].rglob("*") if p.is_file())
        seen["card"] = (kwargs["folder_path"] / "README.md").read_text()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo, **kw: f"https://huggingface.co/{repo}")
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload)
    files = push(trained_run, "me/thing", base_model="someone/tiny-sd", log=lambda *_: None)
    assert seen["allow_patterns"] == files == seen["staged"]
    assert "base_model: someone/tiny-sd" in seen["card"]


def test_corrupted_adapter_is_not_pushed(tmp_path):
    (tmp_path / "README.md").write_text("---\nbase_model: a/b\n---\n# x\n")
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(DifftuneError, match="truncated"):
        files_to_push(tmp_path)
