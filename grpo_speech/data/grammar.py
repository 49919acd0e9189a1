"""A small bilingual English->German grammar: the text side of the synthetic speech translation task.

Sentences are built from one lexicon in both languages at once, so the German reference is right
by construction: gender and case agreement (der/den/dem, ein/einen/einem, adjective endings,
weak nouns), verb-second main clauses, verb-final subordinate clauses (dass, weil), the perfect
with haben/sein, dative verbs and modals. `domain` picks the target (evaluation) distribution or a
pretraining one that shares most words but differs in names, some nouns and some sentence frames.

One description has several correct German renderings (Style: a fronted adverbial, the simple
past, synonyms); sentence_variants lists them all, with one drawn as the reference.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

DOMAINS = ("target", "pretrain")


# ---------------------------------------------------------------------------------------------
# Lexicon. Each table is "english | ... | german ..." lines; tags say which words go together.
# Noun tags: p person, a animal, o object, f food, r readable, x openable, c container, t throwable,
# v vehicle/machine (repairable). pron: English pronoun; weak: German n-declension suffix.

NOUNS = """
man | men | m | Mann | Männer | p | he
woman | women | f | Frau | Frauen | p | she
child | children | n | Kind | Kinder | p | -
boy | boys | m | Junge | Jungen | p | he | n
girl | girls | n | Mädchen | Mädchen | p | she
teacher | teachers | m | Lehrer | Lehrer | p | he
doctor | doctors | m | Arzt | Ärzte | p | he
student | students | m | Student | Studenten | p | he | en
farmer | farmers | m | Bauer | Bauern | p | he | n
baker | bakers | m | Bäcker | Bäcker | p | he
neighbour | neighbours | m | Nachbar | Nachbarn | p | he | n
friend | friends | m | Freund | Freunde | p | he
sister | sisters | f | Schwester | Schwestern | p | she
brother | brothers | m | Bruder | Brüder | p | he
mother | mothers | f | Mutter | Mütter | p | she
father | fathers | m | Vater | Väter | p | he
grandmother | grandmothers | f | Großmutter | Großmütter | p | she
grandfather | grandfathers | m | Großvater | Großväter | p | he
cook | cooks | m | Koch | Köche | p | he
driver | drivers | m | Fahrer | Fahrer | p | he
king | kings | m | König | Könige | p | he
queen | queens | f | Königin | Königinnen | p | she
police officer | police officers | m | Polizist | Polizisten | p | he | en
waiter | waiters | m | Kellner | Kellner | p | he
pupil | pupils | m | Schüler | Schüler | p | he
gardener | gardeners | m | Gärtner | Gärtner | p | he
singer | singers | f | Sängerin | Sängerinnen | p | she
painter | painters | m | Maler | Maler | p | he
dog | dogs | m | Hund | Hunde | a | it
cat | cats | f | Katze | Katzen | a | it
horse | horses | n | Pferd | Pferde | a | it
bird | birds | m | Vogel | Vögel | a | it
cow | cows | f | Kuh | Kühe | a | it
mouse | mice | f | Maus | Mäuse | a | it
rabbit | rabbits | n | Kaninchen | Kaninchen | a | it
sheep | sheep | n | Schaf | Schafe | a | it
pig | pigs | n | Schwein | Schweine | a | it
duck | ducks | f | Ente | Enten | a | it
goat | goats | f | Ziege | Ziegen | a | it
lion | lions | m | Löwe | Löwen | a | it | n
bear | bears | m | Bär | Bären | a | it | en
monkey | monkeys | m | Affe | Affen | a | it | n
elephant | elephants | m | Elefant | Elefanten | a | it | en
frog | frogs | m | Frosch | Frösche | a | it
fox | foxes | m | Fuchs | Füchse | a | it
wolf | wolves | m | Wolf | Wölfe | a | it
snake | snakes | f | Schlange | Schlangen | a | it
owl | owls | f | Eule | Eulen | a | it
donkey | donkeys | m | Esel | Esel | a | it
chicken | chickens | n | Huhn | Hühner | a | it
book | books | n | Buch | Bücher | o r x | it
car | cars | n | Auto | Autos | o v | it
table | tables | m | Tisch | Tische | o | it
chair | chairs | m | Stuhl | Stühle | o v | it
ball | balls | m | Ball | Bälle | o t | it
cup | cups | f | Tasse | Tassen | o c | it
letter | letters | m | Brief | Briefe | o r x | it
key | keys | m | Schlüssel | Schlüssel | o t | it
bag | bags | f | Tasche | Taschen | o c x | it
bicycle | bicycles | n | Fahrrad | Fahrräder | o v | it
hat | hats | m | Hut | Hüte | o t | it
lamp | lamps | f | Lampe | Lampen | o v | it
clock | clocks | f | Uhr | Uhren | o v | it
picture | pictures | n | Bild | Bilder | o | it
box | boxes | f | Kiste | Kisten | o c x | it
bottle | bottles | f | Flasche | Flaschen | o c x | it
pen | pens | m | Stift | Stifte | o t | it
shoe | shoes | m | Schuh | Schuhe | o | it
coat | coats | m | Mantel | Mäntel | o | it
dress | dresses | n | Kleid | Kleider | o | it
shirt | shirts | n | Hemd | Hemden | o | it
newspaper | newspapers | f | Zeitung | Zeitungen | o r | it
umbrella | umbrellas | m | Regenschirm | Regenschirme | o x | it
phone | phones | n | Telefon | Telefone | o v | it
computer | computers | m | Computer | Computer | o v | it
boat | boats | n | Boot | Boote | o v | it
plate | plates | m | Teller | Teller | o c | it
glass | glasses | n | Glas | Gläser | o c | it
spoon | spoons | m | Löffel | Löffel | o t | it
knife | knives | n | Messer | Messer | o | it
ring | rings | m | Ring | Ringe | o t | it
map | maps | f | Karte | Karten | o r | it
basket | baskets | m | Korb | Körbe | o c | it
door | doors | f | Tür | Türen | o x | it
window | windows | n | Fenster | Fenster | o x | it
apple | apples | m | Apfel | Äpfel | f t | it
cake | cakes | m | Kuchen | Kuchen | f | it
egg | eggs | n | Ei | Eier | f | it
orange | oranges | f | Orange | Orangen | f t | it
banana | bananas | f | Banane | Bananen | f | it
soup | soups | f | Suppe | Suppen | f | it
pear | pears | f | Birne | Birnen | f | it
tomato | tomatoes | f | Tomate | Tomaten | f | it
carrot | carrots | f | Karotte | Karotten | f | it
lemon | lemons | f | Zitrone | Zitronen | f | it
potato | potatoes | f | Kartoffel | Kartoffeln | f | it
cookie | cookies | m | Keks | Kekse | f | it
sausage | sausages | f | Wurst | Würste | f | it
sandwich | sandwiches | n | Sandwich | Sandwiches | f | it
"""

# english | german stem | noun tags it fits | predicative (y: "The X is ADJ" reads well)
ADJECTIVES = """
red | rot | o f | y
blue | blau | o | y
green | grün | o f | y
yellow | gelb | o f | y
black | schwarz | o a | y
white | weiß | o a | y
brown | braun | o a | y
grey | grau | o a | y
big | groß | o a f p | y
small | klein | o a f p | y
old | alt | o a p | y
new | neu | o | y
young | jung | a p | y
beautiful | schön | o a p | y
cheap | billig | o | y
expensive | teur | o | -
heavy | schwer | o | y
long | lang | o | -
clean | sauber | o a | y
dirty | schmutzig | o a | y
happy | glücklich | a p | y
tired | müde | a p | y
hungry | hungrig | a p | y
friendly | freundlich | a p | y
clever | klug | a p | y
strong | stark | a p | y
lazy | faul | a p | y
funny | lustig | a p | y
fresh | frisch | f | y
sweet | süß | f | y
empty | leer | c | y
full | voll | c | y
round | rund | o f | y
"""

# english base | 3sg | past | german infinitive | ich | er | präteritum (ich/er) | participle | aux |
# case | subject tags | object tags
VERBS = """
see | sees | saw | sehen | sehe | sieht | sah | gesehen | haben | acc | p a | p a o f
buy | buys | bought | kaufen | kaufe | kauft | kaufte | gekauft | haben | acc | p | o f a
sell | sells | sold | verkaufen | verkaufe | verkauft | verkaufte | verkauft | haben | acc | p | o f a
read | reads | read | lesen | lese | liest | las | gelesen | haben | acc | p | r
find | finds | found | finden | finde | findet | fand | gefunden | haben | acc | p a | o a
lose | loses | lost | verlieren | verliere | verliert | verlor | verloren | haben | acc | p | o
carry | carries | carried | tragen | trage | trägt | trug | getragen | haben | acc | p | o f a
wash | washes | washed | waschen | wasche | wäscht | wusch | gewaschen | haben | acc | p | o a
eat | eats | ate | essen | esse | isst | aß | gegessen | haben | acc | p a | f
need | needs | needed | brauchen | brauche | braucht | brauchte | gebraucht | haben | acc | p | o f
like | likes | liked | mögen | mag | mag | mochte | gemocht | haben | acc | p a | p a o f
open | opens | opened | öffnen | öffne | öffnet | öffnete | geöffnet | haben | acc | p | x
bring | brings | brought | bringen | bringe | bringt | brachte | gebracht | haben | acc | p a | o f
paint | paints | painted | malen | male | malt | malte | gemalt | haben | acc | p | p a o
visit | visits | visited | besuchen | besuche | besucht | besuchte | besucht | haben | acc | p | p
feed | feeds | fed | füttern | füttere | füttert | fütterte | gefüttert | haben | acc | p | a
hold | holds | held | halten | halte | hält | hielt | gehalten | haben | acc | p | o f a
catch | catches | caught | fangen | fange | fängt | fing | gefangen | haben | acc | p a | a t
throw | throws | threw | werfen | werfe | wirft | warf | geworfen | haben | acc | p | t
write | writes | wrote | schreiben | schreibe | schreibt | schrieb | geschrieben | haben | acc | p | r
hear | hears | heard | hören | höre | hört | hörte | gehört | haben | acc | p a | p a
know | knows | knew | kennen | kenne | kennt | kannte | gekannt | haben | acc | p | p
meet | meets | met | treffen | treffe | trifft | traf | getroffen | haben | acc | p | p
clean | cleans | cleaned | putzen | putze | putzt | putzte | geputzt | haben | acc | p | o
repair | repairs | repaired | reparieren | repariere | repariert | reparierte | repariert | haben | acc | p | v
draw | draws | drew | zeichnen | zeichne | zeichnet | zeichnete | gezeichnet | haben | acc | p | p a o
help | helps | helped | helfen | helfe | hilft | half | geholfen | haben | dat | p | p
thank | thanks | thanked | danken | danke | dankt | dankte | gedankt | haben | dat | p | p
follow | follows | followed | folgen | folge | folgt | folgte | gefolgt | sein | dat | p a | p a
answer | answers | answered | antworten | antworte | antwortet | antwortete | geantwortet | haben | dat | p | p
give | gives | gave | geben | gebe | gibt | gab | gegeben | haben | dat+acc | p | o f
show | shows | showed | zeigen | zeige | zeigt | zeigte | gezeigt | haben | dat+acc | p | o a
send | sends | sent | schicken | schicke | schickt | schickte | geschickt | haben | dat+acc | p | r
sleep | sleeps | slept | schlafen | schlafe | schläft | schlief | geschlafen | haben | - | p a | -
play | plays | played | spielen | spiele | spielt | spielte | gespielt | haben | - | p a | -
work | works | worked | arbeiten | arbeite | arbeitet | arbeitete | gearbeitet | haben | - | p | -
wait | waits | waited | warten | warte | wartet | wartete | gewartet | haben | - | p a | -
sing | sings | sang | singen | singe | singt | sang | gesungen | haben | - | p a | -
dance | dances | danced | tanzen | tanze | tanzt | tanzte | getanzt | haben | - | p | -
laugh | laughs | laughed | lachen | lache | lacht | lachte | gelacht | haben | - | p | -
sit | sits | sat | sitzen | sitze | sitzt | saß | gesessen | haben | - | p a | -
swim | swims | swam | schwimmen | schwimme | schwimmt | schwamm | geschwommen | sein | - | p a | -
live | lives | lived | wohnen | wohne | wohnt | wohnte | gewohnt | haben | - | p | -
go | goes | went | gehen | gehe | geht | ging | gegangen | sein | to | p a | -
drive | drives | drove | fahren | fahre | fährt | fuhr | gefahren | sein | to | p | -
run | runs | ran | laufen | laufe | läuft | lief | gelaufen | sein | to | p a | -
fly | flies | flew | fliegen | fliege | fliegt | flog | geflogen | sein | to | p a | -
come | comes | came | kommen | komme | kommt | kam | gekommen | sein | to | p a | -
"""

# english "at" | english "to" | german "at" (dative) | german "to" | who goes there (p/a)
PLACES = """
in the garden | to the garden | im Garten | in den Garten | p a
in the park | to the park | im Park | in den Park | p a
in the kitchen | to the kitchen | in der Küche | in die Küche | p a
at school | to school | in der Schule | in die Schule | p
at the station | to the station | am Bahnhof | zum Bahnhof | p
at the market | to the market | auf dem Markt | zum Markt | p
in the library | to the library | in der Bibliothek | in die Bibliothek | p
in the forest | to the forest | im Wald | in den Wald | p a
in the city | to the city | in der Stadt | in die Stadt | p
in the village | to the village | im Dorf | ins Dorf | p a
at home | home | zu Hause | nach Hause | p a
in the office | to the office | im Büro | ins Büro | p
in the shop | to the shop | im Laden | in den Laden | p
on the beach | to the beach | am Strand | an den Strand | p a
by the river | to the river | am Fluss | zum Fluss | p a
at the lake | to the lake | am See | zum See | p a
in the hospital | to the hospital | im Krankenhaus | ins Krankenhaus | p
at the zoo | to the zoo | im Zoo | in den Zoo | p
in the restaurant | to the restaurant | im Restaurant | ins Restaurant | p
in the bakery | to the bakery | in der Bäckerei | in die Bäckerei | p
in the church | to the church | in der Kirche | in die Kirche | p
at the cinema | to the cinema | im Kino | ins Kino | p
on the bridge | to the bridge | auf der Brücke | zur Brücke | p a
on the farm | to the farm | auf dem Bauernhof | zum Bauernhof | p a
in the room | to the room | im Zimmer | ins Zimmer | p a
in the hotel | to the hotel | im Hotel | ins Hotel | p
in the museum | to the museum | im Museum | ins Museum | p
in Berlin | to Berlin | in Berlin | nach Berlin | p
in Hamburg | to Hamburg | in Hamburg | nach Hamburg | p
in Munich | to Munich | in München | nach München | p
in Vienna | to Vienna | in Wien | nach Wien | p
in Paris | to Paris | in Paris | nach Paris | p
in London | to London | in London | nach London | p
in Rome | to Rome | in Rom | nach Rom | p
in Cologne | to Cologne | in Köln | nach Köln | p
"""

# english | german | tense it goes with (pres, past, any)
TIMES = """
today | heute | any
yesterday | gestern | past
now | jetzt | pres
every day | jeden Tag | pres
last week | letzte Woche | past
last year | letztes Jahr | past
in the morning | am Morgen | any
in the evening | am Abend | any
at night | in der Nacht | any
at noon | am Mittag | any
on Monday | am Montag | any
on Tuesday | am Dienstag | any
on Wednesday | am Mittwoch | any
on Thursday | am Donnerstag | any
on Friday | am Freitag | any
on Saturday | am Samstag | any
on Sunday | am Sonntag | any
on the weekend | am Wochenende | any
in the summer | im Sommer | any
in the winter | im Winter | any
in the spring | im Frühling | any
in the autumn | im Herbst | any
"""

# German alternates that mean the same in these sentences. A noun alternate brings its own gender
# and plural (das Auto, der Wagen: articles and adjective endings follow the alternate).
# german | alternate | alternate plural | alternate gender
NOUN_SYNONYMS = """
Auto | Wagen | Wagen | m
Karotte | Möhre | Möhren | f
Orange | Apfelsine | Apfelsinen | f
Fahrrad | Rad | Räder | n
Keks | Plätzchen | Plätzchen | n
"""
# Adjective stems, times and places: the alternate replaces the whole German word or phrase.
WORD_SYNONYMS = {"schön": "hübsch", "klug": "schlau", "lustig": "witzig", "billig": "günstig",
                 "schmutzig": "dreckig", "jeden Tag": "täglich", "jetzt": "nun",
                 "letzte Woche": "vergangene Woche", "letztes Jahr": "vergangenes Jahr",
                 "zu Hause": "daheim"}

NUMBERS = [("one", "ein"), ("two", "zwei"), ("three", "drei"), ("four", "vier"), ("five", "fünf"),
           ("six", "sechs"), ("seven", "sieben"), ("eight", "acht"), ("nine", "neun"),
           ("ten", "zehn"), ("eleven", "elf"), ("twelve", "zwölf")]

# Names are the same in both languages; the two domains use disjoint lists.
NAMES = {
    "target": [("Anna", "f"), ("Tom", "m"), ("Maria", "f"), ("Peter", "m"), ("Lisa", "f"),
               ("Paul", "m"), ("Emma", "f"), ("David", "m"), ("Sarah", "f"), ("Mark", "m"),
               ("Laura", "f"), ("Daniel", "m"), ("Julia", "f"), ("Simon", "m"), ("Clara", "f"),
               ("Felix", "m")],
    "pretrain": [("John", "m"), ("Mary", "f"), ("James", "m"), ("Linda", "f"), ("Robert", "m"),
                 ("Susan", "f"), ("Michael", "m"), ("Karen", "f"), ("William", "m"),
                 ("Helen", "f"), ("Richard", "m"), ("Alice", "f"), ("George", "m"),
                 ("Nina", "f"), ("Oliver", "m"), ("Sophie", "f")],
}


@dataclass(frozen=True)
class Noun:
    en: str
    en_pl: str
    gender: str  # m, f, n
    de: str
    de_pl: str
    tags: frozenset
    pron: str  # he, she, it, or "-" (no natural English pronoun: "the child")
    weak: str  # German n-declension suffix for accusative/dative singular ("" for most nouns)


@dataclass(frozen=True)
class Adj:
    en: str
    de: str  # stem that takes endings (teuer -> teur)
    tags: frozenset
    predicative: bool

    @property
    def de_pred(self) -> str:
        return "teuer" if self.de == "teur" else self.de


@dataclass(frozen=True)
class Verb:
    en: str
    en3: str
    en_past: str
    de_inf: str
    de_ich: str
    de_er: str
    de_praet: str  # simple past, ich/er form (sah); the plural adds -n or -en (sahen)
    de_part: str
    aux: str  # haben or sein
    case: str  # acc, dat, dat+acc, to (direction), - (intransitive)
    subj: frozenset
    obj: frozenset


@dataclass(frozen=True)
class Place:
    en_at: str
    en_to: str
    de_at: str
    de_to: str
    tags: frozenset


@dataclass(frozen=True)
class Time:
    en: str
    de: str
    tense: str


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")] for line in table.strip().splitlines()]


def _tags(s: str) -> frozenset:
    return frozenset(s.split()) if s != "-" else frozenset()


ALL_NOUNS = [Noun(r[0], r[1], r[2], r[3], r[4], _tags(r[5]), r[6], r[7] if len(r) > 7 else "")
             for r in _rows(NOUNS)]
ALL_ADJS = [Adj(r[0], r[1], _tags(r[2]), r[3] == "y") for r in _rows(ADJECTIVES)]
ALL_VERBS = [Verb(*r[:10], _tags(r[10]), _tags(r[11])) for r in _rows(VERBS)]
ALL_PLACES = [Place(*r[:4], _tags(r[4])) for r in _rows(PLACES)]
ALL_TIMES = [Time(*r) for r in _rows(TIMES)]
# German noun -> (alternate, its plural, its gender)
NOUN_ALTS = {r[0]: (r[1], r[2], r[3]) for r in _rows(NOUN_SYNONYMS)}


def domain_subset(items: list, domain: str) -> list:
    """The target domain leaves out every fifth item (from the second on); pretraining speaks the
    whole lexicon, as a speech model's own training covers the language of a later task. What
    sets the target apart is its names, prompt wordings, frame weights and sentence frames."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}: expected one of {DOMAINS}")
    if domain == "pretrain":
        return list(items)
    return [x for i, x in enumerate(items) if i % 5 != 1]


