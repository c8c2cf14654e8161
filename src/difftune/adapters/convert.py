"""``difftune convert``: diffusers/peft LoRA <-> kohya LoRA, and DoRA/LoHa/LoKr -> LoRA by SVD."""

from __future__ import annotations

import os
from pathlib import Path

from difftune.adapters import kohya
from difftune.adapters.detect import adapter_from_tensors, detect_format
from difftune.adapters.formats import LoraAdapter, to_diffusers
from difftune.adapters.safe_load import load_tensors, resolve_weight_file
from difftune.errors import DifftuneError
from difftune.fileio import save_safetensors

TARGET_FORMATS = ("kohya", "diffusers")


def read_adapter(path: str | Path, *, allow_pickle: bool = False,
                 module_names: dict[str, list[str]] | None = None, unet_config=None,
                 family: str | None = None) -> LoraAdapter:
    """A LoRA file (diffusers or kohya) read safely; errors name the file.

    ``module_names`` and ``unet_config`` describe the target model (see :func:`pipeline_target`);
    ``family`` names its model family (kohya files of transformer families are recognised without it).
    """
    file = resolve_weight_file(path)
    tensors, metadata = load_tensors(file, allow_pickle=allow_pickle)
    try:
        return adapter_from_tensors(tensors, metadata, module_names, unet_config, family=family)
    except DifftuneError as exc:
        raise DifftuneError(f"{file}: {exc}") from None


def adapter_tensors(adapter: LoraAdapter, fmt: str, family: str | None = None):
    if fmt == "kohya":
        return kohya.to_kohya(adapter, family)
    if fmt == "diffusers":
        return to_diffusers(adapter)
    raise DifftuneError(f"--to: unknown format {fmt!r}; choose one of {', '.join(TARGET_FORMATS)}")


def output_file(out: str | Path) -> Path:
    """The file :func:`write_adapter` writes for ``-o out`` (a folder: the diffusers file name in it)."""
    out = Path(out)
    return out / "pytorch_lora_weights.safetensors" if out.is_dir() or out.suffix != ".safetensors" else out


def check_output(out: str | Path, inputs: tuple[str | Path, ...] = (), overwrite: bool = False) -> Path:
    """Refuse an output that is one of the inputs (always) or an existing file (unless ``overwrite``)."""
    out = output_file(out)
    refuse_writing_over_inputs(out, inputs)
    if out.exists() and not overwrite:
        raise DifftuneError(f"-o {out}: already exists; give --overwrite to replace it, or choose another file")
    return out


def write_adapter(adapter: LoraAdapter, out: str | Path, fmt: str = "diffusers", family: str | None = None,
                  inputs: tuple[str | Path, ...] = (), overwrite: bool = False) -> Path:
    """Write ``adapter`` as one safetensors file (``out`` may be a folder: the diffusers file name is used).

    ``family`` picks the kohya naming of transformer families (default: the adapter's recorded family).
    ``inputs``: the files it was read from, which are never written over; an existing file is replaced
    only with ``overwrite``.
    """
    out = check_output(out, inputs, overwrite)
    tensors, header = adapter_tensors(adapter, fmt, family)
    header["difftune.format"] = fmt
    try:
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, out, header)
    except OSError as exc:
        raise DifftuneError(f"-o {out}: cannot write it ({exc.strerror or exc})") from None
    return out


def refuse_writing_over_inputs(out: Path, inputs: tuple[str | Path, ...]) -> None:
    """A tool never writes its result over one of its own input files."""
    if not out.exists():
        return
    for given in inputs:
        try:
            source = resolve_weight_file(given)
        except DifftuneError:
            continue
        if source.exists() and os.path.samefile(source, out):
            raise DifftuneError(f"-o {out}: that is the input {given}; write the result to another file")


def convert(src: str | Path, to: str, out: str | Path, *, allow_pickle: bool = False,
            module_names: dict[str, list[str]] | None = None, unet_config=None, family: str | None = None,
            overwrite: bool = False) -> Path:
    check_output(out, (src,), overwrite)
    adapter = read_adapter(src, allow_pickle=allow_pickle, module_names=module_names, unet_config=unet_config,
                           family=family)
    return write_adapter(adapter, out, to, family, inputs=(src,), overwrite=overwrite)


def describe(path: str | Path) -> str:
    from difftune.adapters.safe_load import read_header

    header = read_header(resolve_weight_file(path))
    return detect_format(list(header.tensors), header.metadata).title
