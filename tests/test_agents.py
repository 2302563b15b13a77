"""agents/: the LangChain agent, the LlamaIndex agent and the chatbot, run offline end to end.

Video models are tiny and random (answers are gibberish); the agents' LLMs are scripted. The
tests check what reached the user, which tools were called with which arguments, and what the
pipeline was asked.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
from llama_index.core.llms.mock import MockFunctionCallingLLM

from freevllm_tools.errors import InputError
from freevllm_tools.testing import tiny_free_video_llm, write_video

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `agents` is a folder of the repository, not of the package
    sys.path.insert(0, str(ROOT))

from agents import chatbot, langchain_agent, llama_index_agent  # noqa: E402

QUESTION = "What moves across the picture?"
QUERY = "a yellow square"


def test_every_agent_file_is_exercised_here() -> None:
    scripts = {p.name for p in (ROOT / "agents").glob("*.py")} - {"__init__.py", "_common.py"}
    assert scripts == {"langchain_agent.py", "llama_index_agent.py", "chatbot.py"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("agents")
    videos = root / "videos"
    videos.mkdir()
    for i in range(2):
        write_video(videos / f"v{i}.mp4", num_frames=12, seed=i)
    write_video(root / "outside.mp4", num_frames=6, seed=7)  # next to the folder, not in it
    return videos


@pytest.fixture(scope="module")
def qa(folder: Path) -> Any:
    return tiny_free_video_llm(cache_dir=folder.parent / "cache", max_new_tokens=6)


@pytest.fixture(scope="module")
def library(folder: Path, qa: Any) -> Any:
    from agents._common import open_folder_library

    lib = open_folder_library(folder, qa, folder.parent / "library", progress=False)
    assert len(lib) == 2
    yield lib
    lib.close()


@pytest.fixture
def asked(qa: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(video path, question) of every ask / aask the pipeline gets."""
    calls: list[tuple[str, str]] = []
    ask, aask = qa.ask, qa.aask

    def ask_spy(video: Any, question: str, **kwargs: Any) -> Any:
        calls.append((os.fspath(video), question))
        return ask(video, question, **kwargs)

    async def aask_spy(video: Any, question: str, **kwargs: Any) -> Any:
        calls.append((os.fspath(video), question))
        return await aask(video, question, **kwargs)

    monkeypatch.setattr(qa, "ask", ask_spy)
    monkeypatch.setattr(qa, "aask", aask_spy)
    return calls


def first_id(text: str) -> str:
    match = re.search(r"\(id (\d+)\)", text)
    assert match, text
    return match.group(1)


# -- LangChain ------------------------------------------------------------------------------------


class ScriptedChatModel(BaseChatModel):
    """A chat model that follows a script: a function from the conversation to the next message."""

    script: Callable[[list[BaseMessage]], AIMessage]
    bound: list[str] = []
    seen: list[list[BaseMessage]] = []

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        self.seen.append(list(messages))
        return ChatResult(generations=[ChatGeneration(message=self.script(messages))])

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedChatModel:
        self.bound = [getattr(t, "name", None) or t["name"] for t in tools]
        return self


def call(name: str, **args: Any) -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": f"call-{name}", "type": "tool_call"}])


def search_then_ask(messages: list[BaseMessage]) -> AIMessage:
    """video_search; then video_qa on the best moment's video id; then answer with what it said."""
    last = messages[-1]
    if not isinstance(last, ToolMessage):
        return call("video_search", query=QUERY, k=1)
    if last.name == "video_search":
        return call("video_qa", video=first_id(str(last.content)), question=QUESTION)
    return AIMessage(content=f"Found it. {last.content}")


def test_langchain_agent_searches_then_asks_the_video(qa: Any, library: Any, folder: Path, asked: list) -> None:
    model = ScriptedChatModel(script=search_then_ask, seen=[])
    agent = langchain_agent.build_agent(model, qa, library, allowed_roots=[str(folder)])
    messages = langchain_agent.ask(agent, "Which video shows a yellow square, and what moves?")
    assert model.bound == ["video_qa", "video_search"]
    assert isinstance(model.seen[0][0], SystemMessage) and model.seen[0][0].content == langchain_agent.SYSTEM_PROMPT
    tools = [m for m in messages if isinstance(m, ToolMessage)]
    assert [(m.name, m.status) for m in tools] == [("video_search", "success"), ("video_qa", "success")]
    video_id = first_id(str(tools[0].content))
    record = library.video(int(video_id))
    assert asked == [(os.path.realpath(record.path), QUESTION)]  # the right video, the right question
    final = messages[-1].content
    assert final == f"Found it. {tools[1].content}"
    assert "Answer: In the video," in final and "Based on: slow frames at " in final


