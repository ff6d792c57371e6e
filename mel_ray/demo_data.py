"""A generated MEL release in MIMIC's format, small but shaped like the real ones.

What makes it useful for testing the pipeline rather than just the parser:
- names are ambiguous on purpose (the paper's failure analysis, App. C/D: same-name entities dominate the
  errors), so a name-only linker fails and attributes/images must do the work;
- attributes are "property: value" statements with a few very frequent ones ("instance of: human") and a
  long tail (years, awards), which is what JD-CCL's Jaccard mining has to cope with;
- images are drawn from the attributes (shape from type, colours and pattern from attribute values), and
  mention images are perturbed views with distractors, so visual similarity is informative but noisy;
- about 30% of entities come from a pool shared by all seeds with identical fields, so merging two demo
  releases (WikiDM/WikiDR style) has duplicates to resolve.

Layout written (as in the cleaned WikiMEL/RichpediaMEL/WikiDiverse releases used by MIMIC):
    kb_entity.json  qid2id.json  demo_{train,dev,test}.json  kb_image/  mention_image/  .demo_data.json
`type` is always "entity" because MIMIC's own loader only accepts that value; the entity's category is in
`attr` ("instance of: ...") and `desc`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
import unicodedata
import zlib
from collections import Counter
from functools import partial
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw

from mel_ray import storage
from mel_ray.errors import UsageError

MARKER = ".demo_data.json"      # written last; hidden so globbing ingesters do not take it for a split
FORMAT_VERSION = 1              # bump when the generator changes what a seed produces
SHARED_FRACTION = 0.3           # share of each KB drawn from the pool common to all seeds
UNIVERSE = 20240611             # fixed: entities of the shared pool must not depend on the dataset seed
IMG = 64                        # image side in pixels
NO_IMAGE_RATE = 0.15
NIL_RATE = 0.02
JPG_FALLBACK_RATE = 0.05        # imgPath says .png, file is <stem>.jpg (MIMIC converted mention images)
MIN_COLLISION_RATE = 0.22
SPLITS = (("train", 0.7), ("dev", 0.1), ("test", 0.2))

# ---------------------------------------------------------------------------------------------- vocabulary

COUNTRIES = ["United States", "United Kingdom", "France", "Germany", "Italy", "Japan", "Norway", "Brazil",
             "India", "Canada", "Spain", "Australia", "Mexico", "Sweden", "Poland", "Egypt", "Argentina",
             "Kenya", "Vietnam", "Iceland", "Portugal", "Chile", "Nigeria", "Finland", "Peru", "Greece",
             "Ireland", "South Korea", "Türkiye", "New Zealand"]
CITY_COUNTRY = {"London": "United Kingdom", "Paris": "France", "Berlin": "Germany", "Rome": "Italy",
                "Tokyo": "Japan", "Oslo": "Norway", "São Paulo": "Brazil", "Mumbai": "India", "Toronto": "Canada",
                "Madrid": "Spain", "Sydney": "Australia", "Kraków": "Poland", "Malmö": "Sweden", "Cairo": "Egypt",
                "Córdoba": "Argentina", "Nairobi": "Kenya", "Hanoi": "Vietnam", "Reykjavík": "Iceland",
                "Lisbon": "Portugal", "Santiago": "Chile", "Lagos": "Nigeria", "Tromsø": "Norway", "Lima": "Peru",
                "Athens": "Greece", "Dublin": "Ireland", "Seoul": "South Korea", "Ålesund": "Norway",
                "Wellington": "New Zealand", "Besançon": "France", "Boston": "United States",
                "Glasgow": "United Kingdom", "Lyon": "France", "Munich": "Germany", "Osaka": "Japan",
                "Bergen": "Norway", "Helsinki": "Finland", "Istanbul": "Türkiye", "Chicago": "United States"}
CITIES = list(CITY_COUNTRY)
LANGUAGES = ["English", "French", "German", "Spanish", "Italian", "Japanese", "Norwegian", "Portuguese",
             "Hindi", "Polish", "Swedish", "Arabic", "Korean", "Greek", "Icelandic", "Finnish", "Turkish"]
FIRST = ["John", "Mary", "Peter", "Anna", "Michael", "Sarah", "David", "Laura", "James", "Emma", "Paul",
         "Maria", "Thomas", "Julia", "Robert", "Sophie", "William", "Helen", "George", "Clara", "Søren",
         "Zoë", "José", "Björn", "Chloé", "Łukasz", "Ingrid", "Kenji", "Amara", "Dmitri", "Aoife", "Rafael"]
LAST = ["Smith", "Johnson", "Brown", "Murphy", "Moore", "Marshall", "Thompson", "Baird", "Edwards",
        "Gallagher", "Ryan", "Holm", "Larsen", "Dubois", "Müller", "Rossi", "Tanaka", "Silva", "Nowak",
        "García", "O'Brien", "Kowalski", "Nakamura", "Haugen", "Lindqvist", "Okafor", "Novak", "Fischer",
        "Costa", "Andersen", "Walsh", "Bianchi"]
UNIVERSITIES = ["Harvard University", "University of Oxford", "Sorbonne University", "University of Oslo",
                "Kyoto University", "University of Cambridge", "Yale University", "University of Bologna",
                "Heidelberg University", "University of São Paulo", "Trinity College Dublin",
                "Jagiellonian University", "Uppsala University", "University of Toronto"]
AWARDS = ["Nobel Prize in Literature", "Academy Award for Best Actor", "Grammy Award", "Pulitzer Prize",
          "Order of Saint Olav", "Légion d'honneur", "Booker Prize", "Turner Prize", "Ballon d'Or",
          "Golden Lion", "Praemium Imperiale", "Pritzker Prize", "Palme d'Or", "Polar Music Prize"]
PARTIES = ["Labour Party", "Conservative Party", "Green Party", "Liberal Party", "Social Democratic Party",
           "Christian Democratic Union", "Democratic Party", "Republican Party"]
GENRES_MUSIC = ["rock music", "pop music", "jazz", "heavy metal", "folk music", "hip hop", "electronic music",
                "punk rock", "indie rock", "blues", "soul music", "black metal", "bossa nova", "synth-pop"]
GENRES_FILM = ["drama film", "comedy film", "thriller film", "horror film", "documentary film",
               "science fiction film", "romance film", "western film", "animated film", "war film",
               "musical film", "crime film"]
LABELS = ["Columbia Records", "EMI", "Sub Pop", "Warp Records", "Island Records", "Rough Trade", "Nuclear Blast",
          "Blue Note Records", "Motown", "Def Jam Recordings", "4AD", "Matador Records"]
STUDIOS = ["Warner Bros", "Universal Pictures", "Gaumont", "Toho", "Nordisk Film", "Paramount Pictures",
           "Studio Ghibli", "Pathé", "A24", "Constantin Film"]
STYLES = ["Gothic architecture", "Baroque architecture", "Art Nouveau", "Brutalist architecture",
          "Neoclassical architecture", "Romanesque architecture", "Modernist architecture", "Art Deco",
          "Renaissance architecture", "Tudor architecture", "Postmodern architecture"]
HERITAGE = ["Grade I listed building", "Grade II listed building", "World Heritage Site",
            "National Historic Landmark", "monument historique", "cultural heritage monument"]
MATERIALS = ["brick", "limestone", "granite", "concrete", "steel", "timber", "marble", "sandstone", "glass"]
WATER = ["Danube", "Thames", "Rhine", "Seine", "Baltic Sea", "Lake Geneva", "Pacific Ocean", "Atlantic Ocean",
         "Mediterranean Sea", "Lake Victoria", "Mekong", "Amazon River", "Lake Ontario", "North Sea"]
ZONES = ["UTC+1", "UTC+0", "UTC-5", "UTC+2", "UTC+9", "UTC-3", "UTC+8", "UTC-8", "UTC+10", "UTC+3"]
GENERA = ["Panthera", "Canis", "Felis", "Ursus", "Aquila", "Corvus", "Parus", "Latrodectus", "Danaus",
          "Vanessa", "Salmo", "Rana", "Bufo", "Passer", "Turdus", "Vulpes", "Lutra", "Phoca", "Apis", "Bombus"]
IUCN = ["Least Concern", "Near Threatened", "Vulnerable", "Endangered", "Critically Endangered",
        "Data Deficient"]
COLOURS = ["black", "brown", "red", "orange", "yellow", "green", "blue", "grey", "white", "purple", "golden"]
HABITATS = ["forest", "grassland", "wetland", "desert", "tundra", "coral reef", "mountains", "river banks"]
SHIP_CLASSES = ["Nimitz-class aircraft carrier", "Type 45 destroyer", "cruise ship", "container ship",
                "ocean liner", "research vessel", "frigate", "icebreaker", "sailing ship", "ferry"]
SHIPYARDS = ["Harland and Wolff", "Fincantieri", "Meyer Werft", "Hyundai Heavy Industries", "Kockums",
             "Chantiers de l'Atlantique", "Newport News Shipbuilding", "Ulstein Group"]
OPERATORS = ["Royal Navy", "United States Navy", "Cunard Line", "Hurtigruten", "Maersk", "Carnival Cruise Line",
             "Norwegian Coastal Administration", "Stena Line"]
OCCUPATIONS = ["politician", "actor", "singer", "painter", "footballer", "writer", "journalist", "composer",
               "film director", "architect", "physicist", "poet", "sculptor", "engineer", "historian",
               "photographer", "chess player", "diplomat", "cyclist", "chef"]
WORDS_A = ["Black", "Red", "Silent", "Golden", "Broken", "Electric", "Midnight", "Crystal", "Iron", "Velvet",
           "Northern", "Wild", "Hidden", "Burning", "Frozen", "Lonely", "Secret", "Blue", "Last", "Little"]
WORDS_N = ["River", "Heart", "Storm", "Garden", "Mirror", "Crown", "Wolf", "Harbor", "Star", "Shadow", "Tide",
           "Lantern", "Empire", "Island", "Machine", "Horizon", "Desert", "Orchard", "Echo", "Parade"]
PLACE_A = ["Spring", "Green", "Fair", "Oak", "Ash", "Mill", "River", "North", "Bel", "Port", "Lake", "Elm",
           "Stone", "Wood", "Clear", "Mount", "West", "Glen"]
PLACE_B = ["field", "ville", "ton", "burg", "haven", "ford", "mont", "port", "dale", "wick", "bury", "view"]
BUILDING_KINDS = {"Tower": "tower", "Cathedral": "cathedral", "Castle": "castle", "Museum": "museum",
                  "Bridge": "bridge", "Palace": "palace", "Library": "library", "Hall": "concert hall",
                  "Abbey": "abbey", "Theatre": "theatre", "Church": "church building", "House": "house"}
ANIMAL_A = ["common", "greater", "lesser", "spotted", "red", "black", "golden", "Arctic", "eastern", "pygmy",
            "crested", "striped"]
ANIMAL_N = ["woodpecker", "fox", "otter", "salamander", "heron", "moth", "beetle", "seal", "shrew", "finch",
            "toad", "bat", "trout", "spider", "butterfly", "owl"]
SHIP_PREFIX = ["HMS", "USS", "MS", "SS", "RV", "HNoMS"]

# Real ambiguous names from the paper's App. D (and a few in the same spirit): reused across entities and
# across types, like "Black Widow" (film, band, spider).
HOT_NAMES = {
    "person": ["John Murphy", "Greg Smith", "Steve Smith", "Gordon Brown", "Paul Ryan", "John Baird",
               "John Edwards", "Stephen Smith", "Michael Gallagher", "Peter Marshall", "Jack Thompson",
               "Scott Brown", "William Johnson", "Brian Moore"],
    "city": ["Washington County", "Monroe County", "Union County", "Wayne County", "Mount Vernon",
             "Burlington", "La Grange", "Grafton", "Greenfield", "Arcadia", "San Fernando", "Lake County",
             "Polk County", "Fayette County"],
    "building": ["Saint John's Episcopal Church", "Government House", "Mount Vernon", "White City",
                 "Victoria Hall", "Union Station"],
    "band": ["Masquerade", "Camera Obscura", "Equinox", "Supernova", "Scarecrow", "Black Widow", "Red Line"],
    "film": ["Black Friday", "Vanity Fair", "Oliver Twist", "Inside Out", "Lockdown", "Alice in Wonderland",
             "Moby Dick", "Woodstock", "Independence Day", "Homecoming", "Scarecrow", "Black Widow"],
    "animal": ["Black Widow", "Monarch", "Emperor", "Red Admiral", "Grayling"],
    "ship": ["Equinox", "Supernova", "Independence", "Victoria", "Ceres", "Arcadia"],
}
HOT_NAME_RATE = 0.15

# Property table per type: (property, probability present, value source, max values). A source is a list
# (drawn Zipf-skewed, so early items are frequent) or "year:LO:HI" / "person" / "city".
# `clue` properties may appear in mention sentences; `look` = (fill colour, pattern, background) sources.
TYPES = {
    "person": {
        "weight": 8, "shape": "circle", "instance": ["human"],
        "props": [("sex or gender", 0.95, ["male", "female"], 1),
               ("country of citizenship", 0.9, COUNTRIES, 1),
               ("occupation", 1.0, OCCUPATIONS, 2),
               ("date of birth", 0.8, "year:1820:2004", 1),
               ("place of birth", 0.5, "city", 1),
               ("educated at", 0.3, UNIVERSITIES, 1),
               ("languages spoken, written or signed", 0.4, LANGUAGES, 2),
               ("award received", 0.15, AWARDS, 2),
               ("member of political party", 0.1, PARTIES, 1)],
        "look": ("occupation", "country of citizenship", "place of birth")},
    "city": {
        "weight": 3, "shape": "square", "instance": ["city", "town", "county seat"],
        "props": [("country", 1.0, COUNTRIES, 1),
               ("located in time zone", 0.7, ZONES, 1),
               ("inception", 0.5, "year:800:1950", 1),
               ("located next to body of water", 0.4, WATER, 1),
               ("twinned administrative body", 0.3, "city", 2),
               ("head of government", 0.2, "person", 1)],
        "look": ("country", "located next to body of water", "located in time zone")},
    "building": {
        "weight": 2, "shape": "triangle", "instance": ["building"],   # or from the name ("Tower" -> tower)
        "props": [("country", 1.0, COUNTRIES, 1),
               ("located in the administrative territorial entity", 0.8, "city", 1),
               ("architectural style", 0.8, STYLES, 1),
               ("inception", 0.6, "year:1100:2015", 1),
               ("heritage designation", 0.35, HERITAGE, 1),
               ("made from material", 0.5, MATERIALS, 2),
               ("architect", 0.3, "person", 1)],
        "look": ("architectural style", "made from material", "country")},
    "band": {
        "weight": 2, "shape": "star", "instance": ["musical group", "rock band"],
        "props": [("genre", 1.0, GENRES_MUSIC, 2),
               ("country of origin", 0.9, COUNTRIES, 1),
               ("location of formation", 0.5, "city", 1),
               ("inception", 0.7, "year:1955:2020", 1),
               ("record label", 0.6, LABELS, 1),
               ("has part(s)", 0.3, "person", 2)],
        "look": ("genre", "record label", "country of origin")},
    "film": {
        "weight": 2, "shape": "rectangle", "instance": ["film"],
        "props": [("genre", 1.0, GENRES_FILM, 2),
               ("director", 0.9, "person", 1),
               ("publication date", 0.9, "year:1910:2023", 1),
               ("country of origin", 0.8, COUNTRIES, 1),
               ("original language of film or TV show", 0.7, LANGUAGES, 1),
               ("cast member", 0.5, "person", 3),
               ("color", 0.5, ["color", "black-and-white"], 1),
               ("distributed by", 0.3, STUDIOS, 1)],
        "look": ("genre", "color", "country of origin")},
    "animal": {
        "weight": 2, "shape": "ellipse", "instance": ["taxon"],
        "props": [("taxon rank", 0.95, ["species", "subspecies"], 1),
               ("parent taxon", 1.0, GENERA, 1),
               ("IUCN conservation status", 0.7, IUCN, 1),
               ("color", 0.6, COLOURS, 2),
               ("habitat", 0.5, HABITATS, 1),
               ("endemic to", 0.2, COUNTRIES, 1)],
        "look": ("color", "habitat", "parent taxon")},
    "ship": {
        "weight": 1, "shape": "boat", "instance": ["ship"],
        "props": [("vessel class", 1.0, SHIP_CLASSES, 1),
               ("country of registry", 0.9, COUNTRIES, 1),
               ("manufacturer", 0.6, SHIPYARDS, 1),
               ("service entry", 0.6, "year:1890:2022", 1),
               ("operator", 0.5, OPERATORS, 1),
               ("home port", 0.4, "city", 1)],
        "look": ("vessel class", "operator", "country of registry")},
}
TYPE_PATTERN = [t for t, spec in TYPES.items() for _ in range(spec["weight"])]   # 20 slots, 8 persons

# How a statement is said in a sentence. Properties missing here ("sex or gender", "instance of",
# "taxon rank") are never used as clues: they do not tell same-name entities apart.
CLUES = {
    "occupation": ["the {v}", "a well-known {v}"], "country of citizenship": ["from {v}"],
    "date of birth": ["born in {v}"], "place of birth": ["born in {v}"], "educated at": ["a graduate of {v}"],
    "languages spoken, written or signed": ["who speaks {v}"], "award received": ["winner of the {v}"],
    "member of political party": ["a member of the {v}"], "country": ["in {v}"],
    "located in time zone": ["in the {v} time zone"], "inception": ["founded in {v}"],
    "located next to body of water": ["next to the {v}"], "twinned administrative body": ["twinned with {v}"],
    "head of government": ["whose mayor is {v}"],
    "located in the administrative territorial entity": ["in {v}"], "architectural style": ["a {v} landmark"],
    "heritage designation": ["listed as a {v}"], "made from material": ["built of {v}"],
    "architect": ["designed by {v}"], "genre": ["known for {v}"], "country of origin": ["from {v}"],
    "location of formation": ["formed in {v}"], "record label": ["signed to {v}"],
    "has part(s)": ["featuring {v}"],
    "director": ["directed by {v}"], "publication date": ["released in {v}"],
    "original language of film or TV show": ["in {v}"], "cast member": ["starring {v}"],
    "color": ["in {v}"], "distributed by": ["distributed by {v}"], "parent taxon": ["of the genus {v}"],
    "IUCN conservation status": ["listed as {v}"], "habitat": ["living in {v}"],
    "endemic to": ["found only in {v}"],
    "vessel class": ["a {v}"], "country of registry": ["registered in {v}"], "manufacturer": ["built by {v}"],
    "service entry": ["in service since {v}"], "operator": ["operated by {v}"], "home port": ["based in {v}"],
}
EVENTS = {
    "person": ["speaks at a press conference", "poses for a portrait", "arrives at the festival",
               "waves to the crowd", "is seen during an interview"],
    "city": ["is seen from the harbour at dawn", "hosts the winter festival", "lies under fresh snow",
             "celebrates its anniversary"],
    "building": ["is lit up at night", "reopens after restoration", "stands in the morning fog",
                 "is crowded with visitors"],
    "band": ["performs live on stage", "poses backstage", "plays the closing set", "announces a new album"],
    "film": ["premieres at the festival", "is shown in a restored print", "opens in cinemas",
             "wins praise from critics"],
    "animal": ["rests on a branch", "was photographed in the wild", "searches for food", "is seen at dusk"],
    "ship": ["leaves the harbour", "is docked for repairs", "sails through the strait", "arrives in port"],
}
INTROS = ["A photo of", "Picture of", "Here is", "Close-up of", "An image showing"]

PALETTE = [(220, 50, 47), (38, 139, 210), (133, 153, 0), (181, 137, 0), (211, 54, 130), (42, 161, 152),
           (108, 113, 196), (203, 75, 22), (30, 30, 30), (240, 240, 240), (120, 80, 40), (0, 90, 60),
           (250, 200, 60), (90, 0, 120), (150, 150, 150), (255, 140, 170)]
BACKGROUNDS = [(250, 246, 227), (210, 230, 250), (225, 245, 220), (245, 225, 225), (235, 235, 235),
               (60, 60, 80), (200, 190, 160), (20, 40, 60)]
PATTERNS = ["solid", "hstripes", "vstripes", "dots", "checker", "diagonal"]


def text_hash(text: str) -> int:
    """Stable small hash (Python's hash() is salted per process, which would break determinism)."""
    return zlib.crc32(text.encode("utf-8"))


def _zipf(rng: np.random.Generator, items: list, a: float = 1.1):
    w = 1.0 / np.arange(1, len(items) + 1) ** a
    return items[int(rng.choice(len(items), p=w / w.sum()))]


def _person_name(rng: np.random.Generator) -> str:
    return f"{_zipf(rng, FIRST, 0.8)} {_zipf(rng, LAST, 0.8)}"


def _value(rng: np.random.Generator, source) -> str:
    if isinstance(source, list):
        return str(_zipf(rng, source))
    if source == "person":
        return _person_name(rng)
    if source == "city":
        return str(_zipf(rng, CITIES, 0.7))
    lo, hi = map(int, source.split(":")[1:])
    return str(int(rng.integers(lo, hi + 1)))


def _name(rng: np.random.Generator, kind: str) -> tuple[str, str | None]:
    """(name, instance-of override). Hot names give cross-entity and cross-type collisions."""
    if rng.random() < HOT_NAME_RATE:
        name = str(rng.choice(HOT_NAMES[kind]))
        return name, ("church building" if kind == "building" and "Church" in name else None)
    if kind == "person":
        return _person_name(rng), None
    if kind == "city":
        return f"{rng.choice(PLACE_A)}{rng.choice(PLACE_B)}", None
    if kind == "building":
        k = str(rng.choice(list(BUILDING_KINDS)))
        base = str(rng.choice(LAST)) if rng.random() < 0.5 else f"{rng.choice(PLACE_A)}{rng.choice(PLACE_B)}"
        return f"{base} {k}", BUILDING_KINDS[k]
    if kind == "band":
        a, n = rng.choice(WORDS_A), rng.choice(WORDS_N)
        return (f"The {a} {n}s" if rng.random() < 0.5 else f"{a} {n}"), None
    if kind == "film":
        a, n = rng.choice(WORDS_A), rng.choice(WORDS_N)
        return (f"The {n} of {rng.choice(CITIES)}" if rng.random() < 0.3 else f"{a} {n}"), None
    if kind == "animal":
        return f"{rng.choice(ANIMAL_A)} {rng.choice(ANIMAL_N)}".capitalize(), None
    return f"{rng.choice(SHIP_PREFIX)} {rng.choice(WORDS_N + WORDS_A)}", None


def _make_entity(u: int, kind: str) -> dict:
    """Entity number `u` of the universe: depends only on (u, kind), never on the dataset seed."""
    rng = np.random.default_rng([UNIVERSE, u])
    spec = TYPES[kind]
    name, instance = _name(rng, kind)
    attrs: list[tuple[str, str]] = [("instance of", instance or str(rng.choice(spec["instance"])))]
    for prop, p, source, most in spec["props"]:
        if rng.random() < p:
            values = {_value(rng, source) for _ in range(int(rng.integers(1, most + 1)))}
            attrs.extend((prop, v) for v in sorted(values))
    city = _first(attrs, "located in the administrative territorial entity")
    if city:   # keep "country" consistent with the city the building stands in
        attrs = [(p, CITY_COUNTRY[city] if p == "country" else v) for p, v in attrs]
    return {"u": u, "kind": kind, "qid": f"Q{u}", "name": name, "attrs": attrs,
            "n_images": int(rng.choice([0, 1, 2], p=[0.06, 0.7, 0.24])), "jpg": bool(rng.random() < 0.2)}


def _first(attrs: list[tuple[str, str]], prop: str) -> str:
    return next((v for p, v in attrs if p == prop), "")


def _description(e: dict) -> str:
    a, kind = e["attrs"], e["kind"]
    get = partial(_first, a)
    if kind == "person":
        occ = get("occupation")
        born = f", born {get('date of birth')}" if get("date of birth") else ""
        where = f" from {get('country of citizenship')}" if get("country of citizenship") else ""
        return f"{occ}{where}{born}"
    if kind == "city":
        return f"{get('instance of')} in {get('country')}"
    if kind == "building":
        where = get("located in the administrative territorial entity") or get("country")
        return f"{get('instance of')} in {where}"
    if kind == "band":
        return f"{get('genre')} band" + (f" from {get('country of origin')}" if get("country of origin") else "")
    if kind == "film":
        year = get("publication date")
        by = f" directed by {get('director')}" if get("director") else ""
        return f"{year + ' ' if year else ''}{get('genre')}{by}"
    if kind == "animal":
        return f"{get('taxon rank') or 'species'} of the genus {get('parent taxon')}"
    return f"{get('vessel class')}" + (f" operated by {get('operator')}" if get("operator") else "")


def _attr_string(attrs: list[tuple[str, str]]) -> str:
    return ". ".join(f"{p}: {v}" for p, v in attrs) + "."


def wiki_title(name: str) -> str:
    """URL-quoted title with spaces as underscores, as the releases store `entity_name`."""
    return quote(name.replace(" ", "_"), safe="_(),'!*-")


# ------------------------------------------------------------------------------------------------- images

def look(e: dict) -> dict:
    colour_p, pattern_p, bg_p = TYPES[e["kind"]]["look"]
    a = e["attrs"]
    return {"shape": TYPES[e["kind"]]["shape"],
            "fg": PALETTE[text_hash(_first(a, colour_p)) % len(PALETTE)],
            "pattern": PATTERNS[text_hash(_first(a, pattern_p)) % len(PATTERNS)],
            "bg": BACKGROUNDS[text_hash(_first(a, bg_p)) % len(BACKGROUNDS)],
            # a per-entity badge: same-name, same-type entities with equal main attributes still differ
            "badge": PALETTE[text_hash(_attr_string(a)) % len(PALETTE)],
            "badge_pos": text_hash(e["qid"]) % 4}


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        ang = np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return list(zip(cx + rad * np.cos(ang), cy - rad * np.sin(ang)))
    if shape == "boat":
        return [(cx - r, cy), (cx + r, cy), (cx + r * 0.6, cy + r * 0.6), (cx - r * 0.6, cy + r * 0.6)]
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ellipse":
        draw.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "rectangle":
        draw.rectangle([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fill)
        if shape == "boat":   # mast and sail make the boat readable at 32 px
            draw.polygon([(cx, cy - r), (cx, cy - 2), (cx + r * 0.6, cy - 2)], fill=fill)


_YY, _XX = np.mgrid[0:IMG, 0:IMG]
PATTERN_MASKS = {"hstripes": (_YY // 4) % 2 == 0, "vstripes": (_XX // 4) % 2 == 0,
                 "dots": ((_YY % 8) < 3) & ((_XX % 8) < 3), "checker": ((_YY // 6) + (_XX // 6)) % 2 == 0,
                 "diagonal": ((_YY + _XX) // 5) % 2 == 0}


def render(look: dict, dx: float = 0.0, dy: float = 0.0, scale: float = 1.0, bg_shift: int = 0) -> np.ndarray:
    bg = tuple(int(np.clip(c + bg_shift, 0, 255)) for c in look["bg"])
    canvas = Image.new("RGB", (IMG, IMG), bg)
    shape_mask = Image.new("L", (IMG, IMG), 0)
    cx, cy, r = IMG / 2 + dx, IMG / 2 + dy, IMG * 0.32 * scale
    _draw_shape(ImageDraw.Draw(canvas), look["shape"], cx, cy, r, look["fg"])
    _draw_shape(ImageDraw.Draw(shape_mask), look["shape"], cx, cy, r, 255)
    img = np.asarray(canvas).copy()
    dark = tuple(int(c * 0.45) for c in look["fg"])
    if look["pattern"] in PATTERN_MASKS:
        img[(np.asarray(shape_mask) > 0) & PATTERN_MASKS[look["pattern"]]] = dark
    q = look["badge_pos"]
    x0, y0 = (4 if q % 2 == 0 else IMG - 14), (4 if q < 2 else IMG - 14)
    img[y0:y0 + 10, x0:x0 + 10] = look["badge"]
    return img


def _perturb(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mention photo of the entity: cropped, shifted, recoloured, noisy, with unrelated objects in it."""
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(1, 4))):    # distractors
        shape = str(rng.choice(["circle", "square", "triangle", "ellipse"]))
        cx, cy = rng.uniform(0, IMG, size=2)
        _draw_shape(draw, shape, cx, cy, rng.uniform(3, 9), PALETTE[int(rng.integers(len(PALETTE)))])
    side = int(rng.integers(int(IMG * 0.75), IMG + 1))
    x0, y0 = (int(v) for v in rng.integers(0, IMG - side + 1, size=2))
    pil = pil.crop((x0, y0, x0 + side, y0 + side)).resize((IMG, IMG), Image.Resampling.BILINEAR)
    out = np.asarray(pil).astype(np.float32)
    out = out * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-20, 20)
    out += rng.normal(0, 8, size=out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
    else:
        Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- mentions

def _surface(e: dict, rng: np.random.Generator) -> str:
    name = e["name"]
    if e["kind"] == "person" and " " in name and rng.random() < 0.25:
        return name.split(" ")[-1]                           # "Murphy": even more ambiguous
    if name.endswith(" County") and rng.random() < 0.3:
        return name[: -len(" County")]
    return name


def _sentence(e: dict, surface: str, rng: np.random.Generator) -> str:
    clueable = [(p, v) for p, v in e["attrs"] if p in CLUES]
    k = 1 if len(clueable) == 1 or rng.random() < 0.55 else 2
    picks = [clueable[i] for i in sorted(rng.choice(len(clueable), size=k, replace=False))]
    clauses = [str(rng.choice(CLUES[p])).format(v=v) for p, v in picks]
    clause = " and ".join(clauses)
    event = str(rng.choice(EVENTS[e["kind"]]))
    form = int(rng.integers(3))
    if form == 0:
        return f"{surface}, {clause}, {event}."
    if form == 1:
        return f"{rng.choice(INTROS)} {surface}, {clause}."
    return f"{surface} {event} ({clause})."


# ---------------------------------------------------------------------------------------------- generator

def _entities(n: int, seed: int, rng: np.random.Generator) -> list[dict]:
    n_shared = round(SHARED_FRACTION * n) if n > 1 else 0
    # universe numbers: shared pool 1000.. (same for every seed), seed pool (seed+1)*10^6..
    us = [1000 + j for j in range(n_shared)] + [(seed + 1) * 1_000_000 + j for j in range(n - n_shared)]
    ents = [_make_entity(u, TYPE_PATTERN[u % len(TYPE_PATTERN)]) for u in us]
    for e in ents:
        e["shared"] = e["u"] < 1_000_000
    _ensure_collisions(ents, rng)
    order = rng.permutation(n)
    return [ents[i] for i in order]


def _collision_rate(ents: list[dict]) -> float:
    counts = Counter(e["name"] for e in ents)
    return sum(1 for e in ents if counts[e["name"]] > 1) / max(1, len(ents))


def _ensure_collisions(ents: list[dict], rng: np.random.Generator) -> None:
    """Rename seed-only entities after same-type ones until enough names are shared (the shared pool is left
    alone so its records stay identical across seeds)."""
    while _collision_rate(ents) < MIN_COLLISION_RATE:
        counts = Counter(e["name"] for e in ents)
        lonely = [i for i, e in enumerate(ents) if not e["shared"] and counts[e["name"]] == 1]
        if not lonely or len(ents) < 2:
            return
        i = lonely[int(rng.integers(len(lonely)))]
        same = [j for j, e in enumerate(ents) if j != i and e["kind"] == ents[i]["kind"]]
        donors = same or [j for j in range(len(ents)) if j != i]
        ents[i]["name"] = ents[donors[int(rng.integers(len(donors)))]]["name"]


def _kb_record(e: dict, idx: int) -> dict:
    ext = "jpg" if e["jpg"] else "png"
    images = [f"{e['qid']}_{k}.{ext}" for k in range(e["n_images"])]
    return {"id": idx, "qid": e["qid"], "entity_name": wiki_title(e["name"]), "desc": _description(e),
            "attr": _attr_string(e["attrs"]), "image_list": images, "type": "entity"}


def _write_release(root: Path, n_entities: int, n_mentions: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, FORMAT_VERSION])
    ents = _entities(n_entities, seed, rng)
    (root / "kb_image").mkdir(parents=True)
    (root / "mention_image").mkdir()
    kb, kb_images = [], 0
    for idx, e in enumerate(ents):
        rec = _kb_record(e, idx)
        entity_look = look(e)
        img_rng = np.random.default_rng([UNIVERSE, e["u"], 1])    # shared entities: identical bytes
        for k, fname in enumerate(rec["image_list"]):
            dx, dy = img_rng.uniform(-4, 4, size=2)
            img = render(entity_look, dx, dy, img_rng.uniform(0.85, 1.1), bg_shift=0 if k == 0 else -25)
            (root / "kb_image" / fname).write_bytes(_encode(img, "jpg" if e["jpg"] else "png"))
            kb_images += 1
        kb.append(rec)

    # popular entities get many mentions, most get none (as in the paper's App. C); ambiguous names are
    # over-sampled so that the name alone is a poor guide.
    counts = Counter(e["name"] for e in ents)
    weight = 1.0 / (1 + rng.permutation(n_entities)) ** 0.6
    weight *= np.array([3.0 if counts[e["name"]] > 1 else 1.0 for e in ents])
    weight /= weight.sum()
    n_nil = round(NIL_RATE * n_mentions)
    nil = set(rng.choice(n_mentions, size=n_nil, replace=False).tolist())
    no_image = set(rng.choice(n_mentions, size=round(NO_IMAGE_RATE * n_mentions), replace=False).tolist())
    mentions, fallback = [], 0
    for i in range(n_mentions):
        if i in nil:      # a mention of something outside the KB
            gold = _make_entity((seed + 1) * 1_000_000 + 900_000 + i, str(rng.choice(TYPE_PATTERN)))
            answer = "nil"
        else:
            gold = ents[int(rng.choice(n_entities, p=weight))]
            answer = gold["qid"]
        surface = _surface(gold, rng)
        sentence = _sentence(gold, surface, rng)
        mid = f"demo{seed}-{i:05d}"
        img_path = ""
        if i not in no_image:
            dx, dy = rng.uniform(-8, 8, size=2)
            img = _perturb(render(look(gold), dx, dy, rng.uniform(0.7, 1.15)), rng)
            r = rng.random()
            if r < JPG_FALLBACK_RATE:
                img_path, fname, fmt = f"{mid}.png", f"{mid}.jpg", "jpg"
                fallback += 1
            elif r < 0.6:
                img_path, fname, fmt = f"{mid}.jpg", f"{mid}.jpg", "jpg"
            else:
                img_path, fname, fmt = f"{mid}.png", f"{mid}.png", "png"
            (root / "mention_image" / fname).write_bytes(_encode(img, fmt))
        mentions.append({"id": mid, "mentions": quote(surface), "sentence": sentence, "imgPath": img_path,
                         "answer": answer})

    order = rng.permutation(n_mentions)
    sizes = [round(frac * n_mentions) for _, frac in SPLITS[:-1]]
    bounds = np.cumsum([0, *sizes, n_mentions - sum(sizes)])
    split_sizes = {}
    for (split, _), lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
        rows = [mentions[j] for j in sorted(order[lo:hi])]
        _write_json(root / f"demo_{split}.json", rows)
        split_sizes[split] = len(rows)
    _write_json(root / "kb_entity.json", kb)
    (root / "qid2id.json").write_text(json.dumps({r["qid"]: r["id"] for r in kb}) + "\n", encoding="utf-8")

    df = Counter(stmt for e in ents for stmt in {f"{p}: {v}" for p, v in e["attrs"]})
    top_stmt, top_n = df.most_common(1)[0]
    return {
        "entities": n_entities,
        "entity_types": dict(sorted(Counter(e["kind"] for e in ents).items())),
        "shared_pool_entities": sum(e["shared"] for e in ents),
        "kb_images": kb_images,
        "entities_without_image": sum(1 for r in kb if not r["image_list"]),
        "mentions": split_sizes,
        "nil_mentions": n_nil,
        "name_collision_rate": round(_collision_rate(ents), 4),
        "no_image_rate": round(len(no_image) / max(1, n_mentions), 4),
        "jpg_fallback_images": fallback,
        "distinct_attributes": len(df),
        "top_attribute": top_stmt,
        "top_attribute_share": round(top_n / max(1, n_entities), 4),
        "median_attribute_entities": float(np.median(list(df.values()))),
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _params(n_entities: int, n_mentions: int, seed: int) -> dict:
    return {"n_entities": n_entities, "n_mentions": n_mentions, "seed": seed, "format_version": FORMAT_VERSION}


def make_demo_data(output: str, n_entities: int = 400, n_mentions: int = 600, seed: int = 0) -> dict:
    """Generate the release into `output` (local path or s3://) and return its statistics.

    Built in a temporary folder and moved into place, so an interrupted run never leaves a release that
    looks complete. A folder already holding this exact release (same parameters) is left as it is.
    """
    if n_entities < 2 or n_mentions < 1 or seed < 0:
        raise UsageError("make-demo-data needs at least 2 entities, 1 mention and a seed >= 0")
    output = str(output)
    params = _params(n_entities, n_mentions, seed)
    marker = storage.join(output, MARKER)
    if storage.exists(marker):
        done = storage.read_json(marker)
        if done.get("params") == params:
            return {"output": output, **done["stats"], "skipped": True}
    t0 = time.perf_counter()
    if storage.is_s3(output):
        with tempfile.TemporaryDirectory(prefix="mel-ray-demo-") as tmp:
            stats = _write_release(Path(tmp) / "release", n_entities, n_mentions, seed)
            for rel in storage.list_files(str(Path(tmp) / "release")):
                storage.write_bytes(storage.join(output, rel), (Path(tmp) / "release" / rel).read_bytes())
            storage.write_json(marker, {"params": params, "stats": stats})
    else:
        stats = _write_local(Path(output).absolute(), params, n_entities, n_mentions, seed)
    return {"output": output, **stats, "seconds": round(time.perf_counter() - t0, 2)}


def _write_local(dest: Path, params: dict, n_entities: int, n_mentions: int, seed: int) -> dict:
    if dest.exists() and any(dest.iterdir()) and not (dest / MARKER).exists():
        raise UsageError(f"{dest}: exists and is not a demo release; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        stats = _write_release(tmp / "release", n_entities, n_mentions, seed)
        _write_json(tmp / "release" / MARKER, {"params": params, "stats": stats})
        if dest.exists():     # an older or partial demo release: swap it out, then drop it
            old = tmp / "old"
            os.replace(dest, old)
        os.replace(tmp / "release", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def corpus() -> list[str]:
    """Words and phrases of the generated releases, used to learn the tiny tokenizer's BPE merges so the
    40-token text budget covers whole words rather than single bytes."""
    parts: list[str] = []
    for spec in TYPES.values():
        parts += [p for p, *_ in spec["props"]] + list(spec["instance"])
        parts += [v for _, _, src, _ in spec["props"] if isinstance(src, list) for v in src]
    for group in (CITIES, FIRST, LAST, WORDS_A, WORDS_N, PLACE_A, PLACE_B, list(BUILDING_KINDS),
                  list(BUILDING_KINDS.values()), ANIMAL_A, ANIMAL_N, SHIP_PREFIX, INTROS):
        parts += group
    parts += [n for names in HOT_NAMES.values() for n in names]
    parts += [c for cs in CLUES.values() for c in cs] + [e for es in EVENTS.values() for e in es]
    return [unicodedata.normalize("NFC", p.replace("{v}", "")) for p in parts]
