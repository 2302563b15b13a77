"""LangChain integration: standard suites, the text an agent reads, hostile arguments, an agent loop.

Everything runs on the tiny random models and small videos written here; answers are gibberish,
so the tests check wiring and grounding (which frames, which times), not meaning.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from langchain_core.documents import Document
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import BaseTool
from langchain_tests.integration_tests import RetrieversIntegrationTests, ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests

from freevllm_tools.errors import InputError
from freevllm_tools.integrations.langchain import (
    FreeVideoQATool,
    FreeVideoRetriever,
    FreeVideoSearchTool,
    FreeVideoToolkit,
)
from freevllm_tools.testing import read_frame_number, write_video

QUESTION = "What moves across the picture?"


# -- shared parts: one tiny pipeline, one library, a folder of videos and hostile files ----------------


def tiny_pipeline(cache_dir: Path) -> Any:
    import freevllm_tools.testing as testing

    if hasattr(testing, "tiny_free_video_llm"):
        return testing.tiny_free_video_llm(cache_dir=cache_dir)
    from freevllm_tools.pipeline import FreeVideoLLM

    return FreeVideoLLM(testing.tiny_clip_guide(), testing.tiny_llava_next(), "paper", max_new_tokens=8)


class Media:
    """``videos/`` (the allowed root: three clips and hostile entries) and ``outside/`` (a secret)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.videos = base / "videos"
        self.outside = base / "outside"
        self.videos.mkdir()
        self.outside.mkdir()
        self.clips = [write_video(self.videos / f"v{i}.mp4", num_frames=12, seed=i) for i in range(3)]
        self.secret = write_video(self.outside / "secret.mp4", num_frames=6, seed=9)
        self.hostile = base / "hostile"  # an allowed root holding links out, a FIFO, a text file
        self.hostile.mkdir()
        os.symlink(self.secret, self.hostile / "escape.mp4")
        os.symlink(self.outside, self.hostile / "outlink")
        os.symlink("/dev/zero", self.hostile / "zero.mp4")
        os.mkfifo(self.hostile / "pipe.mp4")
        (self.hostile / "notes.txt").write_text("not a video")
        (self.hostile / "big.mp4").write_bytes(b"\0" * 2048)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    return Media(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module")
def qa(media: Media) -> Any:
    return tiny_pipeline(media.base / "cache")


@pytest.fixture(scope="module")
def library(media: Media, qa: Any) -> Any:
    from freevllm_tools.library import VideoLibrary

    lib = VideoLibrary(media.base / "library", qa.guide, cache=False)
    report = lib.add([str(p) for p in media.clips], progress=False)
    assert report.ok and len(lib) == 3, str(report)
    yield lib
    lib.close()


@pytest.fixture
def spy(qa: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Records every ask / aask the pipeline gets: (method, video path, question)."""
    calls: list[tuple[str, str, str]] = []
    ask, aask = qa.ask, qa.aask

    def ask_spy(video: Any, question: str, **kwargs: Any) -> Any:
        calls.append(("ask", os.fspath(video), question))
        return ask(video, question, **kwargs)

    async def aask_spy(video: Any, question: str, **kwargs: Any) -> Any:
        calls.append(("aask", os.fspath(video), question))
        return await aask(video, question, **kwargs)

    monkeypatch.setattr(qa, "ask", ask_spy)
    monkeypatch.setattr(qa, "aask", aask_spy)
    return calls


def _call(tool: BaseTool, **args: Any) -> ToolMessage:
    message = tool.invoke({"type": "tool_call", "id": "call-1", "name": tool.name, "args": args})
    assert isinstance(message, ToolMessage)
    return message


# -- langchain-tests standard suites -------------------------------------------------------------------


class _Parts:
    """Hands the module fixtures to the standard suites, whose parameters are properties."""

    parts: dict[str, Any] = {}

    @pytest.fixture(autouse=True)
    def _attach(self, request: pytest.FixtureRequest, qa: Any, library: Any, media: Media) -> None:
        type(self).parts = {"qa": qa, "library": library, "media": media}


class _QAParams(_Parts):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return FreeVideoQATool

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"qa": self.parts["qa"], "allowed_roots": [str(self.parts["media"].videos)]}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"video": "v0.mp4", "question": QUESTION}


class TestQAToolUnit(_QAParams, ToolsUnitTests):
    pass


class TestQAToolIntegration(_QAParams, ToolsIntegrationTests):
    pass


class _SearchParams(_Parts):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return FreeVideoSearchTool

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"library": self.parts["library"]}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"query": "a yellow square", "k": 2}


class TestSearchToolUnit(_SearchParams, ToolsUnitTests):
    pass


class TestSearchToolIntegration(_SearchParams, ToolsIntegrationTests):
    pass


class TestRetrieverStandard(_Parts, RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[FreeVideoRetriever]:
        return FreeVideoRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"library": self.parts["library"], "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "a yellow square on a dark background"


# -- what the agent reads --------------------------------------------------------------------------------


def test_qa_content_carries_answer_times_and_regions(qa: Any, media: Media, spy: list) -> None:
    tool = FreeVideoQATool(qa=qa, allowed_roots=[media.videos])
    message = _call(tool, video="v1.mp4", question=f"  {QUESTION} ")
    assert message.status == "success"
    assert spy == [("ask", os.path.realpath(media.clips[1]), QUESTION)]
    artifact = message.artifact
    json.dumps(artifact)  # JSON-serialisable
    content = message.content
    assert content.startswith(f"Answer: {artifact['answer'].strip()}\n")
    slow = artifact["pathways"]["slow"]
    assert slow["timestamps"], "the slow pathway kept no frame"
    for name in ("slow", "middle"):
        for t, box in zip(artifact["pathways"][name]["timestamps"], artifact["pathways"][name]["boxes_px"]):
            assert f"{t:.2f}s" in content
            if box is not None:
                assert f"region x{box[0]}-{box[2]} y{box[1]}-{box[3]}" in content
    assert f"Video: v1.mp4 ({artifact['num_visual_tokens']} visual tokens)" in content
    assert artifact["video"] == os.path.realpath(media.clips[1])


async def test_async_goes_through_aask(qa: Any, media: Media, spy: list) -> None:
    tool = FreeVideoQATool(qa=qa, allowed_roots=[media.videos])
    message = await tool.ainvoke(
        {"type": "tool_call", "id": "a", "name": "video_qa", "args": {"video": "v2.mp4", "question": QUESTION}}
    )
    assert message.status == "success" and message.content.startswith("Answer: ")
    assert [c[0] for c in spy] == ["aask", "ask"]  # aask runs ask in a worker thread
    hostile = {"video": "../outside/secret.mp4", "question": QUESTION}
    refused = await tool.ainvoke({"type": "tool_call", "id": "b", "name": "video_qa", "args": hostile})
    assert refused.status == "error" and "outside the allowed folders" in refused.content
    assert len(spy) == 2


def test_library_id_and_library_folders(qa: Any, library: Any, media: Media, spy: list) -> None:
    tool = FreeVideoQATool(qa=qa, library=library)  # roots default to the library's folders
    record = library.videos()[0]
    message = _call(tool, video=str(record.id), question=QUESTION)
    assert message.status == "success", message.content
    assert f"Video: {os.path.basename(record.path)} (id {record.id})" in message.content
    assert spy[-1][1] == os.path.realpath(record.path)
    by_path = _call(tool, video=str(media.clips[2]), question=QUESTION)  # inside a library folder
    assert by_path.status == "success"
    missing = _call(tool, video="999", question=QUESTION)
    assert missing.status == "error" and "no video with id 999" in missing.content
    outside = _call(tool, video=str(media.secret), question=QUESTION)
    assert outside.status == "error" and "outside the allowed folders" in outside.content
    assert len(spy) == 2


def test_search_tool_lists_moments_with_ids_and_times(library: Any) -> None:
    tool = FreeVideoSearchTool(library=library)
    message = _call(tool, query="a yellow square", k=3)
    assert message.status == "success"
    moments = message.artifact
    assert len(moments) == 3
    json.dumps(moments)
    lines = message.content.splitlines()
    assert len(lines) == 4
    for line, moment in zip(lines[1:], moments):
        assert f"(id {moment['video_id']})" in line
        assert f"{moment['start']:.2f}s-{moment['end']:.2f}s" in line
        assert moment["name"] in line


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ({"query": "a square", "k": 10**9}, "k must be from 1 to 50"),
        ({"query": "a square", "k": 0}, "k must be from 1 to 50"),
        ({"query": "a square", "k": "many"}, "Invalid tool arguments (k:"),
        ({"query": ""}, "query is empty"),
        ({"query": "q" * 10_000}, "10,000 characters"),
        ({"k": 3}, "Invalid tool arguments (query:"),
    ],
)
def test_search_tool_bad_arguments(library: Any, args: dict, reason: str) -> None:
    message = _call(FreeVideoSearchTool(library=library), **args)
    assert message.status == "error"
    assert reason in message.content


# -- hostile arguments ------------------------------------------------------------------------------------


class _Opened:
    """Paths opened (audit hook) or stat'ed while recording."""

    recording = False
    paths: list[str] = []
    installed = False

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.recording and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            cls.paths.append(os.fsdecode(args[0]))


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Opened]]:
    if not _Opened.installed:
        sys.addaudithook(_Opened.hook)
        _Opened.installed = True
    _Opened.paths = []
    for name in ("stat", "lstat"):
        original = getattr(os, name)

        def wrapper(path: Any, *a: Any, _original: Callable = original, **k: Any) -> Any:
            if _Opened.recording and isinstance(path, (str, bytes, os.PathLike)):
                _Opened.paths.append(os.fsdecode(path))
            return _original(path, *a, **k)

        monkeypatch.setattr(os, name, wrapper)
    _Opened.recording = True
    yield _Opened
    _Opened.recording = False


