"""Judge prompts and the parsing of the judge's replies.

The instructions ask for one JSON object. The parser also accepts JSON in code
fences or prose and plain "Fluency: 7/10" lines, because judges stray from the
format. A reply it cannot read gives None, which the caller counts as
unparseable instead of scoring it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Literal

DIMENSIONS: tuple[str, ...] = ("fluency", "logical_coherence", "factual_consistency")
Preference = Literal["A", "B", "tie"]

# The reply formats use placeholders, not example numbers, because weak judges copy an example verbatim.
SCORE_INSTRUCTIONS = (
    "You are a strict evaluator of answers written by a language model. Rate the answer below on three "
    "dimensions, each with an integer from 1 (very poor) to 10 (excellent):\n"
    "- fluency: grammar, word choice and readability.\n"
    "- logical_coherence: whether the statements and reasoning follow from each other without contradiction.\n"
    "- factual_consistency: whether the stated facts are true and agree with the question.\n"
    "Reply with one JSON object and nothing else, in this form:\n"
    '{"fluency": {"score": <1-10>, "rationale": "<one sentence>"}, '
    '"logical_coherence": {"score": <1-10>, "rationale": "<one sentence>"}, '
    '"factual_consistency": {"score": <1-10>, "rationale": "<one sentence>"}}'
)
PAIRWISE_INSTRUCTIONS = (
    "You compare two answers to the same question, each written by a language model. Decide which "
    "answer is better overall, weighing fluency, logical coherence and factual consistency. The order "
    "and the length of the answers must not decide. Reply with one JSON object and nothing else, in "
    'this form: {"winner": "<A, B or tie>", "rationale": "<one sentence>"}'
)


# Instructions go into the user turn, because some chat templates reject a system role (Gemma 2's
# raises "System role not supported").
def score_messages(prompt: str, answer: str) -> list[dict[str, str]]:
    content = f"{SCORE_INSTRUCTIONS}\n\nQuestion:\n{prompt}\n\nAnswer:\n{answer or '(empty answer)'}"
    return [{"role": "user", "content": content}]


def pairwise_messages(prompt: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    content = (
        f"{PAIRWISE_INSTRUCTIONS}\n\nQuestion:\n{prompt}\n\n[Answer A]\n{answer_a or '(empty answer)'}\n\n"
        f"[Answer B]\n{answer_b or '(empty answer)'}"
    )
    return [{"role": "user", "content": content}]


DIMENSION_ALIASES = {
    "fluency": "fluency",
    "coherence": "logical_coherence",
    "logical_coherence": "logical_coherence",
    "logic": "logical_coherence",
    "factual_consistency": "factual_consistency",
    "factuality": "factual_consistency",
    "factual_accuracy": "factual_consistency",
    "consistency": "factual_consistency",
}
_FENCED_BLOCK = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
# The separators exclude "<" so that an echoed placeholder such as `"score": <1-10>` is not read as a
# score, and the lookahead rejects a range such as "1-10".
_SCORE_LINE = re.compile(
    r"(?i:\b(fluency|logical[ _-]?coherence|coherence|factual[ _-]?consistency|factuality)\b)"
    r"[^\w\n<]*(?i:score[^\w\n<]*)?(\d+(?:\.\d+)?)(?!\s*-\s*\d)(?:\s*/\s*10)?[^\w\n]*(.*)"
)
_VERDICT_BRACKETS = re.compile(r"\[\[\s*([AB]|(?i:tie))\s*\]\]")
_VERDICT_LINE = re.compile(
    r"(?i:\b(?:winner|better answer|preference|verdict)\b)[^\w\n<]*(?i:an?\s+|answer\s+)?([AB]|(?i:tie|draw|equal))\b"
)
VERDICT_KEYS = ("winner", "preference", "better", "verdict", "choice")


def json_objects(text: str) -> Iterator[dict]:
    """Yield the JSON objects in a reply: the whole text, then fenced code blocks, then objects inside prose."""
    decoder = json.JSONDecoder()
    candidates = [text.strip(), *(block.strip() for block in _FENCED_BLOCK.findall(text))]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value


def parse_scores(reply: str) -> tuple[dict[str, float] | None, dict[str, str]]:
    """Read the 1-10 score and rationale of every dimension from a judge reply.

    Strict JSON is tried first, then JSON in code fences or prose, then lines
    such as "Fluency: 7/10 - reads well".

    Returns:
        (scores, rationales). `scores` is None unless every dimension has a
        score between 1 and 10, so a partial or out-of-range reply counts as
        unparseable rather than as a low score.
    """
    for value in json_objects(reply):
        scores, rationales = scores_from_object(value)
        if scores is not None:
            return scores, rationales
    return scores_from_lines(reply)


def scores_from_object(value: dict) -> tuple[dict[str, float] | None, dict[str, str]]:
    if isinstance(value.get("scores"), dict):
        nested = dict(value["scores"])
        nested.setdefault("rationale", value.get("rationale"))
        value = nested
    scores: dict[str, float] = {}
    rationales: dict[str, str] = {}
    for key, item in value.items():
        dimension = DIMENSION_ALIASES.get(re.sub(r"[\s-]+", "_", str(key).strip().lower()))
        if dimension is None:
            continue
        if isinstance(item, dict):
            rationale = item.get("rationale") or item.get("reason") or item.get("explanation")
            if rationale:
                rationales[dimension] = str(rationale)
            item = item.get("score", item.get("rating"))
        score = score_value(item)
        if score is not None:
            scores[dimension] = score
    if isinstance(value.get("rationale"), str):
        rationales.setdefault("overall", value["rationale"])
    return (scores if set(scores) == set(DIMENSIONS) else None), rationales


def scores_from_lines(reply: str) -> tuple[dict[str, float] | None, dict[str, str]]:
    scores: dict[str, float] = {}
    rationales: dict[str, str] = {}
    for match in _SCORE_LINE.finditer(reply):
        dimension = DIMENSION_ALIASES[re.sub(r"[\s-]+", "_", match.group(1).lower())]
        score = score_value(match.group(2))
        if score is None or dimension in scores:
            continue
        scores[dimension] = score
        if match.group(3).strip():
            rationales[dimension] = match.group(3).strip()
    return (scores if set(scores) == set(DIMENSIONS) else None), rationales


def score_value(item: Any) -> float | None:
    """Return a score in [1, 10] from a number or a string such as "7" or "7/10", else None."""
    if isinstance(item, bool):
        return None
    if isinstance(item, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*", item)
        item = float(match.group(1)) if match else None
    if isinstance(item, (int, float)) and 1 <= item <= 10:
        return float(item)
    return None


def parse_preference(reply: str) -> Preference | None:
    """Read the verdict "A", "B" or "tie" of a pairwise reply, or None when there is none.

    A JSON verdict key with an invalid value gives None, without falling back
    to the line patterns, because the JSON is what the judge was asked for.
    """
    found_key = False
    for value in json_objects(reply):
        for key in VERDICT_KEYS:
            if key in value:
                found_key = True
                verdict = normalise_verdict(value[key])
                if verdict is not None:
                    return verdict
    if found_key:
        return None
    for pattern in (_VERDICT_BRACKETS, _VERDICT_LINE):
        match = pattern.search(reply)
        if match:
            return normalise_verdict(match.group(1))
    return None


def normalise_verdict(value: Any) -> Preference | None:
    text = re.sub(r"[\[\]\"'().]", "", str(value)).strip().lower()
    text = re.sub(r"^answer\s+", "", text)
    if text in ("a", "b"):
        return text.upper()  # type: ignore[return-value]
    if text in ("tie", "draw", "equal", "both", "neither", "none"):
        return "tie"
    return None
