"""Syntax minimal pairs: a real Brown sentence (chosen) against a copy with one tag-aware edit (rejected).

Edit kinds, each applied to one position and nothing else:

- `agreement`: a present-tense verb flips number (`is`/`are`, `has`/`have`, `does`/`do`, `takes`/`take`).
- `det_flip`: a demonstrative disagrees with its noun (`this city` -> `these city`).
- `det_insert`: `a`/`an` is inserted before a bare plural (`of voters` -> `of a voters`).
- `swap`: a function word swaps with the word after it (`the jury` -> `jury the`).
- `drop`: a function word is dropped (`size of this city` -> `size this city`).

`det_insert` adds one word and `drop` removes one, and both get the same quota, so the mean word
counts of chosen and rejected agree. Other kinds get equal quotas up to what the sentences supply. The prompt is the start of the sentence and the answers are its
continuation, which begins at most four tokens before the edit.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from probe.data.brown import (
    _ATTACH_LEFT,
    _ATTACH_RIGHT,
    BrownCorpus,
    Sentence,
    detokenize,
    is_clean,
    sentence_text,
)
from probe.data.common import Split, allocate

logger = logging.getLogger(__name__)

EDIT_KINDS = ("det_insert", "drop", "agreement", "det_flip", "swap")
MIN_WORDS, MAX_WORDS = 8, 35
MIN_PROMPT_TOKENS = 3
MAX_CONTEXT_BEFORE_EDIT = 4

_FIXED_AGREEMENT = {("bez", "is"): "are", ("ber", "are"): "is", ("hvz", "has"): "have", ("doz", "does"): "do"}
_DET_FLIP = {("dt", "this", "nn"): "these", ("dt", "that", "nn"): "those",
             ("dts", "these", "nns"): "this", ("dts", "those", "nns"): "that"}
_INSERT_AFTER_TAGS = {"in", "cc", "vb", "vbd", "vbz", "vbg", "vbn", "be", "bez", "ber", "bed", "bedz", "ben",
                      "hv", "hvd", "hvz"}
_SWAP_FIRST_TAGS = {"at", "in", "to", "md", "dt", "dts", "pp$"}
_SWAP_SECOND_TAGS = {"nn", "nns", "jj", "vb", "at", "np"}
_DETERMINER_TAGS = {"at", "dt", "dts", "pp$", "np$", "abn", "cd"}
_BARE_INFINITIVE_VERBS = {"help", "helps", "helped", "helping"}


@dataclass(frozen=True)
class Edit:
    """Replace `length` tokens at `index` with `new_words`."""

    kind: str
    index: int
    length: int
    new_words: tuple[str, ...]

    def apply(self, words: list[str]) -> list[str]:
        return words[: self.index] + list(self.new_words) + words[self.index + self.length :]


def base_verb_forms(corpus: BrownCorpus) -> frozenset[str]:
    """Collect every lower-case word tagged `vb` (base form), to turn a `vbz` form into a real base form."""
    return frozenset(t.word.lower() for d in corpus.documents for s in d.sentences() for t in s if t.tag == "vb")


def _match_case(template: str, word: str) -> str:
    return word[:1].upper() + word[1:] if template[:1].isupper() else word


def _strip_third_person(word: str, base_forms: frozenset[str]) -> str | None:
    lower = word.lower()
    candidates = [lower[:-1], lower[:-2] if lower.endswith("es") else None,
                  lower[:-3] + "y" if lower.endswith("ies") else None]
    return next((c for c in candidates if c and c in base_forms), None)


def _is_word(word: str) -> bool:
    return word.replace("'", "").replace("-", "").isalpha()


def agreement_edits(sentence: Sentence, base_forms: frozenset[str]) -> list[Edit]:
    # NOTE: the subject is not checked, so a flip after a collective noun ("the jury believes" ->
    # "the jury believe") can yield text that British English accepts.
    edits = []
    for i, token in enumerate(sentence):
        new = _FIXED_AGREEMENT.get((token.tag, token.word.lower()))
        if new is None and token.tag == "vbz" and _is_word(token.word):
            new = _strip_third_person(token.word, base_forms)
        if new is not None:
            edits.append(Edit("agreement", i, 1, (_match_case(token.word, new),)))
    return edits


def det_flip_edits(sentence: Sentence) -> list[Edit]:
    edits = []
    for i, (token, nxt) in enumerate(zip(sentence, sentence[1:])):
        new = _DET_FLIP.get((token.tag, token.word.lower(), nxt.tag))
        if new is not None:
            edits.append(Edit("det_flip", i, 1, (_match_case(token.word, new),)))
    return edits


def det_insert_edits(sentence: Sentence) -> list[Edit]:
    edits = []
    for i in range(1, len(sentence) - 1):
        prev, token, nxt = sentence[i - 1], sentence[i], sentence[i + 1]
        bare_plural = token.tag == "nns" or (token.tag == "jj" and nxt.tag == "nns")
        if bare_plural and prev.tag in _INSERT_AFTER_TAGS and token.word[:1].islower() and _is_word(token.word):
            article = "an" if token.word[0] in "aeiou" else "a"
            edits.append(Edit("det_insert", i, 0, (article,)))
    return edits


def swap_edits(sentence: Sentence) -> list[Edit]:
    edits = []
    for i, (token, nxt) in enumerate(zip(sentence, sentence[1:])):
        if token.tag in _SWAP_FIRST_TAGS and nxt.tag in _SWAP_SECOND_TAGS and _is_word(token.word) \
                and _is_word(nxt.word) and token.word.lower() != nxt.word.lower() and token.word[:1].islower():
            edits.append(Edit("swap", i, 2, (nxt.word, token.word)))
    return edits


def _droppable(prev, token, nxt) -> bool:
    word = token.word.lower()
    if word == "of" and token.tag == "in":
        return prev.tag in {"nn", "nns"} and nxt.tag in _DETERMINER_TAGS | {"np"}
    if token.tag == "to":
        return nxt.tag == "vb" and prev.tag in {"vb", "vbd", "vbz", "vbn", "vbg", "jj", "nn", "nns"} \
            and prev.word.lower() not in _BARE_INFINITIVE_VERBS
    if word in {"a", "an"} and token.tag == "at":
        return nxt.tag in {"nn", "jj"} and nxt.word[:1].islower() and _is_word(prev.word)
    return False


def drop_edits(sentence: Sentence) -> list[Edit]:
    return [Edit("drop", i, 1, ()) for i in range(1, len(sentence) - 1)
            if _droppable(sentence[i - 1], sentence[i], sentence[i + 1])]


def candidate_edits(sentence: Sentence, base_forms: frozenset[str]) -> dict[str, list[Edit]]:
    """List the applicable edits of each kind, keeping only those far enough from the sentence start."""
    found = {
        "agreement": agreement_edits(sentence, base_forms),
        "det_flip": det_flip_edits(sentence),
        "det_insert": det_insert_edits(sentence),
        "swap": swap_edits(sentence),
        "drop": drop_edits(sentence),
    }
    return {kind: [e for e in edits if e.index > MIN_PROMPT_TOKENS] for kind, edits in found.items()}


def _cut_points(words: list[str], edit: Edit) -> list[int]:
    """Token indices where the prompt may end: word boundaries shortly before the edit."""
    low = max(MIN_PROMPT_TOKENS, edit.index - MAX_CONTEXT_BEFORE_EDIT)
    return [c for c in range(low, edit.index + 1) if words[c] not in _ATTACH_LEFT and words[c - 1] not in _ATTACH_RIGHT]


def make_pair(words: list[str], edit: Edit, rng: random.Random) -> tuple[str, str, str] | None:
    """Split the sentence into prompt and continuation and return (prompt, chosen, rejected), or None."""
    cuts = _cut_points(words, edit)
    if not cuts:
        return None
    cut = rng.choice(cuts)
    edited = edit.apply(words)
    prompt, chosen, rejected = detokenize(words[:cut]), detokenize(words[cut:]), detokenize(edited[cut:])
    if prompt + " " + chosen != detokenize(words) or prompt + " " + rejected != detokenize(edited):
        return None
    return prompt, chosen, rejected


def _sentences_for_split(corpus: BrownCorpus, split: Split) -> list[tuple[str, Sentence]]:
    """Clean sentences of the split's syntax documents, without text that also occurs in the other split."""
    other = corpus.other_split_texts(split)
    seen: set[str] = set()
    result = []
    for document in corpus.documents:
        if document.split != split or document.role != "syntax":
            continue
        for index, sentence in enumerate(document.sentences()):
            text = sentence_text(sentence)
            if is_clean(sentence, MIN_WORDS, MAX_WORDS) and text not in other and text not in seen:
                seen.add(text)
                result.append((f"brown:{document.doc_id}:{index}", sentence))
    return result


