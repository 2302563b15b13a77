"""examples/: every script runs offline with ``--tiny`` and prints what it promises.

The scripts are loaded from their files and their ``main(argv)`` called in this process. Answers from the tiny random models are gibberish: the tests check
what reached the user, which tool calls were made and what the pipeline was asked.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

from freevllm_tools.pipeline import FreeVideoLLM

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TESTED = {"quickstart.py", "agent_tool_call.py", "rag_library.py", "chatbot.py", "inspect_contact_sheet.py"}


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name.removesuffix('.py')}", EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, bool]]:
    """(video path, question, cache_hit) of every FreeVideoLLM.ask in the example."""
    calls: list[tuple[str, str, bool]] = []
    ask = FreeVideoLLM.ask

    def spy(self: FreeVideoLLM, video: Any, question: str, **kwargs: Any) -> Any:
        result = ask(self, video, question, **kwargs)
        calls.append((os.fspath(video), question, result.cache_hit))
        return result

    monkeypatch.setattr(FreeVideoLLM, "ask", spy)
    return calls


def test_every_example_is_exercised_here() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == TESTED


def test_quickstart(asked: list, capsys: Any) -> None:
    assert load("quickstart.py").main(["--tiny"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^Answer: In the video,", out, re.M)
    assert re.search(r"^Based on: slow frames at \d+\.\d\ds", out, re.M)
    assert "Second question from the cache: True" in out
    assert [(q, hit) for _, q, hit in asked] == [
        ("What moves across the picture?", False),
        ("What colour is the background?", True),
    ]


def test_agent_tool_call(asked: list, capsys: Any) -> None:
    module = load("agent_tool_call.py")
    assert module.main(["--tiny", "--question", "What moves, and when?"]) == 0
    out = capsys.readouterr().out
    assert "Tool call: video_qa({'video': 'clip.mp4', 'question': 'What moves, and when?'})" in out
    assert "Tool result (success):\nAnswer: In the video," in out
    assert re.search(r"^Artifact: slow frames \[\d+, \d+, \d+\] at \[", out, re.M)
    assert "Agent: The video tool says:\nAnswer: In the video," in out
    ((path, question, _),) = asked
    assert Path(path).name == "clip.mp4" and question == "What moves, and when?"
    with pytest.raises(SystemExit):  # real models need a chat model named
        module.main([])


def test_rag_library(asked: list, capsys: Any) -> None:
    assert load("rag_library.py").main(["--tiny", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "Indexed: 3 added" in out
    moments = re.findall(r"^  (\d)\. Video '(clip\d\.mp4)' \(id \d+\) ([\d.]+)s-([\d.]+)s", out, re.M)
    assert [m[0] for m in moments] == ["1", "2"]
    assert out.count("What happens: In the video,") == 2  # each moment described from its frames
    best = moments[0]
    assert f"(about {best[1]}, best moment {best[2]}s-{best[3]}s)" in out
    ((path, question, _),) = asked  # the question went to the best moment's video
    assert Path(path).name == best[1] and question == "What is the square doing?"
    assert re.search(r"^Answer: In the video,", out, re.M) and "Based on: slow frames at " in out


def test_chatbot(capsys: Any) -> None:
    module = load("chatbot.py")
    assert module.main(["--tiny", "--no-interactive", "--ask", "What moves?", "--ask", "And then?"]) == 0
    out = capsys.readouterr().out
    assert out.count("llava> In the video,") == 2
    assert "you> What moves?\n" in out and "you> And then?\n" in out
    assert "[features computed; the prompt carried 0 earlier turn(s)]" in out
    assert "[cache hit; the prompt carried 1 earlier turn(s)]" in out
    assert "Frames used for 'And then?'" in out and "region x " in out


def test_inspect_contact_sheet(tmp_path: Path, capsys: Any) -> None:
    sheet = tmp_path / "sheets" / "sheet.png"
    assert load("inspect_contact_sheet.py").main(["--tiny", "--out", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert f"Contact sheet: {sheet}" in out
    assert len(re.findall(r"^  slow: frame \d+ at [\d.]+s, region \(x0, y0, x1, y1\) = \(", out, re.M)) == 3
    assert len(re.findall(r"^  middle: frame ", out, re.M)) == 5
    with Image.open(sheet) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 200
