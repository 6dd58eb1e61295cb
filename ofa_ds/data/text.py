"""OFA's caption and question normalisation (OFA_SPEC 4.8, data/ofa_dataset.py). Limits are in words."""

from __future__ import annotations

import re

_RUNS_OF_SPACE = re.compile(r"\s{2,}")


def _normalise(text: str, max_words: int) -> str:
    text = _RUNS_OF_SPACE.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_caption(caption: str, max_words: int) -> str:
    caption = caption.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ").replace("<person>", "person")
    return _normalise(caption, max_words)


def pre_question(question: str, max_words: int) -> str:
    question = question.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    return _normalise(question, max_words)
