"""Caption augmentation (dropout, tag shuffling and the trigger word, seeded per item) and editing."""

from __future__ import annotations

import random
import re

from difftune.config.schema import DataConfig


def _join_trigger(caption: str, trigger: str, position: str) -> str:
    if not trigger:
        return caption
    if not caption:
        return trigger
    return f"{trigger}, {caption}" if position == "prefix" else f"{caption}, {trigger}"


def final_caption(caption: str, trigger: str, cfg: DataConfig, rng: random.Random | None) -> str:
    """The caption a training step sees.

    With ``rng=None`` (caching, reports) nothing random happens: no dropout, no shuffling.
    Dropout trains on the empty prompt (trigger included). Shuffling keeps the first
    ``keep_tags`` comma-separated tags in place; the trigger is never shuffled.
    """
    if rng is not None and cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
        return ""
    if rng is not None and cfg.shuffle_tags:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        head, tail = tags[: cfg.keep_tags], tags[cfg.keep_tags:]
        rng.shuffle(tail)
        caption = ", ".join(head + tail)
    return _join_trigger(caption, trigger, cfg.trigger_position)


def possible_captions(caption: str, trigger: str, cfg: DataConfig) -> list[str]:
    """Every caption :func:`final_caption` can produce without tag shuffling (for the text cache)."""
    out = [final_caption(caption, trigger, cfg, None)]
    if cfg.caption_dropout > 0:
        out.append("")
    return out


def without_word(caption: str, word: str) -> str | None:
    """``caption`` with ``word`` taken out (whole word, any case) and the spacing and commas around it tidied;
    ``None`` when the caption does not contain it."""
    pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
    if not pattern.search(caption):
        return None
    text = pattern.sub(" ", caption)
    text = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s{2,}", " ", text)).strip()
    text = re.sub(r"^[,.;:]\s*|\s*,$", "", re.sub(r"([,;:])(\s*[,;:])+", r"\1", text)).strip()
    return text
