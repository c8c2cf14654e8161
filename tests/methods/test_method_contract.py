"""Contract every registered method must meet: prepare, one training step, export, model card."""

from __future__ import annotations

import pytest
import torch

from difftune.methods import METHODS

#: Settings a method cannot run without; a new method that needs none runs with the defaults.
REQUIRED = {
    "textual_inversion": {"token": "<tok>", "initializer_token": "shape"},
    "pivotal": {"token": "<tok>", "initializer_token": "shape"},
}


@pytest.mark.parametrize("name", METHODS.names())
def test_method_prepares_steps_and_exports(name, train_run):
    result = train_run(method={"type": name, **REQUIRED.get(name, {})}, train={"max_steps": 1})
    assert result.files, f"{name} exported nothing"
    assert all(p.exists() and p.stat().st_size > 0 for p in result.files)
    card = (result.output_dir / "README.md").read_text()
    assert "## Use it" in card and "from_pretrained" in card
    assert result.losses and all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)


@pytest.mark.parametrize("name", METHODS.names())
def test_method_trainable_state_round_trips(name, tiny_sd, run_config, shapes_data, tmp_path):
    """What a checkpoint saves is exactly what it restores."""
    from difftune import load_config
    from difftune.models import detect_family, get_family
    from difftune.models.loading import resolve_source

    config = load_config(data=run_config(tiny_sd, shapes_data, tmp_path, method={"type": name, **REQUIRED.get(name, {})}))
    source = resolve_source(str(tiny_sd), None, None, None)
    family = get_family(detect_family(source, "auto"))
    components = family.load(source, dtype=torch.float32)
    method = METHODS.get(name).build(config.method, family)
    method.prepare(components)
    assert method.trainable_modules(components)
    groups = method.param_groups(components, 1e-3)
    assert sum(p.numel() for g in groups for p in g["params"]) > 0
    state = method.trainable_state_dict(components)
    assert state
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    method.load_trainable_state_dict(components, changed)
    after = method.trainable_state_dict(components)
    assert all(torch.equal(after[k], changed[k]) for k in state)


@pytest.mark.parametrize("method", [
    {"type": "textual_inversion", "token": "<tok>", "initializer_token": "shape", "num_vectors": 2},
    {"type": "full", "ema": True, "ema_decay": 0.9},
    {"type": "pivotal", "token": "<tok>", "initializer_token": "shape", "embedding_stop_step": 3},
], ids=["textual_inversion", "full-ema", "pivotal"])
def test_resuming_gives_the_same_result(method, train_run):
    """Checkpoints hold what each method needs (new rows only, EMA shadow weights, both parts)."""
    import shutil

    from safetensors.torch import load_file

    def artefacts(out):
        files = sorted(out.glob("*.safetensors")) or sorted((out / "pipeline" / "unet").glob("*.safetensors"))
        return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}

    straight = train_run("straight", method=method, train={"max_steps": 4})
    train_run("resumed", method=method, train={"max_steps": 4, "checkpoint_every": 2})
    out = straight.output_dir.parent / "resumed"
    shutil.rmtree(out / "checkpoints" / "step-4", ignore_errors=True)
    for f in out.glob("*.safetensors"):
        f.unlink()
    shutil.rmtree(out / "pipeline", ignore_errors=True)
    train_run("resumed", method=method,
              train={"max_steps": 4, "checkpoint_every": 2, "resume": str(out / "checkpoints" / "step-2")})
    a, b = artefacts(straight.output_dir), artefacts(out)
    assert a and set(a) == set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # names of differing tensors