@dataclass(frozen=True)
class Lexicon:
    nouns: list
    adjs: list
    verbs: list
    places: list
    times: list
    names: list

    @staticmethod
    def for_domain(domain: str) -> "Lexicon":
        # Verbs and times are split less finely: every verb frame needs a few of each kind.
        return Lexicon(domain_subset(ALL_NOUNS, domain), domain_subset(ALL_ADJS, domain),
                       ALL_VERBS, domain_subset(ALL_PLACES, domain), ALL_TIMES, NAMES[domain])


# ---------------------------------------------------------------------------------------------
# German morphology.

DEF_ART = {("nom", "m"): "der", ("nom", "f"): "die", ("nom", "n"): "das", ("nom", "p"): "die",
           ("acc", "m"): "den", ("acc", "f"): "die", ("acc", "n"): "das", ("acc", "p"): "die",
           ("dat", "m"): "dem", ("dat", "f"): "der", ("dat", "n"): "dem", ("dat", "p"): "den"}
# Endings of ein/kein/mein/sein/ihr/unser (plural forms only for the possessives and kein).
EIN_END = {("nom", "m"): "", ("nom", "f"): "e", ("nom", "n"): "", ("nom", "p"): "e",
           ("acc", "m"): "en", ("acc", "f"): "e", ("acc", "n"): "", ("acc", "p"): "e",
           ("dat", "m"): "em", ("dat", "f"): "er", ("dat", "n"): "em", ("dat", "p"): "en"}
