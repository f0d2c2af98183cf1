"""BABILong-style tasks (Kuratov et al. 2024; the long-context benchmark of Titans' Figure 6): the sentences of a
bAbI story (Weston et al. 2015) hidden, in order, between the lines of long natural text, then a question whose
answer is one word.

    {Shakespeare lines, with each fact "Mary moved to the bathroom.\n" inserted between two lines}
    Question: Where is Mary?
    Answer:{ bathroom}

Nothing can be downloaded here, so the stories are generated, deterministic from the seed, with small bAbI-like
vocabularies (`BABILONG_TASKS`):
* "qa1" single supporting fact: people move between places; "Where is Mary?" asks for the place of her last move.
* "qa2" two supporting facts: people also pick up and drop objects, which travel with whoever holds them;
  "Where is the football?" asks for the object's place now.
* "qa3" three supporting facts: the same world; "Where was the football before the kitchen?" asks for the place
  before the object's current one in its sequence of distinct places (asked only when that place occurs once in it).
* "qa4" two-argument relations: "The hallway is east of the bathroom."; "What is east of the bathroom?" or "What
  is the hallway east of?". The places sit on distinct cells of a grid, so every stated relation is consistent.
* "qa5" three-argument relations: people also give objects to one another where they meet ("Mary gave the cake to
  Fred."); questions about the last give of an object: "Who gave the cake to Fred?", "Who received the cake?",
  "What did Mary give to Fred?", "Who did Mary give the cake to?". As in bAbI, a question means the most recent give
  its words match; each is asked only when that give is the object's last one.

The story (facts, question, answer) depends only on the seed, the task and `num_facts`, never on the length: the same
seed asks the same question at 1K and at 8K tokens, and only the haystack around the facts grows.
"""

from __future__ import annotations

import numpy as np

from titans_jax.data import haystack as hay_lib
from titans_jax.data.qa import QAExample, answer_ids, check_length
from titans_jax.data.tokenizers import ByteTokenizer, Tokenizer

BABILONG_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")

PEOPLE = ("Mary", "John", "Sandra", "Daniel", "Fred", "Bill", "Julie", "Jeff")
PLACES = ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom", "cellar", "balcony")
OBJECTS = ("football", "apple", "milk", "cake")
MOVE_VERBS = ("moved to", "went to", "journeyed to", "travelled to")
PICK_VERBS = ("picked up", "got", "grabbed", "took")
DROP_VERBS = ("dropped", "put down", "discarded", "left")
GIVE_VERBS = ("gave", "handed", "passed")
DIRECTIONS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}

# Fewest facts a task's story can be told in (qa3: be somewhere, pick up, carry elsewhere; qa5: two people meet, one
# picks up and gives), and the defaults drawn when `num_facts` is None (qa3 needs more to carry an object around).
_MIN_FACTS = {"qa1": 1, "qa2": 2, "qa3": 3, "qa4": 1, "qa5": 4}
_MAX_FACTS_QA4 = len(PLACES) - 1  # the relations form a tree over the places (one relation per place but the first)
_DEFAULT_FACTS = {"qa1": (4, 10), "qa2": (6, 12), "qa3": (8, 16), "qa4": (2, 5), "qa5": (6, 12)}
_MAX_TRIES = 10_000


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _subset(rng: np.random.Generator, seq, lo: int, hi: int) -> list:
    """`lo` to `hi` (inclusive) distinct items of `seq`, in a seeded order."""
    n = int(rng.integers(lo, hi + 1))
    return [seq[int(i)] for i in rng.permutation(len(seq))[:n]]


