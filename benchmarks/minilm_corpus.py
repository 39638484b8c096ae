"""A small fixed corpus of varied English for the MiniLM benchmark: calibration and evaluation texts
are drawn from disjoint topic lists, so the evaluation measures text the calibration never saw."""

from __future__ import annotations

import random

SEQ_LEN = 64
N_CALIBRATION = 128
N_EVALUATION = 128

_CALIBRATION_TOPICS = [
    "the harbour at dawn", "a vegetable garden", "the city council budget", "a jazz concert", "mountain weather",
    "the new train timetable", "a chess tournament", "bread baking", "the school library", "a solar panel installation",
    "the museum's winter exhibition", "a broken washing machine", "the football season", "migrating birds",
    "a job interview", "the price of coffee", "an old sailing ship", "volcanic islands", "a software update",
    "the village bakery", "a marathon runner", "quantum computers", "the local hospital", "a thunderstorm",
    "wild mushrooms", "the stock market", "a family reunion", "electric bicycles", "the desert at night",
    "a poetry reading", "the recycling programme", "a lost passport",
]
_EVALUATION_TOPICS = [
    "the airport security line", "a bee colony", "the election results", "a violin lesson", "river flooding",
    "the night bus", "a tennis final", "homemade pasta", "the university archive", "a wind farm",
    "the gallery's new sculpture", "a leaking roof", "the basketball playoffs", "whale watching",
    "a salary negotiation", "the cost of housing", "a medieval castle", "coral reefs", "a mobile phone battery",
    "the corner pharmacy", "a cycling race", "machine translation", "the dental clinic", "a heat wave",
    "autumn leaves", "interest rates", "a wedding speech", "self-driving cars", "the arctic tundra",
    "a theatre premiere", "the water supply", "a missed flight",
]
_TEMPLATES = [
    "I read an article about {t} this morning and it changed my mind.",
    "Can you tell me more about {t}?",
    "Everyone at work was talking about {t} yesterday.",
    "The report on {t} was longer than anyone expected, and most of it was about costs.",
    "My grandmother used to tell stories about {t}.",
    "Scientists have published a new study on {t}.",
    "We argued for an hour about {t} before dinner.",
    "There is a documentary about {t} on television tonight.",
    "Nobody expected {t} to become such a popular topic.",
    "The photographs of {t} were beautiful, but the captions were wrong.",
    "She wrote a short essay on {t} for her class.",
    "Is {t} really as important as the newspapers say?",
    "After the meeting about {t}, the committee decided to wait another year.",
    "He complained about {t} to anyone who would listen.",
    "The guidebook has a whole chapter on {t}.",
    "Our neighbours have strong opinions about {t}.",
]
_CONNECTIVES = ["", " Later that week,", " Meanwhile,", " On the other hand,", " In the end,"]


def _texts(topics: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = [rng.choice(_TEMPLATES).format(t=rng.choice(topics))]
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):   # varied lengths: some texts fill SEQ_LEN, most pad
            connective = rng.choice(_CONNECTIVES)
            sentence = rng.choice(_TEMPLATES).format(t=rng.choice(topics))
            parts.append(f"{connective} {sentence[0].lower()}{sentence[1:]}" if connective else " " + sentence)
        texts.append("".join(parts))
    return texts


def calibration_texts() -> list[str]:
    return _texts(_CALIBRATION_TOPICS, N_CALIBRATION, seed=1)


def evaluation_texts() -> list[str]:
    return _texts(_EVALUATION_TOPICS, N_EVALUATION, seed=2)
