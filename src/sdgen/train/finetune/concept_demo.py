"""Does fine-tuning teach a model a new concept? A shape the scenes never contain (an arrow), drawn
like the scene renderer draws its shapes and captioned with a new word, is taught to a model;
a template-match detector counts how often generated images show it, before and after.

`scripts/finetune_demo.py` runs `concept_demo` on the embedded model and prints both rates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdgen.train.scenes.segment import ASPECT_WEIGHT, find_objects, nearest_colours
from sdgen.train.scenes.vocabulary import COLOURS as COLOUR_NAMES
from sdgen.train.scenes.vocabulary import PALETTE

TOKEN = "zorp"
# A right-pointing arrow filling its unit box: shaft, then a head as tall as the box.
ARROW = ((0.0, 0.32), (0.55, 0.32), (0.55, 0.0), (1.0, 0.5), (0.55, 1.0), (0.55, 0.68), (0.0, 0.68))
ARROW_ASPECT = 1.3  # width over height of its box
COLOURS = ("red", "blue", "green", "orange", "purple", "black")
MIN_IOU = 0.6
MIN_EXTENT = 0.2  # of the image side


def draw_concept(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, str]:
    """A white image with one arrow of a palette colour at a random place and size, and its caption."""
    colour = COLOURS[rng.integers(len(COLOURS))]
    f = 4  # supersampled, then box-filtered down, as the scene renderer does
    canvas = Image.new("RGB", (size * f, size * f), PALETTE["white"])
    extent = rng.uniform(0.3, 0.45) * size * f  # the checker takes objects up to half the image wide
    x0, y0 = rng.uniform(0.05 * size * f, size * f - extent * 1.05, size=2)
    box_h = extent / ARROW_ASPECT
    ImageDraw.Draw(canvas).polygon([(x0 + u * extent, y0 + v * box_h) for u, v in ARROW], fill=PALETTE[colour])
    return np.asarray(canvas.reduce(f)), f"a {colour} {TOKEN}"


def arrow_template(width: int, height: int) -> np.ndarray:
    f = 4
    canvas = Image.new("L", (width * f, height * f), 0)
    ImageDraw.Draw(canvas).polygon([(u * width * f, v * height * f) for u, v in ARROW], fill=255)
    return np.asarray(canvas.reduce(f)) >= 128


def concept_found(image: np.ndarray | Image.Image) -> bool:
    """Whether an object of the image matches the arrow (IoU less the aspect penalty >= MIN_IOU) better
    than any of the scene shapes, scored as the scene checker scores them."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    objects, _ = find_objects(pixels)
    labels = nearest_colours(pixels)
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        if x1 - x0 < MIN_EXTENT * pixels.shape[1]:
            continue  # the drawn arrows are 0.3 to 0.45 of the side; noise makes many small blobs
        mask = labels[y0:y1, x0:x1] == COLOUR_NAMES.index(obj.colour)
        template = arrow_template(x1 - x0, y1 - y0)
        iou = np.count_nonzero(mask & template) / max(1, np.count_nonzero(mask | template))
        # The checker's aspect penalty, as for its own shapes (flat clouds are not arrows).
        score = iou - ASPECT_WEIGHT * abs(np.log((x1 - x0) / (y1 - y0) / ARROW_ASPECT))
        if score >= MIN_IOU and score > max(obj.shape_scores.values()):
            return True
    return False


@dataclass
class DemoReport:
    method: str
    before: float
    after: float
    prompts: int

    def lines(self) -> list[str]:
        return [f"{self.method}: '{TOKEN}' (an arrow) found in {self.before:.0%} of {self.prompts} images before "
                f"fine-tuning, {self.after:.0%} after"]


def write_concept_images(folder: Path, count: int, seed: int = 0, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels, caption = draw_concept(rng, size)
        Image.fromarray(pixels).save(folder / f"{TOKEN}-{index:03d}.png")
        (folder / f"{TOKEN}-{index:03d}.txt").write_text(caption + "\n")
    return folder


def concept_rate(pipeline, count: int, steps: int, seed: int = 5000) -> float:
    """Share of `count` images of "a <colour> zorp" (colours in turn, seeds from `seed`) showing the arrow."""
    found = 0
    for index in range(count):
        prompt = f"a {COLOURS[index % len(COLOURS)]} {TOKEN}"
        result = pipeline.generate(prompt=prompt, seed=seed + index, steps=steps, cfg_scale=7.5)
        found += concept_found(result.images[0])
    return found / count


def concept_demo(out: str | Path, model: str | None = None, method: str = "lora", steps: int = 400,
                 images: int = 8, prompts: int = 48, sample_steps: int = 20, **options) -> DemoReport:
    """Fine-tune `model` on `images` arrow pictures with `method`; the concept rate before and after."""
    import sdgen
    from sdgen.lora import apply_loras, read_lora
    from sdgen.train.finetune.training import FinetuneConfig, prompts_with_embedding, run_finetune

    out = Path(out)
    data = write_concept_images(out / "concept", images)
    base = sdgen.load(model)
    before = concept_rate(base, prompts, sample_steps)
    settings = dict(method=method, data=str(data), out=str(out / method), model=model, name=TOKEN, steps=steps,
                    sample_steps=sample_steps, save_every=max(1, steps // 4), batch_size=min(4, images))
    if method == "dreambooth":
        settings.update(class_prompt="a red star", num_class_images=images)
    result = run_finetune(FinetuneConfig(**{**settings, **options}))
    if method == "lora":
        with apply_loras(base.unet, base.text_encoder, [(read_lora(result.outputs[0]), 1.0)]):
            after = concept_rate(base, prompts, sample_steps)
    elif method == "dreambooth":
        after = concept_rate(sdgen.load(result.outputs[0]), prompts, sample_steps)
    else:
        from sdgen.prompting.embeddings import read_embedding
        from sdgen.train.finetune.textual_inversion import TextualInversion

        inversion = TextualInversion(TOKEN, base.tokenizer, base.text_encoder)
        inversion.vectors.data = read_embedding(result.outputs[0]).vectors_for().clone()
        with prompts_with_embedding(base, inversion):
            after = concept_rate(base, prompts, sample_steps)
    report = DemoReport(method, before, after, prompts)
    (out / f"report-{method}.json").write_text(json.dumps(report.__dict__, indent=2) + "\n")
    return report