HOSTILE = [
    ({"video": "../outside/secret.mp4"}, "outside the allowed folders"),
    ({"video": "../../../../../../etc/passwd"}, "outside the allowed folders"),
    ({"video": "/etc/passwd"}, "outside the allowed folders"),
    ({"video": "SECRET"}, "outside the allowed folders"),  # replaced by the absolute secret path
    ({"video": "escape.mp4"}, "symbolic link leads outside"),
    ({"video": "outlink/secret.mp4"}, "symbolic link leads outside"),
    ({"video": "zero.mp4"}, "symbolic link leads outside"),
    ({"video": "/dev/zero"}, "outside the allowed folders"),
    ({"video": "pipe.mp4"}, "named pipe"),
    ({"video": "notes.txt"}, "not a video file type"),
    ({"video": "big.mp4"}, "over the limit of 1,024 bytes"),
    ({"video": "http://example.com/v.mp4"}, "URLs are not supported"),
    ({"video": "file:///etc/passwd"}, "URLs are not supported"),
    ({"video": "v.mp4\x00.txt"}, "NUL byte"),
    ({"video": ""}, "video path is empty"),
    ({"video": "clip\ud800.mp4"}, "not valid Unicode"),
    ({"question": ""}, "question is empty"),
    ({"question": "x" * 10_000}, "10,000 characters long; the limit is 2,000"),
    ({"video": None}, "Invalid tool arguments (video:"),
    ({"question": ["a", "list"]}, "Invalid tool arguments (question:"),
]