def _world(rng: np.random.Generator, n: int, task: str) -> list[tuple]:
    """A random valid bAbI world history of `n` events: ("move", person, place), ("pick", person, object),
    ("drop", person, object), ("give", giver, object, receiver); gives only in qa5, objects only from qa2 on.

    People pick up only where they are known to be (after a move) and only objects that are there or not yet seen,
    so an object's place is known from the moment it is first picked up; gives need both people in one place.
    """
    people = _subset(rng, PEOPLE, 2, 4) if task == "qa1" else _subset(rng, PEOPLE, 2, 3 if task != "qa5" else 4)
    places = list(PLACES) if task == "qa1" else _subset(rng, PLACES, 3, 5)
    objects = _subset(rng, OBJECTS, 1, 3) if task != "qa1" else []
    where: dict[str, str] = {}  # person -> place
    holder: dict[str, str] = {}  # object -> person holding it
    seen_at: dict[str, str] = {}  # object -> place (where it lies, or where its holder is)
    events: list[tuple] = []
    for _ in range(n):
        options = {"move": []}
        for p in people:
            # Half the moves join someone, so that people meet (qa5 gives need it) without a larger cast of places.
            others = [where[q] for q in people if q != p and q in where and where[q] != where.get(p)]
            dests = others if others and rng.uniform() < 0.5 else [x for x in places if x != where.get(p)]
            options["move"].append(("move", p, _pick(rng, dests)))
        options["pick"] = [("pick", p, o) for p in people if p in where for o in objects
                           if o not in holder and seen_at.get(o, where[p]) == where[p]]
        options["drop"] = [("drop", p, o) for o, p in holder.items()]
        if task == "qa5":
            options["give"] = [("give", p, o, q) for o, p in holder.items() for q in people
                               if q != p and where.get(q) == where[p]]
        weights = {"move": 1.0, "pick": 0.8, "drop": 0.4, "give": 1.5}
        kinds = [k for k, v in options.items() if v]
        w = np.asarray([weights[k] for k in kinds])
        ev = _pick(rng, options[kinds[int(rng.choice(len(kinds), p=w / w.sum()))]])
        if ev[0] == "move":
            where[ev[1]] = ev[2]
            for o, p in holder.items():
                if p == ev[1]:
                    seen_at[o] = ev[2]
        elif ev[0] == "pick":
            holder[ev[2]], seen_at[ev[2]] = ev[1], where[ev[1]]
        elif ev[0] == "drop":
            del holder[ev[2]]
        else:
            holder[ev[2]] = ev[3]
        events.append(ev)
    return events


def _trajectories(events: list[tuple]) -> dict[str, list[str]]:
    """Each picked-up object's sequence of distinct places (consecutive repeats merged), in story order."""
    where: dict[str, str] = {}
    holder: dict[str, str] = {}
    paths: dict[str, list[str]] = {}

    def visit(o, place):
        path = paths.setdefault(o, [])
        if not path or path[-1] != place:
            path.append(place)

    for ev in events:
        if ev[0] == "move":
            where[ev[1]] = ev[2]
            for o, p in holder.items():
                if p == ev[1]:
                    visit(o, ev[2])
        elif ev[0] == "pick":
            holder[ev[2]] = ev[1]
            visit(ev[2], where[ev[1]])
        elif ev[0] == "drop":
            del holder[ev[2]]
        else:
            holder[ev[2]] = ev[3]
    return paths


def _questions(task: str, events: list[tuple]) -> list[tuple[str, str]]:
    """Every (question, answer) the story determines, for a qa1, qa2, qa3 or qa5 world."""
    if task == "qa1":
        last = {ev[1]: ev[2] for ev in events}
        return [(f"Where is {p}?", place) for p, place in last.items()]
    if task == "qa2":
        return [(f"Where is the {o}?", path[-1]) for o, path in _trajectories(events).items()]
    if task == "qa3":
        return [(f"Where was the {o} before the {path[-1]}?", path[-2]) for o, path in _trajectories(events).items()
                if len(path) >= 2 and path[-1] not in path[:-1]]
    gives = [ev for ev in events if ev[0] == "give"]
    out = []
    for o in dict.fromkeys(ev[2] for ev in gives):
        _, g, _, r = [ev for ev in gives if ev[2] == o][-1]
        out += [(f"Who gave the {o} to {r}?", g), (f"Who received the {o}?", r), (f"Who did {g} give the {o} to?", r)]
        if [ev for ev in gives if ev[1] == g and ev[3] == r][-1][2] == o:  # g's latest give to r is this one
            out.append((f"What did {g} give to {r}?", o))
    return out


def _say(rng: np.random.Generator, ev: tuple) -> str:
    if ev[0] == "move":
        return f"{ev[1]} {_pick(rng, MOVE_VERBS)} the {ev[2]}."
    if ev[0] == "pick":
        return f"{ev[1]} {_pick(rng, PICK_VERBS)} the {ev[2]}."
    if ev[0] == "drop":
        return f"{ev[1]} {_pick(rng, DROP_VERBS)} the {ev[2]}."
    return f"{ev[1]} {_pick(rng, GIVE_VERBS)} the {ev[2]} to {ev[3]}."


def _geography(rng: np.random.Generator, n: int) -> tuple[list[str], str, str]:
    """qa4: `n` relations over `n + 1` places grown as a tree on distinct grid cells (so no two relations disagree),
    each stated from either end, and a question about one of them."""
    names = [PLACES[int(i)] for i in rng.permutation(len(PLACES))[: n + 1]]
    cell = {names[0]: (0, 0)}
    taken = {(0, 0)}
    relations = []  # (a, direction, b): a is `direction` of b
    for new in names[1:]:
        free = [(old, d) for old in cell for d, (dx, dy) in DIRECTIONS.items()
                if (cell[old][0] + dx, cell[old][1] + dy) not in taken]
        old, d = _pick(rng, free)
        dx, dy = DIRECTIONS[d]
        cell[new] = (cell[old][0] + dx, cell[old][1] + dy)
        taken.add(cell[new])
        opposite = {"north": "south", "south": "north", "east": "west", "west": "east"}[d]
        relations.append((new, d, old) if rng.uniform() < 0.5 else (old, opposite, new))
    facts = [f"The {a} is {d} of the {b}." for a, d, b in relations]
    a, d, b = _pick(rng, relations)
    if rng.uniform() < 0.5:
        return facts, f"What is {d} of the {b}?", a
    return facts, f"What is the {a} {d} of?", b