# Adjective endings: weak after der/die/das, mixed after ein-words, strong with no article.
WEAK_END = {("nom", "m"): "e", ("nom", "f"): "e", ("nom", "n"): "e", ("acc", "m"): "en",
            ("acc", "f"): "e", ("acc", "n"): "e"}
MIXED_END = {("nom", "m"): "er", ("nom", "f"): "e", ("nom", "n"): "es", ("acc", "m"): "en",
             ("acc", "f"): "e", ("acc", "n"): "es"}
STRONG_PL_END = {"nom": "e", "acc": "e", "dat": "en"}

PRONOUNS = {  # key: (english nom, english obj, german nom, german acc, german dat, person)
    "I": ("I", "me", "ich", "mich", "mir", "1sg"),
    "he": ("he", "him", "er", "ihn", "ihm", "3sg"),
    "she": ("she", "her", "sie", "sie", "ihr", "3sg"),
    "it": ("it", "it", "es", "es", "ihm", "3sg"),
    "we": ("we", "us", "wir", "uns", "uns", "1pl"),
    "they": ("they", "them", "sie", "sie", "ihnen", "3pl"),
}
POSS_EN = {"he": "his", "she": "her", "it": "its"}


@dataclass(frozen=True)
class Style:
    """How one description is said in German; every style gives a correct translation.
    front: a main clause starts with its time adverbial (else its location, not a direction), the
    finite verb second ("Gestern hat der Mann ..."). praeteritum: the simple past instead of the
    perfect ("Der Mann sah ..."). synonyms: every word with an alternate (NOUN_SYNONYMS,
    WORD_SYNONYMS) takes it: one switch for the whole sentence."""
    front: bool = False
    praeteritum: bool = False
    synonyms: bool = False


