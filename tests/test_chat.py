"""freevllm_tools.chat: multi-turn sessions, the terminal loop, and `freevllm chat`.

Tiny random models: answers are gibberish, so the tests check wiring: which features are
reused (no decode, no encoder after the first turn), what the guide and the answerer read,
what the user sees.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import freevllm_tools.video as video_module
from freevllm_tools.chat import CURRENT_PREFIX, HELP, HISTORY_PREFIX, MAX_TURN_CHARS, ChatSession, run_chat
from freevllm_tools.cli import main as cli_main
from freevllm_tools.errors import InputError
from freevllm_tools.testing import tiny_clip_guide, tiny_free_video_llm, tiny_llava_next, write_video

Q1 = "What moves across the picture?"
Q2 = "Where does it end up?"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("chat") / "clip.mp4", num_frames=24)


@pytest.fixture
def qa(tmp_path: Path) -> Any:
    """A pipeline with an empty feature cache."""
    return tiny_free_video_llm(cache_dir=tmp_path / "cache", max_new_tokens=8)


@pytest.fixture(scope="module")
def warm_qa(tmp_path_factory: pytest.TempPathFactory, clip: Path) -> Any:
    """A pipeline whose feature cache already holds ``clip`` (for tests where that does not matter)."""
    qa = tiny_free_video_llm(cache_dir=tmp_path_factory.mktemp("warm") / "cache", max_new_tokens=8)
    qa.features(clip)
    return qa


class Counts:
    """How often the expensive stages ran, and what the guide's text tower and the answerer read."""

    def __init__(self, qa: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.decode = self.guide_frames = self.vision = 0
        self.guide_texts: list[list[str]] = []
        self.prompts: list[str] = []
        read_frames = video_module.read_frames
        guide_frames, vision, encode_text = qa.guide.encode_frames, qa.answerer.encode_frames, qa.guide.encode_text
        answer, stream = qa.answerer.answer, qa.answerer.stream

        def counting_read(*a: Any, **k: Any) -> Any:
            self.decode += 1
            return read_frames(*a, **k)

        def counting_guide(*a: Any, **k: Any) -> Any:
            self.guide_frames += 1
            return guide_frames(*a, **k)

        def counting_vision(*a: Any, **k: Any) -> Any:
            self.vision += 1
            return vision(*a, **k)

        def text_spy(texts: Any) -> Any:
            self.guide_texts.append(list(texts))
            return encode_text(texts)

        def answer_spy(question: str, *a: Any, **k: Any) -> Any:
            self.prompts.append(question)
            return answer(question, *a, **k)

        def stream_spy(question: str, *a: Any, **k: Any) -> Any:
            self.prompts.append(question)
            return stream(question, *a, **k)

        monkeypatch.setattr(video_module, "read_frames", counting_read)
        monkeypatch.setattr(qa.guide, "encode_frames", counting_guide)
        monkeypatch.setattr(qa.guide, "encode_text", text_spy)
        monkeypatch.setattr(qa.answerer, "encode_frames", counting_vision)
        monkeypatch.setattr(qa.answerer, "answer", answer_spy)
        monkeypatch.setattr(qa.answerer, "stream", stream_spy)

    @property
    def work(self) -> tuple[int, int, int]:
        return self.decode, self.guide_frames, self.vision


@pytest.fixture
def counts(qa: Any, monkeypatch: pytest.MonkeyPatch) -> Counts:
    return Counts(qa, monkeypatch)


def scripted(lines: Iterable[Any]) -> tuple[Callable[[str], str], list[str]]:
    """A ``read`` for run_chat: returns the lines in turn (an exception instance is raised), then EOF."""
    pending = list(lines)
    prompts: list[str] = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        if not pending:
            raise EOFError
        item = pending.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    return read, prompts


# -- sessions ------------------------------------------------------------------------------------


def test_every_turn_after_the_first_is_a_cache_hit_with_no_decode_or_encoder(qa: Any, clip: Path, counts: Counts) -> None:
    chat = ChatSession(qa, clip)
    first = chat.ask(Q1)
    assert first.result.cache_hit is False and first.result.extra["features_from"] == "computed"
    assert counts.work == (1, 1, 1)  # one decode, each encoder once
    for question in (Q2, "Is there a red corner?"):
        turn = chat.ask(question)
        assert turn.result.cache_hit is True and turn.result.extra["features_from"] == "session"
    assert counts.work == (1, 1, 1)
    # A new session on the same pipeline: the feature cache on disk serves the first turn.
    again = ChatSession(qa, clip).ask(Q1)
    assert again.result.cache_hit is True and again.result.extra["features_from"] == "feature cache"
    assert counts.work == (1, 1, 1)
    assert [t.result.extra["turn"] for t in chat.turns] == [1, 2, 3]


def test_a_changed_file_is_read_again(qa: Any, tmp_path: Path, counts: Counts) -> None:
    path = write_video(tmp_path / "v.mp4", num_frames=12, seed=1)
    chat = ChatSession(qa, path)
    chat.ask(Q1)
    write_video(path, num_frames=16, seed=2)  # same name, other content
    turn = chat.ask(Q2)
    assert turn.result.cache_hit is False and turn.result.extra["features_from"] == "computed"
    assert counts.decode == 2


def test_guide_reads_the_question_alone_and_llava_reads_the_transcript(qa: Any, clip: Path, counts: Counts) -> None:
    chat = ChatSession(qa, clip)
    first = chat.ask(Q1)
    second = chat.ask(Q2)
    assert counts.guide_texts == [[Q1], [Q2]]
    assert first.prompt == Q1 and first.history_used == 0
    assert second.prompt == f"{HISTORY_PREFIX} Q: {Q1} A: {first.answer} {CURRENT_PREFIX} {Q2}"
    assert second.history_used == 1 and counts.prompts == [Q1, second.prompt]
    assert second.result.question == Q2 and second.result.extra["prompt"] == second.prompt
    assert second.answer == second.result.answer and second.answer.startswith("In the video,")
    # The frames follow the current question: the same as asking it alone.
    alone = qa.ask(clip, Q2)
    assert {k: v.frame_indices for k, v in second.result.pathways.items()} == {
        k: v.frame_indices for k, v in alone.pathways.items()
    }
    assert second.result.num_visual_tokens == alone.num_visual_tokens


def test_without_history_each_turn_is_exactly_ask(warm_qa: Any, clip: Path) -> None:
    chat = ChatSession(warm_qa, clip, history_turns=0)
    for question in (Q1, Q2):
        turn = chat.ask(question)
        direct = warm_qa.ask(clip, question)
        assert turn.prompt == question and turn.history_used == 0
        assert turn.answer == direct.answer
        assert turn.result.pathways == direct.pathways
        assert turn.result.num_visual_tokens == direct.num_visual_tokens
    no_room = ChatSession(warm_qa, clip, max_history_chars=0)
    no_room.ask(Q1)
    assert no_room.ask(Q2).prompt == Q2


def test_history_is_bounded_to_the_last_turns(warm_qa: Any, clip: Path) -> None:
    chat = ChatSession(warm_qa, clip, history_turns=2)
    questions = [f"MARK{i} " + "what colour is the square " * 12 for i in range(4)]
    for question in questions:
        turn = chat.ask(question)
    assert turn.history_used == 2
    transcript = turn.prompt.removeprefix(HISTORY_PREFIX).split(CURRENT_PREFIX)[0]
    assert "MARK0" not in transcript and "MARK1" in transcript and "MARK2" in transcript
    assert len(transcript.strip()) <= chat.max_history_chars
    assert all(len(part) <= 2 * MAX_TURN_CHARS + 10 for part in transcript.split(" | "))
    assert turn.prompt.endswith(f"{CURRENT_PREFIX} {' '.join(questions[3].split())}")


def test_oldest_turns_are_dropped_when_the_context_is_short(warm_qa: Any, clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chat = ChatSession(warm_qa, clip)
    first = chat.ask(Q1)
    answerer = warm_qa.answerer
    features = warm_qa.features(clip)
    context = features.timing(warm_qa.plan(features, Q2))  # the sentence the answer will carry
    assert context.startswith("The video lasts")
    prompt_tokens = len(answerer.tokenize_prompt(Q2, context)) - 1
    alone = prompt_tokens + first.result.num_visual_tokens + warm_qa.max_new_tokens
    monkeypatch.setattr(answerer, "max_context", alone + 2)  # room for the question, not the transcript
    second = chat.ask(Q2)
    assert second.history_used == 0 and second.prompt == Q2
    assert second.answer.startswith("In the video,")


def test_frames_text_names_each_frame_time_and_region(qa: Any, clip: Path) -> None:
    chat = ChatSession(qa, clip)
    assert chat.frames_text().startswith("No answer yet")
    chat.ask(Q1)
    text = chat.frames_text()
    result = chat.last
    assert f"{result.num_visual_tokens} visual tokens" in text and "features computed" in text
    for name in ("slow", "middle"):
        p = result.pathways[name]
        assert p.frame_indices
        for index, t, (x0, y0, x1, y1) in zip(p.frame_indices, p.timestamps, p.boxes_px):
            assert f"frame {index} at {t:.2f}s, region x {x0}-{x1}, y {y0}-{y1}" in text
    assert f"fast: {len(result.pathways['fast'].frame_indices)} frame(s)" in text


def test_streamed_pieces_join_to_the_answer(warm_qa: Any, clip: Path) -> None:
    pieces: list[str] = []
    turn = ChatSession(warm_qa, clip).ask(Q1, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == turn.answer


async def test_aask(warm_qa: Any, clip: Path) -> None:
    chat = ChatSession(warm_qa, clip)
    turn = await chat.aask(Q1)
    assert turn.answer == warm_qa.ask(clip, Q1).answer and chat.turns == [turn]


def test_failed_or_interrupted_turns_are_not_remembered(warm_qa: Any, clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chat = ChatSession(warm_qa, clip)
    with pytest.raises(InputError, match="empty"):
        chat.ask("   ")
    with pytest.raises(InputError, match="characters long"):
        chat.ask("x" * 5000)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(warm_qa.answerer, "answer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        chat.ask(Q1)
    assert chat.turns == [] and chat.last is None
    with pytest.raises(InputError, match="history_turns"):
        ChatSession(warm_qa, clip, history_turns=-1)
    with pytest.raises(InputError, match="FreeVideoLLM"):
        ChatSession(object(), clip)


# -- the terminal loop ---------------------------------------------------------------------------


def test_run_chat_answers_and_handles_commands(qa: Any, clip: Path, tmp_path: Path, counts: Counts) -> None:
    sheet = tmp_path / "sheet.png"
    read, prompts = scripted(
        ["/sheet", Q1, "", "/frames", "/help", "/nope", Q2, f"/sheet {sheet}", "/history", "/reset",
         "/history", "/quit", "never read"]
    )
    out = io.StringIO()
    chat = ChatSession(qa, clip)
    assert run_chat(chat, read=read, out=out, progress=False) == 0
    text = out.getvalue()
    assert len(prompts) == 12  # stopped at /quit
    answers = [line for line in text.splitlines() if line.startswith("llava> ")]
    assert len(answers) == 2 and all(a.startswith("llava> In the video,") for a in answers)
    # Features are loaded before the first question; the first answer still says they were computed.
    assert "[features computed; " in text and text.count("[cache hit; ") == 1
    assert counts.work == (2, 1, 1)  # the second decode is /sheet's: it draws the frames themselves
    assert "error: no answer yet" in text
    assert f"Frames used for {Q1!r}" in text and "region x " in text
    assert HELP in text and "Unknown command /nope" in text
    assert f"Contact sheet: {sheet}" in text
    with Image.open(sheet) as image:
        assert image.format == "PNG"
    assert f"1. Q: {Q1}" in text and f"2. Q: {Q2}" in text
    assert "Conversation forgotten." in text and text.rstrip().endswith("Bye.") and "No turns yet." in text


@pytest.mark.parametrize("end", [EOFError(), KeyboardInterrupt()], ids=["eof", "ctrl-c"])
def test_run_chat_ends_quietly_on_eof_and_ctrl_c(warm_qa: Any, clip: Path, end: BaseException) -> None:
    read, _ = scripted([Q1, end, Q2])
    out = io.StringIO()
    chat = ChatSession(warm_qa, clip)
    assert run_chat(chat, read=read, out=out, progress=False) == 0
    assert len(chat.turns) == 1 and out.getvalue().rstrip().endswith("Bye.")


def test_run_chat_survives_an_interrupted_answer_and_a_bad_question(
    warm_qa: Any, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = warm_qa.answerer.stream
    calls = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return stream(*args, **kwargs)

    monkeypatch.setattr(warm_qa.answerer, "stream", flaky)
    read, _ = scripted([Q1, "y" * 3000, Q2])
    out = io.StringIO()
    chat = ChatSession(warm_qa, clip)
    assert run_chat(chat, read=read, out=out, progress=False) == 0
    text = out.getvalue()
    assert "(answer interrupted; not kept in the history)" in text
    assert "error: question is 3,000 characters long" in text
    assert [t.question for t in chat.turns] == [Q2]


# -- `freevllm chat` -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("models")
    guide = tiny_clip_guide(0).save_pretrained(root / "guide")
    llm = tiny_llava_next(0, max_position_embeddings=2048).save_pretrained(root / "llm")
    return ["--guide", str(guide), "--llm", str(llm), "--device", "cpu"]


def test_freevllm_chat(model_dirs: list[str], clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{Q1}\n{Q2}\n/frames\n"))
    args = ["chat", str(clip), *model_dirs, "--cache-dir", str(tmp_path / "cache"), "--max-new-tokens", "4"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert f"you> {Q1}" in out and f"you> {Q2}" in out  # piped input is echoed
    answers = [line for line in out.splitlines() if line.startswith("llava> ")]
    assert len(answers) == 2 and all(a.startswith("llava> In the video,") for a in answers)
    assert "[features computed; " in out and "[cache hit; " in out
    assert f"Frames used for {Q2!r}" in out and out.rstrip().endswith("Bye.")


def test_freevllm_chat_bad_video_fails_before_loading_models(tmp_path: Path, capsys: Any) -> None:
    missing = tmp_path / "missing.mp4"
    assert cli_main(["chat", str(missing), "--llm", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("freevllm: error:") and "missing.mp4" in err and "no-model" not in err
    assert not os.path.exists(tmp_path / "no-model")
