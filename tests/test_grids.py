"""Batch grids and X/Y plots: A1111's row rule, labelled rows and columns, the CLI's --grid and --xy."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from reference_pipelines import make_reference_pipeline, save_folder
from sdgen.cli import main
from sdgen.pipelines.grids import annotate_grid, grid_rows, image_grid, parse_axis, xy_plot
from sdgen.pipelines.image_files import read_infotext
from sdgen.pipelines.request import GenerationRequest, RequestError


@pytest.mark.parametrize("count, rows", [(1, 1), (2, 1), (4, 2), (5, 1), (6, 2), (8, 2), (9, 3), (12, 3)])
def test_rows_follow_a1111(count, rows):
    assert grid_rows(count) == rows


def _cell(colour) -> Image.Image:
    return Image.new("RGB", (32, 24), colour)


def test_image_grid_places_images_row_by_row():
    grid = image_grid([_cell((i * 40, 0, 0)) for i in range(6)])
    assert grid.size == (3 * 32, 2 * 24)
    assert grid.getpixel((32 * 2 + 5, 5)) == (80, 0, 0) and grid.getpixel((5, 24 + 5)) == (120, 0, 0)


def test_axes_parse_and_reject():
    axis = parse_axis("cfg=4, 7,10")
    assert axis.field == "cfg_scale" and axis.values == (4.0, 7.0, 10.0) and axis.caption(7.0) == "CFG Scale: 7.0"
    assert parse_axis("Steps=10,20").values == (10, 20)
    for bad in ("cfg", "speed=1,2", "steps=a,b", "cfg="):
        with pytest.raises(RequestError):
            parse_axis(bad)


def test_xy_plot_runs_every_cell_and_labels_rows_and_columns():
    seen = []

    def run(request):
        seen.append((request.cfg_scale, request.steps, request.prompt))
        return _cell((int(request.cfg_scale) * 20, request.steps * 10, 0))

    request = GenerationRequest(prompt="a red boat")
    grid, cells = xy_plot(run, request, parse_axis("cfg=4,7,10"), parse_axis("steps=1,2"))
    assert seen == [(4.0, 1, "a red boat"), (7.0, 1, "a red boat"), (10.0, 1, "a red boat"),
                    (4.0, 2, "a red boat"), (7.0, 2, "a red boat"), (10.0, 2, "a red boat")]
    assert len(cells) == 6
    assert grid.width > 3 * 32 and grid.height > 2 * 24  # label bands on the left and at the top
    band = np.asarray(grid)[: grid.height - 2 * 24]
    assert (band < 128).any()  # dark text was drawn in the top band
    prompts = []
    xy_plot(lambda r: prompts.append(r.prompt) or _cell("white"), request, parse_axis("prompt=red,blue,green"))
    assert prompts == ["a red boat", "a blue boat", "a green boat"]


def test_annotation_without_row_labels_adds_only_the_top_band():
    grid = annotate_grid(image_grid([_cell("white")] * 2, rows=1), 32, 24, ["A", "B"], [""])
    assert grid.width == 64 and grid.height > 24


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sd1-grids")
    return save_folder(make_reference_pipeline("sd1", workdir), workdir / "model")


def test_cli_grid_and_xy_plot(model_folder, tmp_path):
    out = tmp_path / "batch"
    assert main(["generate", "a boat", "--model", str(model_folder), "--seed", "2", "--steps", "1", "--width", "32",
                 "--height", "32", "--n", "4", "--batch-size", "2", "--grid", "--out", str(out)]) == 0
    with Image.open(out / "grid-0000.png") as grid:
        assert grid.size == (64, 64)
    assert "Seed: 2" in read_infotext(out / "grid-0000.png")
    plot = tmp_path / "plot"
    assert main(["generate", "a boat", "--model", str(model_folder), "--seed", "2", "--steps", "1", "--width", "32",
                 "--height", "32", "--xy", "cfg=3,8", "sampler=Euler,DDIM", "--out", str(plot)]) == 0
    with Image.open(plot / "xy_grid-0000.png") as grid:
        assert grid.width > 64 and grid.height > 64
    assert len([p for p in plot.iterdir() if p.name[0].isdigit()]) == 4  # every cell is saved too
    assert main(["generate", "a boat", "--model", str(model_folder), "--xy", "a=1", "b=2", "c=3",
                 "--out", str(plot)]) == 2
