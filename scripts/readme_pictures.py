"""Draw the README's example pictures with the embedded model (or --model): docs/examples-*.png.

    .venv/bin/python scripts/readme_pictures.py                 # writes docs/examples-*.png
    .venv/bin/python scripts/readme_pictures.py --out /tmp/x    # somewhere else

The text-to-image prompts are checked against the scene grammar first (the model knows nothing else).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

import sdgen
from sdgen.pipelines.grids import parse_axis, xy_plot
from sdgen.pipelines.request import GenerationRequest
from sdgen.train.evaluate import contact_sheet
from sdgen.train.scenes import parse_caption

TEXT_TO_IMAGE = [
    "a red circle above a blue square",
    "two small yellow stars on a black background",
    "a large green heart in the top left on a white background",
    "three orange triangles on a gradient from blue to purple",
    "a tranquil lake with the mountains at sunset",
    "snow-capped mountains and a lake at night with the moon and stars",
    "a futuristic cityscape at sunset",
    "a small house and trees beside a lake under a blue sky with clouds",
]
SETTINGS = dict(steps=20, cfg_scale=7.5, sampler="Euler a")


def square(image: Image.Image) -> Image.Image:
    """The image centred on a white square, so that a contact-sheet cell keeps its aspect ratio."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), "white")
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def operations(pipe) -> tuple[list[Image.Image], list[str]]:
    """What a user does to a picture: the prompt language, img2img, inpainting, outpainting, hires fix."""
    images, captions = [], []

    def add(image: Image.Image, caption: str) -> None:
        images.append(square(image))
        captions.append(caption)

    base_prompt = "a red circle above a blue square on a white background"
    base = pipe.generate(prompt=base_prompt, seed=7, **SETTINGS).images[0]
    add(base, f"txt2img: {base_prompt}")
    recoloured = "a red circle above a green square on a white background"
    add(pipe.img2img(init_image=base, prompt=recoloured, strength=0.6, seed=7, **SETTINGS).images[0],
        "img2img 0.6: ... a green square ...")
    edited = "[a red circle:a yellow star:0.4] above a blue square on a white background"
    add(pipe.generate(prompt=edited, seed=7, **SETTINGS).images[0], "prompt editing: [a red circle:a yellow star:0.4]")
    add(pipe.generate(prompt=base_prompt, negative_prompt="red", seed=7, **SETTINGS).images[0],
        "negative prompt: red")

    lake_prompt = "a tranquil lake with the mountains under a blue sky"
    lake = pipe.generate(prompt=lake_prompt, seed=3, **SETTINGS).images[0]
    add(lake, f"txt2img: {lake_prompt}")
    sky = Image.new("L", lake.size, 0)
    ImageDraw.Draw(sky).rectangle((0, 0, lake.width, lake.height * 2 // 5), fill=255)
    night = "a tranquil lake with the mountains at night with the moon and stars"
    add(pipe.inpaint(init_image=lake, mask=sky, prompt=night, strength=1.0, seed=3, **SETTINGS).images[0],
        "inpaint the sky: ... at night with the moon and stars")
    add(pipe.outpaint(init_image=lake, left=32, right=32, prompt=lake_prompt, strength=1.0, seed=3, **SETTINGS).images[0],
        "outpaint 32 px left and right")
    add(pipe.generate(prompt=lake_prompt, seed=3, hires_scale=2, hires_strength=0.5, **SETTINGS).images[0],
        "hires fix 2x (128x128)")
    return images, captions


def cfg_steps_plot(pipe) -> Image.Image:
    """`sdgen generate ... --xy "cfg=1,3,7.5,12" "steps=4,10,20"`: the same X/Y plot through the Python API."""
    request = GenerationRequest(prompt="a tranquil lake with the mountains at sunset", seed=5, sampler="Euler a")
    plot, _ = xy_plot(lambda cell: pipe.generate(cell).images[0], request,
                      parse_axis("cfg=1,3,7.5,12"), parse_axis("steps=4,10,20"))
    return plot


def previews(pipe) -> tuple[list[Image.Image], list[str]]:
    """What a live preview shows at a few steps of one generation: the full VAE decode of that step's
    denoised latent, the model's tiny preview decoder, and the linear map (latent size, enlarged)."""
    import torch

    from sdgen.models.tiny_decoder import folder_tiny_decoder, load_tiny_decoder
    from sdgen.pipelines.images import to_pil
    from sdgen.server.previews import fit_preview_map, preview_image

    decoder = load_tiny_decoder(folder_tiny_decoder(None))
    weights = fit_preview_map(pipe.vae, pipe.vae.cfg.scaling_factor)
    shown, steps = {}, (1, 4, 7, 10, 19)

    def keep(image_index: int, step: int, total: int, denoised: torch.Tensor) -> None:
        if step in steps:
            shown[step] = denoised[:1].detach().clone()

    pipe.generate(prompt="a tranquil lake with the mountains at sunset", seed=5, callback=keep, **SETTINGS)
    rows = {"VAE": [], "tiny decoder": [], "linear map": []}
    side = pipe.native_size
    with torch.inference_mode():
        for step in steps:
            rows["VAE"].append(to_pil(pipe.decode(shown[step], tiled=False))[0])
            rows["tiny decoder"].append(to_pil(decoder(shown[step]))[0])
            rows["linear map"].append(preview_image(shown[step][0], weights, (side, side)))
    images = [image for row in rows.values() for image in row]
    captions = [f"step {step + 1}: {name}" for name in rows for step in steps]
    return images, captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: the embedded model)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs"))
    args = parser.parse_args(argv)
    for prompt in TEXT_TO_IMAGE:
        parse_caption(prompt)  # raises on anything outside the scene grammar
    pipe = sdgen.load(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = [pipe.generate(prompt=prompt, seed=1, **SETTINGS).images[0] for prompt in TEXT_TO_IMAGE]
    contact_sheet(images, TEXT_TO_IMAGE, columns=4).save(out / "examples-txt2img.png")
    images, captions = operations(pipe)
    contact_sheet(images, captions, columns=4).save(out / "examples-editing.png")
    plot = cfg_steps_plot(pipe)
    plot.resize((plot.width * 2, plot.height * 2), Image.Resampling.NEAREST).save(out / "examples-xy.png")
    images, captions = previews(pipe)
    contact_sheet(images, captions, columns=5).save(out / "examples-previews.png")
    for name in ("examples-txt2img.png", "examples-editing.png", "examples-xy.png", "examples-previews.png"):
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