CANONICAL = Style()
STYLES = [Style(f, p, s) for f in (False, True) for p in (False, True) for s in (False, True)]


def syn(word: str, style: Style) -> str:
    """The German word or phrase in this style (its alternate under style.synonyms)."""
    return WORD_SYNONYMS.get(word, word) if style.synonyms else word


def styled_noun(n: Noun, style: Style) -> Noun:
    """The noun in this style: under style.synonyms an alternate with its own gender and plural."""
    if not style.synonyms or n.de not in NOUN_ALTS:
        return n
    de, de_pl, gender = NOUN_ALTS[n.de]
    return replace(n, de=de, de_pl=de_pl, gender=gender, weak="")


@dataclass(frozen=True)
class NP:
    """A noun phrase that can be said in English and declined in German.
    det: the, a, my, our, his/her/its (owner gender in `owner`), num, no (kein), name, pron."""
    det: str
    noun: Noun | None = None
    adj: Adj | None = None
    plural: bool = False
    num: int = 0
    name: str = ""
    gender: str = ""  # of a name or pronoun referent
    pron: str = ""
    owner: str = ""  # German gender of the owner: sein (m, n) or ihr (f)
    owner_en: str = ""  # his, her or its

    @property
    def person(self) -> str:
        if self.det == "pron":
            return PRONOUNS[self.pron][5]
        return "3pl" if self.plural else "3sg"

    @property
    def de_gender(self) -> str:
        if self.det in ("name", "pron"):
            return self.gender
        return "p" if self.plural else self.noun.gender

    def en(self, obj: bool = False) -> str:
        if self.det == "name":
            return self.name
        if self.det == "pron":
            return PRONOUNS[self.pron][1 if obj else 0]
        noun = self.noun.en_pl if self.plural else self.noun.en
        words = ([self.adj.en] if self.adj else []) + [noun]
        if self.det in ("a", "no"):  # "no" only under "does not": "does not buy a car"
            art = "an" if words[0][0] in "aeiou" else "a"
        elif self.det == "num":
            art = NUMBERS[self.num - 1][0]
        elif self.det == "poss":
            art = self.owner_en
        else:
            art = self.det
        return " ".join([art] + words)

    def de(self, case: str, style: Style = CANONICAL) -> str:
        if self.det == "name":
            return self.name
        if self.det == "pron":
            key = self.pron
            if key in ("he", "she", "it"):  # German follows grammatical gender: das Mädchen -> es
                key = {"m": "he", "f": "she", "n": "it"}[self.gender]
            return PRONOUNS[key][2 + ("nom", "acc", "dat").index(case)]
        n = styled_noun(self.noun, style)
        g = "p" if self.plural else n.gender
        if self.plural:
            noun = n.de_pl
            if case == "dat" and not noun.endswith(("n", "s")):
                noun += "n"
        else:
            noun = n.de + (n.weak if case != "nom" else "")
        if self.det == "the":
            art, adj_end = DEF_ART[case, g], WEAK_END.get((case, g), "en")
        elif self.det == "num":
            art, adj_end = NUMBERS[self.num - 1][1], STRONG_PL_END[case]
        else:
            stem = {"a": "ein", "no": "kein", "my": "mein", "our": "unser",
                    "poss": "ihr" if self.owner == "f" else "sein"}[self.det]
            art = stem + EIN_END[case, g]
            adj_end = "en" if self.plural else MIXED_END.get((case, g), "en")
        adj = [syn(self.adj.de, style) + adj_end] if self.adj else []
        return " ".join([art] + adj + [noun])


