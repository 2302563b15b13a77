"""Multi-turn chat about one video, answered by the LLaVA answerer alone (no other LLM).

.. code-block:: python

    from freevllm_tools import FreeVideoLLM
    from freevllm_tools.chat import ChatSession

    chat = ChatSession(FreeVideoLLM.from_pretrained(), "clip.mp4")
    print(chat.ask("What is the cook holding?").answer)
    print(chat.ask("What does she do with it next?").answer)   # features reused: a cache hit
    print(chat.frames_text())                                  # frames, times, regions used

How a turn is answered, and what the history does:

- **Features once per session.** The video's question-independent features (CLIP guide
  embeddings and the LLM-side projected tokens) are fetched on the first turn, from the feature
  cache when it holds them, else by decoding and encoding once. Later turns reuse them from the
  session (re-fetched only if the file's size or modification time changes), so every turn after
  the first is a cache hit: no decode, no vision encoder. ``AskResult.cache_hit`` says so and
  ``AskResult.extra["features_from"]`` says from where (``"computed"``, ``"feature cache"``,
  ``"session"``).
- **Frames follow the current question.** The CLIP guide scores frames and regions against the
  current question alone. CLIP's text tower reads 77 tokens; a transcript in front would push
  the question out, and the frames should show what is asked now.
- **History as text in the one question slot.** The answerer's prompt is single-turn (one user
  message with one image placeholder, primed with "In the video,"). The session writes a short,
  bounded transcript of the last ``history_turns`` turns in front of the question in that slot:
  ``Earlier in this conversation: Q: ... A: ... | Q: ... A: ... Current question: ...``.
  The model reads the earlier answers as text; it does not see earlier turns' frames, and every
  answer is grounded in the frames chosen for the current question. Oldest turns are dropped
  when the prompt would not fit the model's context. ``ChatTurn.prompt`` (also
  ``AskResult.extra["prompt"]``) is exactly what the answerer read; ``AskResult.question`` is
  the user's question. With ``history_turns=0`` a turn is exactly :meth:`FreeVideoLLM.ask`.

:func:`run_chat` is the terminal loop that ``freevllm chat`` and ``python -m agents.chatbot``
put in front of a session: questions, ``/frames``, ``/history``, ``/sheet``, ``/reset``,
``/help``, ``/quit``; end of input and Ctrl-C end it without a traceback.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .answerer import timing_context
from .errors import FreeVideoError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import AskResult, FreeVideoLLM, VideoFeatures

__all__ = ["ChatSession", "ChatTurn", "run_chat", "frames_text", "HELP"]

#: Earlier turns a prompt carries by default.
DEFAULT_HISTORY_TURNS = 2
#: Characters of one earlier question or answer kept in the transcript.
MAX_TURN_CHARS = 200
#: Characters of the whole transcript.
MAX_HISTORY_CHARS = 600

HISTORY_PREFIX = "Earlier in this conversation:"
CURRENT_PREFIX = "Current question:"


@dataclass
class ChatTurn:
    """One question and its answer."""

    question: str
    """The user's question, as asked."""
    answer: str
    prompt: str
    """What the answerer read in its question slot: the question, with the transcript in front."""
    history_used: int
    """Earlier turns in ``prompt`` (0: the question alone)."""
    result: AskResult
    """The answer's grounding: frames, times, regions, token count, timings, ``cache_hit``."""


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


