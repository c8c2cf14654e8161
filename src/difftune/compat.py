"""Which installed package versions are known not to work together, and the ``difftune env`` report.

Only package metadata is read here (no torch, no transformers), so the check costs a few
milliseconds and runs before anything heavy is imported: the packages that need the machine-learning
stack call :func:`require_working_stack` at import time, and a known-broken combination becomes one
message naming the package and the version to install, instead of a failure deep inside a run.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from difftune.errors import DifftuneError

SKIP_ENV = "DIFFTUNE_SKIP_VERSION_CHECK"
"""Set to 1 to skip the check (for example with a development build that fixes a known problem)."""


@dataclass(frozen=True)
class KnownBreak:
    """``package`` at ``versions`` fails unless ``needs`` is installed at ``needs_versions``."""

    package: str
    versions: str
    needs: str
    needs_versions: str
    why: str
    fix: str

    def problem(self, version_of) -> str | None:
        have, other = version_of(self.package), version_of(self.needs)
        if have is None or not _within(have, self.versions):
            return None
        if other is not None and _within(other, self.needs_versions):
            return None
        installed = f"{self.needs} {other} is installed" if other else f"{self.needs} is not installed"
        return f"{self.package} {have} needs {self.needs} {self.needs_versions}, but {installed} ({self.why}). {self.fix}"


@dataclass(frozen=True)
class MatchedBuild:
    """``package`` must be the release built for the installed ``base`` (same minor, offset by ``offset``)."""

    package: str
    base: str
    offset: int
    why: str
    fix: str

    def problem(self, version_of) -> str | None:
        have, base = version_of(self.package), version_of(self.base)
        if have is None or base is None:
            return None
        try:
            got, ref = Version(have), Version(base)
        except InvalidVersion:
            return None
        expected = ref.minor + self.offset
        if got.major == 0 and got.minor == expected:
            return None
        return (f"{self.package} {have} was built for another {self.base} release than the installed "
                f"{self.base} {base} (it needs {self.package} 0.{expected}.x; {self.why}). {self.fix}")


KNOWN_BREAKS: tuple[KnownBreak | MatchedBuild, ...] = (
    KnownBreak(
        package="transformers", versions=">=5.24", needs="peft", needs_versions=">=0.22",
        why="every LoRA on a text encoder fails with 'The version of PEFT you are using is not compatible'",
        fix="Install the tested transformers: pip install 'transformers==5.23.0'",
    ),
    MatchedBuild(
        package="torchvision", base="torch", offset=15,
        why="a mismatched torchvision fails on import with 'operator torchvision::nms does not exist'",
        fix="difftune does not need torchvision: pip uninstall torchvision (or install the build matching your torch)",
    ),
)


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _within(version: str, spec: str) -> bool:
    try:
        return SpecifierSet(spec).contains(Version(version).public, prereleases=True)
    except InvalidVersion:
        return False


def known_problems(version_of=installed_version) -> list[str]:
    """One sentence per installed combination known not to work, each naming what to install."""
    return [p for rule in KNOWN_BREAKS if (p := rule.problem(version_of))]


class BrokenInstall(DifftuneError, ImportError):
    """The installed packages are a combination known not to work. Exit status 2."""

    exit_code = 2


#: Warnings installed packages log while being imported that say nothing about a difftune run:
#: (logger, texts that all appear in the message). torchao (imported by peft when installed, and for
#: ``model.quantize``) cannot load its optional compiled kernels (CUDA, MX formats) on this build and
#: registers enums with torch's pytree, which torch answers with a deprecation notice. transformers
#: says, when a pipeline loads, that it uses the PIL image processors because torchvision is not
#: installed: difftune does not use torchvision (see ``KNOWN_BREAKS``), so that is the intended path.
IMPORT_NOISE = (
    ("torchao", ("Failed to load", ".so")),
    ("torch.utils._pytree", ("is an Enum subclass and is now natively supported",)),
    ("transformers.utils.import_utils", ("requires torchvision (not installed); falling back to",)),
)


class DropMessages(logging.Filter):
    """Drop the records whose message holds every one of ``texts``."""

    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not all(text in message for text in self.texts)


def quiet_import_noise() -> None:
    """Filter :data:`IMPORT_NOISE` out of those loggers (once; imports nothing)."""
    for name, texts in IMPORT_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) and f.texts == texts for f in logger.filters):
            logger.addFilter(DropMessages(texts))


@functools.cache
def require_working_stack() -> None:
    """Raise :class:`BrokenInstall` if the installed packages are known not to work together.

    Also quiets the known import-time noise of the stack (:func:`quiet_import_noise`)."""
    quiet_import_noise()
    if os.environ.get(SKIP_ENV) == "1":
        return
    problems = known_problems()
    if problems:
        raise BrokenInstall(
            "the installed packages do not work together: " + " ".join(problems)
            + f" (difftune env shows every version; set {SKIP_ENV}=1 to skip this check)"
        )


# --- difftune env --------------------------------------------------------------------------------

CORE = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub",
        "tokenizers", "numpy", "pillow")


def _declared_requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    """difftune's own requirements: the core list and each optional extra's list (from its metadata)."""
    core: list[Requirement] = []
    extras: dict[str, list[Requirement]] = {}
    for text in importlib.metadata.requires("difftune") or []:
        req = Requirement(text)
        extra = next((e for e in _extras_of(req)), None)
        (extras.setdefault(extra, []) if extra else core).append(req)
    return core, extras


def _extras_of(req: Requirement) -> list[str]:
    marker = str(req.marker or "")
    return [part.split("==")[1].strip().strip("'\"") for part in marker.split(" or ") if "extra ==" in part]


def _range_note(req: Requirement | None, version: str | None) -> str:
    if version is None:
        return "not installed"
    if req is None or not req.specifier:
        return version
    inside = _within(version, str(req.specifier))
    return version if inside else f"{version}  (outside difftune's supported range {req.specifier})"


#: CPU flags of native bf16 arithmetic (AVX-512 BF16 dot products, AMX tiles).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo(field: str) -> str:
    """The first ``field`` line of /proc/cpuinfo ("model name", "flags"); "" where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(field)), "")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs whose flags include AVX-512 BF16 or AMX-BF16 (read from /proc/cpuinfo)."""
    flags = set(_cpuinfo("flags").split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def cpu_model() -> str:
    """The CPU's model name (e.g. "AMD EPYC"), or the machine type where /proc/cpuinfo has none."""
    return _cpuinfo("model name") or platform.machine()


