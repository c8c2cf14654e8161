"""Default LoRA targets adapt to the model (those it lacks are dropped, and the run says which);
targets the user wrote stay strict."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from difftune import load_config
from difftune.errors import ConfigError
from difftune.tiny import build_tiny_sd3
from difftune.training.loop import train


@pytest.fixture(scope="module")
def one_block_sd3(tmp_path_factory):
    """An SD3 transformer whose only block is context-pre-only: it has no ``to_add_out``."""
    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "sd3-one-block", num_layers=1)


def test_defaults_the_model_lacks_are_dropped_and_named(one_block_sd3, shapes_data, run_config, tmp_path):
    messages: list[str] = []
    raw = run_config(one_block_sd3, shapes_data, tmp_path / "run", train={"max_steps": 1})
    result = train(load_config(data=raw), log=messages.append)
    assert any("method.targets: this transformer has no to_add_out module" in m for m in messages)
    saved = load_file(result.output_dir / "pytorch_lora_weights.safetensors")
    assert any(".add_q_proj." in k for k in saved) and not any("to_add_out" in k for k in saved)
    assert "to_add_out" not in (result.output_dir / "README.md").read_text().split("Target modules")[1].split("\n")[0]


def test_targets_the_user_wrote_stay_strict(one_block_sd3, shapes_data, run_config, tmp_path):
    raw = run_config(one_block_sd3, shapes_data, tmp_path / "run", train={"max_steps": 1},
                     method={"targets": ["to_q", "to_add_out"]})
    with pytest.raises(ConfigError, match="method.targets: 'to_add_out' matches no module in the transformer"):
        train(load_config(data=raw), log=lambda _m: None)
    assert not (tmp_path / "run").exists()  # refused before anything was written