def de_present(v: Verb, person: str) -> str:
    return {"1sg": v.de_ich, "3sg": v.de_er}.get(person, v.de_inf)


def de_praeteritum(v: Verb, person: str) -> str:
    """Simple past: ich/er sah, wir/sie sahen; kaufte, kauften."""
    if person in ("1sg", "3sg"):
        return v.de_praet
    return v.de_praet + ("n" if v.de_praet.endswith("e") else "en")


AUX_PRESENT = {"haben": {"1sg": "habe", "3sg": "hat"}, "sein": {"1sg": "bin", "3sg": "ist"}}
AUX_PLURAL = {"haben": "haben", "sein": "sind"}


def de_aux(aux: str, person: str) -> str:
    return AUX_PRESENT[aux].get(person, AUX_PLURAL[aux])


def en_present(v: Verb, person: str) -> str:
    return v.en3 if person == "3sg" else v.en


# Modals: english, german ich/er form, german plural form.
MODALS = [("wants to", "want to", "will", "wollen"), ("can", "can", "kann", "können"),
          ("must", "must", "muss", "müssen")]


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


# ---------------------------------------------------------------------------------------------
# Clauses: one description, rendered as an English clause and a German main, question or
# subordinate clause.

@dataclass
class Clause:
    subj: NP
    verb: Verb
    tense: str = "pres"  # pres or past
    objs: tuple = ()  # NPs: (acc,), (dat,), or (dat, acc)
    place: Place | None = None
    place_to: bool = False  # direction (to the park) rather than location (in the park)
    with_np: NP | None = None  # "with the dog" -> "mit dem Hund"
    time: Time | None = None
    neg: bool = False
    modal: tuple | None = None

    def _obj_cases(self) -> list[str]:
        return {"acc": ["acc"], "dat": ["dat"], "dat+acc": ["dat", "acc"]}.get(self.verb.case, [])

    # English ------------------------------------------------------------------------------
    def en_verb(self) -> str:
        v, p = self.verb, self.subj.person
        if self.modal:
            m = self.modal[0] if p == "3sg" else self.modal[1]
            return f"{m} not {v.en}" if self.neg and m in ("can", "must") else f"{m} {v.en}"
        if self.neg:
            aux = "did" if self.tense == "past" else ("does" if p == "3sg" else "do")
            return f"{aux} not {v.en}"
        return v.en_past if self.tense == "past" else en_present(v, p)

    def en_rest(self, skip_time: bool = False) -> list[str]:
        out = [o.en(obj=True) for o in self.objs]
        if self.with_np:
            out.append("with " + self.with_np.en(obj=True))
        if self.place:
            out.append(self.place.en_to if self.place_to else self.place.en_at)
        if self.time and not skip_time:
            out.append(self.time.en)
        return out

    def en_statement(self, front_time: bool = False) -> str:
        head = [self.time.en] if front_time and self.time else []
        return " ".join(head + [self.subj.en(), self.en_verb()] + self.en_rest(front_time))

    def en_question(self) -> str:
        p = self.subj.person
        if self.modal:
            aux, rest_verb = self.modal[1].split()[0], self.verb.en
            if aux == "want":  # "Does the boy want to buy ...?"
                aux, rest_verb = ("does" if p == "3sg" else "do"), "want to " + self.verb.en
            return " ".join([aux, self.subj.en(), rest_verb] + self.en_rest())
        aux = "did" if self.tense == "past" else ("does" if p == "3sg" else "do")
        return " ".join([aux, self.subj.en(), self.verb.en] + self.en_rest())

    # German -------------------------------------------------------------------------------
    def de_verbs(self, style: Style = CANONICAL) -> tuple[str, str]:
        """(finite verb, non-finite rest: participle or infinitive or '')."""
        v, p = self.verb, self.subj.person
        if self.modal:
            return (self.modal[2] if p in ("1sg", "3sg") else self.modal[3]), v.de_inf
        if self.tense == "past":
            if style.praeteritum:
                return de_praeteritum(v, p), ""
            return de_aux(v.aux, p), v.de_part
        return de_present(v, p), ""

    def de_fronted(self, style: Style) -> str | None:
        """What a main clause of this style puts first: "time", "place" (a location, never a
        direction: "Im Park spielt ..." but not "In den Park geht ...") or None (the subject)."""
        if not style.front:
            return None
        if self.time:
            return "time"
        if self.place and not self.place_to:
            return "place"
        return None

    def de_time(self, style: Style) -> str:
        return syn(self.time.de, style)

    def de_place(self, style: Style) -> str:
        return self.place.de_to if self.place_to else syn(self.place.de_at, style)

    def de_mid(self, style: Style = CANONICAL, skip: str | None = None) -> list[str]:
        """Middle field: time, objects (dative before accusative), nicht, place; `skip` leaves
        out the fronted one ("time" or "place")."""
        out = [self.de_time(style)] if self.time and skip != "time" else []
        out += [o.de(c, style) for o, c in zip(self.objs, self._obj_cases())]
        if self.neg and not any(o.det == "no" for o in self.objs):
            out.append("nicht")
        if self.with_np:
            out.append("mit " + self.with_np.de("dat", style))
        if self.place and skip != "place":
            out.append(self.de_place(style))
        return out

    def de_main(self, style: Style = CANONICAL, front_time: bool = False) -> str:
        """Verb-second main clause; front_time=True is style.front (the English side's name)."""
        if front_time:
            style = replace(style, front=True)
        fin, rest = self.de_verbs(style)
        first = self.de_fronted(style)
        if first:
            head = self.de_time(style) if first == "time" else self.de_place(style)
            words = [head, fin, self.subj.de("nom", style)] + self.de_mid(style, skip=first)
        else:
            words = [self.subj.de("nom", style), fin] + self.de_mid(style)
        return " ".join(words + ([rest] if rest else []))

    def de_question(self, style: Style = CANONICAL) -> str:
        fin, rest = self.de_verbs(style)
        return " ".join([fin, self.subj.de("nom", style)] + self.de_mid(style)
                        + ([rest] if rest else []))

    def de_sub(self, style: Style = CANONICAL) -> str:
        fin, rest = self.de_verbs(style)
        return " ".join([self.subj.de("nom", style)] + self.de_mid(style) + ([rest] if rest else [])
                        + [fin])


