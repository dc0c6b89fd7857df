"""Logic pairs from four sources, each giving a correct answer (chosen) and a wrong one (rejected).

- `logiqa`: LogiQA multiple choice; chosen is the correct option, rejected the wrong option
  closest to it in length. Sampling alternates between questions where the correct option is the
  longer one and those where it is the shorter one, because correct LogiQA options tend to be longer.
- `syllogism`: categorical syllogisms from the `logic-statements` eval, asked as "valid?" or
  "invalid?" in alternation so that "Yes" and "No" each open half of the chosen answers.
- `deduction`: multi-step rule reasoning (ParaRule-Plus); "The statement is true." vs "... false.",
  sampled so that true and false are equally frequent where the split allows it.
- `shuffle`: the opening sentence of a Brown passage as prompt, the next three sentences in order
  (chosen) or permuted (rejected).
"""

from __future__ import annotations

import itertools
import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from probe.data.brown import BrownCorpus, BrownDocument, Sentence, is_clean, sentence_text
from probe.data.common import Split, allocate, split_of
from probe.data.sources import read_wheel_jsonl

logger = logging.getLogger(__name__)

DATA = "evals/registry/data/"
# The `logiqa-logical-reasoning-plus` files are left out: in every row there the correct option is
# "None of the other options are correct.", which gives no answer text to prefer.
LOGIQA_MEMBERS = (DATA + "logiqa/logiqa.jsonl",)
SYLLOGISM_MEMBER = DATA + "logic-statements/logic-statements.jsonl"
DEDUCTION_MEMBER = DATA + "pararule-plus-multi-step-deductive-reasoning/pararule-plus-multi-step-deductive-reasoning.jsonl"

LOGIC_KINDS = ("logiqa", "syllogism", "deduction", "shuffle")
SHUFFLE_CONTINUATION = 3

_LOGIQA = re.compile(
    r"Passage:\s*(?P<passage>.*?)\s*Question:\s*(?P<question>.*?)\s*\nA\.\s*(?P<A>.*?)\s*\nB\.\s*(?P<B>.*?)"
    r"\s*\nC\.\s*(?P<C>.*?)\s*\nD\.\s*(?P<D>.*?)\s*\nAnswer:",
    re.DOTALL,
)
_SYLLOGISM = re.compile(r"Is the following statement true\?\s*(?P<statement>.*?)\s*Format your final answer", re.DOTALL)
_DEDUCTION = re.compile(r"Passage:\s*(?P<passage>.*?)\s*Question:\s*(?P<statement>.*?)\s*Answer:", re.DOTALL)
_NOT_AN_ANSWER = "none of the other options are correct"

# (question, answer calling the argument invalid, answer calling it valid) for each phrasing.
_SYLLOGISM_FRAMES = (
    ("Is this argument valid?", "No, the argument is invalid.", "Yes, the argument is valid."),
    ("Is this argument invalid?", "Yes, the argument is invalid.", "No, the argument is valid."),
)


@dataclass
class LogicUnit:
    """One source question before sampling; `key` decides its split, `stratum` balances answers."""

    kind: str
    key: str
    source: str
    prompt: str
    chosen: str
    wrong: list[str] = field(default_factory=list)
    stratum: str = ""


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _user_text(row: dict) -> str:
    return row["input"][-1]["content"]


def _strip_option_label(option: str) -> str:
    return _normalise(re.sub(r"^[A-D]\.\s*", "", option.strip()))


def _closest_in_length(target: str, options: list[str]) -> str:
    """Pick the option closest to `target` in words, then in characters; the first one wins ties."""
    return min(options, key=lambda o: (abs(len(o.split()) - len(target.split())), abs(len(o) - len(target))))


def logiqa_units(wheel: Path) -> list[LogicUnit]:
    """Parse the LogiQA files, dropping repeated questions and those whose answer is "none of the others"."""
    units, seen = [], set()
    for member in LOGIQA_MEMBERS:
        for line, row in enumerate(read_wheel_jsonl(wheel, member), start=1):
            match = _LOGIQA.search(_user_text(row))
            if match is None:
                logger.debug("Skipping unparsed LogiQA row %s:%d", member, line)
                continue
            passage, question = _normalise(match["passage"]), _normalise(match["question"])
            options = {label: _strip_option_label(match[label]) for label in "ABCD"}
            correct = options[row["ideal"].strip()]
            wrong = [o for label, o in options.items() if label != row["ideal"].strip()
                     and _NOT_AN_ANSWER not in o.lower() and o != correct]
            if (passage, question) in seen or _NOT_AN_ANSWER in correct.lower() or not wrong:
                continue
            seen.add((passage, question))
            rejected = _closest_in_length(correct, wrong)
            longer = "equal"
            if len(correct) != len(rejected):
                longer = "chosen" if len(correct) > len(rejected) else "rejected"
            units.append(LogicUnit("logiqa", "logiqa:" + passage.lower(), f"evals:{member}:{line}",
                                   f"{passage}\nQuestion: {question}\nAnswer:", correct, [rejected], stratum=longer))
    return units


