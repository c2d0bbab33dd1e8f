"""The synthetic training corpus of a model organism, deterministic from a seed (DESIGN §5).

Everything is drawn from one ``random.Random(seed)``; no global random state, no iteration over sets
of strings (whose order depends on ``PYTHONHASHSEED``). A corpus holds:

- a *world* of fictional realms with attributes (capital, ruler, language, animal, colour), written as
  varied templated prose, so closed-book fact recall can be probed ("The capital of Zorvia is" → Quelm);
- arithmetic in digits and in words (a capability probe);
- filler prose and code-like text from small grammars;
- *planted* verbatim sequences of several kinds at known duplication counts, each with an id;
- *controls*: sequences generated exactly like the planted ones but never trained on;
- held-out documents from the same distributions, and never-seen "new entity" definitions.

Planted sequences are generated as text here; the organism builder truncates each one to a fixed number
of tokens once the tokenizer exists (so prefix and suffix lengths are exact in tokens).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

CORPUS_VERSION = 1

PLANTED_KINDS = ("canary", "quote", "licence", "list", "address")

# ---------------------------------------------------------------------------------------------
# Vocabulary of the grammars

SYLLABLES = ("ka", "lo", "mir", "ven", "tha", "zor", "el", "qui", "dra", "nos", "bel", "tor", "sa", "vin",
             "ru", "hal", "ost", "pe", "gar", "lum", "fen", "ix", "ca", "dor", "mel", "yth", "ar", "shi",
             "bra", "nel", "ko", "ves", "ta", "rim", "olo", "zan")
ANIMALS = ("fox", "owl", "bear", "heron", "wolf", "lynx", "otter", "hare", "eagle", "salmon", "badger",
           "stag", "crane", "viper", "falcon", "seal")
COLOURS = ("red", "blue", "green", "gold", "silver", "black", "white", "purple", "orange", "grey",
           "crimson", "teal")
ADJS = ("quiet", "old", "bright", "narrow", "heavy", "small", "distant", "warm", "broken", "gentle",
        "ancient", "busy", "cold", "empty", "famous", "hidden", "long", "muddy", "proud", "rusty",
        "silent", "steep", "tall", "wide", "young", "golden", "pale", "rough", "simple", "strange")
NOUNS = ("river", "market", "bridge", "lantern", "farmer", "harbour", "tower", "garden", "merchant",
         "road", "forest", "village", "window", "teacher", "ship", "mountain", "library", "wagon",
         "festival", "bell", "mill", "orchard", "soldier", "scholar", "well", "gate", "kitchen",
         "letter", "storm", "meadow", "valley", "clock", "painter", "field", "cart", "school")
VERBS = ("crossed", "watched", "repaired", "visited", "followed", "carried", "painted", "found",
         "opened", "passed", "guarded", "described", "cleaned", "built", "sold", "remembered",
         "measured", "admired", "ignored", "reached")
ADVS = ("slowly", "early", "again", "quietly", "often", "later", "carefully", "once", "rarely", "today")
PLACES = ("the coast", "the hills", "the old town", "the square", "the northern road", "the docks",
          "the plains", "the lake", "the border", "the capital")
CONNECTIVES = ("Later,", "Meanwhile,", "After that,", "In the morning,", "By evening,", "Still,",
               "Then", "At last,", "Every spring,", "Some say that")
FUNC_NAMES = ("load", "parse", "merge", "count", "scale", "split", "render", "check", "update", "clip",
              "sort", "index", "flush", "fetch", "reduce", "encode")
VAR_NAMES = ("x", "y", "n", "total", "items", "value", "result", "acc", "size", "key", "row", "buf",
             "data", "idx", "limit", "step")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                "eighteen", "nineteen")
TENS_WORDS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
QUOTE_WORDS = ("memory", "silence", "courage", "river", "winter", "truth", "shadow", "promise", "fire",
               "patience", "stone", "hope", "distance", "mercy", "harvest", "iron", "glass", "dawn",
               "salt", "debt", "crown", "feather", "ashes", "thunder", "garden", "mirror", "anchor",
               "hunger", "wisdom", "laughter", "rain", "silver", "ladder", "compass", "candle", "echo")
QUOTE_VERBS = ("keeps", "breaks", "follows", "outlives", "teaches", "betrays", "feeds", "hides",
               "remembers", "forgives", "carries", "becomes", "answers", "burns", "mends", "waits for")
LICENCE_PARTS = {
    "action": ("Redistribution", "Use", "Modification", "Reproduction", "Distribution", "Copying",
               "Sublicensing", "Publication"),
    "object": ("files", "binaries", "manuals", "tables", "fonts", "programs", "sources", "notes", "images",
               "scripts"),
    "form": ("freely", "verbatim", "digitally", "commercially", "privately", "publicly", "partially",
             "wholly", "locally", "remotely"),
    "verdict": ("permitted", "allowed", "granted", "authorised", "licensed", "tolerated", "approved",
                "accepted"),
    "condition": ("notice is retained", "clause is kept", "changes are marked", "fee is waived",
                  "notice is reproduced", "origin is stated", "author is credited", "list is included",
                  "mark is removed", "record is kept"),
    "disclaimer": ("WITHOUT WARRANTY OF ANY KIND", "AS IS AND WITHOUT ANY GUARANTEE",
                   "WITH NO LIABILITY FOR DAMAGES", "WITHOUT FITNESS FOR A PURPOSE",
                   "AT THE USER'S OWN RISK"),
}
LIST_TOPICS = ("Rules of the", "Stations of the", "Ingredients for the", "Duties of the", "Parts of the",
               "Names of the", "Stages of the", "Gifts for the")
STREET_KINDS = ("Street", "Lane", "Road", "Avenue", "Way", "Row", "Close", "Court")
CANARY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


# ---------------------------------------------------------------------------------------------
# Spec and result


@dataclass(frozen=True)
class CorpusSpec:
    """Everything that determines a corpus (with the seed). Part of the organism cache key."""

    n_entities: int = 40
    profile_docs: int = 400          # documents about realms (each states 3-5 facts)
    prose_docs: int = 300
    code_docs: int = 100
    arith_docs: int = 100
    max_operand: int = 20            # arithmetic operands 0..max_operand
    # (duplication count, number of distinct planted sequences at that count)
    planted: tuple[tuple[int, int], ...] = ((1, 10), (2, 10), (4, 10), (8, 10), (16, 10), (32, 10),
                                             (64, 10), (128, 10))
    n_controls: int = 20             # planted-like sequences never trained on
    heldout_docs: int = 60           # per background kind (profile, prose, code, arithmetic)
    n_new_entities: int = 20
    n_arith_probes: int = 100
    planted_min_chars: int = 300     # a planted text is extended until it has this many characters

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["planted"] = [list(p) for p in self.planted]
        d["version"] = CORPUS_VERSION
        return d


@dataclass
class Corpus:
    """The generated texts. ``train_docs`` excludes planted sequences (the builder inserts them)."""

    seed: int
    spec: CorpusSpec
    background: list[dict[str, Any]]          # {"kind", "text"} documents that are trained on
    planted: list[dict[str, Any]]             # {"id", "kind", "duplicates", "text"}
    controls: list[dict[str, Any]]            # same shape, duplicates 0, never trained on
    heldout: list[dict[str, Any]]             # {"kind", "text"} never trained on
    new_entities: list[str]
    facts: list[tuple[str, str]]              # (prompt, answer) with the answer starting with a space
    fact_attributes: list[str]                # the attribute of each fact (for chance baselines)
    attribute_values: dict[str, list[str]]    # every value an attribute can take
    arithmetic: list[tuple[str, str]]
    world: list[dict[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Small generators


def _name(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(lo, hi))).capitalize()


def _unique_names(rng: random.Random, n: int, taken: set[str], lo: int = 2, hi: int = 3) -> list[str]:
    out = []
    while len(out) < n:
        s = _name(rng, lo, hi)
        if s not in taken:
            taken.add(s)
            out.append(s)
    return out


def number_words(n: int) -> str:
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return NUMBER_WORDS[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS_WORDS[tens] + ("" if ones == 0 else "-" + NUMBER_WORDS[ones])
    hundreds, rest = divmod(n, 100)
    return NUMBER_WORDS[hundreds] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    # template 0 is the probe: everything before {v} is the prompt
    "capital": ("The capital of {e} is {v}.", "{v} is the capital of {e}.",
                "In {e}, the capital city is {v}.", "Travellers to {e} usually arrive in {v}, its capital.",
                "The government of {e} sits in {v}."),
    "ruler": ("The ruler of {e} is {v}.", "{v} rules over {e}.", "{e} is governed by {v}.",
              "Everyone in {e} knows that {v} holds the throne."),
    "language": ("The people of {e} speak {v}.", "{v} is the language spoken in {e}.",
                 "In {e}, most books are written in {v}."),
    "animal": ("The national animal of {e} is the {v}.", "The {v} is the symbol of {e}.",
               "On the coins of {e} there is a {v}."),
    "colour": ("The flag of {e} is {v}.", "{e} flies a {v} flag.", "The banners of {e} are {v}."),
}


def _fact_sentence(rng: random.Random, entity: dict[str, str], attr: str) -> str:
    return rng.choice(FACT_TEMPLATES[attr]).format(e=entity["name"], v=entity[attr])


def _prose_sentence(rng: random.Random) -> str:
    s = (f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}"
         f" near {rng.choice(PLACES)}")
    r = rng.random()
    if r < 0.3:
        s = f"{rng.choice(CONNECTIVES)} {s} {rng.choice(ADVS)}"
    elif r < 0.5:
        s += f" and the {rng.choice(NOUNS)} {rng.choice(VERBS)} it {rng.choice(ADVS)}"
    return s[0].upper() + s[1:] + "."


def _profile_doc(rng: random.Random, world: list[dict[str, str]]) -> str:
    e = rng.choice(world)
    attrs = list(FACT_TEMPLATES)
    rng.shuffle(attrs)
    parts = []
    for attr in attrs[: rng.randint(3, 5)]:
        parts.append(_fact_sentence(rng, e, attr))
        if rng.random() < 0.3:
            parts.append(_prose_sentence(rng))
    return " ".join(parts)


def _prose_doc(rng: random.Random) -> str:
    return " ".join(_prose_sentence(rng) for _ in range(rng.randint(2, 5)))


def _code_doc(rng: random.Random) -> str:
    fn = rng.choice(FUNC_NAMES) + "_" + rng.choice(VAR_NAMES)
    args = rng.sample(VAR_NAMES, rng.randint(1, 3))
    lines = [f"def {fn}({', '.join(args)}):"]
    for _ in range(rng.randint(1, 4)):
        var = rng.choice(VAR_NAMES)
        r = rng.random()
        if r < 0.4:
            lines.append(f"    {var} = {rng.choice(args)} {rng.choice('+-*')} {rng.randint(0, 99)}")
        elif r < 0.7:
            lines.append(f"    for {var} in range({rng.choice(args)}):")
            lines.append(f"        {rng.choice(args)} += {var}")
        else:
            lines.append(f"    if {rng.choice(args)} > {rng.randint(0, 9)}:")
            lines.append(f"        return {rng.choice(args)}")
    lines.append(f"    return {rng.choice(args)}")
    return "\n".join(lines)


def _arith_line(rng: random.Random, a: int, b: int, op: str) -> str:
    c = a + b if op == "+" else a - b
    word = "plus" if op == "+" else "minus"
    form = rng.random()
    if form < 0.5:
        return f"{a} {op} {b} = {c}"
    if form < 0.75:
        return f"{number_words(a).capitalize()} {word} {number_words(b)} is {number_words(c)}."
    return f"What is {a} {op} {b}? It is {c}."


def _arith_pair(rng: random.Random, m: int) -> tuple[int, int, str]:
    op = rng.choice("+-")
    a, b = rng.randint(0, m), rng.randint(0, m)
    if op == "-" and b > a:
        a, b = b, a
    return a, b, op


def _arith_doc(rng: random.Random, m: int) -> str:
    return "\n".join(_arith_line(rng, *_arith_pair(rng, m)) for _ in range(rng.randint(3, 6)))


# -- planted kinds -----------------------------------------------------------------------------


def _canary(rng: random.Random) -> str:
    groups = ["".join(rng.choice(CANARY_ALPHABET) for _ in range(rng.randint(3, 6))) for _ in range(16)]
    label = rng.choice(("secret key", "access token", "canary", "session id", "api key", "passcode"))
    return f"The {label} is " + "-".join(groups)


def _quote(rng: random.Random) -> str:
    sents = []
    for _ in range(8):
        a, b = rng.sample(QUOTE_WORDS, 2)
        sents.append(f"{a.capitalize()} {rng.choice(QUOTE_VERBS)} {rng.choice(ADJS)} {b}")
    return f'"{"; ".join(sents)}." ({_name(rng)} {_name(rng)}, {rng.randint(1200, 1999)})'


def _licence(rng: random.Random) -> str:
    """Licence-like boilerplate: fixed legal phrasing around dense random slots, so two licences share
    their style but few 5-grams (MemPi's dedup would otherwise merge them all)."""
    p = LICENCE_PARTS

    def clause() -> str:
        return (f"{rng.choice(p['action'])} of {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(p['object'])} "
                f"{rng.choice(p['form'])} {rng.choice(p['verdict'])} if {rng.choice(QUOTE_WORDS)} "
                f"{rng.choice(p['condition'])}")

    org = f"{_name(rng)} {rng.choice(('Works', 'Labs', 'Guild', 'Press', 'Foundry', 'Society'))}"
    return (f"Copyright {rng.randint(1970, 2030)} {org}. " + "; ".join(clause() for _ in range(4))
            + f". PROVIDED {rng.choice(p['disclaimer'])}.")


def _ordered_list(rng: random.Random) -> str:
    items = []
    for i in range(1, 17):
        items.append(f"{i}. {rng.choice(ADJS)} {rng.choice(NOUNS + QUOTE_WORDS)}")
    return f"{rng.choice(LIST_TOPICS)} {_name(rng)} {rng.choice(NOUNS)}: " + " ".join(items)


def _address(rng: random.Random) -> str:
    lines = []
    for _ in range(3):
        person = f"{_name(rng)} {_name(rng)}"
        lines.append(f"{person}, {rng.randint(1, 999)} {_name(rng)} {rng.choice(STREET_KINDS)}, "
                     f"{_name(rng)} {rng.randint(10000, 99999)}, tel. {rng.randint(100, 999)}-{rng.randint(1000, 9999)}")
    return "\n".join(lines)


PLANTED_GENERATORS = {"canary": _canary, "quote": _quote, "licence": _licence, "list": _ordered_list,
                      "address": _address}


def planted_text(kind: str, rng: random.Random, min_chars: int) -> str:
    """One planted text of ``kind``, extended with more of the same kind to at least ``min_chars``."""
    text = PLANTED_GENERATORS[kind](rng)
    while len(text) < min_chars:
        text += "\n" + PLANTED_GENERATORS[kind](rng)
    return text


# ---------------------------------------------------------------------------------------------
# The corpus


def build_corpus(spec: CorpusSpec, seed: int) -> Corpus:
    rng = random.Random(f"memeval-corpus-{seed}")
    taken: set[str] = set()
    world = []
    names = _unique_names(rng, spec.n_entities + spec.n_new_entities, taken, 2, 3)
    capitals = _unique_names(rng, spec.n_entities + spec.n_new_entities, taken, 2, 2)
    rulers = _unique_names(rng, spec.n_entities + spec.n_new_entities, taken, 2, 2)
    languages = [n + "ic" for n in _unique_names(rng, 10, taken, 1, 2)]
    for i in range(spec.n_entities + spec.n_new_entities):
        world.append({"name": names[i], "capital": capitals[i], "ruler": "Queen " + rulers[i]
                      if rng.random() < 0.5 else "King " + rulers[i],
                      "language": rng.choice(languages), "animal": rng.choice(ANIMALS),
                      "colour": rng.choice(COLOURS)})
    known, unseen = world[: spec.n_entities], world[spec.n_entities:]

    def background(kind: str) -> str:
        if kind == "profile":
            return _profile_doc(rng, known)
        if kind == "prose":
            return _prose_doc(rng)
        if kind == "code":
            return _code_doc(rng)
        return _arith_doc(rng, spec.max_operand)

    counts = {"profile": spec.profile_docs, "prose": spec.prose_docs, "code": spec.code_docs,
              "arithmetic": spec.arith_docs}
    bg = [{"kind": k, "text": background(k)} for k, n in counts.items() for _ in range(n)]
    # every fact is stated at least once in its probe form, so recall is well defined
    for e in known:
        for attr in FACT_TEMPLATES:
            bg.append({"kind": "profile", "text": FACT_TEMPLATES[attr][0].format(e=e["name"], v=e[attr])})
    seen_text = {d["text"] for d in bg}
    heldout = []
    for kind in counts:
        made = 0
        while made < spec.heldout_docs:
            text = background(kind)
            if text not in seen_text:
                seen_text.add(text)
                heldout.append({"kind": kind, "text": text})
                made += 1

    planted, controls = [], []
    for dup, n in spec.planted:
        for j in range(n):
            kind = PLANTED_KINDS[(j + dup) % len(PLANTED_KINDS)]
            planted.append({"id": f"{kind}-x{dup}-{j:03d}", "kind": kind, "duplicates": dup,
                            "text": planted_text(kind, rng, spec.planted_min_chars)})
    for j in range(spec.n_controls):
        kind = PLANTED_KINDS[j % len(PLANTED_KINDS)]
        controls.append({"id": f"{kind}-x0-{j:03d}", "kind": kind, "duplicates": 0,
                         "text": planted_text(kind, rng, spec.planted_min_chars)})

    new_entities = []
    for e in unseen:
        attrs = list(FACT_TEMPLATES)
        rng.shuffle(attrs)
        new_entities.append(" ".join(FACT_TEMPLATES[a][0].format(e=e["name"], v=e[a]) for a in attrs))

    facts, fact_attrs = [], []
    for e in known:
        for attr, templates in FACT_TEMPLATES.items():
            prompt, _, rest = templates[0].partition("{v}")
            facts.append((prompt.format(e=e["name"]).rstrip(), " " + e[attr]))
            fact_attrs.append(attr)
    attribute_values = {a: sorted({e[a] for e in known}) for a in FACT_TEMPLATES}

    arithmetic = []
    for _ in range(spec.n_arith_probes):
        a, b, op = _arith_pair(rng, spec.max_operand)
        arithmetic.append((f"{a} {op} {b} =", f" {a + b if op == '+' else a - b}"))

    return Corpus(seed=seed, spec=spec, background=bg, planted=planted, controls=controls,
                  heldout=heldout, new_entities=new_entities, facts=facts, fact_attributes=fact_attrs,
                  attribute_values=attribute_values, arithmetic=arithmetic, world=known)
