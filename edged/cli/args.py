"""Argument types the subcommands share: each refuses a value with a sentence naming
the text and what was expected, which argparse prints with the flag."""

from __future__ import annotations

import argparse


def whole(text: str) -> int:
    """A count where 0 is allowed (no retries; "derive it")."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value