class ChatSession:
    """A conversation about one video with a :class:`~freevllm_tools.pipeline.FreeVideoLLM`.

    Args:
        qa: the pipeline; its answerer writes every answer.
        video: the video file.
        history_turns: earlier turns written into each prompt (0: none; each turn is then ``qa.ask``).
        max_history_chars: length limit of that transcript, in characters.
        max_new_tokens: longest answer (None: the pipeline's default).

    A session is safe to share between threads: turns run one at a time.
    """

    def __init__(
        self,
        qa: FreeVideoLLM,
        video: str | os.PathLike[str],
        *,
        history_turns: int = DEFAULT_HISTORY_TURNS,
        max_history_chars: int = MAX_HISTORY_CHARS,
        max_new_tokens: int | None = None,
    ) -> None:
        if isinstance(history_turns, bool) or not isinstance(history_turns, int) or history_turns < 0:
            raise InputError(f"history_turns must be a whole number >= 0, got {history_turns!r}")
        if max_history_chars < 0:
            raise InputError(f"max_history_chars must be >= 0, got {max_history_chars!r}")
        if not callable(getattr(qa, "features", None)) or getattr(qa, "answerer", None) is None:
            raise InputError(f"qa must be a FreeVideoLLM, got {type(qa).__name__}")
        self.qa = qa
        self.video = os.fspath(video)
        self.history_turns = history_turns
        self.max_history_chars = max_history_chars
        self.max_new_tokens = max_new_tokens
        self.turns: list[ChatTurn] = []
        self._features: VideoFeatures | None = None
        self._signature: tuple[int, int] | None = None
        self._fetched_from: str | None = None
        self._lock = threading.RLock()

    # -- state ---------------------------------------------------------------------------

    @property
    def last(self) -> AskResult | None:
        """The grounding of the last answer (None before the first)."""
        return self.turns[-1].result if self.turns else None

    def reset(self) -> None:
        """Forget the conversation; the video's features stay loaded."""
        with self._lock:
            self.turns.clear()

    def _stat(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.video)
        except OSError:
            return None
        return info.st_size, info.st_mtime_ns

    def load(self, *, progress: bool = False) -> VideoFeatures:
        """The video's features: held by the session for the unchanged file, else fetched with
        :meth:`FreeVideoLLM.features` (from the feature cache, or decoded and encoded once)."""
        with self._lock:
            signature = self._stat()
            if self._features is None or signature is None or signature != self._signature:
                features = self.qa.features(self.video, progress=progress)
                self._features, self._signature = features, signature
                self._fetched_from = "feature cache" if features.cache_hit else "computed"
            return self._features

    def _take_source(self) -> str:
        """Where the features the next answer uses came from: the fetch, for the first answer
        after it (even when :meth:`load` ran earlier), else the session."""
        source, self._fetched_from = self._fetched_from or "session", None
        return source

    # -- prompts -------------------------------------------------------------------------

    def transcript(self, turns: int | None = None) -> str:
        """The last ``turns`` (default: ``history_turns``) turns as one bounded line of text."""
        count = self.history_turns if turns is None else turns
        if count <= 0 or not self.turns:
            return ""
        parts = [
            f"Q: {_shorten(t.question, MAX_TURN_CHARS)} A: {_shorten(t.answer, MAX_TURN_CHARS)}"
            for t in self.turns[-count:]
        ]
        while len(parts) > 1 and len(" | ".join(parts)) > self.max_history_chars:
            parts.pop(0)
        return _shorten(" | ".join(parts), self.max_history_chars) if self.max_history_chars else ""

    def prompt_for(
        self, question: str, *, num_visual_tokens: int = 0, context: str | None = None
    ) -> tuple[str, int]:
        """The text for the answerer's question slot and how many earlier turns it carries.

        Drops the oldest turns while the prompt (with ``context``, the timing sentence),
        ``num_visual_tokens`` and the answer's new tokens would not fit the answerer's context.
        """
        question = self.qa.limits.check_question(question)
        answerer = self.qa.answerer
        limit = getattr(answerer, "max_context", None)
        new_tokens = self.max_new_tokens or getattr(self.qa, "max_new_tokens", 128)
        for count in range(min(self.history_turns, len(self.turns)), 0, -1):
            transcript = self.transcript(count)
            if not transcript:
                break
            prompt = f"{HISTORY_PREFIX} {transcript} {CURRENT_PREFIX} {question}"
            if limit is None:
                return prompt, count
            num_text = len(answerer.tokenize_prompt(prompt, context)) - 1  # the placeholder becomes the visual tokens
            if num_text + num_visual_tokens + new_tokens <= limit:
                return prompt, count
        return question, 0

    def _timing_stand_in(self, features: Any) -> str:
        """A timing sentence as long as the one the answer's plan will give (same number of key
        frames, each time as wide as the latest), to size the prompt before the plan exists."""
        config = self.qa.config
        count = len(features.indices)
        kept = next((n for p in config.pathways if (n := p.frames_kept(count))), 0)
        latest = max(features.timestamps, default=0.0)
        return timing_context([latest] * kept, features.duration)

    # -- turns ---------------------------------------------------------------------------

    def ask(
        self,
        question: str,
        *,
        on_text: Callable[[str], None] | None = None,
        progress: bool = False,
    ) -> ChatTurn:
        """Answer ``question``, remember the turn, return it. ``on_text`` gets the answer in pieces.

        A turn that fails or is interrupted is not remembered.
        """
        question = self.qa.limits.check_question(question)
        with self._lock:
            started = time.perf_counter()
            features = self.load(progress=progress)
            source = self._take_source()
            loaded = time.perf_counter()
            num_tokens = self.qa.config.num_visual_tokens(
                tuple(features.frame_tokens.shape[1:3]), len(features.indices)
            )
            prompt, used = self.prompt_for(
                question, num_visual_tokens=num_tokens, context=self._timing_stand_in(features)
            )
            # The guide reads the current question alone; LLaVA reads it with the history.
            result = self.qa.answer(
                features, question, prompt=prompt, max_new_tokens=self.max_new_tokens, on_text=on_text
            )
            result.timings["features"] = loaded - started
            result.timings["total"] = time.perf_counter() - started
            result.cache_hit = source != "computed"
            result.extra.update(
                {"prompt": prompt, "history_turns": used, "features_from": source, "turn": len(self.turns) + 1}
            )
            turn = ChatTurn(question, result.answer, prompt, used, result)
            self.turns.append(turn)
            return turn

    async def aask(self, question: str) -> ChatTurn:
        """:meth:`ask` in a worker thread, so an event loop stays responsive."""
        return await asyncio.to_thread(self.ask, question)

    # -- reports -------------------------------------------------------------------------

    def frames_text(self) -> str:
        """Which frames, times and regions the last answer used (what ``/frames`` prints)."""
        if not self.turns:
            return "No answer yet: ask a question first."
        return frames_text(self.last)

    def history_text(self) -> str:
        """The conversation so far, one block per turn."""
        if not self.turns:
            return "No turns yet."
        lines = []
        for number, turn in enumerate(self.turns, 1):
            hit = "cache hit" if turn.result.cache_hit else "features computed"
            lines.append(f"{number}. Q: {turn.question}")
            lines.append(f"   A: {turn.answer}")
            lines.append(f"   ({hit}; prompt carried {turn.history_used} earlier turn(s))")
        return "\n".join(lines)

    def contact_sheet(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Draw the last answer's frames and regions into a PNG (decodes the video's frames)."""
        if not self.turns:
            raise InputError("no answer yet: ask a question before drawing its contact sheet")
        return self.qa.contact_sheet(self.last, path, **kwargs)


def frames_text(result: AskResult) -> str:
    """Per pathway, the frames an answer used: frame number, time, region in pixels."""
    source = result.extra.get("features_from")
    hit = "cache hit" if result.cache_hit else "features computed"
    header = (
        f"Frames used for {result.question!r}: {result.num_visual_tokens} visual tokens, "
        f"{hit}" + (f" ({source})" if source else "")
    )
    return header + "\n" + result.provenance_text()


# -- the terminal loop -----------------------------------------------------------------------------

HELP = """Ask anything about the video; the answer streams as it is written. Commands:
  /frames          which frames, times and regions the last answer used
  /history         the conversation so far
  /sheet [PATH]    draw the last answer's frames and regions into a PNG (default chat_sheet.png)
  /reset           forget the conversation (the video's features stay loaded)
  /help            this text
  /quit            end the chat (so do Ctrl-D and Ctrl-C)"""


def _reader(out: TextIO) -> Callable[[str], str]:
    """``input`` on a terminal (line editing); otherwise read stdin and echo, for a readable log."""
    if sys.stdin is not None and sys.stdin.isatty() and out is sys.stdout:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:  # pragma: no cover - Windows
            pass
        return input

    def read(prompt: str) -> str:
        print(prompt, end="", file=out, flush=True)
        line = sys.stdin.readline() if sys.stdin is not None else ""
        if not line:
            raise EOFError
        print(line.rstrip("\n"), file=out, flush=True)
        return line

    return read


def run_chat(
    session: ChatSession,
    *,
    read: Callable[[str], str] | None = None,
    out: TextIO | None = None,
    stream: bool = True,
    progress: bool = True,
) -> int:
    """Chat in a terminal until ``/quit``, end of input or Ctrl-C; returns the exit status (0).

    ``read(prompt)`` returns one line (default: stdin); ``out`` gets everything printed. Ctrl-C
    while an answer is written stops that answer; at the prompt it ends the chat. An error of the
    package's own family during a turn is printed and the chat goes on.
    """
    out = out or sys.stdout
    read = read or _reader(out)
    name = os.path.basename(session.video)

    def say(text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=out, flush=True)

    say(f"Loading features of {name} ...")
    session.load(progress=progress)
    say(f"Chatting about {name}: ask a question, /help lists the commands, /quit ends.")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            say()
            break
        except KeyboardInterrupt:
            say()
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            command = command.lower()
            if command in ("/quit", "/exit", "/q"):
                break
            if command == "/help":
                say(HELP)
            elif command == "/frames":
                say(session.frames_text())
            elif command == "/history":
                say(session.history_text())
            elif command == "/reset":
                session.reset()
                say("Conversation forgotten.")
            elif command == "/sheet":
                try:
                    path = session.contact_sheet(argument.strip() or "chat_sheet.png")
                except FreeVideoError as error:
                    say(f"error: {error}")
                except OSError as error:
                    say(f"error: cannot write the contact sheet: {error}")
                else:
                    say(f"Contact sheet: {path}")
            else:
                say(f"Unknown command {command}; /help lists the commands.")
            continue
        say("llava> ", end="")
        try:
            if stream:
                turn = session.ask(text, on_text=lambda piece: say(piece, end=""))
                say()
            else:
                turn = session.ask(text)
                say(turn.answer)
        except KeyboardInterrupt:
            say("\n(answer interrupted; not kept in the history)")
            continue
        except FreeVideoError as error:
            say(f"\nerror: {error}")
            continue
        result = turn.result
        hit = "cache hit" if result.cache_hit else "features computed"
        times = ", ".join(f"{t:.2f}s" for t in result.pathways["slow"].timestamps) if "slow" in result.pathways else ""
        key = f"; key frames at {times}" if times else ""
        say(f"  [{hit}; {result.num_visual_tokens} visual tokens{key}; /frames for regions]")
    say("Bye.")
    return 0
