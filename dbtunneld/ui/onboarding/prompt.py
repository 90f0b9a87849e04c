"""Questions to the user, one line each, answered from a line reader (stdin by default).

Tests drive ``dbtunneld init`` with scripted answers on stdin; an empty answer takes the default
shown in brackets. A closed stdin is an error naming the unanswered question, never a hang.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence, TextIO

from ...core.errors import NeedsUserError


class Prompter:
    """Ask questions on ``out`` and read answers with ``read_line`` (returns "" at EOF)."""

    def __init__(self, read_line: Callable[[], str] | None = None, out: TextIO | None = None) -> None:
        self._read_line = read_line or sys.stdin.readline
        self.out = out or sys.stdout

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def show_sign_in(self, url: str, code: str) -> None:
        """The AWS sign-in is waiting for the user to confirm ``code`` at ``url``."""
        self.say(f"Sign in to AWS: open {url} and confirm the code {code}")

    def ask(self, question: str, default: str = "", *, required: bool = False) -> str:
        """The answer, or ``default`` for an empty line; ``required`` repeats until non-empty."""
        shown = f" [{default}]" if default else ""
        while True:
            print(f"{question}{shown}: ", end="", file=self.out, flush=True)
            line = self._read_line()
            if line == "":
                raise NeedsUserError(f"no answer to {question!r}: the input ended",
                                     hint="run `dbtunneld init` in a terminal, or pipe one answer per line")
            answer = line.strip() or default
            if answer or not required:
                return answer
            self.say("  an answer is needed here")

    def choose(self, question: str, options: Sequence[str], default: int = 0) -> int:
        """The index of the chosen option (by number or by its exact text)."""
        for i, option in enumerate(options, 1):
            self.say(f"  {i}) {option}")
        while True:
            answer = self.ask(question, str(default + 1))
            if answer.isdigit() and 1 <= int(answer) <= len(options):
                return int(answer) - 1
            if answer in options:
                return list(options).index(answer)
            self.say(f"  answer a number from 1 to {len(options)}")

    def choose_many(self, question: str, options: Sequence[str]) -> list[int]:
        """Indexes chosen by "all" (the default), "none", or numbers separated by commas or spaces."""
        for i, option in enumerate(options, 1):
            self.say(f"  {i}) {option}")
        while True:
            answer = self.ask(question, "all").lower()
            if answer == "all":
                return list(range(len(options)))
            if answer == "none":
                return []
            parts = answer.replace(",", " ").split()
            if parts and all(p.isdigit() and 1 <= int(p) <= len(options) for p in parts):
                return sorted({int(p) - 1 for p in parts})
            self.say(f"  answer all, none, or numbers from 1 to {len(options)} (e.g. 1,3)")

    def confirm(self, question: str, default: bool = True) -> bool:
        while True:
            answer = self.ask(f"{question} ({'Y/n' if default else 'y/N'})").lower()
            if not answer:
                return default
            if answer in ("y", "yes", "n", "no"):
                return answer.startswith("y")
            self.say("  answer y or n")
