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


@pytest.mark.parametrize("command", ["convert", "merge", "reduce"])
def test_an_existing_output_file_is_replaced_only_with_overwrite(lora_a, tmp_path, capsys, command):
    from safetensors.torch import load_file

    out = tmp_path / "someone-elses.safetensors"
    out.write_bytes(b"not mine to replace")
    argv = {"convert": ["convert", str(lora_a), "--to", "kohya", "-o", str(out)],
            "merge": ["merge", str(lora_a), f"{lora_a}:0.5", "-o", str(out)],
            "reduce": ["convert", str(lora_a), "--to", "diffusers", "--to-lora", "--rank", "2", "-o", str(out)]}[command]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"difftune: error: -o {out}: already exists; give --overwrite to replace it, or choose another file"]
    assert out.read_bytes() == b"not mine to replace"
    assert main([*argv, "--overwrite"]) == 0
    assert load_file(out)  # replaced by the result


def test_fuse_refuses_overwrite_rather_than_ignoring_it(lora_a, tiny_sd, tmp_path, capsys):
    out = tmp_path / "fused"
    assert main(["merge", str(lora_a), "--fuse", "--model", str(tiny_sd), "-o", str(out), "--overwrite"]) == 1
    assert "--overwrite does not apply to --fuse" in capsys.readouterr().err and not out.exists()


def test_generate_replaces_images_of_the_same_names_only_with_overwrite(tiny_sd, tmp_path, capsys):
    out = tmp_path / "images"
    out.mkdir()
    (out / "grid.png").write_bytes(b"my grid")
    argv = ["generate", "--model", str(tiny_sd), "--prompt", "a circle", "--steps", "1", "--width", "32",
            "--height", "32", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"difftune: error: --out {out}: already holds grid.png; give --overwrite to replace them, "
                   "or choose another folder"]
    assert (out / "grid.png").read_bytes() == b"my grid" and sorted(p.name for p in out.iterdir()) == ["grid.png"]
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "grid.png").read_bytes() != b"my grid" and (out / "00-00-seed0.png").is_file()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main([*argv[:-1], str(a_file)]) == 1
    assert f"--out {a_file}: is a file, not a folder" in capsys.readouterr().err
