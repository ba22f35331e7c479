"""Embedded English word lists for the synthetic review language, by word class.

Plain tuples of lowercase single-word tokens (punctuation marks are tokens too). Every word occurs
in exactly one list (tests check this), so the sentiment of an adjective or verb and the topic of
a noun are unambiguous. `beyondlm.data.synthetic` truncates each list to `words_per_class` entries
(the first ones) and gives them Zipf weights over a seeded permutation.

Nouns are singular and verbs and copulas past tense, so that most sampled sentences read as
grammatical English ("the plot was really gripping ." / "i hated the battery , but the screen
seemed bright !").
"""

# Topic-specific nouns, ~40 per topic; the first `n_topics` topics (in this order) are used.
TOPIC_NOUNS: dict[str, tuple[str, ...]] = {
    "movie": (
        "film", "movie", "plot", "acting", "cast", "director", "script", "ending", "scene",
        "soundtrack", "cinematography", "dialogue", "villain", "hero", "sequel", "trailer",
        "screenplay", "actor", "actress", "premiere", "cameo", "twist", "climax", "montage",
        "editing", "costume", "visual", "pacing", "subplot", "narrator", "cinema", "popcorn",
        "studio", "franchise", "remake", "documentary", "thriller", "comedy", "stunt", "heroine",
    ),
    "book": (
        "novel", "author", "chapter", "prose", "narrative", "paperback", "hardcover",
        "protagonist", "epilogue", "prologue", "memoir", "biography", "poem", "poetry", "sentence",
        "paragraph", "page", "cover", "publisher", "translation", "edition", "manuscript",
        "library", "bookstore", "storyline", "worldbuilding", "trilogy", "anthology", "essay",
        "foreword", "footnote", "glossary", "index", "bestseller", "fable", "saga", "verse",
        "appendix", "novella", "reader",
    ),
    "restaurant": (
        "food", "menu", "waiter", "waitress", "chef", "dish", "dessert", "appetizer", "steak",
        "pasta", "salad", "soup", "bread", "wine", "cocktail", "burger", "pizza", "sushi", "curry",
        "sauce", "portion", "table", "reservation", "kitchen", "bartender", "brunch", "dinner",
        "lunch", "breakfast", "patio", "buffet", "noodle", "taco", "seafood", "risotto", "pastry",
        "espresso", "tip", "bill", "flavor",
    ),
    "hotel": (
        "hotel", "room", "bed", "lobby", "pool", "receptionist", "suite", "balcony", "shower",
        "bathroom", "towel", "pillow", "mattress", "elevator", "hallway", "concierge", "checkin",
        "checkout", "housekeeping", "minibar", "view", "resort", "spa", "sauna", "gym", "parking",
        "wifi", "carpet", "curtain", "hostel", "motel", "bellhop", "doorman", "valet", "corridor",
        "keycard", "bathtub", "lounge", "terrace", "blanket",
    ),
    "game": (
        "game", "gameplay", "level", "boss", "controller", "console", "graphics", "multiplayer",
        "campaign", "quest", "puzzle", "character", "map", "inventory", "weapon", "upgrade",
        "checkpoint", "tutorial", "mission", "dungeon", "player", "enemy", "difficulty",
        "framerate", "server", "avatar", "skin", "crafting", "loot", "combat", "leaderboard",
        "achievement", "expansion", "patch", "mod", "sandbox", "arcade", "joystick", "cutscene",
        "respawn",
    ),
    "album": (
        "album", "song", "singer", "band", "melody", "chorus", "lyric", "guitar", "drum", "bass",
        "vocal", "track", "rhythm", "concert", "tour", "record", "vinyl", "producer", "drummer",
        "guitarist", "pianist", "piano", "violin", "ballad", "anthem", "tune", "beat", "remix",
        "duet", "harmony", "orchestra", "symphony", "jazz", "opera", "playlist", "recording",
        "bridge", "tempo", "encore", "saxophone",
    ),
    "phone": (
        "phone", "screen", "battery", "camera", "charger", "case", "app", "keyboard", "speaker",
        "microphone", "processor", "storage", "display", "notification", "update", "touchscreen",
        "button", "headset", "earbud", "cable", "port", "sensor", "fingerprint", "signal",
        "ringtone", "firmware", "bluetooth", "memory", "chip", "lens", "flashlight", "widget",
        "interface", "antenna", "bezel", "stylus", "smartwatch", "tablet", "handset", "carrier",
    ),
    "car": (
        "car", "engine", "seat", "steering", "brake", "tire", "dashboard", "trunk", "mileage",
        "transmission", "dealer", "dealership", "sedan", "truck", "suspension", "horn",
        "headlight", "windshield", "wheel", "radio", "gearbox", "clutch", "exhaust", "bumper",
        "mirror", "hood", "fuel", "gasoline", "hybrid", "convertible", "driver", "passenger",
        "airbag", "odometer", "accelerator", "cruise", "legroom", "upholstery", "garage",
        "mechanic",
    ),
}

