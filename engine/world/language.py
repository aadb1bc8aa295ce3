"""The world's language: captions from a grammar, questions with answers by type, and the closed
vocabulary every world model reads and writes.

Caption: the objects in reading order, "a large red circle at the top left and a small blue
square at the bottom right". Questions (one of each type per scene where the scene allows it):
count, colour, shape, position, relation (yes/no), existence (yes/no). All words are lower case
and separated by single spaces; `Vocabulary.check` refuses anything else with a VocabularyError.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import VocabularyError
from .scene import COLOURS, POSITIONS, SHAPES, SIZES, Obj, Scene

NUMBERS = ("zero", "one", "two", "three", "four")
RELATIONS = ("above", "below", "left of", "right of")
QUESTION_TYPES = ("count", "colour", "shape", "position", "relation", "existence")
CAPTION_PROMPT = "describe the image"
PLURAL = {s: s + "s" for s in SHAPES}


@dataclass(frozen=True)
class QA:
    kind: str          # one of QUESTION_TYPES
    question: str
    answer: str


def describe(o: Obj) -> str:
    return f"{o.size} {o.colour} {o.shape}"


def caption(scene: Scene) -> str:
    return " and ".join(f"a {describe(o)} at the {o.position}" for o in scene.objects)


def parse_caption(text: str) -> list:
    """The clauses of a caption as dicts of the attributes they state ("size", "colour", "shape",
    "position"), leniently: a clause that breaks the grammar keeps whatever attribute words it has."""
    out = []
    for clause in text.split(" and "):
        words = clause.split()
        stated = {}
        for w in words:
            if w in SIZES:
                stated.setdefault("size", w)
            elif w in COLOURS:
                stated.setdefault("colour", w)
            elif w in SHAPES:
                stated.setdefault("shape", w)
        joined = " ".join(words)
        for p in POSITIONS:
            if joined.endswith(p):
                stated["position"] = p
        if stated:
            out.append(stated)
    return out


def scene_from_caption(text: str) -> Scene:
    """The scene a grammatical caption describes (objects only, centred); raises VocabularyError
    for words outside the world and PromptError-typed errors for a caption that breaks the grammar."""
    VOCABULARY.check(text, "caption")
    objects = {}
    for clause in parse_caption(text):
        if set(clause) != {"size", "colour", "shape", "position"}:
            raise VocabularyError(f"caption {text!r}: a clause does not name size, colour, shape and position "
                                  "('a large red circle at the top left')")
        cell = POSITIONS.index(clause["position"])
        if cell in objects:
            raise VocabularyError(f"caption {text!r}: two objects at the {clause['position']}")
        objects[cell] = Obj(cell, clause["size"], clause["colour"], clause["shape"])
    if not objects:
        raise VocabularyError(f"caption {text!r} describes no object")
    return Scene(tuple(objects[c] for c in sorted(objects)))


def _unique(scene: Scene) -> list:
    """Objects whose size-colour-shape description names only them."""
    names = [describe(o) for o in scene.objects]
    return [o for o, n in zip(scene.objects, names) if names.count(n) == 1]


def relation_holds(a: Obj, rel: str, b: Obj) -> bool:
    return {"above": a.row < b.row, "below": a.row > b.row,
            "left of": a.col < b.col, "right of": a.col > b.col}[rel]


def questions(scene: Scene, seed: int, draw: int = 0) -> list:
    """One QA of each type the scene allows, drawn with `seed` (answers balanced yes/no). The draws
    come from their own stream of `seed`, not the scene generator's: sharing it tied the kind of
    count question to the number of objects (the first draw of both). `draw` > 0 gives another set
    of questions about the same scene (training asks each scene anew every epoch)."""
    rng = np.random.default_rng((seed, 1) if draw == 0 else (seed, 1, draw))
    objs = scene.objects
    out = []
    which = int(rng.integers(3))
    if which == 0:
        out.append(QA("count", "how many objects are there", NUMBERS[len(objs)]))
    elif which == 1:
        c = str(rng.choice(COLOURS))
        out.append(QA("count", f"how many {c} objects are there", NUMBERS[sum(o.colour == c for o in objs)]))
    else:
        s = str(rng.choice(SHAPES))
        out.append(QA("count", f"how many {PLURAL[s]} are there", NUMBERS[sum(o.shape == s for o in objs)]))
    o = objs[int(rng.integers(len(objs)))]
    out.append(QA("colour", f"what colour is the object at the {o.position}", o.colour))
    o = objs[int(rng.integers(len(objs)))]
    out.append(QA("shape", f"what shape is the object at the {o.position}", o.shape))
    unique = _unique(scene)
    if unique:
        o = unique[int(rng.integers(len(unique)))]
        out.append(QA("position", f"where is the {describe(o)}", o.position))
    if len(unique) >= 2:
        want = bool(rng.integers(2))
        pairs = [(a, r, b) for a in unique for b in unique if a != b for r in RELATIONS
                 if relation_holds(a, r, b) == want]
        a, r, b = pairs[int(rng.integers(len(pairs)))]
        out.append(QA("relation", f"is the {describe(a)} {r} the {describe(b)}", "yes" if want else "no"))
    present = {(o.colour, o.shape) for o in objs}
    if rng.integers(2):
        c, s = sorted(present)[int(rng.integers(len(present)))]
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
    out.append(QA("existence", f"is there a {c} {s}", "yes" if (c, s) in present else "no"))
    return out


class Vocabulary:
    """The closed set of words of the world's texts (captions, questions, answers, prompts)."""

    def __init__(self):
        words = {"a", "at", "the", "and", "how", "many", "objects", "object", "are", "there", "what",
                 "colour", "shape", "is", "where", "yes", "no", *CAPTION_PROMPT.split()}
        words |= set(SIZES) | set(COLOURS) | set(SHAPES) | set(PLURAL.values()) | set(NUMBERS)
        for p in (*POSITIONS, *RELATIONS):
            words |= set(p.split())
        self.words = tuple(sorted(words))

    def __contains__(self, word: str) -> bool:
        return word in self.words

    def check(self, text: str, where: str = "text") -> str:
        """`text` if every word is in the vocabulary; else a VocabularyError naming the words."""
        if not isinstance(text, str) or not text.strip():
            raise VocabularyError(f"{where}: expected a non-empty text of the world's words, got {text!r}")
        bad = [w for w in text.split() if w not in self.words]
        if bad:
            raise VocabularyError(f"{where} {text!r}: word(s) {sorted(set(bad))} are outside the world's vocabulary "
                                  f"({len(self.words)} words: {' '.join(self.words)})")
        return text


VOCABULARY = Vocabulary()