@pytest.mark.parametrize(("override", "reason"), HOSTILE, ids=[repr(h[0])[:50] for h in HOSTILE])
def test_hostile_arguments_give_tool_errors_and_open_nothing_outside(
    qa: Any, media: Media, spy: list, opened: type[_Opened], override: dict, reason: str
) -> None:
    tool = FreeVideoQATool(qa=qa, allowed_roots=[media.hostile], max_file_bytes=1024)
    args = {"video": "ok.mp4", "question": QUESTION, **override}
    if args["video"] == "SECRET":
        args["video"] = str(media.secret)
    message = _call(tool, **args)
    opened.recording = False
    assert message.status == "error"
    assert reason in message.content
    assert message.artifact is None
    assert spy == []  # the pipeline never saw the call
    assert opened.paths, "the recorder saw nothing: it is not wired up"
    forbidden = [os.path.realpath(media.outside), "/etc", "/dev/zero", "/proc"]
    touched = [p for p in opened.paths if any(os.path.normpath(p).startswith(f) for f in forbidden)]
    assert touched == []


def test_unexpected_errors_are_not_swallowed(qa: Any, media: Media, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the package's own errors become tool errors; a bug still surfaces.
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(qa, "ask", broken)
    with pytest.raises(RuntimeError, match="bug"):
        _call(FreeVideoQATool(qa=qa, allowed_roots=[media.videos]), video="v0.mp4", question=QUESTION)


def test_video_errors_become_tool_errors(qa: Any, tmp_path: Path) -> None:
    (tmp_path / "broken.mp4").write_bytes(os.urandom(4096))
    message = _call(FreeVideoQATool(qa=qa, allowed_roots=[tmp_path]), video="broken.mp4", question=QUESTION)
    assert message.status == "error"
    assert "broken.mp4" in message.content


def test_duration_limit(qa: Any, media: Media, spy: list) -> None:
    tool = FreeVideoQATool(qa=qa, allowed_roots=[media.videos], max_duration_s=0.1)
    message = _call(tool, video="v0.mp4", question=QUESTION)
    assert message.status == "error" and "over the limit of 0.1 s" in message.content
    assert spy == []


def test_construction_refuses_bad_settings(qa: Any, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="qa=FreeVideoLLM"):
        FreeVideoQATool(qa=object())
    with pytest.raises(Exception, match="not an existing folder"):
        FreeVideoQATool(qa=qa, allowed_roots=[tmp_path / "missing"])
    with pytest.raises(Exception, match="folder path"):
        FreeVideoQATool(qa=qa, allowed_roots=[""])


def test_default_root_is_the_current_directory(
    qa: Any, media: Media, spy: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(media.videos)
    tool = FreeVideoQATool(qa=qa)
    assert tool.resolver.policy().roots == (os.path.realpath(media.videos),)
    assert _call(tool, video="v0.mp4", question=QUESTION).status == "success"
    assert _call(tool, video="../outside/secret.mp4", question=QUESTION).status == "error"


# -- toolkit and retriever ----------------------------------------------------------------------------------


def test_toolkit(qa: Any, library: Any, media: Media) -> None:
    tools = FreeVideoToolkit(qa=qa, library=library).get_tools()
    assert [t.name for t in tools] == ["video_qa", "video_search"]
    assert tools[0].library is library
    assert [t.name for t in FreeVideoToolkit(qa=qa, allowed_roots=[str(media.videos)]).get_tools()] == ["video_qa"]
    assert [t.name for t in FreeVideoToolkit(library=library).get_tools()] == ["video_search"]
    with pytest.raises(Exception, match="needs qa="):
        FreeVideoToolkit()


def test_retriever_documents(library: Any) -> None:
    documents = FreeVideoRetriever(library=library, k=3).invoke("a yellow square")
    assert len(documents) == 3
    for document in documents:
        assert isinstance(document, Document)
        meta = document.metadata
        assert {"source", "video_id", "start", "end", "score", "frame_indices", "timestamps"} <= set(meta)
        assert os.path.isfile(meta["source"])
        assert meta["start"] <= meta["end"]
        assert f"{meta['start']:.2f}s-{meta['end']:.2f}s" in document.page_content
        assert os.path.basename(meta["source"]) in document.page_content
        assert "thumbnail_path" not in meta
        json.dumps(meta)
    scores = [d.metadata["score"] for d in documents]
    assert scores == sorted(scores, reverse=True)


def test_retriever_restricted_to_videos_describe_and_thumbnails(qa: Any, library: Any, tmp_path: Path) -> None:
    record = library.videos()[1]
    retriever = FreeVideoRetriever(
        library=library, k=2, qa=qa, describe=True, videos=[record.id], thumbnail_dir=str(tmp_path / "thumbs")
    )
    documents = retriever.invoke("a yellow square")
    assert documents
    for document in documents:
        assert document.metadata["video_id"] == record.id
        assert "\nWhat happens: " in document.page_content
        thumbnail = document.metadata["thumbnail_path"]
        assert os.path.dirname(thumbnail) == str(tmp_path / "thumbs")
        with Image.open(thumbnail) as image:
            assert image.size == (64, 48)
            picture = np.asarray(image.convert("RGB"))
        # the synthetic frames draw their own number: the thumbnail is the moment's best frame
        meta = document.metadata
        best = meta["frame_indices"][int(np.argmax(meta["frame_scores"]))]
        assert read_frame_number(picture) == best


def test_retriever_bad_arguments(library: Any) -> None:
    with pytest.raises(InputError, match="k must be"):
        FreeVideoRetriever(library=library).invoke("a square", k=10**6)
    with pytest.raises(InputError, match="query is empty"):
        FreeVideoRetriever(library=library).invoke("  ")
    with pytest.raises(Exception, match="describe=True needs qa"):
        FreeVideoRetriever(library=library, describe=True)


# -- an agent loop ---------------------------------------------------------------------------------------------


class ScriptedChatModel(BaseChatModel):
    """A chat model that follows a script: a function from the conversation to the next message."""

    script: Callable[[list[BaseMessage]], AIMessage]
    bound: list[str] = []

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self.script(messages))])

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedChatModel:
        self.bound = [getattr(t, "name", None) or t["name"] for t in tools]
        return self


