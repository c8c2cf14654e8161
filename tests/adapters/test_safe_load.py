"""Refusing bad files: every broken or hostile file gets a one-line reason, read from the header."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from difftune.adapters.safe_load import load_tensors, parse_weighted, read_header
from difftune.cli import main
from difftune.errors import DifftuneError
from difftune.fileio import save_safetensors


def _raw_file(path, header: dict, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_safetensors({"unet.a.lora_A.weight": torch.ones(2, 4), "unet.a.lora_B.weight": torch.ones(4, 2)}, path)
    return path


def test_good_file_reads(good):
    tensors, _ = load_tensors(good)
    assert set(tensors) == {"unet.a.lora_A.weight", "unet.a.lora_B.weight"}


def test_truncated_file_is_refused_from_header(good, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(DifftuneError, match="truncated"):
        read_header(cut)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(DifftuneError, match="truncated"):
        read_header(tiny)


def test_corrupted_header_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json!")
    with pytest.raises(DifftuneError, match="not valid JSON"):
        read_header(path)


def test_huge_header_length_is_refused_without_reading(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(DifftuneError, match="header claims"):
        read_header(path)


def test_trillion_element_tensor_is_refused_from_header(tmp_path):
    path = tmp_path / "big.safetensors"
    _raw_file(path, {"x.lora_A.weight": {"dtype": "F32", "shape": [1_000_000, 1_000_000],
                                         "data_offsets": [0, 4 * 10**12]}})
    with pytest.raises(DifftuneError, match="elements"):
        load_tensors(path)


def test_rank_over_limit_and_bad_offsets_and_dtype(tmp_path):
    path = tmp_path / "rank.safetensors"
    _raw_file(path, {"m.lora_A.weight": {"dtype": "F32", "shape": [5000, 1], "data_offsets": [0, 20000]}},
              b"\0" * 20000)
    with pytest.raises(DifftuneError, match="rank 5000"):
        read_header(path)
    _raw_file(path, {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(DifftuneError, match="truncated"):
        read_header(path)
    _raw_file(path, {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 16)
    with pytest.raises(DifftuneError, match="bytes stored"):
        read_header(path)
    _raw_file(path, {"t": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    with pytest.raises(DifftuneError, match="unknown dtype"):
        read_header(path)
    _raw_file(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    with pytest.raises(DifftuneError, match="overlap"):
        read_header(path)


def test_pickle_refused_unless_allowed(tmp_path):
    path = tmp_path / "emb.pt"
    torch.save({"emb_params": torch.ones(1, 4)}, path)
    with pytest.raises(DifftuneError, match="--allow-pickle"):
        load_tensors(path)
    tensors, _ = load_tensors(path, allow_pickle=True)
    assert torch.equal(tensors["emb_params"], torch.ones(1, 4))


def test_unsafe_pickle_refused_even_when_allowed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.bin"
    torch.save({"x": Evil()}, path)
    with pytest.raises(DifftuneError, match="could not load the pickle file safely"):
        load_tensors(path, allow_pickle=True)


def test_cli_gives_one_line_reason_without_traceback(tmp_path, capsys):
    path = tmp_path / "big.safetensors"
    _raw_file(path, {"x": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}})
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("difftune: error: ") and "Traceback" not in err and err.count("\n") == 1
    assert main(["convert", str(tmp_path / "missing.safetensors"), "--to", "kohya", "-o", str(tmp_path / "o")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_wrong_keys_are_an_error(tmp_path, capsys):
    path = tmp_path / "weird.safetensors"
    save_safetensors({"foo.bar": torch.ones(2, 2), "baz": torch.ones(3)}, path)
    assert main(["convert", str(path), "--to", "kohya", "-o", str(tmp_path / "out.safetensors")]) == 1
    assert "a LoRA was expected" in capsys.readouterr().err


@pytest.mark.parametrize(("spec", "expected"), [
    ("a/b.safetensors:0.7", ("a/b.safetensors", 0.7)),
    ("a/b.safetensors", ("a/b.safetensors", 1.0)),
    ("weird:name/x.safetensors", ("weird:name/x.safetensors", 1.0)),
    ("dir:with:colons:-1.5", ("dir:with:colons", -1.5)),
])
def test_parse_weighted(spec, expected):
    assert parse_weighted(spec) == expected
