"""Adapter tools never write over their own inputs; an output they cannot write is one line."""

from __future__ import annotations

import shutil

import pytest

from difftune.cli import main


@pytest.mark.parametrize("command", ["convert", "merge", "reduce"])
def test_an_output_naming_the_input_is_refused_and_the_input_kept(lora_a, tmp_path, capsys, command):
    lora = tmp_path / "mine.safetensors"
    shutil.copy(lora_a, lora)
    before = lora.read_bytes()
    argv = {"convert": ["convert", str(lora), "--to", "kohya", "-o", str(lora)],
            "merge": ["merge", str(lora), f"{lora}:0.5", "-o", str(lora)],
            "reduce": ["convert", str(lora), "--to", "diffusers", "--to-lora", "--rank", "2", "-o", str(lora)]}[command]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"difftune: error: -o {lora}: that is the input {lora}; write the result to another file"
    assert lora.read_bytes() == before


def test_an_output_given_as_the_input_folder_is_refused(lora_a, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(lora_a.parent, run)
    before = (run / lora_a.name).read_bytes()
    assert main(["convert", str(run), "--to", "diffusers", "-o", str(run)]) == 1
    assert "that is the input" in capsys.readouterr().err and (run / lora_a.name).read_bytes() == before


@pytest.mark.parametrize("out", ["/dev/null/x.safetensors", "/proc/difftune.safetensors"])
def test_an_output_that_cannot_be_written_is_one_line(lora_a, tmp_path, capsys, out):
    assert main(["convert", str(lora_a), "--to", "kohya", "-o", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"difftune: error: -o {out}: cannot write it (")


def test_fuse_never_writes_into_an_existing_folder(lora_a, tiny_sd, tmp_path, capsys):
    before = sorted(p.name for p in tiny_sd.iterdir())
    assert main(["merge", str(lora_a), "--fuse", "--model", str(tiny_sd), "-o", str(tiny_sd)]) == 1
    assert "already exists" in capsys.readouterr().err and sorted(p.name for p in tiny_sd.iterdir()) == before
