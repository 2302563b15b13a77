"""`freevllm` end to end, loading tiny models from local directories (the real loading path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from freevllm_tools.cli import main
from freevllm_tools.testing import tiny_clip_guide, tiny_llava_next, write_video


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    guide_dir = tiny_clip_guide(0).save_pretrained(root / "guide")
    llm_dir = tiny_llava_next(0, max_position_embeddings=2048).save_pretrained(root / "llm")
    return str(guide_dir), str(llm_dir)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "one.mp4", num_frames=30)
    (root / "nested").mkdir()
    write_video(root / "nested" / "two.mp4", num_frames=24, seed=5)
    (root / "notes.txt").write_text("not a video")
    return root


def model_args(models, tmp_path):
    guide_dir, llm_dir = models
    return ["--guide", guide_dir, "--llm", llm_dir, "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]


def test_ask_json(models, videos, tmp_path, capsys):
    code = main(["ask", str(videos / "one.mp4"), "What happens?", "--json", "--max-new-tokens", "4", *model_args(models, tmp_path)])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["answer"].startswith("In the video,")
    assert data["num_visual_tokens"] == sum(p["num_tokens"] for p in data["pathways"].values())
    assert len(data["pathways"]["slow"]["frame_indices"]) == 3
    assert data["cache_hit"] is False


def test_ask_streams_text_then_provenance(models, videos, tmp_path, capsys):
    args = ["ask", str(videos / "one.mp4"), "What happens?", "--max-new-tokens", "4", *model_args(models, tmp_path)]
    assert main(args) == 0
    first = capsys.readouterr()
    assert first.out.startswith("In the video,")
    assert "slow" in first.out and "visual tokens:" in first.out and "region x" in first.out
    assert "decoding" in first.err.lower() or "%" in first.err  # a progress bar on stderr
    assert main(args) == 0  # second time: from the cache, same answer
    assert capsys.readouterr().out.splitlines()[0] == first.out.splitlines()[0]


def test_inspect_writes_a_contact_sheet(models, videos, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    code = main(["inspect", str(videos / "one.mp4"), "Where is the square?", "--out", str(sheet), "--max-new-tokens", "2", *model_args(models, tmp_path)])
    assert code == 0
    with Image.open(sheet) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
    assert str(sheet) in capsys.readouterr().out


def test_index_and_search(models, videos, tmp_path, capsys):
    guide_dir, _ = models
    common = ["--guide", guide_dir, "--library", str(tmp_path / "lib"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    code = main(["index", str(videos), *common])
    out = capsys.readouterr().out
    assert "2 added" in out and "failed" in out
    assert code == 0  # a .txt file in the folder is not a video: not counted as a failure
    assert main(["search", "a moving square", "-k", "2", "--json", *common]) == 0
    moments = json.loads(capsys.readouterr().out)
    assert 1 <= len(moments) <= 2
    assert {Path(m["path"]).name for m in moments} <= {"one.mp4", "two.mp4"}
    assert all(m["start"] <= m["end"] for m in moments)
    assert main(["search", "a moving square", *common]) == 0
    assert "start-end" in capsys.readouterr().out


def test_errors_are_one_line_and_exit_2(models, tmp_path, capsys):
    code = main(["ask", str(tmp_path / "missing.mp4"), "What?", *model_args(models, tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("freevllm: error:") and "missing.mp4" in err
    assert "Traceback" not in err
    video = write_video(tmp_path / "x.mp4", num_frames=5)
    code = main(["ask", str(video), "What?", "--llm", str(tmp_path / "no-model"), "--guide", models[0], "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "no-model" in err.splitlines()[-1] and "freevllm: error:" in err


def test_console_script_runs_in_a_fresh_process(models, videos, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", FREEVLLM_CACHE=str(tmp_path / "cache"))
    script = Path(sys.executable).with_name("freevllm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "freevllm_tools.cli"]
    guide_dir, llm_dir = models
    proc = subprocess.run(
        [*command, "ask", str(videos / "one.mp4"), "What happens?", "--guide", guide_dir, "--llm", llm_dir,
         "--device", "cpu", "--max-new-tokens", "3", "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["answer"].startswith("In the video,")


def test_demo_runs_offline_and_grounds_its_answer(tmp_path, capsys):
    from freevllm_tools import synthetic
    from freevllm_tools.demo import DEMO_SEED

    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    answer = next(line for line in out.splitlines() if line.startswith("Answer:"))
    world = synthetic.make_video(DEMO_SEED, brief=True)
    assert world.target_object.colour in answer  # the tiny trained answerer names the colour
    assert "visual tokens:" in out
    with Image.open(tmp_path / "demo" / "contact_sheet.png") as sheet:
        assert sheet.width > 100
    # The slow pathway's frames are where the briefly visible target is.
    visible = world.visible_frames(world.target_object)
    slow = [int(line.split()[1]) for line in out.splitlines() if line.strip().startswith("frame")][:3]
    assert all(visible[i] for i in slow)