def test_langchain_agent_reads_by_file_name_and_only_inside_the_folder(qa: Any, library: Any, folder: Path, asked: list) -> None:
    def by_name(messages: list[BaseMessage]) -> AIMessage:
        done = [m for m in messages if isinstance(m, ToolMessage)]
        if len(done) == 0:
            return call("video_qa", video="v1.mp4", question=QUESTION)
        if len(done) == 1:
            return call("video_qa", video="../outside.mp4", question=QUESTION)
        return AIMessage(content=" | ".join(f"{m.status}: {m.content}" for m in done))

    agent = langchain_agent.build_agent(ScriptedChatModel(script=by_name), qa, library, allowed_roots=[str(folder)])
    final = langchain_agent.ask(agent, "Look at v1.mp4 and at the file next to the folder")[-1].content
    assert asked == [(os.path.realpath(folder / "v1.mp4"), QUESTION)]
    assert final.startswith("success: Answer: In the video,")
    assert "error: " in final and "outside the allowed folders" in final


def test_langchain_agent_names_a_model_through_init_chat_model(qa: Any, library: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    names: list[str] = []
    model = ScriptedChatModel(script=search_then_ask)

    def fake_init(name: str, **kwargs: Any) -> Any:
        names.append(name)
        return model

    monkeypatch.setattr(langchain_agent, "init_chat_model", fake_init)
    agent = langchain_agent.build_agent("someprovider:some-model", qa, library)
    assert names == ["someprovider:some-model"]
    assert langchain_agent.ask(agent, "What moves?")[-1].content.startswith("Found it. Answer:")
    assert model.bound == ["video_qa", "video_search"]


def tiny_args(folder: Path) -> list[str]:
    base = folder.parent
    return ["--tiny", "--cache-dir", str(base / "cache"), "--library", str(base / "library")]


def test_langchain_agent_main_prints_the_tool_calls_and_the_answer(folder: Path, capsys: Any) -> None:
    model = ScriptedChatModel(script=search_then_ask)
    assert langchain_agent.main([str(folder), "What moves?", *tiny_args(folder)], model=model) == 0
    out = capsys.readouterr().out
    assert "2 video(s) in " in out and "you> What moves?" in out
    assert f"-> video_search(query={QUERY!r}, k=1)" in out
    assert f"<- video_search: 1 moment(s) matching {QUERY!r}" in out
    video_id = first_id(out.split("<- video_search", 1)[1])
    assert f"-> video_qa(video={video_id!r}, question={QUESTION!r})" in out
    assert "<- video_qa: Answer: In the video," in out
    assert re.search(r"^agent> Found it\. Answer: In the video,", out, re.M)


def test_langchain_agent_main_needs_a_model(folder: Path, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        langchain_agent.main([str(folder), "What moves?", "--tiny"])
    assert exit_info.value.code == 2 and "--model provider:model" in capsys.readouterr().err


# -- LlamaIndex -----------------------------------------------------------------------------------


def scripted_llm(seen_prompts: list[str] | None = None) -> MockFunctionCallingLLM:
    """search_video_library; then answer_video_question on the best video id; then answer."""

    def generate(messages: Sequence[ChatMessage], **_: Any) -> ChatMessage:
        if seen_prompts is not None and messages and messages[0].role == MessageRole.SYSTEM:
            seen_prompts.append(str(messages[0].content))
        results = [m for m in messages if m.role == MessageRole.TOOL]
        if not results:
            block = ToolCallBlock(tool_call_id="c1", tool_name="search_video_library", tool_kwargs={"query": QUERY, "k": 1})
        elif len(results) == 1:
            args = {"video": first_id(str(results[0].content)), "question": QUESTION}
            block = ToolCallBlock(tool_call_id="c2", tool_name="answer_video_question", tool_kwargs=args)
        else:
            return ChatMessage(role=MessageRole.ASSISTANT, content=f"Found it. {results[-1].content}")
        return ChatMessage(role=MessageRole.ASSISTANT, blocks=[block])

    return MockFunctionCallingLLM(response_generator=generate)


async def test_llama_index_agent_searches_then_asks_the_video(qa: Any, library: Any, folder: Path, asked: list) -> None:
    prompts: list[str] = []
    agent = llama_index_agent.build_agent(scripted_llm(prompts), qa, library, allowed_roots=[str(folder)])
    out = io.StringIO()
    answer = await llama_index_agent.ask(agent, "Which video shows a yellow square?", out=out)
    trace = out.getvalue()
    assert f"-> search_video_library(query={QUERY!r}, k=1)" in trace
    video_id = first_id(trace.split("<- search_video_library", 1)[1])
    assert f"-> answer_video_question(video={video_id!r}, question={QUESTION!r})" in trace
    record = library.video(int(video_id))
    assert asked[0] == (os.path.realpath(record.path), QUESTION)
    assert answer.startswith("Found it. Answer: In the video,") and "Based on: slow frames at " in answer
    assert prompts and prompts[0] == llama_index_agent.SYSTEM_PROMPT


def test_llama_index_agent_main(folder: Path, capsys: Any) -> None:
    assert llama_index_agent.main([str(folder), "What moves?", *tiny_args(folder)], llm=scripted_llm()) == 0
    out = capsys.readouterr().out
    assert "2 video(s) in " in out and "you> What moves?" in out
    assert "<- answer_video_question: Answer: In the video," in out
    assert re.search(r"^agent> Found it\. Answer: In the video,", out, re.M)


def test_llama_index_agent_model_names(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="provider:model with a provider in"):
        llama_index_agent.load_llm("nosuch:model")
    with pytest.raises(InputError, match="provider:model"):
        llama_index_agent.load_llm("openai")
    monkeypatch.setitem(
        llama_index_agent.PROVIDERS, "openai", ("llama_index.llms.not_installed_here", "OpenAI", "model", "llama-index-llms-openai")
    )
    with pytest.raises(InputError, match="pip install llama-index-llms-openai"):
        llama_index_agent.load_llm("openai:gpt-4o-mini")


# -- chatbot --------------------------------------------------------------------------------------


def test_chatbot_module_in_a_terminal(folder: Path, tmp_path: Path) -> None:
    """`python -m agents.chatbot VIDEO --tiny` from the repository root, questions on stdin."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    lines = f"{QUESTION}\nWhere does it end up?\n/frames\n/quit\n"
    proc = subprocess.run(
        [sys.executable, "-m", "agents.chatbot", str(folder / "v0.mp4"), "--tiny",
         "--cache-dir", str(tmp_path / "cache"), "--max-new-tokens", "4"],
        input=lines, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    answers = [line for line in out.splitlines() if line.startswith("llava> ")]
    assert len(answers) == 2 and all(a.startswith("llava> In the video,") for a in answers)
    notes = [line for line in out.splitlines() if line.startswith("  [")]
    assert notes[0].startswith("  [features computed; ") and notes[1].startswith("  [cache hit; ")
    assert "Frames used for 'Where does it end up?'" in out and "region x " in out
    assert out.rstrip().endswith("Bye.") and "Traceback" not in proc.stderr


def test_chatbot_main_in_process(folder: Path, tmp_path: Path, capsys: Any) -> None:
    replies = iter([QUESTION, "/history"])

    def read(prompt: str) -> str:
        try:
            return next(replies)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    args = [str(folder / "v1.mp4"), "--tiny", "--cache-dir", str(tmp_path / "cache"), "--history-turns", "0"]
    assert chatbot.main(args, read=read, out=out) == 0
    assert f"1. Q: {QUESTION}" in out.getvalue() and "llava> In the video," in out.getvalue()
    assert chatbot.main([str(tmp_path / "missing.mp4"), "--tiny"], out=out) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the first run's progress bars
    assert last.startswith("chatbot: error:") and "missing.mp4" in last
