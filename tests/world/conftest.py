"""Runs in these tests train in-process with the precision a user's run picks (``auto``: bf16 where the
CPU runs it natively, fp32 elsewhere); accelerate keeps one mixed-precision setting per process, so each
test starts and ends with none."""

import pytest


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