GENERIC_NOUNS = (
    "experience", "time", "price", "place", "thing", "idea", "quality", "value", "part", "moment",
    "service", "staff", "atmosphere", "design", "style", "detail", "feature", "setting", "vibe",
    "result", "purchase", "visit", "day", "night", "weekend", "money", "effort", "choice", "option",
    "story",
)

POSITIVE_ADJECTIVES = (
    "great", "good", "excellent", "amazing", "wonderful", "fantastic", "brilliant", "superb",
    "lovely", "delightful", "charming", "outstanding", "perfect", "beautiful", "enjoyable",
    "impressive", "memorable", "stunning", "terrific", "fabulous", "marvelous", "pleasant", "solid",
    "smart", "clever", "fun", "exciting", "engaging", "gripping", "moving", "heartwarming", "fresh",
    "tasty", "delicious", "comfortable", "cozy", "friendly", "helpful", "reliable", "smooth",
    "fast", "elegant", "gorgeous", "refreshing", "satisfying", "inspiring", "flawless",
    "magnificent", "splendid", "cheerful",
)

NEGATIVE_ADJECTIVES = (
    "bad", "terrible", "awful", "horrible", "boring", "dull", "disappointing", "mediocre", "poor",
    "weak", "bland", "stale", "rude", "dirty", "noisy", "slow", "broken", "buggy", "clunky",
    "confusing", "messy", "sloppy", "lazy", "tedious", "annoying", "frustrating", "overpriced",
    "flimsy", "unreliable", "uncomfortable", "greasy", "soggy", "tasteless", "pathetic", "dreadful",
    "lousy", "forgettable", "predictable", "shallow", "pointless", "unbearable", "painful", "ugly",
    "cramped", "smelly", "shabby", "lifeless", "clumsy", "disgusting", "nasty",
)

NEUTRAL_ADJECTIVES = (
    "new", "old", "big", "small", "long", "short", "large", "recent", "typical", "standard",
    "simple", "basic", "modern", "classic", "local", "foreign", "early", "late", "usual", "average",
    "ordinary", "different", "similar", "warm", "strange", "serious", "unusual", "complex",
    "original", "quiet", "busy", "dark", "bright", "red", "blue", "young", "famous", "popular",
    "expensive", "familiar",
)

POSITIVE_VERBS = (
    "loved", "enjoyed", "adored", "liked", "recommended", "appreciated", "admired", "praised",
    "cherished", "treasured", "savored", "relished", "applauded", "celebrated", "devoured",
    "embraced", "valued", "welcomed", "revisited", "favored",
)

NEGATIVE_VERBS = (
    "hated", "disliked", "regretted", "despised", "loathed", "resented", "criticized", "dreaded",
    "endured", "tolerated", "returned", "abandoned", "wasted", "avoided", "mocked", "cursed",
    "skipped", "quit", "ditched", "trashed",
)

NEUTRAL_VERBS = (
    "watched", "read", "tried", "visited", "ordered", "bought", "rented", "played", "heard", "saw",
    "used", "tested", "booked", "finished", "started", "found", "chose", "picked", "borrowed",
    "reviewed",
)

ADVERBS = (
    "really", "very", "quite", "truly", "pretty", "so", "rather", "fairly", "incredibly",
    "extremely", "somewhat", "totally", "absolutely", "genuinely", "surprisingly", "honestly",
    "simply", "utterly", "remarkably", "especially", "overly", "slightly", "mostly", "too",
    "clearly",
)

DETERMINERS = (
    "the", "this", "that", "my", "our", "their", "a", "every", "each", "his", "her", "one", "some",
    "your", "its",
)

# Singular subjects only: the copulas and verbs are past tense ("i was", "she was").
PRONOUNS = ("i", "she", "he", "someone", "everyone", "nobody", "everybody", "somebody", "mom",
            "dad")

COPULAS = ("was", "seemed", "felt", "looked", "sounded", "became", "remained", "stayed",
           "appeared", "proved", "tasted", "smelled")

PREPOSITIONS = ("for", "at", "in", "with", "of", "about", "from", "during", "after", "before",
                "near", "on", "by", "without", "despite")

CONJUNCTIONS = ("but", "and", "yet", "although", "though", "because", "while", "since",
                "whereas", "plus")

COMMAS = (",",)

SENTENCE_ENDS = (".", "!")
