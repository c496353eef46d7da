"""Image files with infotext, written through the one atomic writer (`sdgen.runtime.files`)."""

from __future__ import annotations

import os

import pytest
from PIL import Image

import sdgen.runtime.files as files
from sdgen.pipelines.image_files import read_infotext, save_image_atomic

INFOTEXT = 'a red boat, "quoted"\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, Seed: 7, Size: 16x16'


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp")])
def test_saved_images_carry_their_infotext_through_the_shared_writer(tmp_path, monkeypatch, fmt, suffix):
    calls = []
    write_atomically = files.write_atomically
    monkeypatch.setattr(files, "write_atomically",
                        lambda path, write: calls.append(path) or write_atomically(path, write))
    path = save_image_atomic(Image.new("RGB", (16, 16), (200, 30, 30)), tmp_path / "deep" / f"image{suffix}",
                             INFOTEXT, fmt)
    assert calls == [path] and read_infotext(path) == INFOTEXT
    with Image.open(path) as image:
        assert image.format == fmt and image.size == (16, 16)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = save_image_atomic(Image.new("RGB", (16, 16)), tmp_path / "image.png", "first")

    def no_room(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_room)
    with pytest.raises(OSError, match="No space"):
        save_image_atomic(Image.new("RGB", (16, 16), (255, 255, 255)), path, "second")
    assert read_infotext(path) == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]
