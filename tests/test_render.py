"""Contact sheets: the image's size, and RoI boxes drawn exactly where the provenance puts them.

Frames are flat grey, so every thumbnail is a grey rectangle on the sheet's dark background:
the test finds the thumbnails in the picture itself, then reads the box outlines' colours at
the pixel coordinates the provenance gives (scaled to the thumbnail).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from freevllm_tools import render
from freevllm_tools.pipeline import AskResult, PathwayProvenance
from freevllm_tools.render import BOX_COLOURS, contact_sheet, save_contact_sheet

GREY = (128, 128, 128)
MISSING = (96, 96, 96)  # what the sheet draws for a frame it was not given


def make_result(pathways: dict[str, tuple[list[int], list[Any]]], frame_size: tuple[int, int]) -> AskResult:
    provenance = {
        name: PathwayProvenance(
            name=name,
            frame_indices=frames,
            timestamps=[i / 10 for i in frames],
            grid=(24, 12),
            boxes=[None] * len(frames),  # grid cells are not drawn; pixels are
            boxes_px=boxes,
            num_tokens=7,
        )
        for name, (frames, boxes) in pathways.items()
    }
    return AskResult(
        answer="In the video, ...",
        question="Where is the box?",
        video="v.mp4",
        pathways=provenance,
        num_visual_tokens=21,
        timings={},
        cache_hit=False,
        models={},
        frame_size=frame_size,
    )


def thumbnails(sheet: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners (x, y) of the thumbnails, in reading order: frame pixels (grey, or a
    box outline) whose left and upper neighbours are not frame pixels, starting solid runs."""
    colours = [GREY, MISSING, *BOX_COLOURS.values()]
    inside = np.zeros(sheet.shape[:2], dtype=bool)
    for colour in colours:
        inside |= (sheet == np.array(colour, dtype=np.uint8)).all(axis=-1)
    corner = inside.copy()
    corner[1:, :] &= ~inside[:-1, :]
    corner[:, 1:] &= ~inside[:, :-1]
    ys, xs = np.nonzero(corner)
    # Labels are written in the pathways' colours too: a thumbnail's corner starts a solid
    # run of frame pixels both ways, a glyph's stroke does not.
    solid = [(x, y) for x, y in zip(xs.tolist(), ys.tolist()) if inside[y, x : x + 8].all() and inside[y : y + 8, x].all()]
    return sorted(solid, key=lambda p: (p[1], p[0]))


