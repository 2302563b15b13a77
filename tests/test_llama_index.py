"""LlamaIndex integration: the tool spec in FunctionAgent and ReActAgent, the retriever in a query engine.

Scripted mock LLMs stand in for a real one: they call the tools with fixed arguments and then
repeat what the tool returned, so the tests can check that the tool ran with those arguments and
that its text (answer, times, regions) reached the agent's final message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
from llama_index.core.llms.mock import MockFunctionCallingLLM, MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import ImageNode, MetadataMode, NodeWithScore, QueryBundle, TextNode

from freevllm_tools.errors import AccessError, FreeVideoError, InputError
from freevllm_tools.integrations.llama_index import FreeVideoRetriever, FreeVideoToolSpec
from freevllm_tools.testing import write_video

QUESTION = "What moves across the picture?"


def tiny_pipeline(cache_dir: Path) -> Any:
    import freevllm_tools.testing as testing

    if hasattr(testing, "tiny_free_video_llm"):
        return testing.tiny_free_video_llm(cache_dir=cache_dir)
    from freevllm_tools.pipeline import FreeVideoLLM

    return FreeVideoLLM(testing.tiny_clip_guide(), testing.tiny_llava_next(), "paper", max_new_tokens=8)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("media")
    videos, outside = base / "videos", base / "outside"
    videos.mkdir()
    outside.mkdir()
    clips = [write_video(videos / f"v{i}.mp4", num_frames=12, seed=i) for i in range(3)]
    secret = write_video(outside / "secret.mp4", num_frames=6, seed=9)
    os.symlink(secret, videos / "escape.mp4")
    return {"base": base, "videos": videos, "outside": outside, "clips": clips, "secret": secret}


@pytest.fixture(scope="module")
def qa(media: dict[str, Any]) -> Any:
    return tiny_pipeline(media["base"] / "cache")


@pytest.fixture(scope="module")
def library(media: dict[str, Any], qa: Any) -> Any:
    from freevllm_tools.library import VideoLibrary

    lib = VideoLibrary(media["base"] / "library", qa.guide, cache=False)
    assert lib.add([str(p) for p in media["clips"]], progress=False).ok
    yield lib
    lib.close()


@pytest.fixture
def spy(qa: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
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


# -- the tool spec ----------------------------------------------------------------------------------


def test_tool_list_is_what_an_llm_needs(qa: Any, library: Any) -> None:
    tools = FreeVideoToolSpec(qa=qa, library=library).to_tool_list()
    assert [t.metadata.name for t in tools] == ["answer_video_question", "search_video_library"]
    answer, search = tools
    schema = answer.metadata.get_parameters_dict()
    assert schema["required"] == ["video", "question"]
    assert "library video id" in schema["properties"]["video"]["description"]
    assert "times (in seconds) of the key frames" in answer.metadata.description
    search_schema = search.metadata.get_parameters_dict()
    assert search_schema["properties"]["k"]["default"] == 5
    assert [t.metadata.name for t in FreeVideoToolSpec(qa=qa, allowed_roots=[os.getcwd()]).to_tool_list()] == [
        "answer_video_question"
    ]
    assert [t.metadata.name for t in FreeVideoToolSpec(library=library).to_tool_list()] == ["search_video_library"]
    with pytest.raises(InputError, match="needs qa="):
        FreeVideoToolSpec()


def test_answer_text_carries_times(qa: Any, media: dict[str, Any], spy: list) -> None:
    spec = FreeVideoToolSpec(qa=qa, allowed_roots=[media["videos"]])
    text = spec.answer_video_question("v0.mp4", QUESTION)
    assert spy == [("ask", os.path.realpath(media["clips"][0]), QUESTION)]
    assert text.startswith("Answer: ")
    assert "\nBased on: slow frames at " in text and "middle frames at " in text
    assert text.endswith("visual tokens)")


async def test_async_tool_uses_aask(qa: Any, media: dict[str, Any], spy: list) -> None:
    tool = FreeVideoToolSpec(qa=qa, allowed_roots=[media["videos"]]).to_tool_list()[0]
    output = await tool.acall(video="v1.mp4", question=QUESTION)
    assert str(output).startswith("Answer: ")
    assert spy[0] == ("aask", os.path.realpath(media["clips"][1]), QUESTION)


@pytest.mark.parametrize(
    ("video", "question", "error", "reason"),
    [
        ("../outside/secret.mp4", QUESTION, AccessError, "outside the allowed folders"),
        ("escape.mp4", QUESTION, AccessError, "symbolic link leads outside"),
        ("/dev/zero", QUESTION, AccessError, "outside the allowed folders"),
        ("https://example.com/a.mp4", QUESTION, AccessError, "URLs are not supported"),
        ("v0.mp4", "", InputError, "question is empty"),
        ("v0.mp4", "x" * 10_000, InputError, "10,000 characters"),
    ],
)
def test_hostile_arguments_raise_readable_errors(
    qa: Any, media: dict[str, Any], spy: list, video: str, question: str, error: type, reason: str
) -> None:
    spec = FreeVideoToolSpec(qa=qa, allowed_roots=[media["videos"]])
    with pytest.raises(error, match=reason):
        spec.answer_video_question(video, question)
    assert spy == []


def test_search(library: Any) -> None:
    spec = FreeVideoToolSpec(library=library)
    text = spec.search_video_library("a yellow square", k=3)
    lines = text.splitlines()
    assert lines[0].startswith("3 moment(s) matching")
    ids = {str(r.id) for r in library.videos()}
    for line in lines[1:]:
        assert any(f"(id {i})" in line for i in ids)
    for k in (0, 10**6):
        with pytest.raises(InputError, match="k must be"):
            spec.search_video_library("a yellow square", k=k)


# -- agents ------------------------------------------------------------------------------------------


def _function_calling_llm(tool: str, kwargs: dict[str, Any]) -> MockFunctionCallingLLM:
    """Calls ``tool`` once, then answers with what the tool returned."""

    def generate(messages: Sequence[ChatMessage], **_: Any) -> ChatMessage:
        results = [m for m in messages if m.role == MessageRole.TOOL]
        if results:
            return ChatMessage(role=MessageRole.ASSISTANT, content=f"The tool says: {results[-1].content}")
        return ChatMessage(
            role=MessageRole.ASSISTANT,
            blocks=[ToolCallBlock(tool_call_id="call-1", tool_name=tool, tool_kwargs=kwargs)],
        )

    return MockFunctionCallingLLM(response_generator=generate)


async def _run(agent: Any, message: str) -> tuple[Any, list[ToolCallResult]]:
    handler = agent.run(user_msg=message)
    results = [event async for event in handler.stream_events() if isinstance(event, ToolCallResult)]
    return await handler, results


async def test_function_agent_calls_the_tool_and_reads_the_answer(qa: Any, library: Any, spy: list) -> None:
    record = library.videos()[0]
    args = {"video": str(record.id), "question": QUESTION}
    agent = FunctionAgent(
        tools=FreeVideoToolSpec(qa=qa, library=library).to_tool_list(),
        llm=_function_calling_llm("answer_video_question", args),
    )
    output, results = await _run(agent, "What moves in video 1?")
    assert [(r.tool_name, r.tool_kwargs) for r in results] == [("answer_video_question", args)]
    assert not results[0].tool_output.is_error
    assert spy == [("aask", os.path.realpath(record.path), QUESTION), ("ask", os.path.realpath(record.path), QUESTION)]
    tool_text = results[0].tool_output.content
    assert tool_text.startswith("Answer: ") and "Based on: slow frames at " in tool_text
    assert output.response.content == f"The tool says: {tool_text}"


async def test_function_agent_reads_a_refusal(qa: Any, library: Any, spy: list) -> None:
    agent = FunctionAgent(
        tools=FreeVideoToolSpec(qa=qa, library=library).to_tool_list(),
        llm=_function_calling_llm("answer_video_question", {"video": "/etc/passwd", "question": QUESTION}),
    )
    output, results = await _run(agent, "Show me the password file")
    assert results[0].tool_output.is_error
    assert "refused '/etc/passwd': it is outside the allowed folders" in output.response.content
    assert spy == []


async def test_react_agent_with_scripted_text(qa: Any, library: Any, spy: list) -> None:
    """A ReAct text protocol: Thought / Action / Action Input, then Answer after the Observation."""

    record = library.videos()[2]
    args = {"video": str(record.id), "question": QUESTION}

    def generate(messages: Sequence[ChatMessage], **_: Any) -> ChatMessage:
        observations = [m.content for m in messages if m.content and m.content.startswith("Observation:")]
        if observations:
            seen = observations[-1].removeprefix("Observation:").strip()
            answer = f"Thought: I can answer without using any more tools.\nAnswer: {seen}"
            return ChatMessage(role=MessageRole.ASSISTANT, content=answer)
        return ChatMessage(
            role=MessageRole.ASSISTANT,
            content=(
                "Thought: I need to look at the video.\nAction: answer_video_question\n"
                f"Action Input: {json.dumps(args)}"
            ),
        )

    agent = ReActAgent(
        tools=FreeVideoToolSpec(qa=qa, library=library).to_tool_list(),
        llm=MockFunctionCallingLLM(response_generator=generate),
    )
    output, results = await _run(agent, "What moves in the third video?")
    assert [(r.tool_name, r.tool_kwargs) for r in results] == [("answer_video_question", args)]
    assert spy[0] == ("aask", os.path.realpath(record.path), QUESTION)
    final = output.response.content
    assert final.startswith("Answer: ") and "slow frames at " in final
    assert final == results[0].tool_output.content.strip()


# -- the retriever -------------------------------------------------------------------------------------


def test_retriever_nodes(library: Any) -> None:
    nodes = FreeVideoRetriever(library, k=3).retrieve("a yellow square")
    assert len(nodes) == 3
    assert [n.score for n in nodes] == sorted((n.score for n in nodes), reverse=True)
    for item in nodes:
        assert isinstance(item, NodeWithScore) and isinstance(item.node, TextNode)
        meta = item.node.metadata
        assert {"source", "video_id", "start", "end", "score", "frame_indices", "timestamps"} <= set(meta)
        assert item.score == meta["score"]
        assert item.node.node_id == f"{meta['video_id']}@{meta['start']:.3f}-{meta['end']:.3f}"
        llm_text = item.node.get_content(metadata_mode=MetadataMode.LLM)
        assert f"{meta['start']:.2f}s-{meta['end']:.2f}s" in llm_text
        assert "frame_indices" not in llm_text  # noise kept out of the LLM's view
        json.dumps(meta)


async def test_retriever_async_and_image_nodes(qa: Any, library: Any, tmp_path: Path) -> None:
    retriever = FreeVideoRetriever(library, k=2, thumbnail_dir=tmp_path, image_nodes=True)
    nodes = await retriever.aretrieve("a yellow square")
    assert len(nodes) == 2
    for item in nodes:
        assert isinstance(item.node, ImageNode)
        assert item.node.image_path == item.node.metadata["thumbnail_path"]
        assert Path(item.node.image_path).is_file() and Path(item.node.image_path).parent == tmp_path
    with pytest.raises(InputError, match="needs thumbnail_dir"):
        FreeVideoRetriever(library, image_nodes=True)
    with pytest.raises(InputError, match="describe=True needs qa"):
        FreeVideoRetriever(library, describe=True)
    with pytest.raises(InputError, match="k must be"):
        FreeVideoRetriever(library, k=0)


def test_retriever_describe(qa: Any, library: Any) -> None:
    record = library.videos()[0]
    nodes = FreeVideoRetriever(library, k=1, qa=qa, describe=True, videos=[record.id]).retrieve("a yellow square")
    assert len(nodes) == 1
    assert nodes[0].node.metadata["video_id"] == record.id
    assert "\nWhat happens: " in nodes[0].node.get_content()


def test_retriever_in_a_query_engine(library: Any) -> None:
    engine = RetrieverQueryEngine.from_args(FreeVideoRetriever(library, k=2), llm=MockLLM())
    response = engine.query("a yellow square")
    assert len(response.source_nodes) == 2
    # MockLLM echoes its prompt: the moments' text reached the LLM through the synthesizer.
    for item in response.source_nodes:
        assert item.node.get_content() in str(response)


def test_retriever_refuses_an_empty_query(library: Any) -> None:
    with pytest.raises(FreeVideoError, match="query is empty"):
        FreeVideoRetriever(library).retrieve(QueryBundle(query_str="  "))
