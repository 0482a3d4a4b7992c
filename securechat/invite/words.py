"""Invite codes: ``<nameplate>-<word>-<word>``, and the PGP word list they use (core).

Why these words: the PGP word list (Juola and Zimmermann, 1995) was made to be read
aloud over a telephone. It has two lists of 256 words, "even" words of two syllables
and "odd" words of three, chosen to sound unlike each other; a code takes its first
word from the even list and its second from the odd list, 8 random bits each (16 in
all). Because the lists are disjoint, a swapped, misheard or mistyped word is caught
on the accepting side *before* it connects, so a typo never burns an invite.

The SPAKE2 password is the whole normalised code, nameplate included, as UTF-8
(``docs/protocol.md`` section 7.2). Input is case-insensitive and may separate
the three parts with hyphens or spaces.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from securechat.errors import UsageError
from securechat.wire import MAX_NAMEPLATE

# Byte value i is EVEN_WORDS[i] (first word) or ODD_WORDS[i] (second word).
EVEN_WORDS: Final[tuple[str, ...]] = (
    "aardvark", "absurd", "accrue", "acme", "adrift", "adult", "afflict", "ahead", "aimless",
    "algol", "allow", "alone", "ammo", "ancient", "apple", "artist", "assume", "athens",
    "atlas", "aztec", "baboon", "backfield", "backward", "banjo", "beaming", "bedlamp",
    "beehive", "beeswax", "befriend", "belfast", "berserk", "billiard", "bison", "blackjack",
    "blockade", "blowtorch", "bluebird", "bombast", "bookshelf", "brackish", "breadline",
    "breakup", "brickyard", "briefcase", "burbank", "button", "buzzard", "cement", "chairlift",
    "chatter", "checkup", "chisel", "choking", "chopper", "christmas", "clamshell", "classic",
    "classroom", "cleanup", "clockwork", "cobra", "commence", "concert", "cowbell", "crackdown",
    "cranky", "crowfoot", "crucial", "crumpled", "crusade", "cubic", "dashboard", "deadbolt",
    "deckhand", "dogsled", "dragnet", "drainage", "dreadful", "drifter", "dropper", "drumbeat",
    "drunken", "dupont", "dwelling", "eating", "edict", "egghead", "eightball", "endorse",
    "endow", "enlist", "erase", "escape", "exceed", "eyeglass", "eyetooth", "facial", "fallout",
    "flagpole", "flatfoot", "flytrap", "fracture", "framework", "freedom", "frighten",
    "gazelle", "geiger", "glitter", "glucose", "goggles", "goldfish", "gremlin", "guidance",
    "hamlet", "highchair", "hockey", "indoors", "indulge", "inverse", "involve", "island",
    "jawbone", "keyboard", "kickoff", "kiwi", "klaxon", "locale", "lockup", "merit", "minnow",
    "miser", "mohawk", "mural", "music", "necklace", "neptune", "newborn", "nightbird",
    "oakland", "obtuse", "offload", "optic", "orca", "payday", "peachy", "pheasant", "physique",
    "playhouse", "pluto", "preclude", "prefer", "preshrunk", "printer", "prowler", "pupil",
    "puppy", "python", "quadrant", "quiver", "quota", "ragtime", "ratchet", "rebirth", "reform",
    "regain", "reindeer", "rematch", "repay", "retouch", "revenge", "reward", "rhythm",
    "ribcage", "ringbolt", "robust", "rocker", "ruffled", "sailboat", "sawdust", "scallion",
    "scenic", "scorecard", "scotland", "seabird", "select", "sentence", "shadow", "shamrock",
    "showgirl", "skullcap", "skydive", "slingshot", "slowdown", "snapline", "snapshot",
    "snowcap", "snowslide", "solo", "southward", "soybean", "spaniel", "spearhead", "spellbind",
    "spheroid", "spigot", "spindle", "spyglass", "stagehand", "stagnate", "stairway",
    "standard", "stapler", "steamship", "sterling", "stockman", "stopwatch", "stormy", "sugar",
    "surmount", "suspense", "sweatband", "swelter", "tactics", "talon", "tapeworm", "tempest",
    "tiger", "tissue", "tonic", "topmost", "tracker", "transit", "trauma", "treadmill",
    "trojan", "trouble", "tumor", "tunnel", "tycoon", "uncut", "unearth", "unwind", "uproot",
    "upset", "upshot", "vapor", "village", "virus", "vulcan", "waffle", "wallet", "watchword",
    "wayside", "willow", "woodlark", "zulu",
)
ODD_WORDS: Final[tuple[str, ...]] = (
    "adroitness", "adviser", "aftermath", "aggregate", "alkali", "almighty", "amulet",
    "amusement", "antenna", "applicant", "apollo", "armistice", "article", "asteroid",
    "atlantic", "atmosphere", "autopsy", "babylon", "backwater", "barbecue", "belowground",
    "bifocals", "bodyguard", "bookseller", "borderline", "bottomless", "bradbury", "bravado",
    "brazilian", "breakaway", "burlington", "businessman", "butterfat", "camelot", "candidate",
    "cannonball", "capricorn", "caravan", "caretaker", "celebrate", "cellulose", "certify",
    "chambermaid", "cherokee", "chicago", "clergyman", "coherence", "combustion", "commando",
    "company", "component", "concurrent", "confidence", "conformist", "congregate", "consensus",
    "consulting", "corporate", "corrosion", "councilman", "crossover", "crucifix", "cumbersome",
    "customer", "dakota", "decadence", "december", "decimal", "designing", "detector",
    "detergent", "determine", "dictator", "dinosaur", "direction", "disable", "disbelief",
    "disruptive", "distortion", "document", "embezzle", "enchanting", "enrollment",
    "enterprise", "equation", "equipment", "escapade", "eskimo", "everyday", "examine",
    "existence", "exodus", "fascinate", "filament", "finicky", "forever", "fortitude",
    "frequency", "gadgetry", "galveston", "getaway", "glossary", "gossamer", "graduate",
    "gravity", "guitarist", "hamburger", "hamilton", "handiwork", "hazardous", "headwaters",
    "hemisphere", "hesitate", "hideaway", "holiness", "hurricane", "hydraulic", "impartial",
    "impetus", "inception", "indigo", "inertia", "infancy", "inferno", "informant", "insincere",
    "insurgent", "integrate", "intention", "inventive", "istanbul", "jamaica", "jupiter",
    "leprosy", "letterhead", "liberty", "maritime", "matchmaker", "maverick", "medusa",
    "megaton", "microscope", "microwave", "midsummer", "millionaire", "miracle", "misnomer",
    "molasses", "molecule", "montana", "monument", "mosquito", "narrative", "nebula",
    "newsletter", "norwegian", "october", "ohio", "onlooker", "opulent", "orlando",
    "outfielder", "pacific", "pandemic", "pandora", "paperweight", "paragon", "paragraph",
    "paramount", "passenger", "pedigree", "pegasus", "penetrate", "perceptive", "performance",
    "pharmacy", "phonetic", "photograph", "pioneer", "pocketful", "politeness", "positive",
    "potato", "processor", "provincial", "proximate", "puberty", "publisher", "pyramid",
    "quantity", "racketeer", "rebellion", "recipe", "recover", "repellent", "replica",
    "reproduce", "resistor", "responsive", "retraction", "retrieval", "retrospect", "revenue",
    "revival", "revolver", "sandalwood", "sardonic", "saturday", "savagery", "scavenger",
    "sensation", "sociable", "souvenir", "specialist", "speculate", "stethoscope", "stupendous",
    "supportive", "surrender", "suspicious", "sympathy", "tambourine", "telephone", "therapist",
    "tobacco", "tolerance", "tomorrow", "torpedo", "tradition", "travesty", "trombonist",
    "truncated", "typewriter", "ultimate", "undaunted", "underfoot", "unicorn", "unify",
    "universe", "unravel", "upcoming", "vacancy", "vagabond", "vertigo", "virginia", "visitor",
    "vocalist", "voyager", "warranty", "waterloo", "whimsical", "wichita", "wilmington",
    "wyoming", "yesteryear", "yucatan",
)
# SHA-256 of the 512 words joined by spaces, even list first (protocol 7.2)
WORDS_SHA256: Final = "e732a7c847b5ceea625e50b7dbd670d080d4b681a606c8805d588ed1848653de"
CODE_BITS: Final = 16  # one byte per word: the chance of a single guess is 1 in 65,536
_EVEN_INDEX: Final = {w: i for i, w in enumerate(EVEN_WORDS)}
_ODD_INDEX: Final = {w: i for i, w in enumerate(ODD_WORDS)}
_SEPARATORS: Final = re.compile(r"[\s-]+")
_FORM: Final = "NUMBER-WORD-WORD, e.g. 7-tiger-universe"


def words_digest() -> str:
    """SHA-256 of the word lists, so a second implementation can check its copy."""
    return hashlib.sha256(" ".join(EVEN_WORDS + ODD_WORDS).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Code:
    """One invite code; ``str(code)`` is its one normalised spelling."""

    nameplate: int
    even: str
    odd: str

    def __str__(self) -> str:
        return f"{self.nameplate}-{self.even}-{self.odd}"

    @property
    def password(self) -> bytes:
        """What SPAKE2 gets: the whole normalised code (the nameplate is bound too)."""
        return str(self).encode("utf-8")


def make_code(nameplate: int, rng: Callable[[int], bytes]) -> Code:
    """A fresh code for ``nameplate`` from two random bytes."""
    if not 1 <= nameplate <= MAX_NAMEPLATE:
        raise ValueError(f"nameplate {nameplate} outside 1..{MAX_NAMEPLATE}")
    pick = rng(2)
    return Code(nameplate, EVEN_WORDS[pick[0]], ODD_WORDS[pick[1]])


def parse_code(text: str) -> Code:
    """The code the user typed, or a UsageError that says what is wrong with it."""
    parts = [p for p in _SEPARATORS.split(text.strip().lower()) if p]
    if len(parts) != 3:
        raise UsageError(f"{text.strip()!r} is not an invite code: expected {_FORM}")
    number, first, second = parts
    if not number.isdigit() or number.startswith("0") or not int(number) <= MAX_NAMEPLATE:
        raise UsageError(
            f"{text.strip()!r} is not an invite code: it starts with the invite's number "
            f"({_FORM})"
        )
    if first in _ODD_INDEX and second in _EVEN_INDEX:
        raise UsageError(f"the words of {text.strip()!r} are in the wrong order: did you mean "
                         f"{number}-{second}-{first}?")
    for word, index, which in ((first, _EVEN_INDEX, "first"), (second, _ODD_INDEX, "second")):
        if word not in index:
            raise UsageError(f"{word!r} is not a possible {which} word of an invite code"
                             f"{_suggest(word, index)}; check the code with whoever gave it")
    return Code(int(number), first, second)


def _suggest(word: str, index: dict[str, int]) -> str:
    close = difflib.get_close_matches(word, list(index), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""
