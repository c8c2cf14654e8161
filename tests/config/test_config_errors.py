"""Config problems are one clear line naming the key or path, exit status 2, before any weights load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from difftune import load_config
from difftune.cli import main
from difftune.config.loader import parse_override
from difftune.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


@pytest.fixture
def good(tmp_path, tiny_sd, shapes_data) -> str:
    return f'[model]\npath = "{tiny_sd}"\n[data]\npath = "{shapes_data}"\n[output]\ndir = "{tmp_path / "out"}"\n'


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[train]\nlearnig_rate = 1e-4\n", "train.learnig_rate: unknown key (did you mean train.learning_rate?)"),
        ("[train]\nrank = 4\n", "train.rank: unknown key (did you mean method.rank?)"),
        ("[trian]\nseed = 1\n", "[trian]: unknown section (did you mean train?)"),
        ("[train]\nbatch_size = \"two\"\n", "train.batch_size: expected an integer, got 'two'"),
        ("[train]\nlearning_rate = -1.0\n", "train.learning_rate: -1.0 is out of range (must be > 0)"),
        ("[method]\ndropout = 1.5\n", "method.dropout: 1.5 is out of range (must be <= 1.0)"),
        ("[train]\noptimizer = \"adam\"\n", "train.optimizer: 'adam' is not one of 'adamw', 'adamw8bit', 'prodigy'"),
        ("[train]\nmixed_precision = \"bf61\"\n", "(did you mean 'bf16'?)"),
        ("[method]\ntype = \"lora2\"\n", "method.type: 'lora2' is not one of"),
        ("[train]\ngradient_checkpointing = 1\n", "train.gradient_checkpointing: expected true or false, got 1"),
    ],
)
def test_bad_key_or_value_is_named(tmp_path, good, extra, expected, capsys):
    # Sections may appear twice in TOML only if not redefined; put the extra section at the end.
    path = write(tmp_path, good + extra) if not extra.startswith(("[output]",)) else write(tmp_path, extra)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err
    assert len(err.splitlines()) == 1


def test_missing_paths_are_named(tmp_path, shapes_data, capsys):
    path = write(tmp_path, f'[model]\npath = "{tmp_path}/nope"\n[data]\npath = "{shapes_data}"\n')
    assert main(["validate", str(path)]) == 2
    assert f"model.path: {tmp_path}/nope does not exist" in capsys.readouterr().err
    path = write(tmp_path, '[model]\npath = "org/model"\n[data]\npath = "./missing_folder"\n')
    assert main(["validate", str(path)]) == 2
    assert "data.path: ./missing_folder does not exist" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nothing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_invalid_toml_names_the_file(tmp_path, capsys):
    path = write(tmp_path, "[model\npath = 1")
    assert main(["validate", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_set_overrides_and_typos(tmp_path, good):
    path = write(tmp_path, good)
    cfg = load_config(path, ["train.learning_rate=5e-5", "output.dir=runs/b", "validation.prompts=['a', 'b']",
                             "data.instance_prompt=a photo of sks dog"])
    assert cfg.train.learning_rate == 5e-5
    assert cfg.output.dir == "runs/b"
    assert cfg.validation.prompts == ["a", "b"]
    assert cfg.data.instance_prompt == "a photo of sks dog"
    with pytest.raises(ConfigError, match=r"--set train.lr: unknown key"):
        load_config(path, ["train.lr=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.learning_rate")


def test_train_rejects_bad_config_before_loading_weights(tmp_path, good):
    """A typo fails in well under the time it takes to import diffusers and load a model."""
    path = write(tmp_path, good + "[train]\nmax_step = 3\n")
    proc = subprocess.run([sys.executable, "-m", "difftune", "train", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "train.max_step: unknown key (did you mean train.max_steps?)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_init_writes_a_config_that_validates_once_the_data_exists(tmp_path, shapes_data, capsys):
    assert main(["init"]) == 0
    text = capsys.readouterr().out
    assert "# Peak learning rate." in text
    path = write(tmp_path, text)
    cfg = load_config(path, [f"data.path={shapes_data}"])  # the model is the embedded base
    assert cfg.model.path == "difftune:shapes" and cfg.data.resolution == 64
    assert cfg.train.mixed_precision == "auto"  # bf16 where the CPU or GPU runs it natively, fp32 elsewhere
    assert cfg.validation.prompts == ["a blue zorb on a white background"]


def test_version_mismatch(tmp_path, good):
    with pytest.raises(ConfigError, match="version: this difftune reads config version 1, got 7"):
        load_config(write(tmp_path, "version = 7\n" + good))


def test_holdout_config_errors(run_config, tiny_sd, shapes_data, tmp_path):
    base = run_config(tiny_sd, shapes_data, tmp_path)
    with pytest.raises(ConfigError, match="validation.holdout: 1.5"):
        load_config(data={**base, "validation": {"holdout": 1.5}})
    with pytest.raises(ConfigError, match="validation.holdout: .*not a folder"):
        load_config(data={**base, "validation": {"holdout": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError, match="validation.loss_every: needs validation.holdout"):
        load_config(data={**base, "validation": {"loss_every": 5}})
    assert load_config(data={**base, "validation": {"holdout": 0.2}}).validation.holdout == 0.2


def test_a_model_path_that_is_not_a_model_is_caught_by_validate(tmp_path, shapes_data, capsys):
    """A dataset folder, a random file, a pickle or a file named .safetensors that is not one: exit 2 at validate."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    cases = [(shapes_data, "is a folder without model_index.json"), (junk, "is not a safetensors file"),
             (pickle, "is not a .safetensors checkpoint"), (notes, "is not a .safetensors checkpoint")]
    for model, expected in cases:
        path = write(tmp_path, f'[model]\npath = "{model}"\n[data]\npath = "{shapes_data}"\n')
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"model.path: {model} {expected}" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.distributed=fsdp", "method.type=textual_inversion", "method.token=<x>", "method.initializer_token=dog"],
         "train.distributed: \"fsdp\" shards the methods full, lora, not 'textual_inversion'"),
        (["train.fsdp_cpu_offload=true"], 'train.fsdp_cpu_offload: only applies with train.distributed = "fsdp"'),
        (["train.distributed=zero3"], "train.distributed: 'zero3' is not one of 'ddp', 'fsdp'"),
    ],
)
def test_distributed_settings_it_cannot_honour_are_refused(tmp_path, good, overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, good), overrides)
    assert expected in str(err.value)


