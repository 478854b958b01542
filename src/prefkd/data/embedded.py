"""A procedural instruction dataset with exact reference answers, generated in memory (no download).

It gives prefkd a self-contained source of instruction data for tests, demos and the tiny tokenizers of
:mod:`prefkd.models.tiny`: short tasks (arithmetic, sorting, reversing words, counting letters, ...) whose
answers are computed, so exact match and ROUGE-L are meaningful. Texts use a built-in list of a few hundred
common English words so that tokenizers trained on them learn real words.

Every record is a dict with ``instruction``, ``input`` ("" when none), ``output`` (the exact answer),
``task`` (the family name) and ``prompt`` (the Alpaca template of docs/methods.md §1). Same seed, same records.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

from prefkd.data.records import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, alpaca_prompt
from prefkd.data.splits import DataSplits


def chatml_prompt(instruction: str, input: str = "") -> str:
    """A ChatML user turn (the chat format of SmolLM2 and Qwen) without a system message: short prompts
    for the CPU demo, in the format an instruction-tuned teacher was trained on."""
    content = f"{instruction}\n\n{input}" if input else instruction
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


PROMPT_TEMPLATES = {"alpaca": alpaca_prompt, "chatml": chatml_prompt}

NOUNS = """
apple river mountain table window garden book letter friend family house school teacher student city
country forest ocean island bridge road street market bread water coffee music story picture flower tree
bird horse dog cat fish rabbit mouse lion tiger bear wolf sheep cow chicken farmer doctor driver king
queen child mother father sister brother morning evening night summer winter spring autumn rain snow wind
cloud storm sun moon star planet stone sand canal boat ship train plane car bicycle engine wheel door
chair bed lamp clock phone paper pencil camera computer kitchen village castle tower field hill lake
valley desert beach shore harbor museum library office factory church hospital park shirt shoe hat coat
ring gold silver iron glass wood fire light shadow voice song dream idea answer question problem lesson
game party dinner lunch breakfast orange lemon cherry grape banana carrot potato tomato cheese butter
honey sugar salt pepper soup cake cookie candle blanket basket bottle box key map ticket wallet
garage fence gate roof floor wall corner drawer pocket button mirror pillow spoon plate knife cup jar
engineer painter singer sailor pilot nurse baker hunter artist writer neighbor stranger captain soldier
machine robot rocket signal circle square number pattern puzzle secret treasure journey holiday
""".split()

ADJECTIVES = """
big small quick slow happy sad bright dark warm cold old young new green blue red yellow white black
brown quiet loud soft hard heavy light tall short long wide narrow clean dirty rich poor early late
strong weak sweet bitter fresh simple busy calm brave kind gentle clever proud lucky empty full deep
shallow round sharp smooth rough wild friendly famous hungry sleepy funny strange purple golden silent
ancient modern tiny huge careful honest polite shiny cheap expensive curious nervous patient useful
""".split()

VERBS = """
finds carries watches opens closes builds paints reads writes sees follows helps visits likes
cleans moves takes brings sells buys draws holds keeps shares
""".split()

WORDS = sorted(set(NOUNS) | set(ADJECTIVES))

Record = dict


def _phrase(rng: random.Random) -> str:
    """A short natural-ish phrase such as 'the brave farmer finds a green key'."""
    return (f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"{rng.choice(['a', 'the', 'one'])} {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}")


def _words(rng: random.Random, lo: int = 3, hi: int = 7) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _numbers(rng: random.Random, lo: int = 4, hi: int = 8, top: int = 99) -> list[int]:
    return rng.sample(range(0, top + 1), rng.randint(lo, hi))


def _join(numbers: Sequence[int]) -> str:
    return ", ".join(str(x) for x in numbers)


# Each family: rng -> (instruction, input, output). Templates vary the phrasing; the answer is computed.

def _add(rng):
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return rng.choice([
        (f"What is {a} plus {b}?", ""),
        ("Add the two numbers.", f"{a} and {b}"),
        ("Compute the sum.", f"{a} + {b}"),
        (f"Calculate the sum of {a} and {b}.", ""),
    ]) + (str(a + b),)


def _subtract(rng):
    a = rng.randint(0, 999)
    b = rng.randint(0, a)
    return rng.choice([
        (f"What is {a} minus {b}?", ""),
        (f"Subtract {b} from {a}.", ""),
        ("Compute the difference.", f"{a} - {b}"),
        ("Subtract the second number from the first.", f"{a} and {b}"),
    ]) + (str(a - b),)


def _multiply(rng):
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    return rng.choice([
        (f"What is {a} times {b}?", ""),
        (f"Multiply {a} by {b}.", ""),
        ("Compute the product.", f"{a} * {b}"),
        ("Multiply the two numbers.", f"{a} and {b}"),
    ]) + (str(a * b),)


def _reverse_words(rng):
    words = _words(rng)
    return rng.choice([
        "Reverse the order of these words.",
        "Write the words in reverse order.",
        "List the following words backwards, last word first.",
    ]), " ".join(words), " ".join(reversed(words))


def _sort_numbers(rng):
    numbers = _numbers(rng)
    if rng.random() < 0.5:
        instruction = rng.choice(["Sort these numbers from smallest to largest.",
                                  "Put the numbers in ascending order."])
        return instruction, _join(numbers), _join(sorted(numbers))
    instruction = rng.choice(["Sort these numbers from largest to smallest.",
                              "Put the numbers in descending order."])
    return instruction, _join(numbers), _join(sorted(numbers, reverse=True))


def _count_letter(rng):
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    instruction, input = rng.choice([
        (f"How many times does the letter '{letter}' appear in the word '{word}'?", ""),
        (f"Count the letter '{letter}' in the word '{word}'.", ""),
        (f"Count how many times the letter '{letter}' occurs in the given word.", word),
    ])
    return instruction, input, str(word.count(letter))


def _uppercase(rng):
    phrase = _phrase(rng)
    return rng.choice([
        "Write this phrase in capital letters.",
        "Convert the text to upper case.",
        "Rewrite the sentence using only uppercase letters.",
    ]), phrase, phrase.upper()


def _sequence(rng):
    start, step, length = rng.randint(0, 50), rng.randint(1, 12), rng.randint(4, 6)
    terms = [start + i * step for i in range(length)]
    instruction, input = rng.choice([
        ("Continue the sequence with the next number.", _join(terms)),
        ("What number comes next?", _join(terms)),
        (f"Give the next number in the sequence {_join(terms)}.", ""),
    ])
    return instruction, input, str(start + length * step)


def _alphabetical(rng):
    words = _words(rng)
    return rng.choice([
        "Put these words in alphabetical order.",
        "Sort the words alphabetically.",
        "Arrange the following words from A to Z.",
    ]), ", ".join(words), ", ".join(sorted(words))


def _largest(rng):
    numbers = _numbers(rng, 3, 7, 999)
    return rng.choice([
        "Which is the largest number in this list?",
        "Find the biggest number.",
        "Return the maximum of these numbers.",
    ]), _join(numbers), str(max(numbers))


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "reverse_words": _reverse_words,
    "sort_numbers": _sort_numbers,
    "count_letter": _count_letter,
    "uppercase": _uppercase,
    "sequence": _sequence,
    "alphabetical": _alphabetical,
    "largest": _largest,
}


def _check_families(families: Sequence[str] | None) -> list[str]:
    names = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"families={families!r}: unknown {unknown}; valid families are {list(FAMILIES)}.")
    return names


def _generate(rng: random.Random, n: int, families: list[str], seen: set[str]) -> list[Record]:
    """``n`` records whose prompts are not in ``seen`` (updated), families in turn, then shuffled."""
    records: list[Record] = []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not generate {n} distinct records from families {families}; ask for fewer.")
        task = families[len(records) % len(families)]
        instruction, input, output = FAMILIES[task](rng)
        prompt = alpaca_prompt(instruction, input)
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"instruction": instruction, "input": input, "output": output, "task": task,
                        "prompt": prompt})
    rng.shuffle(records)
    return records


def generate_records(n: int, seed: int = 0, families: Sequence[str] | None = None) -> list[Record]:
    """``n`` records with distinct prompts, the families in equal shares (shuffled). Same seed, same list."""
    return _generate(random.Random(seed), n, _check_families(families), set())


def embedded_splits(seed: int = 0, n_train: int = 2000, n_dev: int = 200, n_test: int = 200,
                    families: Sequence[str] | None = None, prompt_template: str = "alpaca") -> DataSplits:
    """Train/dev/test splits of the procedural tasks; no prompt occurs in two splits.

    The train split equals ``generate_records(n_train, seed, families)``.
    """
    if prompt_template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt_template={prompt_template!r}: valid values are {list(PROMPT_TEMPLATES)}.")
    names = _check_families(families)
    rng, seen = random.Random(seed), set()
    train = _generate(rng, n_train, names, seen)
    dev = _generate(rng, n_dev, names, seen)
    test = _generate(rng, n_test, names, seen)
    if prompt_template != "alpaca":
        for record in (*train, *dev, *test):
            record["prompt"] = PROMPT_TEMPLATES[prompt_template](record["instruction"], record["input"])
    label = f"embedded(seed={seed})" if families is None else f"embedded(seed={seed}, families={names})"
    if prompt_template != "alpaca":
        label = label[:-1] + f", template={prompt_template})"
    return DataSplits(train=train, dev=dev, test=test, source=label)


def all_text(seed: int = 0, n: int = 2000) -> Iterator[str]:
    """Texts to train tokenizers on: both Alpaca templates, the word lists, then ``prompt + output`` of
    ``n`` records of every family."""
    yield ALPACA_WITH_INPUT
    yield ALPACA_NO_INPUT
    yield " ".join(NOUNS + ADJECTIVES + VERBS)
    for record in generate_records(n, seed):
        yield record["prompt"] + record["output"]
