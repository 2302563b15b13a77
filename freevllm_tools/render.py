"""Contact sheets: the frames each pathway kept, their RoI boxes and timestamps, as one image.

A user checking why an answer came out as it did would rather look than read: one row per
pathway, each kept frame as a thumbnail with its region of interest drawn and its time
written under it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from .pipeline import AskResult

__all__ = ["contact_sheet", "save_contact_sheet", "BOX_COLOURS"]

#: Outline colour per pathway.
BOX_COLOURS = {"slow": (255, 64, 64), "middle": (255, 200, 0), "fast": (64, 160, 255)}
_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
_LABEL_H = 16
_PAD = 4


def _thumb_size(frame_size: tuple[int, int], thumb_width: int) -> tuple[int, int]:
    width, height = frame_size
    return thumb_width, max(1, round(height * thumb_width / max(width, 1)))


def contact_sheet(
    result: AskResult,
    images: Mapping[int, np.ndarray],
    *,
    thumb_width: int = 192,
    pathways: tuple[str, ...] = ("slow", "middle", "fast"),
    max_per_row: int = 10,
) -> Image.Image:
    """Draw ``result``'s kept frames: one block per pathway, boxes in frame pixels scaled down.

    ``images`` maps a video frame number to that frame (H, W, 3) uint8 RGB, as displayed.
    Frames the mapping lacks are drawn grey, so a sheet is still made for what is there.
    """
    frame_size = result.frame_size
    tw, th = _thumb_size(frame_size, thumb_width)
    scale = tw / max(frame_size[0], 1)
    font = ImageFont.load_default()
    rows: list[tuple[str, list[tuple[int, float, tuple[int, int, int, int] | None]]]] = []
    for name in pathways:
        p = result.pathways.get(name)
        if p is None or not p.frame_indices:
            continue
        items = list(zip(p.frame_indices, p.timestamps, p.boxes_px))
        for start in range(0, len(items), max_per_row):
            rows.append((name, items[start : start + max_per_row]))
    columns = max((len(items) for _, items in rows), default=1)
    header = _LABEL_H + _PAD
    cell_h = th + _LABEL_H + _PAD
    sheet = Image.new(
        "RGB",
        (_PAD + columns * (tw + _PAD), header + len(rows) * (cell_h + _LABEL_H) + _PAD),
        _BACKGROUND,
    )
    draw = ImageDraw.Draw(sheet)
    draw.text((_PAD, _PAD), f"{result.question[:120]}  ({result.num_visual_tokens} visual tokens)", fill=_TEXT, font=font)
    y = header
    for name, items in rows:
        draw.text((_PAD, y), f"{name} pathway", fill=BOX_COLOURS.get(name, _TEXT), font=font)
        y += _LABEL_H
        for column, (index, timestamp, box) in enumerate(items):
            x = _PAD + column * (tw + _PAD)
            image = images.get(index)
            if image is None:
                thumb = Image.new("RGB", (tw, th), (96, 96, 96))
            else:
                thumb = Image.fromarray(np.ascontiguousarray(image)).resize((tw, th), Image.BILINEAR)
            sheet.paste(thumb, (x, y))
            if box is not None:
                x0, y0, x1, y1 = box
                draw.rectangle(
                    [x + round(x0 * scale), y + round(y0 * scale), x + round(x1 * scale) - 1, y + round(y1 * scale) - 1],
                    outline=BOX_COLOURS.get(name, _TEXT),
                    width=2,
                )
            draw.text((x, y + th + 2), f"#{index}  {timestamp:.2f}s", fill=_TEXT, font=font)
        y += cell_h
    return sheet


def save_contact_sheet(
    result: AskResult, images: Mapping[int, np.ndarray], path: str | os.PathLike[str], **kwargs: object
) -> Path:
    """Render :func:`contact_sheet` and write it as a PNG (parent folders are created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(result, images, **kwargs).save(out, format="PNG")  # type: ignore[arg-type]
    return out
