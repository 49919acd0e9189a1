"""Short spoken passages with a text question and an open-format answer: the synthetic sqa task.

A passage holds one to three facts about different people (who did what, where, when, how many),
so the question can only be answered by listening. Each question has several correct answers: full
sentences in more than one wording and a short answer ("Five goats.", "In Berlin."); every example
keeps all of them. Words come from the grammar's lexicon of the same domain.
"""
from __future__ import annotations

import random

from grpo_speech.data.grammar import Lexicon, cap, distinct

COUNT_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
               "twelve"]
AGE_WORDS = ["six", "seven", "eight", "nine", "ten", "eleven", "twelve", "twenty", "thirty",
             "forty", "fifty", "sixty", "seventy", "eighty"]
JOBS = ["teacher", "doctor", "baker", "farmer", "cook", "driver", "waiter", "gardener", "painter",
        "singer", "nurse", "pilot"]
SHOPS = ["market", "shop", "bakery", "station", "city", "village", "zoo", "museum"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey"]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class PassageGenerator:
    """Draws (passage, question, answer) triples for one domain."""

    def __init__(self, domain: str = "target"):
        self.domain = domain
        self.lex = Lexicon.for_domain(domain)
        self.facts = FACTS[domain]
        self.places = [p for p in self.lex.places if "p" in p.tags]
        self.cities = [p for p in self.places if p.en_at[3].isupper()]  # in Berlin, in Rome
        self.shops = [p for p in self.places if p.en_at.split()[-1] in SHOPS] + self.cities
        self.times = [t for t in self.lex.times if t.tense in ("any", "past")]

    def pick_nouns(self, tags: str) -> list:
        return [n for n in self.lex.nouns if n.tags & frozenset(tags)]

    # facts: each returns (sentence, [(question, [sentence answers], short answer)]) -------------
    def fact_count(self, rng, name, pron):
        noun = rng.choice(self.pick_nouns("ao"))
        k = rng.choice(COUNT_WORDS)
        s = f"{name} has {k} {noun.en_pl}."
        return s, [(f"How many {noun.en_pl} does {name} have?",
                    [f"{name} has {k} {noun.en_pl}.", f"{cap(pron)} has {k} {noun.en_pl}."],
                    f"{cap(k)} {noun.en_pl}.")]

    def fact_bought(self, rng, name, pron):
        noun = rng.choice(self.pick_nouns("o"))
        colour = rng.choice(COLOURS)
        place = rng.choice(self.shops)
        time = rng.choice(self.times) if rng.random() < 0.5 else None
        tail = f" {time.en}" if time else ""
        s = f"{name} bought {_a(colour)} {noun.en} {place.en_at}{tail}."
        P = cap(pron)
        qa = [(f"Who bought {_a(colour)} {noun.en}?",
               [f"{name} bought the {colour} {noun.en}.", f"It was {name} who bought the {noun.en}.",
                f"The {colour} {noun.en} was bought by {name}."], f"{name}."),
              (f"What did {name} buy?",
               [f"{name} bought {_a(colour)} {noun.en}.", f"{P} bought {_a(colour)} {noun.en}."],
               f"{cap(_a(colour))} {noun.en}."),
              (f"Where did {name} buy the {noun.en}?",
               [f"{name} bought the {noun.en} {place.en_at}.", f"{P} bought it {place.en_at}."],
               f"{cap(place.en_at)}."),
              (f"What colour is the {noun.en} that {name} bought?",
               [f"The {noun.en} is {colour}.", f"It is {colour}.",
                f"{name} bought {_a(colour)} {noun.en}."], f"{cap(colour)}.")]
        if time:
            qa.append((f"When did {name} buy the {noun.en}?",
                       [f"{name} bought the {noun.en} {time.en}.", f"{P} bought it {time.en}."],
                       f"{cap(time.en)}."))
        return s, qa

    def fact_went(self, rng, name, pron):
        place = rng.choice(self.places)
        time = rng.choice(self.times)
        s = f"{name} went {place.en_to} {time.en}." if rng.random() < 0.6 else \
            f"{cap(time.en)} {name} went {place.en_to}."
        P = cap(pron)
        return s, [(f"Where did {name} go?",
                    [f"{name} went {place.en_to}.", f"{P} went {place.en_to} {time.en}."],
                    f"{cap(place.en_to)}."),
                   (f"When did {name} go {place.en_to}?",
                    [f"{name} went {place.en_to} {time.en}.", f"{P} went there {time.en}."],
                    f"{cap(time.en)}."),
                   (f"Who went {place.en_to}?",
                    [f"{name} went {place.en_to}.", f"It was {name} who went {place.en_to}."],
                    f"{name}.")]

    def fact_age(self, rng, name, pron):
        k = rng.choice(AGE_WORDS)
        return f"{name} is {k} years old.", [
            (f"How old is {name}?", [f"{name} is {k} years old.", f"{cap(pron)} is {k}."],
             f"{cap(k)} years old.")]

    def fact_visit(self, rng, name, pron, other):
        place = rng.choice(self.cities)
        time = rng.choice(self.times) if rng.random() < 0.5 else None
        tail = f" {time.en}" if time else ""
        s = f"{name} visited {other} {place.en_at}{tail}."
        P = cap(pron)
        return s, [(f"Who did {name} visit?", [f"{name} visited {other}.", f"{P} visited {other}."],
                    f"{other}."),
                   (f"Who visited {other}?",
                    [f"{name} visited {other}.", f"It was {name} who visited {other}."], f"{name}."),
                   (f"Where did {name} visit {other}?",
                    [f"{name} visited {other} {place.en_at}.", f"{P} visited {other} {place.en_at}."],
                    f"{cap(place.en_at)}.")]

    def fact_pet(self, rng, name, pron):
        noun = rng.choice(self.pick_nouns("a"))
        colour = rng.choice(COLOURS[4:])
        return f"{name} has {_a(colour)} {noun.en}.", [
            (f"What colour is {name}'s {noun.en}?",
             [f"{name}'s {noun.en} is {colour}.", f"It is {colour}."], f"{cap(colour)}."),
            (f"What animal does {name} have?",
             [f"{name} has {_a(colour)} {noun.en}.", f"{cap(pron)} has {_a(noun.en)}."],
             f"{cap(_a(noun.en))}.")]

    def fact_job(self, rng, name, pron):
        job = rng.choice(JOBS)
        place = rng.choice(self.places)
        return f"{name} works as {_a(job)} {place.en_at}.", [
            (f"What is {name}'s job?", [f"{name} works as {_a(job)}.", f"{name} is {_a(job)}."],
             f"{cap(_a(job))}."),
            (f"Where does {name} work?",
             [f"{name} works {place.en_at}.", f"{cap(pron)} works {place.en_at}."],
             f"{cap(place.en_at)}.")]

    def fact_lives(self, rng, name, pron):
        place = rng.choice(self.cities)
        return f"{name} lives {place.en_at}.", [
            (f"Where does {name} live?",
             [f"{name} lives {place.en_at}.", f"{cap(pron)} lives {place.en_at}."],
             f"{cap(place.en_at)}.")]

    # ------------------------------------------------------------------------------------------
    def example(self, rng: random.Random) -> dict:
        n_facts = rng.choices([1, 2, 3], weights=[4, 5, 1])[0]
        people = rng.sample(self.lex.names, n_facts + 1)
        sentences, qas = [], []
        for i in range(n_facts):
            (name, g), kind = people[i], rng.choice(self.facts)
            pron = "he" if g == "m" else "she"
            if kind == "visit":
                s, qa = self.fact_visit(rng, name, pron, people[n_facts][0])
            else:
                s, qa = getattr(self, "fact_" + kind)(rng, name, pron)
            sentences.append(s)
            qas.append(qa)
        question, wordings, short = rng.choice(rng.choice(qas))
        # The reference is drawn from the sentence wordings alone, as it always was: the same rng
        # draws give the same passages, questions and references for a seed.
        answer = rng.choice(wordings)
        answers = list(dict.fromkeys([answer] + wordings + [short]))
        return {"text": " ".join(sentences), "question": question, "answer": answer,
                "answers": answers}


# Fact kinds per domain: pretraining has every kind the target has, plus jobs and homes.
FACTS = {
    "target": ["count", "bought", "went", "age", "visit", "pet"],
    "pretrain": ["count", "bought", "went", "age", "job", "lives", "visit", "pet"],
}


def qa_triples(n: int, seed: int, domain: str = "target") -> list[dict]:
    """n examples with distinct (passage, question), the same for the same (seed, domain)."""
    rng = random.Random(f"sqa-{domain}-{seed}")
    gen = PassageGenerator(domain)
    return distinct(n, lambda: gen.example(rng), key=lambda ex: (ex["text"], ex["question"]),
                    what="passage examples")
