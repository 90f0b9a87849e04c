"""The first-run window (`dbtunneld init --gui`): the same wizard as `dbtunneld init`, asked in Tk.

``InitWizard`` runs on a worker thread and asks through ``WindowPrompter``; each question becomes a
page of the window (a text field prefilled with the default, radio buttons, or checkboxes) on the
Tk thread, and the worker waits for its answer. Nothing of the wizard's logic lives here. When the
config is written, the window starts the daemon (or asks a running one to reload) and connects
the clusters just added. Tk runs in its own process, never beside pystray's main loop.

Keyboard: Return is "Next"; on a choice page the digits 1-9 pick an option (toggle a checkbox).
The window title is "dbtunneld setup - <step>: <question>", so tests (and screen readers) find
the page being shown.
"""

from __future__ import annotations

import logging
import queue
import threading
import tkinter as tk
import webbrowser
from dataclasses import dataclass, field
from pathlib import Path
from tkinter import ttk
from typing import Any, Callable, Sequence

from ...core.errors import DbtunneldError, NeedsUserError
from .prompt import Prompter
from .wizard import InitWizard

log = logging.getLogger(__name__)

TITLE = "dbtunneld setup"
STEPS = (("AWS", "1. AWS profile"), ("Sign in", "2. Sign in"), ("Vault", "3. Vault"),
         ("Transport", "4. Bastion"), ("Bastion", "4. Bastion"), ("SSH", "4. Bastion"),
         ("Clusters", "5. Clusters"), ("Local port", "5. Clusters"))
CLOSED = object()


def step_of(question: str) -> str:
    """The wizard step a question belongs to (for the page heading)."""
    if question.startswith("Vault database role"):
        return "5. Clusters"
    return next((step for prefix, step in STEPS if question.startswith(prefix)), "Setup")


@dataclass
class Question:
    """One question from the wizard thread; its answer comes back through ``answers``."""

    kind: str                                   # ask | choose | choose_many | confirm
    text: str
    default: Any = ""
    options: Sequence[str] = ()
    answers: "queue.Queue[Any]" = field(default_factory=queue.Queue)


class WindowPrompter(Prompter):
    """The wizard's questions, shown by ``window`` (every call hops to the Tk thread)."""

    def __init__(self, window: "SetupWindow") -> None:
        super().__init__(read_line=lambda: "")
        self.window = window

    def say(self, text: str = "") -> None:
        log.info("init: %s", text)
        self.window.post(lambda: self.window.add_line(text))

    def show_sign_in(self, url: str, code: str) -> None:
        self.say(f"Sign in to AWS in your browser and confirm the code {code}")
        self.window.post(lambda: self.window.show_code(url, code))

    def ask(self, question: str, default: str = "", *, required: bool = False) -> str:
        while True:
            answer = str(self._answer(Question("ask", question, default))).strip() or default
            if answer or not required:
                return answer
            self.say(f"{question}: an answer is needed here")

    def choose(self, question: str, options: Sequence[str], default: int = 0) -> int:
        return int(self._answer(Question("choose", question, default, options)))

    def choose_many(self, question: str, options: Sequence[str]) -> list[int]:
        return list(self._answer(Question("choose_many", question, None, options)))

    def confirm(self, question: str, default: bool = True) -> bool:
        return bool(self._answer(Question("confirm", question, default)))

    def _answer(self, q: Question) -> Any:
        self.window.post(lambda: self.window.show_question(q))
        answer = q.answers.get()
        if answer is CLOSED:
            raise NeedsUserError("the setup window was closed before the setup was done",
                                 hint="run `dbtunneld init` (or pick Set up… in the tray) again")
        return answer


