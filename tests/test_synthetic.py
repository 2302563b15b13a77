"""The synthetic world: deterministic, consistent ground truth, questions that have one answer."""

from __future__ import annotations

import numpy as np
import pytest

from freevllm_tools import synthetic as S
from freevllm_tools.errors import InputError

HELDOUT = range(S.HELDOUT_SEED, S.HELDOUT_SEED + 40)


def test_same_seed_same_video_and_pixels():
    a, b = S.make_video(1_000_123), S.make_video(1_000_123)
    assert a == b
    np.testing.assert_array_equal(a.render(), b.render())
    assert a != S.make_video(1_000_124)


def test_render_shape_and_type():
    video = S.make_video(7)
    frames = video.render()
    assert frames.shape == (video.num_frames, video.size, video.size, 3)
    assert frames.dtype == np.uint8
    assert video.render([3, 5]).shape == (2, video.size, video.size, 3)
    np.testing.assert_array_equal(video.render([5])[0], frames[5])


@pytest.mark.parametrize("seed", list(HELDOUT))
def test_objects_distinct_inside_frame_and_apart(seed):
    video = S.make_video(seed)
    colours = [o.colour for o in video.objects]
    shapes = [o.shape for o in video.objects]
    assert len(set(colours)) == len(colours) and len(set(shapes)) == len(shapes)
    assert 3 <= len(video.objects) <= 4
    for obj in video.objects:
        assert 0 <= obj.start < obj.end <= video.num_frames
        for f in range(obj.start, obj.end):
            x0, y0, x1, y1 = obj.box(f)
            assert 0 <= x0 < x1 <= video.size and 0 <= y0 < y1 <= video.size
    for i, a in enumerate(video.objects):
        for b in video.objects[i + 1 :]:
            for f in range(max(a.start, b.start), min(a.end, b.end)):
                ax0, ay0, ax1, ay1 = a.box(f)
                bx0, by0, bx1, by1 = b.box(f)
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def test_pixels_show_the_object_where_and_when_the_truth_says():
    video = S.make_video(1_000_001, num_objects=3)
    frames = video.render().astype(int)
    for obj in video.objects:
        colour = np.array(S.COLOURS[obj.colour])
        inside = obj.start + (obj.end - obj.start) // 2
        cx, cy = (int(v) for v in obj.centre(inside))
        # the shape's centre pixel has the object's colour while it is visible ...
        assert np.abs(frames[inside, cy, cx] - colour).max() <= 2, obj
        # ... and not before or after its window
        for outside in (obj.start - 1, obj.end):
            if 0 <= outside < video.num_frames:
                assert not any(o.visible(outside) and o.name == obj.name for o in video.objects)
                x0, y0, x1, y1 = obj.box(outside)
                patch = frames[outside, y0:y1, x0:x1].reshape(-1, 3)
                close = (np.abs(patch - colour).max(axis=1) <= 20).mean()
                assert close < 0.2, (obj, outside, close)


def test_brief_target_is_brief_and_when_is_placed():
    for seed in HELDOUT:
        video = S.make_video(seed, brief=True)
        target = video.target_object
        assert target.end - target.start <= video.num_frames // 10
        early = S.make_video(seed, when="early").target_object
        late = S.make_video(seed, when="late").target_object
        assert early.when(video.num_frames) == "early"
        assert late.when(video.num_frames) == "late"


def test_visible_frames_and_seconds_agree_with_the_window():
    video = S.make_video(1_000_010)
    target = video.target_object
    visible = video.visible_frames(target)
    assert visible.sum() == target.end - target.start
    assert np.flatnonzero(visible).tolist() == list(range(target.start, target.end))
    assert video.seconds(target) == (target.start / video.fps, target.end / video.fps)
    assert video.visible_frames("purple nothing").sum() == 0


