"""`difftune ui` as a person starts it: prints its URL, serves the page, stops on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request

import pytest


def _ignoring_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's background job starts it


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("inherited", [None, _ignoring_sigint], ids=["foreground", "sigint-ignored"])
def test_difftune_ui_prints_its_url_and_stops_on_ctrl_c(tmp_path, stop, inherited):
    proc = subprocess.Popen([sys.executable, "-m", "difftune", "ui", "--root", str(tmp_path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=inherited)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert lines[0].strip() == f"difftune ui: serving {tmp_path.resolve()}"
        url = lines[1].strip().removeprefix("open ")
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        with urllib.request.urlopen(url, timeout=30) as res:
            page = res.read().decode()
        assert "<title>difftune</title>" in page and 'src="/static/app.js"' in page
        with urllib.request.urlopen(url + "static/style.css", timeout=30) as res:
            style = res.read().decode()
        assert "//" not in page and "url(" not in style  # nothing is fetched from elsewhere
        proc.send_signal(stop)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / ".difftune-ui" / "queue.sqlite").is_file()


def test_a_root_that_is_not_a_folder_is_one_line(tmp_path, capsys):
    from difftune.cli import main

    assert main(["ui", "--root", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.strip() == f"difftune: error: --root {tmp_path / 'nope'}: not a folder"


def test_a_port_that_is_not_one_is_one_line(tmp_path, capsys):
    from difftune.cli import main

    assert main(["ui", "--root", str(tmp_path), "--port", "-1"]) == 1
    assert capsys.readouterr().err.strip() == "difftune: error: --port -1: not a port number (0 to 65535; 0 picks a free one)"
    assert not (tmp_path / ".difftune-ui").exists()