# ---------------------------------------------------------------------------------------------
# Sampling.

class Generator:
    """Draws (English, German) sentence pairs for one domain from a seeded random.Random."""

    def __init__(self, domain: str = "target"):
        self.domain = domain
        self.lex = Lexicon.for_domain(domain)
        self.frames = FRAMES[domain]

    # words ---------------------------------------------------------------------------------
    def noun(self, rng: random.Random, tags, exclude: Noun | None = None) -> Noun:
        pool = [n for n in self.lex.nouns if n.tags & tags and n is not exclude]
        return rng.choice(pool)

    def adj_for(self, rng: random.Random, noun: Noun, p: float) -> Adj | None:
        if rng.random() >= p:
            return None
        pool = [a for a in self.lex.adjs if a.tags & noun.tags]
        return rng.choice(pool) if pool else None

    def np(self, rng: random.Random, tags, *, exclude: Noun | None = None, subject: bool = False,
           allow_plural: bool = True, adj_p: float = 0.35) -> NP:
        """A noun phrase of a noun with one of `tags`: names and pronouns only for subjects."""
        r = rng.random()
        if subject and "p" in tags and r < 0.2:
            name, g = rng.choice(self.lex.names)
            return NP("name", name=name, gender=g)
        if subject and "p" in tags and r < 0.3:
            pron = rng.choice(["I", "he", "she", "we", "they"])
            return NP("pron", pron=pron, gender={"he": "m", "she": "f"}.get(pron, "p"))
        noun = self.noun(rng, tags, exclude)
        adj = self.adj_for(rng, noun, adj_p)
        r = rng.random()
        if allow_plural and r < 0.1:
            return NP("num", noun, adj, plural=True, num=rng.randint(2, 12))
        if allow_plural and r < 0.17:
            return NP("the", noun, adj, plural=True)
        det = rng.choices(["the", "a", "my", "our"], weights=[5, 4, 1, 1])[0]
        return NP(det, noun, adj)

    def time(self, rng: random.Random, tense: str, p: float = 0.4) -> Time | None:
        if rng.random() >= p:
            return None
        return rng.choice([t for t in self.lex.times if t.tense in ("any", tense)])

    def place(self, rng: random.Random, subj: NP, p: float) -> Place | None:
        if rng.random() >= p:
            return None
        tag = "a" if subj.noun is not None and "a" in subj.noun.tags else "p"
        return rng.choice([pl for pl in self.lex.places if tag in pl.tags])

    def verb(self, rng: random.Random, cases: tuple[str, ...]) -> Verb:
        return rng.choice([v for v in self.lex.verbs if v.case in cases])

    def subject_for(self, rng: random.Random, v: Verb, **kw) -> NP:
        return self.np(rng, v.subj, subject=True, **kw)

    # clauses -------------------------------------------------------------------------------
    def clause(self, rng: random.Random, cases=("acc", "dat", "dat+acc", "-", "to"),
               tense: str | None = None, neg_p: float = 0.0, place_p: float = 0.35,
               time_p: float = 0.35, subj: NP | None = None) -> Clause:
        v = self.verb(rng, cases)
        if subj is not None and not (subj_tags(subj) & v.subj):
            v = self.verb_for_subject(rng, cases, subj)
        subj = subj or self.subject_for(rng, v)
        tense = tense or rng.choice(["pres", "past"])
        subj_noun = subj.noun
        objs: tuple = ()
        if v.case == "acc":
            objs = (self.np(rng, v.obj, exclude=subj_noun),)
        elif v.case == "dat":
            objs = (self.np(rng, v.obj, exclude=subj_noun, allow_plural=False, adj_p=0.2),)
        elif v.case == "dat+acc":
            recipient = self.np(rng, frozenset("p"), exclude=subj_noun, allow_plural=False,
                                adj_p=0.0)
            objs = (recipient, self.np(rng, v.obj, allow_plural=True, adj_p=0.35))
        # "to" verbs need a direction and "live" a place ("Felix lives." says nothing).
        place = self.place(rng, subj, 1.0 if v.case == "to" or v.en == "live" else
                           (0.6 if v.case == "-" else place_p))
        c = Clause(subj, v, tense, objs, place, place_to=v.case == "to",
                   time=self.time(rng, tense, time_p))
        if rng.random() < neg_p and not c.place and not any(o.det == "num" for o in objs):
            c.neg = True
            # "does not buy a car" -> "kauft kein Auto": an indefinite object takes kein.
            if objs and objs[-1].det == "a" and c._obj_cases()[-1] == "acc":
                o = objs[-1]
                c.objs = objs[:-1] + (NP("no", o.noun, o.adj),)
        return c

    def verb_for_subject(self, rng: random.Random, cases, subj: NP) -> Verb:
        return rng.choice([v for v in self.lex.verbs if v.case in cases and subj_tags(subj) & v.subj])

    def draw(self, rng: random.Random) -> tuple[str, Callable[[Style], str], Style]:
        """One sentence: its English, its German as a function of the style, and the style of the
        frame's own rendering (the canonical German)."""
        names, weights = zip(*self.frames)
        frame = rng.choices(names, weights=weights)[0]
        en, de, *canon = getattr(self, "frame_" + frame)(rng)
        return finish(en), lambda style: finish(de(style)), canon[0] if canon else CANONICAL

    def sentence(self, rng: random.Random) -> tuple[str, str]:
        """(English, canonical German)."""
        en, de, canon = self.draw(rng)
        return en, de(canon)

    def variants(self, rng: random.Random) -> tuple[str, list[str]]:
        """(English, every distinct German rendering over STYLES, the canonical one first)."""
        en, de, canon = self.draw(rng)
        return en, list(dict.fromkeys([de(canon)] + [de(s) for s in STYLES]))

    # frames: each returns english, german (a function of the style) without final punctuation
    # for statements, and optionally the style of the canonical German (default CANONICAL) -----
    def frame_statement(self, rng):
        c = self.clause(rng, neg_p=0.15)
        front = c.time is not None and rng.random() < 0.4
        return c.en_statement(front), c.de_main, Style(front=front)

    def frame_yes_no(self, rng):
        c = self.clause(rng, time_p=0.2)
        return c.en_question() + "?", lambda s: c.de_question(s) + "?"

    def frame_wh(self, rng):
        kind = rng.choice(["what", "who", "whom", "where", "where_to", "when"])
        if kind in ("what", "who"):
            c = self.clause(rng, cases=("acc",), time_p=0.2, place_p=0.2)
            if kind == "what":
                if "o" not in c.verb.obj and "f" not in c.verb.obj and "r" not in c.verb.obj \
                        and "x" not in c.verb.obj and "t" not in c.verb.obj:
                    kind = "who"
                else:
                    c.objs = ()
                    aux = "did" if c.tense == "past" else ("does" if c.subj.person == "3sg" else "do")
                    en = " ".join(["What", aux, c.subj.en(), c.verb.en] + c.en_rest())
                    return en + "?", lambda s: wh_question("Was", c, s)
            # Who + 3sg verb asks for the subject: "Who sees the dog?" -> "Wer sieht den Hund?"
            c.subj = NP("pron", pron="he", gender="m")
            en = " ".join(["Who", c.en_verb()] + c.en_rest())
            return en + "?", lambda s: wh_question("Wer", c, s, subject=False)
        if kind == "whom":  # the person object: wen (accusative) or wem (dative)
            c = self.clause(rng, cases=("acc", "dat"), time_p=0.2, place_p=0.0)
            if "p" not in c.verb.obj:
                c = Clause(c.subj, rng.choice([v for v in self.lex.verbs if v.case in ("acc", "dat")
                                               and "p" in v.obj and subj_tags(c.subj) & v.subj]),
                           c.tense, (), None, time=c.time)
            c.objs = ()
            wh = "Wem" if c.verb.case == "dat" else "Wen"
            aux = "did" if c.tense == "past" else ("does" if c.subj.person == "3sg" else "do")
            en = " ".join(["Who", aux, c.subj.en(), c.verb.en] + c.en_rest())
            return en + "?", lambda s: wh_question(wh, c, s)
        cases = ("to",) if kind == "where_to" else (("-",) if kind == "where" else ("-", "to"))
        c = self.clause(rng, cases=cases, time_p=0.0 if kind == "when" else 0.3)
        if kind == "where_to" and c.verb.en == "come":  # "Where does he come?" is not English
            c.verb = next(v for v in self.lex.verbs if v.en == "go")
        if kind == "when":
            wh_en, wh_de = "When", "Wann"
        else:
            c.place = None
            wh_en, wh_de = "Where", ("Wohin" if kind == "where_to" else "Wo")
        aux = "did" if c.tense == "past" else ("does" if c.subj.person == "3sg" else "do")
        en = " ".join([wh_en, aux, c.subj.en(), c.verb.en] + c.en_rest())
        return en + "?", lambda s: wh_question(wh_de, c, s)

    def frame_that(self, rng):
        en_m, de_m = rng.choice(THAT_MATRIX[self.domain])
        c = self.clause(rng, neg_p=0.1, time_p=0.25)
        return f"{en_m} {c.en_statement()}", lambda s: f"{de_m}, dass {c.de_sub(s)}"

    def frame_because(self, rng):
        """'The boy is happy because he found the ball' -> 'Der Junge ist glücklich, weil er ...'"""
        noun = self.noun(rng, frozenset("pa"))
        while noun.pron == "-":
            noun = self.noun(rng, frozenset("pa"))
        subj = NP(rng.choice(["the", "my", "our"]), noun)
        adj_en, adj_de, reason = rng.choice(BECAUSE)
        # The German pronoun follows grammatical gender: das Mädchen -> es, die Katze -> sie.
        pron = NP("pron", pron=noun.pron, gender=noun.gender)
        c = reason(self, rng, pron)
        en = f"{subj.en()} is {adj_en} because {c.en_statement()}"
        return en, lambda s: f"{subj.de('nom', s)} ist {adj_de}, weil {c.de_sub(s)}"

    def frame_copula(self, rng):
        noun = self.noun(rng, frozenset("oafp"))
        adjs = [a for a in self.lex.adjs if a.tags & noun.tags and a.predicative]
        pred = rng.choice(adjs)
        attr = self.adj_for(rng, noun, 0.3)
        if attr is pred:
            attr = None
        plural = rng.random() < 0.2
        subj = NP(rng.choice(["the", "the", "my", "our"]), noun, attr, plural=plural)
        past = rng.random() < 0.3
        neg = rng.random() < 0.15
        be_en = ("were" if plural else "was") if past else ("are" if plural else "is")
        be_de = ("waren" if plural else "war") if past else ("sind" if plural else "ist")
        en = f"{subj.en()} {be_en}{' not' if neg else ''} {pred.en}"
        return en, lambda s: (f"{subj.de('nom', s)} {be_de}{' nicht' if neg else ''} "
                              f"{syn(pred.de_pred, s)}")

    def frame_have(self, rng):
        subj = self.np(rng, frozenset("p"), subject=True, allow_plural=False)
        obj_noun = self.noun(rng, frozenset("oaf"))
        adj = self.adj_for(rng, obj_noun, 0.5)
        obj = (NP("num", obj_noun, adj, plural=True, num=rng.randint(2, 12))
               if rng.random() < 0.6 else NP("a", obj_noun, adj))
        past = rng.random() < 0.3
        p = subj.person
        en_v = "had" if past else ("has" if p == "3sg" else "have")
        de_v = ("hatte" if p in ("1sg", "3sg") else "hatten") if past else \
            {"1sg": "habe", "3sg": "hat"}.get(p, "haben")
        return (f"{subj.en()} {en_v} {obj.en(obj=True)}",
                lambda s: f"{subj.de('nom', s)} {de_v} {obj.de('acc', s)}")

    def frame_with(self, rng):
        v = self.verb(rng, ("-",))
        subj = self.subject_for(rng, v, allow_plural=False)
        partner = self.np(rng, subj_tags(subj) | frozenset("a"), exclude=subj.noun, adj_p=0.2)
        tense = rng.choice(["pres", "past"])
        c = Clause(subj, v, tense, (), self.place(rng, subj, 0.6), with_np=partner,
                   time=self.time(rng, tense, 0.2))
        return c.en_statement(), c.de_main

    def frame_modal(self, rng):
        c = self.clause(rng, tense="pres", neg_p=0.1, time_p=0.25)
        c.modal = rng.choice(MODALS)
        if c.neg and c.modal[0] == "wants to":
            c.neg = False
            if c.objs and c.objs[-1].det == "no":
                o = c.objs[-1]
                c.objs = c.objs[:-1] + (NP("a", o.noun, o.adj),)
        return c.en_statement(), c.de_main

    def frame_coord(self, rng):
        tense = rng.choice(["pres", "past"])
        a = self.clause(rng, tense=tense, time_p=0.0, place_p=0.2)
        b = self.clause(rng, tense=tense, time_p=0.0, place_p=0.2)
        if rng.random() < 0.5:
            return (f"{a.en_statement()} and {b.en_statement()}",
                    lambda s: f"{a.de_main(s)} und {b.de_main(s)}")
        return (f"{a.en_statement()} but {b.en_statement()}",
                lambda s: f"{a.de_main(s)}, aber {b.de_main(s)}")