def _asking(video: str, question: str) -> Callable[[list[BaseMessage]], AIMessage]:
    def script(messages: list[BaseMessage]) -> AIMessage:
        last = messages[-1]
        if isinstance(last, ToolMessage):
            return AIMessage(content=f"From the video tool ({last.status}): {last.content}")
        return AIMessage(
            content="",
            tool_calls=[
                {"name": "video_qa", "args": {"video": video, "question": question}, "id": "c1", "type": "tool_call"}
            ],
        )

    return script


def test_agent_calls_video_qa_and_reads_the_answer(qa: Any, library: Any, spy: list) -> None:
    from langchain.agents import create_agent

    tools = FreeVideoToolkit(qa=qa, library=library).get_tools()
    record = library.videos()[0]
    model = ScriptedChatModel(script=_asking(str(record.id), QUESTION))
    agent = create_agent(model, tools)
    state = agent.invoke({"messages": [HumanMessage("What moves in video 1?")]})
    assert model.bound == ["video_qa", "video_search"]
    assert spy == [("ask", os.path.realpath(record.path), QUESTION)]
    tool_messages = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    assert len(tool_messages) == 1 and tool_messages[0].status == "success"
    final = state["messages"][-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert tool_messages[0].content in final.content
    assert "Answer: " in final.content and "Based on: slow frames at " in final.content
    assert tool_messages[0].artifact["pathways"]["slow"]["timestamps"]


async def test_agent_reads_a_refusal_instead_of_crashing(qa: Any, library: Any, spy: list) -> None:
    from langchain.agents import create_agent

    model = ScriptedChatModel(script=_asking("../../../etc/passwd", QUESTION))
    agent = create_agent(model, FreeVideoToolkit(qa=qa, library=library).get_tools())
    state = await agent.ainvoke({"messages": [HumanMessage("Read the password file")]})
    final = state["messages"][-1]
    assert final.content.startswith("From the video tool (error): refused")
    assert "outside the allowed folders" in final.content
    assert spy == []