def _capacities(candidates: list[dict[str, list[Edit]]]) -> dict[str, int]:
    """Count sentences offering each kind; `det_insert` and `drop` share the smaller count to stay balanced."""
    capacity = {kind: sum(1 for edits in candidates if edits[kind]) for kind in EDIT_KINDS}
    paired = min(capacity["det_insert"], capacity["drop"])
    capacity["det_insert"] = capacity["drop"] = paired
    return capacity


def _pair_from_sentence(words: list[str], edits: list[Edit], rng: random.Random) -> tuple[str, str, str] | None:
    for edit in rng.sample(edits, len(edits)):
        texts = make_pair(words, edit, rng)
        if texts is not None:
            return texts
    return None


def build_syntax(corpus: BrownCorpus, split: Split, n: int, seed: int) -> list[dict]:
    """Build `n` syntax pairs for one split, with an equal quota per edit kind where the sentences allow it.

    A sentence yields at most one pair per edit kind. The first pass over the shuffled sentences
    takes one pair per sentence. Later passes reuse sentences for other kinds, which happens only
    when the quotas need more pairs than there are sentences.

    Raises:
        ValueError: If the split's sentences cannot supply `n` pairs.
    """
    rng = random.Random(f"{seed}:syntax:{split}")
    base_forms = base_verb_forms(corpus)
    sentences = _sentences_for_split(corpus, split)
    rng.shuffle(sentences)
    candidates = [candidate_edits(sentence, base_forms) for _, sentence in sentences]
    quotas = allocate(n, _capacities(candidates), dict.fromkeys(EDIT_KINDS, 1.0), f"syntax ({split})")

    pairs: list[dict] = []
    counts = dict.fromkeys(EDIT_KINDS, 0)
    used: list[set[str]] = [set() for _ in sentences]
    for _ in EDIT_KINDS:
        for index, (source, sentence) in enumerate(sentences):
            if len(pairs) == n:
                break
            edits = candidates[index]
            open_kinds = [k for k in EDIT_KINDS if edits[k] and counts[k] < quotas[k] and k not in used[index]]
            if not open_kinds:
                continue
            kind = max(open_kinds, key=lambda k: quotas[k] - counts[k])
            texts = _pair_from_sentence([t.word for t in sentence], edits[kind], rng)
            used[index].add(kind)
            if texts is None:
                continue
            counts[kind] += 1
            prompt, chosen, rejected = texts
            pairs.append({"id": f"syntax:{source}:{kind}", "capability": "syntax", "source": source, "kind": kind,
                          "split": split, "prompt": prompt, "chosen": chosen, "rejected": rejected})

    if len(pairs) < n:
        raise ValueError(f"syntax: the {split} split supplies only {counts} of the quotas {quotas}; "
                         "lower the item count.")
    return pairs