def test_set_none_unsets_an_optional_key_and_nothing_else(tmp_path, tiny_sd, shapes_data):
    path = tmp_path / "c.toml"
    path.write_text(f'version = 1\n[model]\npath = "{tiny_sd}"\n[data]\npath = "{shapes_data}"\n'
                    f'[train]\nsnr_gamma = 5.0\n[output]\ndir = "{tmp_path / "out"}"\n')
    assert load_config(path).train.snr_gamma == 5.0
    assert load_config(path, overrides=["train.snr_gamma=none"]).train.snr_gamma is None
    with pytest.raises(ConfigError, match="train.learning_rate"):  # a key that must have a value
        load_config(path, overrides=["train.learning_rate=none"])
    assert load_config(path, overrides=["logging.report_to=none"]).logging.report_to == "none"  # a word


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.resolution=63"], "data.resolution: 63 is not a multiple of 8 (the VAE works in blocks of 8 pixels), "
                                 "e.g. 56"),
        (["data.resolution=[64, 100]"], "data.resolution: 100 is not a multiple of 8"),
        (["validation.resolution=30"], "validation.resolution: 30 is not a multiple of 8"),
        (["data.buckets=true", "data.bucket_step=12"], "data.bucket_step: 12 is not a multiple of 8, e.g. 64"),
        (["data.path=RUN"], "data.path: RUN is a file; give a folder of images (or a dataset folder or Hub id)"),
        (["output.dir=RUN"], "output.dir: RUN is a file, not a folder; choose a folder for the run's results"),
    ],
)
def test_what_would_fail_only_after_training_is_refused_by_validate(tmp_path, good, overrides, expected, capsys):
    """Sizes the VAE cannot sample (a traceback after the last step) and paths that are files."""
    path = write(tmp_path, good)
    sets = [a for o in overrides for a in ("--set", o.replace("RUN", str(path)))]
    assert main(["validate", str(path), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"difftune: error: {expected.replace('RUN', str(path))}")


def test_a_folder_given_as_the_config_is_named(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 2
    assert f"{tmp_path}: is a folder, not a config file" in capsys.readouterr().err


def test_a_run_folder_given_as_the_checkpoint_to_resume_is_named(tmp_path, good, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    path = write(tmp_path, good)
    assert main(["validate", str(path), "--set", f"train.resume={run}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"difftune: error: train.resume: {run} is a run folder, not a checkpoint; give one of its checkpoints "
        f"({run / 'checkpoints' / 'step-N'}), or set output.dir to it and train.resume = \"latest\"")
