"""The active-options block: what a run will do, in a few lines, from the config alone (no torch).

``difftune validate`` prints it before any weights load; a run prints it at its start with what only the
loaded model knows (:class:`RunFacts`), and writes it to ``logs/options.txt`` and the model card.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from difftune.config.loader import UNSET, toml_value
from difftune.config.schema import SECTIONS, Config, field_default


@dataclass
class RunFacts:
    """What the loaded model and machine add; ``None`` where ``difftune validate`` cannot know it."""

    family: str | None = None
    objective: str | None = None
    prediction: str | None = None
    targets: list[str] | None = None
    precision: str | None = None
    #: Sampling settings the run uses for its previews and says in the card (e.g. zero terminal SNR).
    sampling: dict | None = None


def non_default(config: Config) -> list[tuple[str, object]]:
    """Every ``section.key`` whose value differs from the schema default, in schema order."""
    out = []
    for name in SECTIONS:
        section = getattr(config, name)
        for f in dataclasses.fields(section):
            default = field_default(f)
            value = getattr(section, f.name)
            if value != default:
                out.append((f"{name}.{f.name}", value))
    return out


def _show(value: object) -> str:
    """A value as it is written in TOML (tables of a list without their unset keys)."""
    if value is None:  # a key unset from its default, as ``--set`` writes it
        return UNSET
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        value = [{k: v for k, v in dataclasses.asdict(x).items() if v not in (None, [], "")} for x in value]
    return toml_value(value)


def _method_line(config: Config, facts: RunFacts) -> str:
    m = config.method
    if m.type in ("lora", "pivotal"):
        targets = ", ".join(facts.targets) if facts.targets else (", ".join(m.targets) or "the family's default")
        what = f"{m.variant} rank {m.rank} alpha {m.alpha if m.alpha is not None else m.rank} on {targets}"
    elif m.type == "full":
        what = "every denoiser weight"
    else:
        what = f"token embeddings {', '.join(m.token)}"
    text = "text encoder trains" if m.train_text_encoder else "text encoder frozen"
    ema = f"EMA {m.ema_decay} (export {'EMA' if m.ema_export else 'trained'} weights, validate with " \
          f"{'EMA' if m.ema_validate else 'trained'} weights)" if m.ema else "no EMA"
    return f"method: {m.type}: {what}; {text}; {ema}"


def _loss_lines(config: Config, facts: RunFacts) -> list[str]:
    t = config.train
    loss = t.loss if t.loss in ("mse", "l1") else f"{t.loss} (δ {t.huber_delta}, {t.huber_schedule} schedule)"
    flow = facts.objective == "flow_match"
    weights = []
    if not flow:
        weights += [f"min-SNR γ {t.snr_gamma}"] if t.snr_gamma is not None else []
        weights += ["debiased estimation"] if t.debiased_estimation else []
    else:
        weights += [f"{t.weighting_scheme}"] if t.weighting_scheme != "none" else []
    lines = [f"loss: {loss}; weighting: {' + '.join(weights) or 'none'}"]
    if flow:
        shift = t.flow_shift if t.flow_shift is not None else "the model's"
        lines.append(f"timesteps: σ from {t.weighting_scheme if t.weighting_scheme != 'none' else 'uniform'}, "
                     f"shift {shift}")
    else:
        high = t.timestep_max if t.timestep_max is not None else "last"
        bias = "" if t.timestep_bias == "none" else (
            f", {t.timestep_bias} {t.timestep_bias_portion:g} drawn ×{t.timestep_bias_multiplier:g}")
        extra = [name for name, on in (("zero terminal SNR", t.zero_terminal_snr),
                                       (f"input perturbation {t.input_perturbation:g}", t.input_perturbation),
                                       (f"noise offset {t.noise_offset:g}", t.noise_offset)) if on]
        lines.append(f"timesteps: {t.timestep_min}–{high}{bias}" + (f"; {', '.join(extra)}" if extra else ""))
    return lines


def _turned_off(config: Config) -> list[str]:
    """What this run does not do, and why (only where someone might expect it)."""
    m, t, v = config.method, config.train, config.validation
    off = []
    if m.train_text_encoder:
        off.append("data.cache_text off: the text encoder trains")
    if t.optimizer == "adamw_schedulefree":
        off.append("learning-rate schedule off: schedule-free AdamW replaces it (warm-up is its own)")
    if t.optimizer != "adamw" and t.fused_optimizer:
        off.append(f"train.fused_optimizer has no effect: it is for adamw, not {t.optimizer}")
    if not v.prompts and not v.samples:
        off.append("validation samples off: validation.prompts and validation.samples are empty")
    return off


def active_options(config: Config, facts: RunFacts | None = None) -> list[str]:
    """The block's lines (without a heading)."""
    facts = facts or RunFacts()
    if facts.family:
        family = f"{facts.family} ({facts.objective}, {facts.prediction} prediction)"
    elif config.model.family != "auto":
        family = f"{config.model.family} (model.family)"
    else:
        family = "auto (detected from the model's files when training starts)"
    # the run passes the resolved precision with its reason (training.precision.precision_label)
    precision = facts.precision or config.train.mixed_precision
    lines = [f"family: {family}", _method_line(config, facts), f"precision: mixed {precision}",
             *_loss_lines(config, facts)]
    if facts.sampling:
        lines.append("sampling: " + ", ".join(f"{k} = {v}" for k, v in facts.sampling.items()))
    changed: dict[str, list[str]] = {}
    for key, value in non_default(config):
        if key not in ("model.path", "data.path", "output.dir"):
            section, name = key.split(".", 1)
            changed.setdefault(section, []).append(f"{name} = {_show(value)}")
    lines += [f"set [{section}]: " + ", ".join(items) for section, items in changed.items()]
    if not changed:
        lines.append("set: nothing but the paths")
    lines += [f"off: {reason}" for reason in _turned_off(config)]
    return lines


def options_block(config: Config, facts: RunFacts | None = None) -> str:
    """The block as printed: a heading and one indented line per item."""
    return "active options:\n" + "\n".join(f"  {line}" for line in active_options(config, facts))
