"""What the Watch page polls about a run's marked checkpoint (best.json), read strictly."""

from __future__ import annotations

import json
import urllib.request

import pytest
from tests.ui.conftest import tiny_config


def _strict(raw: bytes):
    """JSON as a browser's JSON.parse reads it: NaN and Infinity are errors."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(raw, parse_constant=refuse)


@pytest.mark.parametrize("text", ['{"checkpoint": "step-2", "step": 2, "val_loss": NaN, "by": "loss"}',
                                  '{"checkpoint": "step-2", "step": 2, "val_loss": 0.1, "word_gain": Infinity}',
                                  '{"checkpoint": "step-2", "step": 2.5, "val_loss": 0.1}', "{half"])
def test_a_best_mark_that_is_not_one_is_not_served(served, ui_root, text):
    """A hand-edited best.json with NaN reached the page as NaN, which the browser's JSON.parse refuses (the
    Watch page stopped updating); now the run is served without a mark."""
    run = ui_root / "runs" / "a"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "config.toml").write_text(tiny_config("runs/a"))
    (run / "checkpoints" / "best.json").write_text(text)
    with urllib.request.urlopen(served.url + "api/run?run=runs/a&offset=0", timeout=60) as res:
        detail = _strict(res.read())
    assert detail["best"] is None and detail["checkpoints"] == ["step-2"]

    record = {"checkpoint": "step-2", "step": 2, "val_loss": 0.1, "by": "loss"}
    (run / "checkpoints" / "best.json").write_text(json.dumps(record))
    with urllib.request.urlopen(served.url + "api/run?run=runs/a&offset=0", timeout=60) as res:
        assert _strict(res.read())["best"] == record