class SetupWindow:
    """The Tk window: a heading, the current question, the wizard's messages, and Next."""

    def __init__(self, root: tk.Tk) -> None:
        self.root = root
        self._inbox: "queue.Queue[Callable[[], None]]" = queue.Queue()
        self.current: Question | None = None
        self._read: Callable[[], Any] = lambda: None
        root.title(TITLE)
        root.geometry("640x520")
        root.protocol("WM_DELETE_WINDOW", self.close)
        self.heading = ttk.Label(root, text="Setting up dbtunneld", font=("TkDefaultFont", 15, "bold"))
        self.heading.pack(anchor="w", padx=16, pady=(14, 4))
        self.code = ttk.Frame(root)
        self.body = ttk.Frame(root)
        self.body.pack(fill="x", padx=16, pady=6)
        self.next = ttk.Button(root, text="Next", command=self.submit, state="disabled")
        self.next.pack(anchor="e", padx=16)
        self.lines = tk.Text(root, height=10, wrap="word", state="disabled", relief="flat", background="#f4f4f4")
        self.lines.pack(fill="both", expand=True, padx=16, pady=(8, 14))
        root.bind("<Return>", lambda _e: self.submit())
        root.bind("<KP_Enter>", lambda _e: self.submit())
        root.bind("<Key>", self._digit)
        self._drain()

    # -- from other threads

    def post(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)

    def _drain(self) -> None:
        while True:
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                break
            fn()
        self.root.after(40, self._drain)

    # -- pages

    def add_line(self, text: str) -> None:
        self.lines.configure(state="normal")
        self.lines.insert("end", text + "\n")
        self.lines.see("end")
        self.lines.configure(state="disabled")

    def show_code(self, url: str, code: str) -> None:
        for child in self.code.winfo_children() + self.body.winfo_children():
            child.destroy()
        ttk.Label(self.body, text="Waiting for the sign-in to be confirmed…").pack(anchor="w")
        ttk.Label(self.code, text="Confirm this code in the browser:").pack(anchor="w")
        ttk.Label(self.code, text=code, font=("TkFixedFont", 22, "bold")).pack(anchor="w", pady=4)
        ttk.Button(self.code, text="Open the sign-in page", command=lambda: webbrowser.open(url)).pack(anchor="w")
        self.code.pack(fill="x", padx=16, pady=6, before=self.body)
        self._set_title("2. Sign in", f"waiting for the code {code}")

    def show_question(self, q: Question) -> None:
        self.code.pack_forget()
        for child in self.body.winfo_children():
            child.destroy()
        self.current = q
        step = step_of(q.text)
        self._set_title(step, q.text)
        ttk.Label(self.body, text=q.text, wraplength=600).pack(anchor="w", pady=(0, 6))
        self._read = {"ask": self._entry, "choose": self._radios, "choose_many": self._checks,
                      "confirm": self._yes_no}[q.kind](q)
        self.next.configure(state="normal")

    def _set_title(self, step: str, text: str) -> None:
        self.heading.configure(text=step)
        self.root.title(f"{TITLE} - {step}: {text}")

    def _entry(self, q: Question) -> Callable[[], str]:
        value = tk.StringVar(value=str(q.default or ""))
        entry = ttk.Entry(self.body, textvariable=value, width=70)
        entry.pack(anchor="w")
        entry.focus_set()
        entry.select_range(0, "end")              # typing replaces the proposal
        return value.get

    def _radios(self, q: Question) -> Callable[[], int]:
        value = tk.IntVar(value=int(q.default or 0))
        for i, option in enumerate(q.options):
            ttk.Radiobutton(self.body, text=f"{i + 1}) {option}", variable=value, value=i).pack(anchor="w")
        self._pick = lambda i: value.set(i)
        self.root.focus_force()
        return value.get

    def _checks(self, q: Question) -> Callable[[], list[int]]:
        values = [tk.BooleanVar(value=True) for _ in q.options]
        for i, option in enumerate(q.options):
            ttk.Checkbutton(self.body, text=f"{i + 1}) {option}", variable=values[i]).pack(anchor="w")
        self._pick = lambda i: values[i].set(not values[i].get())
        self.root.focus_force()
        return lambda: [i for i, v in enumerate(values) if v.get()]

    def _yes_no(self, q: Question) -> Callable[[], bool]:
        value = tk.BooleanVar(value=bool(q.default))
        ttk.Checkbutton(self.body, text="Yes", variable=value).pack(anchor="w")
        return value.get

    def _digit(self, event: tk.Event) -> None:
        q = self.current
        if q is None or q.kind not in ("choose", "choose_many") or not event.char.isdigit():
            return
        index = int(event.char) - 1
        if 0 <= index < len(q.options):
            self._pick(index)

    def submit(self) -> None:
        q = self.current
        if q is None:
            return
        self.current = None
        self.next.configure(state="disabled")
        q.answers.put(self._read())

    def finish(self, heading: str, text: str) -> None:
        """The last page: what happened, and a Close button."""
        self.code.pack_forget()
        for child in self.body.winfo_children():
            child.destroy()
        self._set_title(heading, text.splitlines()[0] if text else heading)
        ttk.Label(self.body, text=text, wraplength=600, justify="left").pack(anchor="w")
        self.next.configure(text="Close", state="normal", command=self.root.destroy)
        self.root.bind("<Return>", lambda _e: self.root.destroy())

    def close(self) -> None:
        if self.current is not None:
            self.current.answers.put(CLOSED)
        self.root.destroy()


def run_window(config_path: Path, *, ports_file: Path | None, open_browser: bool,
               after_write: Callable[[list[str], WindowPrompter], str]) -> int:
    """Show the window until it is closed; 0 when the config was written (or had nothing to add)."""
    try:
        root = tk.Tk(className="dbtunneld")
    except tk.TclError as exc:
        raise NeedsUserError(f"the setup window cannot open: {exc}",
                             hint="run `dbtunneld init` in a terminal instead") from None
    window = SetupWindow(root)
    outcome: dict[str, int] = {"code": 1}

    def work() -> None:
        ui = WindowPrompter(window)
        try:
            added = InitWizard(config_path, ui, ports_file=ports_file, open_browser=open_browser).run()
            summary = after_write(added, ui)
            outcome["code"] = 0
            window.post(lambda: window.finish("Done", summary))
        except DbtunneldError as exc:
            text = exc.message + (f"\nFix: {exc.hint}" if exc.hint else "")
            window.post(lambda: window.finish("Setup stopped", text))
        except Exception as exc:                      # shown, never a silent dead window
            log.exception("init window: the wizard failed")
            text = f"{type(exc).__name__}: {exc}"
            window.post(lambda: window.finish("Setup stopped", text))

    threading.Thread(target=work, name="init-wizard", daemon=True).start()
    root.mainloop()
    return outcome["code"]
