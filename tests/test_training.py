"""The tiny answerer's training data: every word is in its vocabulary, and each answer follows
from what the sample shows (no label the model could only guess)."""

from __future__ import annotations

import re

import numpy as np
import torch

from freevllm_tools import synthetic as S
from freevllm_tools.answerer import timing_context
from freevllm_tools.training import answerer_tokenizer, shown_object, text_only_example


def test_prompts_and_replies_have_no_unknown_words():
    tokenizer = answerer_tokenizer()
    unknown = tokenizer.convert_tokens_to_ids("<unk>")
    rng = np.random.default_rng(0)
    texts = [timing_context([0.4, 1.25, 3.0], 5.0), "the key frames show nothing, so no."]
    for video in S.make_videos(range(S.HELDOUT_SEED, S.HELDOUT_SEED + 10)):
        texts += [f"{qa.question} {qa.reply}" for qa in video.questions()]
    texts += [" ".join(text_only_example(rng)) for _ in range(200)]
    for text in texts:
        assert unknown not in tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_text_only_answers_follow_from_the_words():
    rng = np.random.default_rng(1)
    kinds = {"presence": 0, "when": 0}
    for _ in range(400):
        question, context, reply = text_only_example(rng)
        times = [float(t) for t in re.findall(r"\d+\.\d", context.split("key frames are at")[1])]
        assert times == sorted(times) and context.startswith("The video lasts 5.0 seconds;")
        if question.startswith("Is there a "):
            kinds["presence"] += 1
            asked = question.removeprefix("Is there a ").removesuffix(" in the video?")
            shown = reply.removeprefix("the key frames show ").split(",")[0].removeprefix("a ")
            assert reply.endswith("so yes." if shown == asked else "so no.")
        else:
            kinds["when"] += 1
            when = reply.removeprefix("it appears ").removesuffix(".")
            middle = times[len(times) // 2]  # at most one stray frame, so the median is inside
            assert (middle < 2.5) == (when == "early"), (context, reply)
    assert min(kinds.values()) > 150


def test_shown_object_is_the_visible_one_closest_to_the_question():
    video = S.make_video(S.HELDOUT_SEED, num_objects=3)
    a, b, c = video.objects
    owner = torch.full((2, 64), -1)
    owner[0, :3] = 1  # b covers 3 patches
    owner[1, :5] = 2  # c covers 5
    assert shown_object(video, owner, None) is c  # nothing asked: the one covering most
    assert shown_object(video, owner, (b.colour, "nothing")) is b  # shares the colour
    assert shown_object(video, owner, (a.colour, a.shape)) is c  # a is not visible
    assert shown_object(video, torch.full((2, 64), -1), (a.colour, a.shape)) is None
