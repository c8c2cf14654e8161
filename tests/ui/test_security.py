"""Access control: the root confines every path, a non-loopback bind needs the token, pages of other sites cannot act."""

from __future__ import annotations

import os

import pytest
from tests.ui.conftest import Client, Served, tiny_config

from difftune.errors import DifftuneError
from difftune.ui.paths import OutsideRoot, Root
from difftune.ui.server import App, is_loopback

ESCAPES = ["../secret.txt", "/etc/passwd", "data/../../secret.txt", "~/secret.txt", "data\\..\\..\\secret.txt",
           "escape/secret.txt", "escape_file", "data/shapes/\x00"]


@pytest.fixture
def escapes(ui_root):
    """A secret beside the root, a symlinked folder and a symlinked file pointing at it."""
    secret = ui_root.parent / "secret.txt"
    secret.write_text("do not serve")
    os.symlink(ui_root.parent, ui_root / "escape")
    os.symlink(secret, ui_root / "escape_file")
    return secret


def test_root_resolves_inside_and_refuses_every_escape(ui_root, escapes):
    root = Root(ui_root)
    assert root.resolve("data/shapes") == ui_root / "data" / "shapes"
    assert root.resolve("") == ui_root
    for bad in ESCAPES:
        with pytest.raises(OutsideRoot):
            root.resolve(bad)
    assert root.rel(ui_root / ".difftune-ui") == ".difftune-ui"


@pytest.mark.parametrize("path", ESCAPES)
def test_every_endpoint_that_takes_a_path_refuses_escapes(served, escapes, path):
    c = served.client
    q = path.replace("\x00", "%00")
    for url in (f"/file?path={q}", f"/thumb?path={q}", f"/api/folders?path={q}", f"/api/run?run={q}",
                f"/api/compare?run={q}&run=data"):
        status, body = c.request(url)
        assert status == 403, (url, status, body)
        assert b"do not serve" not in (body if isinstance(body, bytes) else str(body).encode())
    for url, body in (("/api/data/check", {"path": path}), ("/api/config/open", {"path": path}),
                      ("/api/config/save", {"path": path + "/x.toml", "text": "version = 1\n"}),
                      ("/api/data/caption", {"path": path, "name": "img_000.png", "caption": "x"}),
                      ("/api/run/convert", {"run": path}),
                      ("/api/run/generate", {"run": path, "prompt": "a"})):
        status, data = c.request(url, body)
        assert status == 403, (url, status, data)
    assert escapes.read_text() == "do not serve"


def test_saving_through_a_symlink_out_of_the_root_is_refused(served, escapes):
    os.symlink(escapes, served.app.root.path / "link.toml")
    status, _ = served.client.request("/api/config/save", {"path": "link.toml", "text": "x", "overwrite": True})
    assert status == 403
    assert escapes.read_text() == "do not serve"


def test_caption_names_and_config_paths_cannot_leave_the_root(served, escapes):
    c = served.client
    status, data = c.request("/api/data/caption", {"path": "data/shapes", "name": "../../../secret.txt", "caption": "x"})
    assert status == 400 and "not an image inside" in data["error"]
    text = tiny_config().replace('path = "data/shapes"', f'path = "{escapes.parent}"')
    check = c.post("/api/config/parse", {"text": text})["check"]
    assert not check["ok"] and check["message"].startswith(f"data.path: {escapes.parent} is outside the root folder")
    status, data = c.request("/api/jobs", {"text": text})
    assert status == 400 and "outside the root folder" in data["error"]
    text = tiny_config(out=str(escapes.parent / "runs"))
    status, data = c.request("/api/jobs", {"text": text})
    assert status == 400 and data["error"].startswith("output.dir:")
    assert c.get("/api/jobs") == []


def test_the_apps_own_state_is_not_served(served):
    status, _ = served.client.request("/file?path=.difftune-ui/queue.sqlite")
    assert status == 403


def test_changes_need_the_apps_header_and_a_loopback_host(served):
    c = served.client
    status, data = c.request("/api/config/save", {"path": "x.toml", "text": "version = 1\n"}, headers={"X-Difftune": "0"})
    assert status == 403 and "X-Difftune" in data["error"]
    assert not (served.app.root.path / "x.toml").exists()
    status, data = c.request("/api/info", headers={"Host": "evil.example:80"})
    assert status == 403 and "Host" in data["error"]
    assert c.request("/api/info", headers={"Host": "localhost:1"})[0] == 200
    status, _ = c.request("/api/nothing")
    assert status == 404


def test_non_loopback_bind_requires_a_token(ui_root):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7")
    with pytest.raises(DifftuneError, match="needs an access token"):
        App(ui_root, host="0.0.0.0", start_runner=False)


def test_token_is_checked_on_every_request(ui_root):
    # The app believes it is bound to a LAN address; the socket is on 127.0.0.1 (the only address tests may use).
    served = Served(ui_root, host="192.0.2.7", token="s3cret-token")
    try:
        anonymous = Client(served.client.base)
        for path in ("/", "/static/app.js", "/api/runs", "/file?path=data/shapes/img_000.png"):
            status, _ = anonymous.request(path)
            assert status == 401, path
        assert anonymous.request("/api/jobs", {"text": tiny_config()})[0] == 401
        assert Client(served.client.base, {"Authorization": "Bearer wrong"}).request("/api/runs")[0] == 401
        assert anonymous.request("/api/runs?token=wrong")[0] == 401
        assert anonymous.request("/api/runs", headers={"Cookie": "difftune_token=wrong"})[0] == 401
        assert Client(served.client.base, {"Authorization": "Bearer s3cret-token"}).request("/api/runs")[0] == 200
        assert anonymous.request("/api/runs", headers={"Cookie": "difftune_token=s3cret-token"})[0] == 200
        import urllib.request

        with urllib.request.urlopen(served.client.base + "/?token=s3cret-token") as res:
            assert "difftune_token=s3cret-token" in res.headers["Set-Cookie"] and "HttpOnly" in res.headers["Set-Cookie"]
        # with a token, any Host is fine (the token is the protection); without one nothing is served
        assert anonymous.request("/api/runs", headers={"Host": "lan-name:7860"})[0] == 401
    finally:
        served.close()


def test_cli_refuses_a_port_in_use(ui_root, capsys):
    import socket

    from difftune.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["ui", "--root", str(ui_root), "--port", str(port)]) == 1
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