def _torch_line() -> str:
    version = installed_version("torch")
    if version is None:
        return "not installed"
    try:
        import torch
    except Exception as exc:  # a broken torch is exactly what a bug report needs to show
        return f"{version} (import failed: {exc})"
    parts = [version]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        parts.append(f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {names}")
    else:
        parts.append(f"CUDA: no (built for {torch.version.cuda})" if torch.version.cuda else "CUDA: no (CPU build)")
    mps = getattr(torch.backends, "mps", None)
    parts.append("MPS: yes" if mps is not None and mps.is_available() else "MPS: no")
    device = "cuda" if torch.cuda.is_available() else ("mps" if mps is not None and mps.is_available() else "cpu")
    parts.append(f"device: {device}, {torch.get_num_threads()} CPU threads")
    parts.append(f"CPU: {cpu_model()}")
    parts.append("CPU bf16: native" if cpu_has_native_bf16() else
                 "CPU bf16: emulated (no avx512_bf16/amx_bf16; train.mixed_precision auto trains in fp32 on the CPU)")
    return "; ".join(parts)


def environment_report() -> str:
    """What a bug report needs: difftune, Python, platform, torch and its device, every dependency."""
    core, extras = _declared_requirements()
    by_name = {r.name.lower().replace("_", "-"): r for r in core}
    lines = [
        f"- difftune: {installed_version('difftune')}",
        f"- Platform: {platform.platform()}",
        f"- Python: {platform.python_version()}",
        f"- torch: {_torch_line()}",
    ]
    for name in CORE[1:]:
        lines.append(f"- {name}: {_range_note(by_name.get(name.replace('_', '-')), installed_version(name))}")
    for extra, reqs in sorted(extras.items()):
        if extra == "test":
            continue
        listed = ", ".join(f"{r.name} {_range_note(r, installed_version(r.name))}" for r in reqs)
        lines.append(f"- extra [{extra}]: {listed}")
    problems = known_problems()
    lines.append("- Known problems: " + (" ".join(problems) if problems else "none"))
    return "\n".join(lines) + "\n"
