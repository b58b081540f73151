"""Build the bundled controlled-sentiment dataset (``data/01_raw/sentiment_reviews.jsonl``).

Each row is one movie-review opening (the prompt) with K continuations of mixed sentiment, scored by
the gold judge VADER (compound score of the continuation alone). This is the DPO paper's IMDb task
("continue a review positively") at laptop scale, written from a phrase grammar so that it is
deterministic, license-free and small. Run from the project root:

    python scripts/make_sentiment_dataset.py            # writes the default file
    python scripts/make_sentiment_dataset.py --check    # rebuilds in memory, compares with the file
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

OUT = Path("data/01_raw/sentiment_reviews.jsonl")

ADJ_TITLE = """silent broken golden hidden last lost crimson quiet long burning frozen distant wild
hollow electric paper secret bitter final forgotten little midnight northern velvet iron glass
restless sleeping shattered endless fading scarlet lonely""".split()
NOUN_TITLE = """river garden house summer city kingdom mirror letter road island winter ghost
machine promise harbor storm detective circus orchard signal frontier lighthouse empire witness
symphony highway shadow tide crown archive experiment heist voyage""".split()
FIRST = """Anna Marcus Elena David Priya Tom Sofia James Nadia Oliver Grace Victor Lena Samuel
Ines Hugo Maya Felix Clara Omar Julia Ethan Rosa Daniel Alice Leo Hannah Ruben Zoe Martin""".split()
LAST = """Hart Okafor Lindqvist Moreau Patel Reyes Novak Brennan Tanaka Keller Alvarez Whitfield
Castellano Dubois Harper Mendez Sato Kowalski Fischer Lambert Quinn Romero Sinclair Vance Ito
Marsh Bianchi Holm Duarte Carver""".split()
GENRES = [
    "thriller", "comedy", "drama", "horror film", "western", "musical", "romance", "documentary",
    "war film", "science fiction film", "mystery", "animated feature", "crime drama",
    "period piece", "road movie", "coming-of-age story", "disaster movie", "spy thriller",
    "courtroom drama", "heist movie", "family film", "sports drama", "biopic", "satire",
]
TOPIC = [
    "a retired boxer", "two estranged sisters", "a small-town sheriff", "a chess prodigy",
    "a failing restaurant", "a family road trip", "a haunted boarding school", "a lighthouse keeper",
    "a stolen painting", "a marathon runner", "a space station crew", "a jazz pianist",
    "a wedding gone wrong", "a young teacher", "an aging rock band", "a missing child",
    "a border town", "a lonely inventor", "a high school reunion", "a con artist",
    "a submarine crew", "a village baker", "an election campaign", "a dying factory town",
]
RELATION = ["wife", "husband", "brother", "sister", "best friend", "roommate", "dad", "mom",
            "girlfriend", "boyfriend", "neighbor", "cousin", "kids", "film club", "coworkers"]
VENUE = ["the local cinema", "a festival screening", "a drive-in", "a packed theater",
         "a late-night showing", "a matinee", "an art-house cinema"]
WHEN = ["last night", "this weekend", "on a rainy Sunday", "yesterday", "on a long flight",
        "over the holidays", "after work on Friday", "on opening night", "a few days ago"]
SOURCE = ["novel", "comic book", "stage play", "true story", "short story", "video game"]
DECADE = ["seventies", "eighties", "nineties", "fifties", "sixties"]

OPENINGS = [
    "I finally watched {title} {when}, and",
    "I saw {title} at {venue} with my {relation}, and",
    "{title} is the new {genre} from director {person}, and",
    "My {relation} talked me into watching {title} {when}. Honestly,",
    "When I heard {person} was starring in a {genre} about {topic},",
    "I went into {title} knowing nothing about it, and",
    "Having read the {source} years ago, I was curious about {title}, and",
    "{title} tells the story of {topic}, and",
    "I rented {title} because the cover looked interesting, and",
    "This {genre} about {topic} came out in the {decade}, and",
    "After all the buzz around {title}, I expected a lot, and",
    "{person} directs this {genre} about {topic}, and",
    "I caught {title} on television {when}, and",
    "As a fan of {person}, I had to see {title}. Sadly or not,",
    "{title} is a {genre} set around {topic}, and",
    "The trailer for {title} promised a clever {genre}, and",
    "I watched {title} twice {when}, and",
    "Nobody I know has seen {title}, a {genre} about {topic}, but",
    "Our {relation} picked {title} for movie night, and",
    "Based on the {source}, {title} follows {topic}, and",
    "I remember seeing {title} as a kid in the {decade}, and",
    "{title} stars {person} as {topic}, and",
    "I had low expectations for this {genre}, but",
    "Going by the poster, {title} looked like a typical {genre}, and",
    "It took me years to get around to {title}, and",
    "I streamed {title} {when} on a whim, and",
    "Critics keep talking about {title}, the {genre} from {person}, and",
    "The opening scene of {title} shows {topic}, and",
]

ASPECT = ["acting", "story", "script", "soundtrack", "cinematography", "dialogue", "pacing",
          "ending", "direction", "editing", "lead performance", "supporting cast", "humor",
          "plot", "visual effects", "costume design", "final act", "score", "camera work"]
ASPECT_PL = ["characters", "performances", "jokes", "action scenes", "songs", "twists",
             "set pieces", "visuals", "effects", "battle scenes", "flashbacks", "locations"]

POS = {
    2: ["brilliant", "wonderful", "superb", "stunning", "excellent", "fantastic", "beautiful",
        "amazing", "outstanding", "magnificent", "masterful", "delightful", "incredible",
        "perfect", "extraordinary", "glorious"],
    1: ["good", "nice", "solid", "charming", "enjoyable", "pleasant", "fun", "sweet", "clever",
        "likable", "engaging", "warm", "lovely", "fine", "interesting", "effective"],
}
NEG = {
    2: ["awful", "terrible", "horrible", "dreadful", "painful", "atrocious", "pathetic",
        "unbearable", "disastrous", "miserable", "hideous", "disgusting", "worthless", "abysmal"],
    1: ["dull", "boring", "weak", "bland", "clumsy", "tedious", "messy", "lazy", "flat", "silly",
        "forgettable", "disappointing", "annoying", "stale", "confusing", "uneven"],
}
NEUTRAL = [
    "It runs a little over two hours.", "Most of it was filmed on location.",
    "The story takes place over a single summer.", "There is a short scene after the credits.",
    "It was released in a handful of theaters.", "The film is mostly told in flashbacks.",
    "Half of the cast are newcomers.", "The runtime is about ninety minutes.",
    "It is loosely based on real events.", "The second half moves to a new city.",
]
POS_VERB = ["loved", "enjoyed", "adored", "admired", "savored", "treasured"]
NEG_VERB = ["hated", "disliked", "regretted", "resented", "endured"]
POS_CLOSER = [
    "I would happily watch it again.", "Highly recommended.", "It made me smile all evening.",
    "It is a real gem.", "Easily one of the best films I have seen this year.",
    "I left the theater grinning.", "My {relation} loved it too.", "A great way to spend an evening.",
    "It deserves every bit of praise.", "I can't wait to see what {person} does next.",
]
NEG_CLOSER = [
    "I would not recommend it.", "What a waste of time.", "I nearly walked out.",
    "Avoid this one.", "It was a chore to sit through.", "I wanted my money back.",
    "My {relation} fell asleep halfway.", "Easily one of the worst films I have seen this year.",
    "I regret watching it.", "Skip it.",
]
MILD_POS_CLOSER = ["Worth a look.", "Not bad at all.", "It kept me interested.", "Pretty good overall."]
MILD_NEG_CLOSER = ["Not worth the hype.", "It just didn't work for me.", "A bit of a letdown.",
                   "I expected more."]

# the same templates for both polarities: {a}/{b} adjectives of the clause's polarity,
# {x}/{y} aspects
CLAUSE_TEMPLATES = [
    "the {x} was {a} and the {y} felt {b}.",
    "the {x} is {a}, and {p} gives a {b} performance.",
    "I {v} the {x}, which was {a} from start to finish.",
    "the {xs} are {a} and the {x} is {b}.",
    "it is a {a} {genre} with a {b} {x}.",
    "the {x} was {a}, and the {xs} were {b} too.",
    "everything about the {x} felt {a}.",
    "{p} is {a} here, and the {x} is {b}.",
]
CLAUSES = {+1: CLAUSE_TEMPLATES, -1: CLAUSE_TEMPLATES}  # polarity sign -> templates
MIXED = [
    "the {x} was {pa}, but the {y} was {na}.",
    "the {x} was {na}, although the {y} was {pa}.",
    "the {xs} are {pa}, yet the {x} is {na}.",
    "despite a {na} {x}, the {y} is {pa}.",
]


_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _articles(text: str) -> str:
    """Fix 'a' before a vowel ('a incredible' -> 'an incredible')."""
    return _ARTICLE.sub(r"\1n ", text)


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _title(rng: random.Random) -> str:
    form = rng.randrange(6)
    a, n, n2 = rng.choice(ADJ_TITLE), rng.choice(NOUN_TITLE), rng.choice(NOUN_TITLE)
    return [
        f"The {a.title()} {n.title()}",
        f"{n.title()} of the {n2.title()}",
        f"{rng.choice(FIRST)}'s {n.title()}",
        f"Return to the {a.title()} {n.title()}",
        f"{a.title()} {n.title()}s",
        f"The {n.title()} Who Knew Too Little" if rng.random() < 0.2 else f"A {a.title()} {n.title()}",
    ][form]


def _slots(rng: random.Random) -> dict[str, str]:
    return {
        "title": _title(rng), "person": _person(rng), "genre": rng.choice(GENRES),
        "topic": rng.choice(TOPIC), "relation": rng.choice(RELATION), "venue": rng.choice(VENUE),
        "when": rng.choice(WHEN), "source": rng.choice(SOURCE), "decade": rng.choice(DECADE),
    }


def _clause(rng: random.Random, polarity: int, strength: int, slots: dict[str, str]) -> str:
    """One sentence fragment; polarity 0 gives a mixed clause."""
    x, y = rng.sample(ASPECT, 2)
    common = {"x": x, "y": y, "xs": rng.choice(ASPECT_PL), "p": slots["person"],
              "genre": slots["genre"]}
    if polarity == 0:
        return rng.choice(MIXED).format(pa=rng.choice(POS[1]), na=rng.choice(NEG[1]), **common)
    bank = POS if polarity > 0 else NEG
    a, b = rng.sample(bank[strength], 2)
    v = rng.choice(POS_VERB if polarity > 0 else NEG_VERB)
    return rng.choice(CLAUSES[polarity]).format(a=a, b=b, v=v, **common)


def _continuation(rng: random.Random, target: int, slots: dict[str, str]) -> str:
    """A continuation with target sentiment in {-2, -1, 0, 1, 2}."""
    sign = (target > 0) - (target < 0)
    parts = [_clause(rng, sign, max(1, abs(target)), slots)]
    if rng.random() < 0.45:
        extra = _clause(rng, sign if rng.random() < 0.8 else 0, 1 + (abs(target) == 2), slots)
        parts.append(extra[0].upper() + extra[1:])
    if rng.random() < 0.3:
        parts.append(rng.choice(NEUTRAL))
    if target >= 2 or (target == 1 and rng.random() < 0.5):
        closer = rng.choice(POS_CLOSER if target == 2 else MILD_POS_CLOSER)
    elif target <= -2 or (target == -1 and rng.random() < 0.5):
        closer = rng.choice(NEG_CLOSER if target == -2 else MILD_NEG_CLOSER)
    else:
        closer = rng.choice(NEUTRAL) if rng.random() < 0.5 else ""
    if closer:
        parts.append(closer.format(**slots))
    return _articles(" ".join(parts))


def build(n_prompts: int, k: int, seed: int) -> list[dict]:
    """Generate ``n_prompts`` unique prompts with ``k`` distinct continuations each."""
    rng = random.Random(seed)
    judge = SentimentIntensityAnalyzer()
    rows, seen = [], set()
    while len(rows) < n_prompts:
        slots = _slots(rng)
        prompt = _articles(rng.choice(OPENINGS).format(**slots))
        if prompt in seen:
            continue
        seen.add(prompt)
        targets = rng.sample([-2, -1, 0, 1, 2], k) if k <= 5 else [rng.randint(-2, 2) for _ in range(k)]
        responses: list[str] = []
        for t in targets:
            text = _continuation(rng, t, slots)
            while text in responses:
                text = _continuation(rng, t, slots)
            responses.append(text)
        scores = [round(judge.polarity_scores(r)["compound"], 4) for r in responses]
        rows.append({"prompt": prompt, "responses": responses, "scores": scores})
    return rows


def serialize(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=2550)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=20250203)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="verify the file is what the script builds")
    args = ap.parse_args()
    data = serialize(build(args.n_prompts, args.k, args.seed))
    digest = hashlib.sha256(data).hexdigest()
    if args.check:
        same = args.out.exists() and args.out.read_bytes() == data
        print(f"{args.out}: {'matches' if same else 'DIFFERS from'} the script output ({digest[:12]})")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out}: {args.n_prompts} prompts x {args.k} responses, "
          f"{len(data) / 1e6:.2f} MB, sha256 {digest[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