def wh_question(wh: str, c: Clause, style: Style, subject: bool = True) -> str:
    """Was/Wer/Wen/Wem/Wo/Wohin/Wann + finite verb (+ subject) + middle field + rest + '?'."""
    fin, rest = c.de_verbs(style)
    words = [wh, fin] + ([c.subj.de("nom", style)] if subject else []) + c.de_mid(style)
    return " ".join(words + ([rest] if rest else [])) + "?"


def subj_tags(np_: NP) -> frozenset:
    return np_.noun.tags if np_.noun is not None else frozenset("p")


def finish(s: str) -> str:
    s = cap(s)
    return s if s.endswith("?") else s + "."


def _reason_found(g: Generator, rng: random.Random, pron: NP) -> Clause:
    pool = ["find", "buy", "see"] if pron.pron != "it" else ["find", "see"]
    name = rng.choice(pool)
    v = next(x for x in g.lex.verbs if x.en == name)
    obj = g.np(rng, frozenset("o") if v.en != "see" else frozenset("pa"), allow_plural=False)
    return Clause(pron, v, "past", (obj,))


def _reason_tired(g: Generator, rng: random.Random, pron: NP) -> Clause:
    pool = ["work", "play", "dance", "swim"] if pron.pron != "it" else ["play", "swim"]
    name = rng.choice(pool)
    v = next(x for x in g.lex.verbs if x.en == name)
    place = rng.choice([p for p in g.lex.places if ("a" if pron.pron == "it" else "p") in p.tags])
    return Clause(pron, v, "past", (), place if rng.random() < 0.7 else None)


