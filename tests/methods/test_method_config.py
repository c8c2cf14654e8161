"""Config keys of the methods: typed tables, unions, and errors that name the key."""

from __future__ import annotations

import pytest

from difftune import load_config
from difftune.config.loader import config_to_dict, dump_toml
from difftune.errors import ConfigError


def test_rank_pattern_is_a_typed_table_and_round_trips(run_config, tiny_sd, shapes_data, tmp_path):
    raw = run_config(tiny_sd, shapes_data, tmp_path, method={"rank_pattern": {"to_q": 8}, "alpha_pattern": {"to_q": 4}})
    config = load_config(data=raw)
    assert config.method.rank_pattern == {"to_q": 8} and config.method.alpha_pattern == {"to_q": 4.0}
    path = tmp_path / "written.toml"
    path.write_text(dump_toml(config_to_dict(config)))
    assert load_config(path).method.rank_pattern == {"to_q": 8}
    with pytest.raises(ConfigError, match=r"method.rank_pattern.to_q: expected an integer"):
        load_config(data=run_config(tiny_sd, shapes_data, tmp_path, method={"rank_pattern": {"to_q": "big"}}))
    with pytest.raises(ConfigError, match=r"method.rank_pattern: expected a table"):
        load_config(data=run_config(tiny_sd, shapes_data, tmp_path, method={"rank_pattern": [8]}))
    with pytest.raises(ConfigError, match=r"method.rank_pattern.to_q: 0 is out of range"):
        load_config(data=run_config(tiny_sd, shapes_data, tmp_path, method={"rank_pattern": {"to_q": 0}}))


@pytest.mark.parametrize("method, message", [
    ({"type": "textual_inversion"}, "method.token: required"),
    ({"type": "pivotal", "token": "<a>"}, "method.initializer_token: required"),
    ({"type": "textual_inversion", "token": ["<a>", "<b>", "<c>"], "initializer_token": ["x", "y"]},
     "method.initializer_token: give one word"),
    ({"type": "lora", "variant": "lokr", "train_text_encoder": True}, "method.train_text_encoder: not supported"),
    ({"type": "lora", "variant": "loah"}, "method.variant: 'loah' is not one of"),
])
def test_method_settings_are_checked_before_loading(method, message, run_config, tiny_sd, shapes_data, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(data=run_config(tiny_sd, shapes_data, tmp_path, method=method))


def test_token_clash_with_the_tokenizer_is_named(run_config, tiny_sd, shapes_data, tmp_path):
    import torch

    from difftune.methods import METHODS
    from difftune.models import detect_family, get_family
    from difftune.models.loading import resolve_source

    config = load_config(data=run_config(tiny_sd, shapes_data, tmp_path,
                                         method={"type": "textual_inversion", "token": "a", "initializer_token": "b"}))
    source = resolve_source(str(tiny_sd), None, None, None)
    family = get_family(detect_family(source, "auto"))
    components = family.load(source, dtype=torch.float32)
    with pytest.raises(ConfigError, match="'a' is already a token"):
        METHODS.get("textual_inversion").build(config.method, family).prepare(components)
