"""Bilingual grammar and sqa passages: German agreement, determinism, domains.

    .venv/bin/python -m pytest -q tests/test_data_grammar.py
"""

from grpo_speech.data.grammar import (ALL_ADJS, ALL_NOUNS, ALL_PLACES, ALL_VERBS, NP, Clause,
                                      Lexicon, Time, sentence_pairs)
from grpo_speech.data.passages import qa_triples


def noun(en):
    return next(n for n in ALL_NOUNS if n.en == en)


def adj(en):
    return next(a for a in ALL_ADJS if a.en == en)


def verb(en):
    return next(v for v in ALL_VERBS if v.en == en)


def test_noun_phrase_declension():
    # Hand-declined: masculine accusative takes den/einen and -en; dative dem/einem; neuter
    # after ein takes -es; weak nouns add -n in acc/dat; dative plural adds -n.
    assert NP("the", noun("dog"), adj("black")).de("acc") == "den schwarzen Hund"
    assert NP("a", noun("dog"), adj("black")).de("nom") == "ein schwarzer Hund"
    assert NP("a", noun("car"), adj("red")).de("acc") == "ein rotes Auto"
    assert NP("the", noun("car"), adj("red")).de("dat") == "dem roten Auto"
    assert NP("my", noun("cat"), adj("small")).de("dat") == "meiner kleinen Katze"
    assert NP("the", noun("boy")).de("dat") == "dem Jungen"
    assert NP("a", noun("student")).de("acc") == "einen Studenten"
    assert NP("num", noun("apple"), adj("red"), plural=True, num=2).de("acc") == "zwei rote Äpfel"
    assert NP("num", noun("apple"), adj("red"), plural=True, num=3).de("dat") == "drei roten Äpfeln"
    assert NP("a", noun("book"), adj("expensive")).de("acc") == "ein teures Buch"
    assert NP("a", noun("apple")).en() == "an apple"
    assert NP("num", noun("mouse"), plural=True, num=12).en() == "twelve mice"


def test_clause_word_order():
    man, dog = NP("the", noun("man")), NP("the", noun("dog"))
    yesterday = Time("yesterday", "gestern", "past")
    c = Clause(man, verb("see"), "past", (dog,), time=yesterday)
    assert c.en_statement() == "the man saw the dog yesterday"
    assert c.de_main() == "der Mann hat gestern den Hund gesehen"  # verb second, participle last
    assert c.de_main(front_time=True) == "gestern hat der Mann den Hund gesehen"  # inversion
    assert c.de_sub() == "der Mann gestern den Hund gesehen hat"  # verb final after dass/weil
    assert c.de_question() == "hat der Mann gestern den Hund gesehen"
    park = next(p for p in ALL_PLACES if p.en_at == "in the park")
    go = Clause(NP("the", noun("girl")), verb("go"), "past", (), park, place_to=True)
    assert go.de_main() == "das Mädchen ist in den Park gegangen"  # motion: sein, accusative
    give = Clause(NP("the", noun("woman")), verb("give"), "pres",
                  (NP("the", noun("child")), NP("a", noun("apple"))))
    assert give.de_main() == "die Frau gibt dem Kind einen Apfel"
    neg = Clause(man, verb("buy"), "pres", (NP("no", noun("car")),), neg=True)
    assert neg.en_statement() == "the man does not buy a car"
    assert neg.de_main() == "der Mann kauft kein Auto"


def test_pairs_are_deterministic_distinct_and_domains_differ():
    a = sentence_pairs(300, seed=7)
    assert a == sentence_pairs(300, seed=7)
    assert a != sentence_pairs(300, seed=8)
    assert len({en for en, _ in a}) == 300
    for en, de in a:
        assert en[0].isupper() and de[0].isupper() and en[-1] in ".?" and en[-1] == de[-1]
    # Names are disjoint between domains; most nouns are shared.
    target, pre = Lexicon.for_domain("target"), Lexicon.for_domain("pretrain")
    assert not {n for n, _ in target.names} & {n for n, _ in pre.names}
    shared = set(target.nouns) & set(pre.nouns)
    # 99 nouns: indices with i % 5 == 0 (20 of them) are target-only, i % 5 == 1 (20)
    # pretrain-only, the other 59 shared; the target keeps 99 - 20 = 79.
    assert len(ALL_NOUNS) == 99 and len(shared) == 59 and len(target.nouns) == 79
    pre_text = " ".join(en for en, _ in sentence_pairs(300, 7, "pretrain"))
    assert "because" not in pre_text and any("weil" in de for _, de in a)


def test_qa_triples():
    rows = qa_triples(200, seed=1)
    assert rows == qa_triples(200, seed=1)
    assert len({(r["text"], r["question"]) for r in rows}) == 200
    starts = {r["question"].split()[0] for r in rows}
    assert {"Who", "What", "Where", "When", "How"} <= starts
    for r in rows:
        assert r["answer"].endswith(".") and r["question"].endswith("?")
        assert 1 <= r["text"].count(".") <= 3
    # The same kind of question gets more than one answer wording across the set.
    how_old = {r["answer"].endswith("years old.") for r in rows if r["question"].startswith("How old")}
    assert how_old == {True, False}
