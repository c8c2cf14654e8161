"""The newest-versions check: find the next breaking release before users do.

Installs difftune into a fresh virtual environment with the newest releases its ranges in
pyproject.toml allow (not the lock), runs the lint and the whole suite, and prints what changed
against the lock (constraints.txt) and what passed or broke.

    python scripts/check_newest.py                 # newest releases within pyproject's ranges
    python scripts/check_newest.py --beyond-caps   # newest releases ignoring the upper bounds
    python scripts/check_newest.py --write-lock    # ... and, if everything passes, rewrite constraints.txt

torch stays at 2.13.0 (the CPU build on this project's machines; any other torch is a multi-GB CUDA
download). Exit status 0 when the suite passes, 1 when it does not. See docs/dependencies.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
TORCH = "torch==2.13.0"
LOCK_HEADER = """\
# The exact versions difftune's test suite last passed with (the lock).
# The README's two commands install through it: pip install ... -c constraints.txt
# pyproject.toml keeps the ranges difftune supports; this file pins one tested point inside them.
# Refresh it with `python scripts/check_newest.py --write-lock` (fresh venv, newest allowed versions,
# full suite, then freeze); see docs/dependencies.md.
"""


def _requirements(beyond_caps: bool) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    reqs = [r for r in reqs if not r.startswith("torch")]
    if beyond_caps:  # keep the lower bounds, drop every "<" and "<=" (and "!=") specifier
        reqs = [re.sub(r",?\s*(<=?|!=)\s*[^,;\s]+", "", r) for r in reqs]
    return reqs


def _run(cmd: list[str], log: Path | None = None, **kw) -> int:
    print("+", " ".join(cmd), flush=True)
    if log is None:
        return subprocess.run(cmd, cwd=ROOT, **kw).returncode
    with log.open("w") as out:
        return subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, **kw).returncode


def _freeze(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                         text=True, check=True).stdout
    return dict(line.split("==", 1) for line in out.splitlines() if "==" in line)


def _locked() -> dict[str, str]:
    lines = [ln for ln in LOCK.read_text().splitlines() if ln and not ln.startswith("#")]
    return dict(ln.split("==", 1) for ln in lines)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beyond-caps", action="store_true", help="ignore the upper bounds in pyproject.toml")
    parser.add_argument("--write-lock", action="store_true", help="rewrite constraints.txt if the suite passes")
    parser.add_argument("--venv", default=None, help="where to make the fresh venv (default: a temporary folder)")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest, e.g. -m 'not slow'")
    args = parser.parse_args()
    if args.write_lock and args.beyond_caps:
        parser.error("--write-lock records versions inside the ranges; do not combine it with --beyond-caps")

    with tempfile.TemporaryDirectory(prefix="difftune-newest-") as tmp:
        venv = Path(args.venv or Path(tmp) / "venv")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        pip = [str(python), "-m", "pip", "install", "-q"]
        if _run([*pip, TORCH], env=env) or _run([*pip, "--no-deps", "-e", "."], env=env):
            return 1
        # torch is named again so that the eager upgrade keeps it (a newer one is a CUDA build)
        upgrade = [*pip, "--upgrade", "--upgrade-strategy", "eager", TORCH, *_requirements(args.beyond_caps)]
        if _run(upgrade, env=env):
            print("the newest allowed versions do not install together (see pip's message above)")
            return 1

        installed, locked = _freeze(python), {_norm(k): v for k, v in _locked().items()}
        print("\nversions (lock -> newest installed):")
        for name, version in sorted(installed.items(), key=lambda kv: _norm(kv[0])):
            old = locked.get(_norm(name))
            if old != version.split("+")[0] and old != version:
                print(f"  {name}: {old or 'not in the lock'} -> {version}")

        log = ROOT / f"newest-check{'-beyond-caps' if args.beyond_caps else ''}.log"  # kept; git ignores it
        guard = subprocess.run([str(python), "-c", "from difftune.compat import known_problems as k; "
                                "print('\\n'.join(k()))"], capture_output=True, text=True, cwd=ROOT).stdout
        print("\nknown problems difftune's guard reports:", guard.strip() or "none")
        if guard.strip():  # run the suite anyway, to see what actually breaks behind the guard
            env["DIFFTUNE_SKIP_VERSION_CHECK"] = "1"
        lint = _run([str(venv / "bin" / "ruff"), "check", "src", "tests", "benchmarks", "scripts"], env=env)
        tests = _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args], log=log,
                     env=env)
        lines = log.read_text().splitlines()
        failed = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
        print("\nsuite:", lines[-1] if lines else "no output")
        for line in failed:
            print(" ", line)
        if tests or lint:
            print(f"\nbroken with the newest versions above; the suite's output is in {log}")
            return 1
        print("\nthe newest allowed versions pass")
        if args.write_lock:
            pins = [f"{k}=={v.split('+')[0] if _norm(k) == 'torch' else v}"
                    for k, v in sorted(installed.items(), key=lambda kv: _norm(kv[0]))]
            LOCK.write_text(LOCK_HEADER + "\n".join(pins) + "\n")
            print(f"wrote {LOCK} ({len(pins)} pins)")
        return 0


if __name__ == "__main__":
    sys.exit(main())