def rows_of(corners: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    rows: dict[int, list[tuple[int, int]]] = {}
    for x, y in corners:
        rows.setdefault(y, []).append((x, y))
    return [rows[y] for y in sorted(rows)]


def pixel(sheet: np.ndarray, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in sheet[y, x])


def check_thumbnail(sheet: np.ndarray, origin: tuple[int, int], size: tuple[int, int], fill: tuple) -> None:
    """The thumbnail at ``origin`` is ``size`` (w, h): frame pixels end exactly there."""
    x, y = origin
    w, h = size
    assert pixel(sheet, x + w - 1, y + h - 1) in (fill, *BOX_COLOURS.values())
    assert pixel(sheet, x + w, y + h - 1) not in (GREY, MISSING)
    assert pixel(sheet, x + w - 1, y + h) not in (GREY, MISSING)


def check_box(
    sheet: np.ndarray,
    origin: tuple[int, int],
    box_px: tuple[int, int, int, int],
    scale: float,
    colour: tuple[int, int, int],
    thumb: tuple[int, int],
    fill: tuple = GREY,
) -> None:
    """The outline of the half-open pixel box ``box_px`` (x0, y0, x1, y1), scaled, drawn 2 px
    wide just inside its bounds: the box's outermost pixels carry ``colour``, the pixels just
    outside it (within the thumbnail) and 2 px inside it carry the frame."""
    ox, oy = origin
    x0, y0, x1, y1 = (round(v * scale) for v in box_px)
    mid_x, mid_y = ox + (x0 + x1) // 2, oy + (y0 + y1) // 2
    edges = {
        "left": [(ox + x0, mid_y), (ox + x0 + 1, mid_y)],
        "right": [(ox + x1 - 1, mid_y), (ox + x1 - 2, mid_y)],
        "top": [(mid_x, oy + y0), (mid_x, oy + y0 + 1)],
        "bottom": [(mid_x, oy + y1 - 1), (mid_x, oy + y1 - 2)],
    }
    for name, points in edges.items():
        for x, y in points:
            assert pixel(sheet, x, y) == colour, f"{name} edge at ({x}, {y})"
    assert pixel(sheet, ox + x0 + 2, mid_y) == fill and pixel(sheet, mid_x, oy + y0 + 2) == fill
    assert pixel(sheet, ox + x1 - 3, mid_y) == fill and pixel(sheet, mid_x, oy + y1 - 3) == fill
    w, h = thumb
    if x0 > 0:
        assert pixel(sheet, ox + x0 - 1, mid_y) == fill
    if y0 > 0:
        assert pixel(sheet, mid_x, oy + y0 - 1) == fill
    if x1 < w:
        assert pixel(sheet, ox + x1, mid_y) == fill
    if y1 < h:
        assert pixel(sheet, mid_x, oy + y1) == fill


SLOW = ([10, 20], [(40, 20, 200, 180), (100, 60, 300, 220)])
MIDDLE = ([0, 30, 60], [(20, 40, 180, 200), (120, 100, 280, 200), (60, 60, 260, 160)])
FAST = ([0, 10, 20, 30], [None, None, None, None])


def test_sheet_size_thumbnails_and_boxes_where_the_provenance_says(tmp_path: Path) -> None:
    frame_size, thumb_width = (320, 240), 160
    result = make_result({"slow": SLOW, "middle": MIDDLE, "fast": FAST}, frame_size)
    grey = np.full((240, 320, 3), GREY[0], dtype=np.uint8)
    images = {i: grey for i in (0, 10, 20, 30)}  # frame 60 missing: drawn in MISSING grey
    path = save_contact_sheet(result, images, tmp_path / "deep" / "sheet.png", thumb_width=thumb_width)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        sheet = np.asarray(image)

    tw, th = thumb_width, 120  # aspect ratio kept
    pad, label = render._PAD, render._LABEL_H
    columns, rows = 4, 3  # the widest block (fast) sets the width; one block per pathway
    assert sheet.shape[1] == pad + columns * (tw + pad)
    assert sheet.shape[0] == (label + pad) + rows * (th + label + pad + label) + pad

    found = rows_of(thumbnails(sheet))
    assert [len(r) for r in found] == [2, 3, 4]  # slow, middle, fast, top to bottom
    lefts = [x for x, _ in found[2]]
    assert all([x for x, _ in r] == lefts[: len(r)] for r in found)  # shared columns
    assert np.diff(lefts).tolist() == [tw + pad] * 3
    assert np.diff([r[0][1] for r in found]).tolist() == [th + 2 * label + pad] * 2
    scale = tw / frame_size[0]
    for name, row in zip(("slow", "middle", "fast"), found):
        frames, boxes = {"slow": SLOW, "middle": MIDDLE, "fast": FAST}[name]
        for origin, index, box in zip(row, frames, boxes):
            fill = GREY if index in images else MISSING
            check_thumbnail(sheet, origin, (tw, th), fill)
            if box is None:  # fast: whole frames, no outline anywhere
                x, y = origin
                assert (sheet[y : y + th, x : x + tw] == np.array(fill, dtype=np.uint8)).all()
            else:
                check_box(sheet, origin, box, scale, BOX_COLOURS[name], (tw, th), fill)


def test_long_pathways_wrap_and_boxes_scale_up() -> None:
    """Small frames drawn larger (scale 3), boxes touching the frame's edges, rows of at most 3."""
    frame_size = (64, 48)
    slow = ([1, 2, 3, 4], [(0, 0, 64, 40), (0, 8, 64, 48), (8, 8, 40, 32), (16, 0, 48, 24)])
    result = make_result({"slow": slow}, frame_size)
    grey = np.full((48, 64, 3), GREY[0], dtype=np.uint8)
    sheet = np.asarray(contact_sheet(result, dict.fromkeys(slow[0], grey), thumb_width=192, max_per_row=3))
    found = rows_of(thumbnails(sheet))
    assert [len(r) for r in found] == [3, 1]
    assert sheet.shape[1] == render._PAD + 3 * (192 + render._PAD)
    for origin, box in zip([p for r in found for p in r], slow[1]):
        check_thumbnail(sheet, origin, (192, 144), GREY)
        check_box(sheet, origin, box, 3.0, BOX_COLOURS["slow"], (192, 144))


def test_a_pipeline_result_draws_its_own_provenance(tmp_path: Path) -> None:
    """An AskResult from the (tiny) pipeline: each slow and middle box lands where boxes_px says."""
    from freevllm_tools.testing import tiny_free_video_llm, write_video

    size = (96, 72)
    video = write_video(tmp_path / "grey.mp4", [np.full((72, 96, 3), GREY[0], np.uint8)] * 20)
    result = tiny_free_video_llm().ask(video, "Where is the box?")
    assert result.frame_size == size
    grey = np.full((72, 96, 3), GREY[0], dtype=np.uint8)
    images = dict.fromkeys(result.pathways["fast"].frame_indices, grey)
    sheet = np.asarray(contact_sheet(result, images, thumb_width=192))
    found = rows_of(thumbnails(sheet))
    expected = [  # one block per pathway, rows of at most 10 frames
        (name, p.boxes_px[start : start + 10])
        for name, p in result.pathways.items()
        for start in range(0, len(p.frame_indices), 10)
    ]
    assert [len(r) for r in found] == [len(boxes) for _, boxes in expected]
    for (name, boxes), row in zip(expected, found):
        for origin, box in zip(row, boxes):
            check_thumbnail(sheet, origin, (192, 144), GREY)
            if box is not None:
                check_box(sheet, origin, box, 2.0, BOX_COLOURS[name], (192, 144))
    assert any(box is not None for box in result.pathways["slow"].boxes_px)


@pytest.mark.parametrize("missing", [True, False])
def test_missing_frames_are_drawn_grey(missing: bool) -> None:
    result = make_result({"slow": ([5], [None])}, (32, 24))
    images = {} if missing else {5: np.full((24, 32, 3), GREY[0], np.uint8)}
    sheet = np.asarray(contact_sheet(result, images, thumb_width=64))
    (origin,) = thumbnails(sheet)
    check_thumbnail(sheet, origin, (64, 48), MISSING if missing else GREY)