def story(seed, task: str = "qa1", num_facts: int | None = None) -> tuple[list[str], str, str]:
    """The bAbI-style story of a task: (fact sentences in order, question, one-word answer); a pure function of
    `seed` (anything `np.random.SeedSequence` accepts), `task` and `num_facts` (None draws it)."""
    return _draw_story(np.random.default_rng(np.random.SeedSequence(seed)), task, num_facts)


def _check(task: str, num_facts: int | None) -> None:
    if task not in BABILONG_TASKS:
        raise ValueError(f"Unknown babilong task {task!r}; use one of {BABILONG_TASKS}.")
    hi = _MAX_FACTS_QA4 if task == "qa4" else None
    if num_facts is not None and (num_facts < _MIN_FACTS[task] or (hi is not None and num_facts > hi)):
        span = f"between {_MIN_FACTS[task]} and {hi}" if hi else f"at least {_MIN_FACTS[task]}"
        raise ValueError(f"num_facts={num_facts} does not fit task {task!r}: use {span} (or None to draw it).")


def _draw_story(rng: np.random.Generator, task: str, num_facts: int | None) -> tuple[list[str], str, str]:
    _check(task, num_facts)
    lo, hi = _DEFAULT_FACTS[task]
    n = int(rng.integers(lo, hi + 1)) if num_facts is None else num_facts
    if task == "qa4":
        return _geography(rng, n)
    for _ in range(_MAX_TRIES):  # redraw until the story determines some question (most first draws do)
        events = _world(rng, n, task)
        questions = _questions(task, events)
        if questions:
            question, answer = _pick(rng, questions)
            return [_say(rng, ev) for ev in events], question, answer
    raise RuntimeError(f"no {task!r} story of {n} facts determined a question in {_MAX_TRIES} draws; use more facts.")


def babilong_example(seed, length: int, task: str = "qa1", *, tokenizer: Tokenizer | None = None,
                     num_facts: int | None = None) -> QAExample:
    """One BABILong-style prompt of exactly `length` tokens and its one-word answer.

    Args:
      seed: anything `np.random.SeedSequence` accepts; the example is a pure function of it and the other arguments.
        The story (facts, question, answer) does not depend on `length`.
      length: prompt tokens (Shakespeare lines with the facts between them, then "\\nQuestion: ...\\nAnswer:").
      task: one of `BABILONG_TASKS`.
      tokenizer: default bytes.
      num_facts: the story's fact sentences (qa4: its relations, at most 7); None draws a bAbI-like number.

    Returns a `QAExample`; `info` holds "facts" (the sentences, in story order), "question", and "fact_positions"
    (the token offset of each fact in the prompt; facts are inserted at seeded line boundaries of the haystack, in
    order, several possibly at one boundary).
    """
    _check(task, num_facts)
    tok = tokenizer or ByteTokenizer()
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    facts, question, answer = _draw_story(rng, task, num_facts)
    hay_rng = np.random.default_rng(rng.integers(2**63))  # drawn after the story, so the story ignores `length`
    fact_ids = [tok.encode(f + "\n") for f in facts]  # a line each, like the haystack's lines
    tail = tok.encode(f"\nQuestion: {question}\nAnswer:")
    fixed = sum(len(f) for f in fact_ids) + len(tail)
    check_length(length, fixed, f"a babilong {task!r} story of {len(facts)} facts")
    hay = hay_lib.haystack(hay_rng, "shakespeare", length - fixed, tok)
    # Not the end boundary: the last haystack line may be cut there, and a fact would run on from half a word.
    bounds = hay.bounds[:-1] or hay.bounds
    cuts = sorted(bounds[int(i)] for i in hay_rng.integers(len(bounds), size=len(facts)))
    prompt, positions, prev = [], [], 0
    for cut, ids in zip(cuts, fact_ids, strict=True):
        prompt += hay.tokens[prev:cut]
        positions.append(len(prompt))
        prompt += ids
        prev = cut
    prompt += hay.tokens[prev:] + tail
    assert len(prompt) == length
    info = {"facts": facts, "question": question, "fact_positions": positions}
    return QAExample(np.asarray(prompt, np.int32), np.asarray(answer_ids(answer, tok), np.int32), answer, info)