def _reason_lost(g: Generator, rng: random.Random, pron: NP) -> Clause:
    v = next(x for x in g.lex.verbs if x.en == "lose")
    noun = g.noun(rng, frozenset("o"))
    # his/her/its: the owner's gender decides sein/ihr in German (das Mädchen -> sein).
    return Clause(pron, v, "past", (NP("poss", noun, owner=pron.gender, owner_en=POSS_EN[pron.pron]),))


def _reason_plays(g: Generator, rng: random.Random, pron: NP) -> Clause:
    v = next(x for x in g.lex.verbs if x.en in ("play",))
    place = rng.choice([p for p in g.lex.places if ("a" if pron.pron == "it" else "p") in p.tags])
    return Clause(pron, v, "pres", (), place)


BECAUSE = [("happy", "glücklich", _reason_found), ("tired", "müde", _reason_tired),
           ("sad", "traurig", _reason_lost), ("happy", "glücklich", _reason_plays)]

THAT_MATRIX = {
    "target": [("I think that", "Ich glaube"), ("she says that", "Sie sagt"),
               ("he knows that", "Er weiß"), ("we hope that", "Wir hoffen")],
    "pretrain": [("I know that", "Ich weiß"), ("they say that", "Sie sagen"),
                 ("he believes that", "Er glaubt"), ("she hopes that", "Sie hofft")],
}

# (frame, weight) per domain. The target domain asks wh-questions and gives weil-clauses twice as
# often as pretraining; pretraining also has modals and coordination, which the target never shows.
FRAMES = {
    "target": [("statement", 8), ("yes_no", 2), ("wh", 2), ("that", 1.5), ("because", 1.5),
               ("copula", 1.5), ("have", 1.5), ("with", 1)],
    "pretrain": [("statement", 8), ("yes_no", 2), ("wh", 1), ("that", 1.5), ("because", 0.75),
                 ("copula", 1.5), ("have", 1.5), ("with", 1), ("modal", 2), ("coord", 1)],
}


def sentence_variants(n: int, seed: int, domain: str = "target") -> list[tuple[str, str, list[str]]]:
    """n distinct (English, reference German, every distinct correct German rendering with the
    reference first), the same for the same (seed, domain). The reference is one rendering drawn
    at random, as one translator would pick one; that draw has its own rng keyed by the sentence,
    so the English sentences are those the canonical renderings alone would give."""
    rng = random.Random(f"ast-{domain}-{seed}")
    gen = Generator(domain)
    out = []
    for en, des in distinct(n, lambda: gen.variants(rng), key=lambda pair: pair[0],
                            what="grammar sentences"):
        ref = random.Random(f"ast-reference-{domain}-{seed}-{en}").choice(des)
        out.append((en, ref, [ref] + [d for d in des if d != ref]))
    return out


def sentence_pairs(n: int, seed: int, domain: str = "target") -> list[tuple[str, str]]:
    """n distinct (English, reference German) pairs of sentence_variants."""
    return [(en, ref) for en, ref, _ in sentence_variants(n, seed, domain)]


def word_lists(n: int, seed: int, domain: str = "target", max_words: int = 3) -> list[str]:
    """n distinct lists of 1..max_words English words of the domain's sentences, in random order
    (no grammar, so a listener must hear every word: the first lessons of a speech model)."""
    vocab = sorted({w.strip(".,?!").lower() for en, _ in sentence_pairs(1000, seed + 1000, domain)
                    for w in en.split()} - {""})
    rng = random.Random(f"words-{domain}-{seed}")
    return distinct(n, lambda: " ".join(rng.choice(vocab) for _ in range(rng.randint(1, max_words))),
                    key=lambda text: text, what="word lists")


def distinct(n: int, draw, key, what: str) -> list:
    """The first n draws with distinct keys (up to 50 n draws), in draw order."""
    seen, out = set(), []
    for _ in range(n * 50):
        if len(out) == n:
            break
        item = draw()
        if key(item) not in seen:
            seen.add(key(item))
            out.append(item)
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct {what} of {n} asked for")
    return out