def test_questions_have_one_right_answer():
    kinds = set()
    for seed in HELDOUT:
        video = S.make_video(seed)
        names = {o.name for o in video.objects}
        for qa in video.questions():
            kinds.add(qa.kind)
            assert S.grade(qa, f"In the video, {qa.reply}"), qa
            if qa.kind == "presence":
                named = qa.question.removeprefix("Is there a ").removesuffix(" in the video?")
                assert (named in names) == (qa.answer == "yes")
                assert qa.asks == tuple(named.split())
                shown = S.closest_object(*qa.asks, video.objects)
                assert sum(a == b for a, b in zip(qa.asks, (shown.colour, shown.shape))) == (2 if qa.answer == "yes" else 1)
                assert qa.reply == f"the key frames show a {shown.name}, so {qa.answer}."
            elif qa.kind == "colour":
                shape = qa.question.removeprefix("What color is the ").removesuffix("?")
                assert [o.colour for o in video.objects if o.shape == shape] == [qa.answer]
            elif qa.kind == "shape":
                colour = qa.question.removeprefix("What shape is the ").removesuffix(" object?")
                assert [o.shape for o in video.objects if o.colour == colour] == [qa.answer]
            else:
                assert video.find(qa.target).when(video.num_frames) == qa.answer
    assert kinds == {"presence", "colour", "shape", "when"}


@pytest.mark.parametrize(
    ("kind", "answer", "text", "right"),
    [
        ("presence", "yes", "In the video, yes, there is.", True),
        ("presence", "yes", "In the video, no, there is not.", False),
        ("presence", "no", "In the video, no, there is not.", True),
        ("presence", "no", "In the video, yes.", False),
        ("presence", "no", "In the video, the key frames show a red circle, so no.", True),
        ("presence", "yes", "In the video, the key frames show a red circle, so no.", False),
        ("presence", "yes", "In the video, the key frames show a red square, so yes.", True),
        ("presence", "no", "In the video, the key frames show nothing, so no.", True),
        ("colour", "red", "In the video, it is red.", True),
        ("colour", "red", "In the video, it is red or blue.", False),
        ("colour", "red", "In the video, it is blue.", False),
        ("shape", "circle", "In the video, it is a circle.", True),
        ("when", "late", "In the video, it appears early.", False),
        ("when", "late", "In the video, it appears late.", True),
    ],
)
def test_grade(kind, answer, text, right):
    qa = S.QA("q", answer, kind, None, "")
    assert S.grade(qa, text) is right


def test_written_video_decodes_to_the_rendered_frames(tmp_path):
    av = pytest.importorskip("av")
    video = S.make_video(1_000_002)
    path = video.write(tmp_path / "clip.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        rate = stream.average_rate
    assert decoded.shape == video.render().shape
    assert float(rate) == video.fps
    error = np.abs(decoded.astype(int) - video.render().astype(int))
    assert error.mean() < 4


def test_simulated_codec_is_close_to_the_real_one(tmp_path):
    pytest.importorskip("av")
    import av

    from freevllm_tools.training import simulate_codec

    video = S.make_video(1_000_003)
    frames = video.render()
    with av.open(str(video.write(tmp_path / "c.mp4"))) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)
    simulated = simulate_codec(frames, np.random.default_rng(0)).astype(int)
    assert np.abs(simulated - decoded).mean() < np.abs(frames.astype(int) - decoded).mean() + 1.0


def test_bad_arguments_raise_input_error():
    with pytest.raises(InputError):
        S.make_video(0, size=33)
    with pytest.raises(InputError):
        S.make_video(0, num_objects=9)
    with pytest.raises(InputError):
        S.make_video(0, when="noon")
    with pytest.raises(InputError):
        S.shape_mask("hexagon", 12)


def test_tiny_configs_token_counts():
    grid = S.TINY_GRID
    assert S.tiny_config().num_visual_tokens(grid, 50) == 3 * 28 + 5 * 28 + 50 * 4
    for k in (1, 2, 4, 8):
        assert S.guided_config(k).num_visual_tokens(grid, 50) == k * 64
        assert S.uniform_config(k).num_visual_tokens(grid, 50) == k * 64


def test_presence_reply_names_what_the_key_frames_show_then_answers():
    objects = (S.SceneObject("red", "circle", 0, 10, 16, 0.0, 0.0), S.SceneObject("blue", "square", 5, 20, 16, 32.0, 0.0))
    cases = {
        ("red", "circle"): ("yes", "the key frames show a red circle, so yes."),
        ("red", "square"): ("no", "the key frames show a red circle, so no."),  # first of two that share one word
        ("green", "square"): ("no", "the key frames show a blue square, so no."),
    }
    for (colour, shape), (answer, reply) in cases.items():
        qa = S.presence_qa(colour, shape, objects)
        assert (qa.question, qa.answer, qa.reply) == (f"Is there a {colour} {shape} in the video?", answer, reply)
        assert S.grade(qa, f"In the video, {qa.reply}")
    assert S.presence_reply(False, None) == "the key frames show nothing, so no."
