"""Query tokens grouped into words for the heat maps: a token that starts with whitespace, or
with byte-level BPE's 'Ġ' / sentencepiece's '▁' word mark, starts a new word (a token of
spaces alone joins the next: BPE writes " reset" as " " "r" "es" "et"); so do a newline and a
change between prompt and completion. A word's score is the sum of its tokens' scores."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

_MARKS = {"Ġ": " ", "▁": " ", "Ċ": "\n"}  # tokenizer pieces as they print


def printable(token: str) -> str:
    """A token as text: BPE / sentencepiece marks written as the space or newline they stand for."""
    return "".join(_MARKS.get(c, c) for c in token)


def group_words(tokens: Sequence[str], values: Sequence[Optional[float]],
                completion: Optional[Sequence[bool]] = None) -> List[Dict]:
    """[{"text", "score", "completion", "tokens": [(text, value), ...]}] in token order; a
    missing (non-finite) token score counts as 0 in its word's sum."""
    flags = [True] * len(tokens) if completion is None else [bool(c) for c in completion]
    words: List[Dict] = []
    for token, value, flag in zip(tokens, values, flags):
        text = printable(token)
        current = words[-1]["text"] if words else ""
        starts = (not words or words[-1]["completion"] != flag or current.endswith("\n")
                  or (text[:1].isspace() and not current.isspace()))
        if starts:
            words.append({"text": "", "score": 0.0, "completion": flag, "tokens": []})
        word = words[-1]
        word["text"] += text
        word["score"] += value or 0.0
        word["tokens"].append((text, value))
    return words
