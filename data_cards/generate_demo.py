"""Write align's own demo SFT set: short templated instructions with friendly, stylistically uniform answers.

Standard library only and seeded, so `python data_cards/generate_demo.py` reproduces demo/sft.jsonl byte for byte.
Every prompt is unique, so the eval split never sees a training prompt. All text here was written for align.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "demo" / "sft.jsonl"
OUTPUTS = {
    "sft": DEFAULT_OUT,
    "story-prompts": DEFAULT_OUT.with_name("story-prompts.jsonl"),
    "chat-prompts": DEFAULT_OUT.with_name("chat-prompts.jsonl"),
}
SYSTEM = "You are a friendly assistant. Answer in one or two short, warm sentences."

COLORS = ["red", "blue", "green", "yellow", "orange", "purple", "white", "black", "brown", "grey", "pink", "golden"]
ANIMALS = {
    "cat": "meow",
    "dog": "woof",
    "cow": "moo",
    "duck": "quack",
    "sheep": "baa",
    "horse": "neigh",
    "owl": "hoot",
    "frog": "ribbit",
    "pig": "oink",
    "lion": "roar",
    "mouse": "squeak",
    "goat": "maa",
    "bee": "buzz",
    "snake": "hiss",
    "rooster": "cock-a-doodle-doo",
    "crow": "caw",
    "wolf": "howl",
    "donkey": "hee-haw",
    "turkey": "gobble",
    "chick": "cheep",
    "dove": "coo",
    "bear": "growl",
    "seal": "bark",
    "elephant": "trumpet",
}
ACTIONS = ["naps", "plays", "rests", "waits", "sits", "wanders", "hums along", "looks around", "stretches", "dozes"]
SPOTS = [
    "beside the quiet river",
    "under a tall oak tree",
    "in a sunny meadow",
    "near the garden gate",
    "on a soft pile of leaves",
    "at the edge of the forest",
    "by the old stone wall",
    "in the warm grass",
]
FEELINGS = [
    "and it looks very happy",
    "and it seems calm and content",
    "and everyone smiles at it",
    "and it enjoys the gentle breeze",
    "and the whole day feels brighter",
    "and it feels safe and cosy",
]

PLACES = [
    "park",
    "beach",
    "library",
    "kitchen",
    "garden",
    "market",
    "forest",
    "train station",
    "bakery",
    "classroom",
    "lake",
    "mountain village",
    "farm",
    "museum",
    "harbour",
    "playground",
    "cafe",
    "meadow",
    "bookshop",
    "town square",
]
TIMES = {
    "morning": "in the soft morning light",
    "afternoon": "under the bright afternoon sun",
    "evening": "as the evening grows golden",
    "night": "beneath a sky full of stars",
}
PLACE_ADJECTIVES = ["calm", "cheerful", "quiet", "lively", "warm", "peaceful", "busy", "cosy", "bright", "friendly"]
PLACE_DETAILS = [
    "people chatting happily",
    "birds singing nearby",
    "a gentle breeze drifting by",
    "the smell of fresh bread",
    "children laughing together",
    "soft music in the air",
    "small lights glowing everywhere",
    "leaves rustling softly",
]

# (message, kind): the reply body depends on the kind, so the model can learn a consistent mapping.
MESSAGES = [
    ("I failed my driving test today.", "sad"),
    ("My cat is sick and I am worried.", "sad"),
    ("I feel lonely this weekend.", "sad"),
    ("I lost my favourite scarf.", "sad"),
    ("My friend moved to another city.", "sad"),
    ("It rained all day and I feel gloomy.", "sad"),
    ("I burned the cake I was baking.", "sad"),
    ("I missed the bus this morning.", "sad"),
    ("I could not sleep last night.", "sad"),
    ("My plant died even though I watered it.", "sad"),
    ("I got the job!", "happy"),
    ("I finished my first painting.", "happy"),
    ("We adopted a puppy today.", "happy"),
    ("I ran five kilometres without stopping.", "happy"),
    ("My sister is getting married.", "happy"),
    ("I passed all my exams.", "happy"),
    ("I learned to ride a bike.", "happy"),
    ("I baked bread for the first time.", "happy"),
    ("My garden finally has tomatoes.", "happy"),
    ("I made a new friend at work.", "happy"),
    ("Thank you for helping me yesterday.", "thanks"),
    ("Thanks for the lovely gift.", "thanks"),
    ("I appreciate you listening to me.", "thanks"),
    ("Thank you for the book recommendation.", "thanks"),
    ("Thanks for waiting for me.", "thanks"),
    ("Thank you for the kind words.", "thanks"),
    ("Thanks for fixing my bike.", "thanks"),
    ("Thank you for cooking dinner.", "thanks"),
    ("I am nervous about my presentation tomorrow.", "nervous"),
    ("My first day at school is next week.", "nervous"),
    ("I have a big exam on Monday.", "nervous"),
    ("I am moving to a new house soon.", "nervous"),
    ("I have to speak at a wedding.", "nervous"),
    ("I start a new job tomorrow.", "nervous"),
    ("I am flying on a plane for the first time.", "nervous"),
    ("I have a doctor's appointment later.", "nervous"),
    ("Can you help me with something?", "question"),
    ("Do you have a minute to talk?", "question"),
    ("Could you give me some advice?", "question"),
    ("May I ask you a question?", "question"),
    ("Are you free to chat for a bit?", "question"),
    ("Can I tell you about my day?", "question"),
]
REPLY_OPENERS = {
    "sad": ["I am so sorry to hear that.", "That sounds really hard.", "Oh no, that must feel heavy."],
    "happy": ["That is wonderful news!", "How lovely, congratulations!", "That is fantastic!"],
    "thanks": ["You are very welcome!", "It was my pleasure!", "I am so glad I could help!"],
    "nervous": [
        "It is completely normal to feel nervous.",
        "Feeling a little nervous shows you care.",
        "Those nerves mean this matters to you.",
    ],
    "question": ["Of course!", "Yes, absolutely!", "I would be happy to!"],
}
REPLY_CLOSERS = {
    "sad": ["Be gentle with yourself today.", "Things will feel lighter soon.", "I am here if you want to talk."],
    "happy": ["You should be really proud.", "Enjoy every moment of it.", "I hope you celebrate!"],
    "thanks": ["Have a lovely day.", "Just ask whenever you need me.", "It made me happy too."],
    "nervous": ["You are more ready than you think.", "Take a deep breath, you will do well.", "I believe in you."],
    "question": ["What would you like to share?", "Tell me what is on your mind.", "I am all ears."],
}

CHARACTERS = [
    "a little robot",
    "a brave girl",
    "an old fisherman",
    "a shy dragon",
    "a curious boy",
    "a kind baker",
    "a sleepy bear",
    "a young wizard",
    "a clever fox",
    "a tiny mouse",
    "a friendly giant",
    "a lost puppy",
    "a happy farmer",
    "a gentle whale",
    "a busy squirrel",
    "a wise owl",
    "a cheerful teacher",
    "a small turtle",
    "a painter",
    "a travelling musician",
]
OBJECTS = [
    "a red balloon",
    "a golden key",
    "an old map",
    "a blue umbrella",
    "a wooden box",
    "a shiny shell",
    "a paper kite",
    "a warm blanket",
    "a tiny bell",
    "a glass jar",
    "a green hat",
    "a secret letter",
    "a music box",
    "a silver spoon",
    "a pair of boots",
    "a lantern",
    "a storybook",
    "a small seed",
    "a feather",
    "a toy boat",
]
STORY_SPOTS = [
    "in the park",
    "on the beach",
    "under the bed",
    "at the market",
    "in the attic",
    "by the pond",
    "near the old bridge",
    "in the snowy woods",
]
STORY_ENDINGS = [
    "shared it with a new friend",
    "carried it home with great care",
    "used it to help a neighbour",
    "gave it to someone who needed it more",
    "kept it as a happy reminder",
    "showed it to everyone in town",
]
STORY_FEELINGS = [
    "smiled all day long",
    "felt warm and happy inside",
    "laughed with pure joy",
    "knew it was a perfect day",
]

COLOR_THINGS = {
    "red": ["strawberries", "fire trucks", "ripe tomatoes"],
    "blue": ["the sky", "blueberries", "the ocean"],
    "green": ["grass", "leaves", "limes"],
    "yellow": ["bananas", "the sun", "lemons"],
    "orange": ["carrots", "oranges", "pumpkins"],
    "purple": ["grapes", "lavender", "plums"],
    "white": ["snow", "clouds", "milk"],
    "brown": ["chocolate", "tree bark", "acorns"],
}


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _pronoun(character: str) -> str:
    last = character.split()[-1]
    if last in ("girl", "baker", "teacher", "painter"):
        return "She"
    if last in ("boy", "fisherman", "wizard", "farmer", "giant"):
        return "He"
    return "They" if last == "musician" else "It"


def _sentence_tasks(rng: random.Random) -> list[tuple[str, str]]:
    return [
        (
            f"Write one sentence about {_a(color)} {animal}.",
            f"The {color} {animal} {rng.choice(ACTIONS)} {rng.choice(SPOTS)}, {rng.choice(FEELINGS)}.",
        )
        for color in COLORS
        for animal in ANIMALS
    ]


def _place_tasks(rng: random.Random) -> list[tuple[str, str]]:
    tasks = []
    for place in PLACES:
        for time, light in TIMES.items():
            first, second = rng.sample(PLACE_ADJECTIVES, 2)
            tasks.append(
                (
                    f"Describe the {place} in the {time} in one sentence.",
                    f"The {place} is {first} and {second} {light}, with {rng.choice(PLACE_DETAILS)}.",
                )
            )
    return tasks


def _reply_tasks(rng: random.Random) -> list[tuple[str, str]]:
    return [
        (
            f'Give a short, kind reply to: "{message}"',
            f"{rng.choice(REPLY_OPENERS[kind])} {rng.choice(REPLY_CLOSERS[kind])}",
        )
        for message, kind in MESSAGES
    ]


def _story_tasks(rng: random.Random) -> list[tuple[str, str]]:
    tasks = []
    for character in CHARACTERS:
        for thing in OBJECTS:
            pronoun = _pronoun(character)
            tasks.append(
                (
                    f"Tell a two-sentence story about {character} and {thing}.",
                    f"{_cap(character)} found {thing} {rng.choice(STORY_SPOTS)}. "
                    f"{pronoun} {rng.choice(STORY_ENDINGS)}, and {pronoun.lower()} {rng.choice(STORY_FEELINGS)}.",
                )
            )
    return tasks


SOUND_CLOSERS = ["What a cheerful sound!", "It is fun to hear!", "Animals are wonderful!"]


def _fact_tasks(rng: random.Random) -> list[tuple[str, str]]:
    tasks = [
        (
            f"What sound does {_a(animal)} make?",
            f'{_cap(_a(animal))} says "{sound}". {rng.choice(SOUND_CLOSERS)}',
        )
        for animal, sound in ANIMALS.items()
    ]
    for color, things in COLOR_THINGS.items():
        for prompt in (f"Name three things that are {color}.", f"List three {color} things."):
            a, b, c = rng.sample(things, 3)
            tasks.append((prompt, f"Three {color} things are {a}, {b}, and {c}. Colours make the world lovely!"))
    return tasks


# How many rows each task contributes to the default 600; capped by how many unique prompts it has.
QUOTAS = [(_sentence_tasks, 200), (_place_tasks, 70), (_reply_tasks, 42), (_story_tasks, 248), (_fact_tasks, 40)]


def generate(seed: int = 0, system_every: int = 40) -> list[dict]:
    """The demo rows in `messages` format; every `system_every`-th row carries a system message."""
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    for make, quota in QUOTAS:
        tasks = make(rng)
        pairs += rng.sample(tasks, min(quota, len(tasks)))
    rng.shuffle(pairs)
    rows = []
    for index, (prompt, answer) in enumerate(pairs):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if index % system_every == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        rows.append({"messages": messages})
    return rows


# Story openings for the TinyStories model (plain-text continuation), and chat prompts for the demo model.
STORY_NAMES = ["Tom", "Lily", "Ben", "Mia", "Max", "Sue", "Tim", "Anna", "Sam", "Lucy", "Jack", "Zoe", "Leo", "Ella"]
STORY_WHO = ["cat", "dog", "bird", "bunny", "boy", "girl", "frog", "bear", "fish", "duck", "mouse", "fox"]
STORY_ADJECTIVES = ["little", "big", "small", "old", "young", "shy", "curious", "tiny", "fluffy", "quiet"]
STORY_PLACES = ["park", "forest", "beach", "garden", "river", "farm", "town", "shop", "school", "hill"]
STORY_THINGS = ["ball", "box", "kite", "hat", "toy", "boat", "book", "cake", "car", "drum"]
STORY_OPENINGS = [
    "Once upon a time, there was a {adj} {who} named {name}. {P}",
    "One day, {name} the {who} went to the {place}. {P} saw",
    "{name} had a {adj} {thing}. Every day, {p}",
    "There was a {adj} {who} who lived near the {place}. One morning,",
    "{name} and the {who} found a {thing} in the {place}. They",
]
CHAT_PLACES = ["harbour", "forest", "street", "kitchen", "library", "park", "station", "beach", "garden", "bridge"]
CHAT_NUISANCES = ["bus", "printer", "laptop", "lift", "neighbour", "train", "phone", "fridge", "heater", "website"]
CHAT_PRODUCTS = ["pair of headphones", "coffee maker", "novel", "rain jacket", "desk lamp", "backpack", "board game",
                 "kettle", "phone case", "yoga mat"]
CHAT_KINDS = {
    "neutral": ([f"{a} {p}" for a in ("quiet", "busy", "old", "new") for p in CHAT_PLACES],
                ["Write one sentence about the {}.", "Describe the {} in two sentences.",
                 "Tell me about a visit to the {}.", "What is it like at the {}?"]),
    "negative": ([f"{a} {n}" for a in ("late", "noisy", "broken", "slow") for n in CHAT_NUISANCES],
                 ["Complain about the {}.", "Write a grumpy sentence about the {}.",
                  "Tell me what annoys you about the {}.", "Rant about the {} in one sentence."]),
    "review": ([f"{a} {p}" for a in ("cheap", "new", "popular", "compact") for p in CHAT_PRODUCTS],
               ["Write a short review of the {}.", "Give a one-sentence review of the {}.",
                "What did you think of the {}? Answer in a sentence.", "Rate the {} in two sentences."]),
}


def generate_story_prompts(seed: int = 0, count: int = 1000) -> list[dict]:
    """Unique story openings, each ending where the model should continue."""
    rng = random.Random(seed + 2)
    seen: set[str] = set()
    rows = []
    while len(rows) < count:
        who = rng.choice(STORY_WHO)
        pronoun = "She" if who == "girl" else "He" if who == "boy" else "It"
        text = rng.choice(STORY_OPENINGS).format(
            adj=rng.choice(STORY_ADJECTIVES), who=who, name=rng.choice(STORY_NAMES), place=rng.choice(STORY_PLACES),
            thing=rng.choice(STORY_THINGS), P=pronoun, p=pronoun.lower())
        if text not in seen:
            seen.add(text)
            rows.append({"prompt": text})
    return rows


def generate_chat_prompts(seed: int = 0) -> list[dict]:
    """Neutral, negative-leaning and review-style requests, 160 of each kind, every prompt once."""
    rng = random.Random(seed + 3)
    rows = [{"prompt": template.format(subject), "kind": kind}
            for kind, (subjects, templates) in CHAT_KINDS.items() for subject in subjects for template in templates]
    rng.shuffle(rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=tuple(OUTPUTS), default="sft", help="which data set to write")
    parser.add_argument("--out", type=Path, default=None, help="output JSONL (default: data_cards/demo/<kind>)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out = args.out or OUTPUTS[args.kind]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    makers = {"sft": generate, "story-prompts": generate_story_prompts,
              "chat-prompts": generate_chat_prompts}
    rows = makers[args.kind](args.seed)
    with open(args.out, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