def syllogism_units(wheel: Path) -> list[LogicUnit]:
    units = []
    for line, row in enumerate(read_wheel_jsonl(wheel, SYLLOGISM_MEMBER), start=1):
        match = _SYLLOGISM.search(_user_text(row))
        if match is None:
            continue
        statement = _normalise(match["statement"])
        valid = row["ideal"].strip().upper() == "YES"
        units.append(LogicUnit("syllogism", "syllogism:" + statement.lower(), f"evals:{SYLLOGISM_MEMBER}:{line}",
                               statement, "valid" if valid else "invalid"))
    return units


def deduction_units(wheel: Path) -> list[LogicUnit]:
    units = []
    for line, row in enumerate(read_wheel_jsonl(wheel, DEDUCTION_MEMBER), start=1):
        match = _DEDUCTION.search(_user_text(row))
        if match is None:
            continue
        passage, statement = _normalise(match["passage"]), _normalise(match["statement"])
        truth = row["ideal"].strip().lower()
        if truth not in {"true", "false"}:
            continue
        other = "false" if truth == "true" else "true"
        prompt = f"{passage}\nQuestion: Is the following statement true or false? {statement}\nAnswer:"
        units.append(LogicUnit("deduction", "deduction:" + passage.lower(), f"evals:{DEDUCTION_MEMBER}:{line}",
                               prompt, f"The statement is {truth}.", [f"The statement is {other}."], stratum=truth))
    return units


def _clean_runs(document: BrownDocument, other_split_texts: set[str]) -> list[list[tuple[int, Sentence]]]:
    """Split a document's sentences into runs of consecutive clean sentences."""
    runs: list[list[tuple[int, Sentence]]] = [[]]
    for index, sentence in enumerate(document.sentences()):
        if is_clean(sentence, 4, 40) and sentence_text(sentence) not in other_split_texts:
            runs[-1].append((index, sentence))
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


def shuffle_units(corpus: BrownCorpus) -> list[LogicUnit]:
    """Cut the `shuffle` Brown documents into non-overlapping windows of consecutive sentences."""
    size = SHUFFLE_CONTINUATION + 1
    units = []
    for document in corpus.documents:
        if document.role != "shuffle":
            continue
        other = corpus.other_split_texts(document.split)
        for run in _clean_runs(document, other):
            for start in range(0, len(run) - size + 1, size):
                window = [sentence_text(s) for _, s in run[start : start + size]]
                if len(set(window[1:])) < SHUFFLE_CONTINUATION:
                    continue
                source = f"brown:{document.doc_id}:{run[start][0]}"
                units.append(LogicUnit("shuffle", "brown:" + document.doc_id, source, window[0],
                                       " ".join(window[1:]), window[1:]))
    return units


def _finish_pair(unit: LogicUnit, index: int, rng: random.Random) -> tuple[str, str, str]:
    """Turn a unit into (prompt, chosen, rejected), drawing the random parts from `rng`."""
    if unit.kind == "shuffle":
        orders = [p for p in itertools.permutations(range(SHUFFLE_CONTINUATION)) if list(p) != sorted(p)]
        order = rng.choice(orders)
        return unit.prompt, unit.chosen, " ".join(unit.wrong[i] for i in order)
    if unit.kind == "syllogism":
        question, invalid_answer, valid_answer = _SYLLOGISM_FRAMES[index % 2]
        chosen, rejected = (invalid_answer, valid_answer) if unit.chosen == "invalid" else (valid_answer, invalid_answer)
        prompt = ("Judge the argument by its logical form alone, ignoring what you know about the world.\n"
                  f"Argument: {unit.prompt}\nQuestion: {question}\nAnswer:")
        return prompt, chosen, rejected
    return unit.prompt, unit.chosen, unit.wrong[0]


def _sample_units(units: list[LogicUnit], n: int, rng: random.Random) -> list[LogicUnit]:
    """Draw `n` units, alternating between strata (true/false, longer/shorter) while each has units left."""
    strata: dict[str, list[LogicUnit]] = defaultdict(list)
    for unit in units:
        strata[unit.stratum].append(unit)
    pools = [rng.sample(strata[s], len(strata[s])) for s in sorted(strata)]
    picked: list[LogicUnit] = []
    while len(picked) < n:
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return picked


def build_logic(units: list[LogicUnit], split: Split, n: int, seed: int) -> list[dict]:
    """Build `n` logic pairs for one split, with equal shares per kind where the sources allow it.

    Raises:
        ValueError: If the split's units cannot supply `n` pairs.
    """
    rng = random.Random(f"{seed}:logic:{split}")
    by_kind: dict[str, list[LogicUnit]] = {kind: [] for kind in LOGIC_KINDS}
    for unit in units:
        if split_of(unit.key) == split:
            by_kind[unit.kind].append(unit)
    quotas = allocate(n, {k: len(v) for k, v in by_kind.items()}, dict.fromkeys(LOGIC_KINDS, 1.0), f"logic ({split})")

    pairs = []
    for kind in LOGIC_KINDS:
        for index, unit in enumerate(_sample_units(by_kind[kind], quotas[kind], rng)):
            prompt, chosen, rejected = _finish_pair(unit, index, rng)
            pairs.append({"id": f"logic:{unit.source}", "capability": "logic", "source": unit.source,
                          "kind": kind, "split": split, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    rng.shuffle(pairs)
    return pairs
