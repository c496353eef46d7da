"""Image grids and X/Y plots (AUTOMATIC1111's `image_grid`, `draw_grid_annotations` and the X/Y/Z plot script).

A batch grid has floor(sqrt(n)) rows, fewer until they divide n (A1111's default `n_rows` -1).
An X/Y plot runs the request once per cell, changing one field along X (columns) and
optionally another along Y (rows), and labels each column and row as A1111 does
("CFG Scale: 7", "Steps: 20"). Axes are written `name=v1,v2,...`; a `prompt` axis is A1111's
"Prompt S/R": its first value is searched in the prompt and replaced by each value in turn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw, ImageFont

from sdgen.pipelines.request import GenerationRequest, RequestError

MAX_CELLS = 100


@dataclass(frozen=True)
class Axis:
    """One X/Y plot axis: the request field it sets, its values and its label (A1111's axis names)."""

    name: str
    field: str
    label: str
    values: tuple

    def apply(self, request: GenerationRequest, value) -> GenerationRequest:
        if self.field == "prompt":
            return replace(request, prompt=request.prompt.replace(self.values[0], value))
        return replace(request, **{self.field: value})

    def caption(self, value) -> str:
        return str(value) if self.field == "prompt" else f"{self.label}: {value}"


# axis name -> (request field, value type, A1111's label)
AXES = {
    "cfg": ("cfg_scale", float, "CFG Scale"),
    "steps": ("steps", int, "Steps"),
    "seed": ("seed", int, "Seed"),
    "subseed": ("subseed", int, "Var. seed"),
    "subseed_strength": ("subseed_strength", float, "Var. strength"),
    "sampler": ("sampler", str, "Sampler"),
    "scheduler": ("scheduler", str, "Schedule type"),
    "clip_skip": ("clip_skip", int, "Clip skip"),
    "strength": ("strength", float, "Denoising"),
    "hires_strength": ("hires_strength", float, "Hires denoising"),
    "hires_steps": ("hires_steps", int, "Hires steps"),
    "prompt": ("prompt", str, "Prompt S/R"),
}


def parse_axis(text: str) -> Axis:
    """`cfg=4,7,10` -> Axis; RequestError naming the axis for unknown names or values of the wrong type."""
    name, sep, values = str(text).partition("=")
    name = name.strip().lower().replace("-", "_")
    if not sep or name not in AXES:
        raise RequestError(f"X/Y axis {text!r}: write name=value1,value2 with a name among {', '.join(AXES)}")
    field, kind, label = AXES[name]
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not items:
        raise RequestError(f"X/Y axis {name}: give at least one value")
    try:
        typed = tuple(kind(v) for v in items)
    except ValueError:
        raise RequestError(f"X/Y axis {name}: values must be {kind.__name__}s, got {values!r}") from None
    return Axis(name, field, label, typed)


def grid_rows(count: int) -> int:
    """A1111's automatic row count: floor(sqrt(n)), lowered until it divides n."""
    rows = max(1, int(math.sqrt(count)))
    while count % rows:
        rows -= 1
    return rows


def image_grid(images: Sequence[Image.Image], rows: int | None = None) -> Image.Image:
    """Images pasted row by row on one canvas, each cell the size of the first image."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    rows = rows or grid_rows(len(images))
    cols = math.ceil(len(images) / rows)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "black")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * width, (i // cols) * height))
    return grid


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Greedy word wrap to `width` pixels."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return "\n".join(lines + [line])


def annotate_grid(grid: Image.Image, cell_width: int, cell_height: int, column_labels: Sequence[str],
                  row_labels: Sequence[str]) -> Image.Image:
    """Add a band above the columns and one left of the rows with their labels (A1111's draw_grid_annotations)."""
    font_size = max(10, (cell_width + cell_height) // 25)
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    columns = [_wrap(measure, text, font, cell_width - 8) for text in column_labels]
    pad_left = 0 if not any(row_labels) else max(cell_width * 3 // 4, 64)
    rows = [_wrap(measure, text, font, pad_left - 8) for text in row_labels]
    line = font_size + 4
    pad_top = 0 if not any(column_labels) else max(text.count("\n") + 1 for text in columns) * line + 12
    result = Image.new("RGB", (grid.width + pad_left, grid.height + pad_top), "white")
    result.paste(grid, (pad_left, pad_top))
    draw = ImageDraw.Draw(result)
    for col, text in enumerate(columns):
        draw.multiline_text((pad_left + cell_width * col + cell_width / 2, pad_top / 2), text, font=font,
                            fill="black", anchor="mm", align="center")
    for row, text in enumerate(rows):
        draw.multiline_text((pad_left / 2, pad_top + cell_height * row + cell_height / 2), text, font=font,
                            fill="black", anchor="mm", align="center")
    return result


def xy_plot(run: Callable[[GenerationRequest], Image.Image], request: GenerationRequest, x_axis: Axis,
            y_axis: Axis | None = None) -> tuple[Image.Image, list[Image.Image]]:
    """(labelled grid, cells row by row): `run(request)` gives each cell's image for every X, Y combination."""
    y_values = y_axis.values if y_axis else (None,)
    if len(x_axis.values) * len(y_values) > MAX_CELLS:
        raise RequestError(f"X/Y plot of {len(x_axis.values)} x {len(y_values)} cells is over the limit of {MAX_CELLS}")
    cells = []
    for y in y_values:
        for x in x_axis.values:
            cell_request = x_axis.apply(request, x)
            if y_axis is not None:
                cell_request = y_axis.apply(cell_request, y)
            cells.append(run(cell_request))
    grid = image_grid(cells, rows=len(y_values))
    width, height = cells[0].size
    column_labels = [x_axis.caption(x) for x in x_axis.values]
    row_labels = [y_axis.caption(y) for y in y_values] if y_axis else [""]
    return annotate_grid(grid, width, height, column_labels, row_labels), cells
