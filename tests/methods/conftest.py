"""Fixtures for the method tests: a short training run of the tiny model."""

from __future__ import annotations

import pytest


@pytest.fixture
def train_run(tiny_sd, shapes_data, run_config, tmp_path):
    """Train the tiny model for a few steps; ``sections`` update the config section by section."""
    from difftune import load_config
    from difftune.training.loop import train

    def run(out_name: str = "out", data_path=None, log=None, **sections):
        out = tmp_path / out_name
        raw = run_config(tiny_sd, data_path or shapes_data, out, **sections)
        messages: list[str] = []
        result = train(load_config(data=raw), log=log or messages.append)
        result.messages = messages
        return result

    return run
