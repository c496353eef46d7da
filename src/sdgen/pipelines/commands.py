"""The image commands of `sdgen` (img2img, inpaint, outpaint, upscale, replay) and the output options they share
with `generate` (variation seeds, hires fix, file names and formats, grids, X/Y plots).

cli.py stays a thin dispatcher: it calls `add_image_commands` and `add_output_options` while
building its parser, and the `run_*` functions here build requests and call the library.
Nothing here is imported unless a command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from sdgen.errors import UserError

AddOptions = Callable[[argparse.ArgumentParser], None]


def add_output_options(parser: argparse.ArgumentParser, hires: bool = False) -> None:
    """Variation seed, file naming, format, grid and X/Y plot options (and the hires fix for txt2img)."""
    group = parser.add_argument_group("variations, files and grids")
    group.add_argument("--subseed", type=int, default=-1, help="variation seed (-1: random); used with --subseed-strength")
    group.add_argument("--subseed-strength", type=float, default=0.0,
                       help="0..1: how far the noise moves from --seed towards --subseed")
    group.add_argument("--filename", default=None, metavar="PATTERN",
                       help="file name pattern such as '{seed}-{prompt_words}' (default: NNNNN-SEED)")
    group.add_argument("--format", default="png", choices=["png", "jpeg", "webp"], help="image file format")
    group.add_argument("--grid", action="store_true", help="also save a grid of all images")
    group.add_argument("--xy", nargs="+", default=None, metavar="AXIS",
                       help="X/Y plot: one or two axes such as 'cfg=4,7,10' 'steps=10,20' (columns, rows)")
    group.add_argument("--lora-dir", default=None, help="folder where <lora:name:weight> in a prompt finds name.safetensors")
    if hires:
        group = parser.add_argument_group("hires fix")
        group.add_argument("--hires", type=float, default=None, metavar="SCALE",
                           help="two passes: generate, upscale by SCALE, then img2img at the larger size")
        group.add_argument("--hires-strength", type=float, default=0.7, help="denoising strength of the second pass")
        group.add_argument("--hires-steps", type=int, default=0, help="second-pass steps (0: same as --steps)")
        group.add_argument("--hires-upscaler", default="Latent",
                           help="Latent, 'Latent (bicubic)', 'Latent (nearest)', ..., Lanczos, Nearest")


def configure(pipeline, args: argparse.Namespace):
    """Pipeline settings from the options: the LoRA folder, the CPU fast paths."""
    if getattr(args, "lora_dir", None):
        pipeline.lora_dir = Path(args.lora_dir)
    step_cache, token_merging = getattr(args, "step_cache", 0), getattr(args, "token_merging", 0.0)
    int8 = getattr(args, "int8", False)
    if getattr(args, "fast", False) or step_cache or token_merging or int8:
        from sdgen.runtime.fast import FastOptions, accelerate_pipeline

        accelerate_pipeline(pipeline, FastOptions(step_cache=step_cache, token_merging=token_merging, int8=int8))
    return pipeline


def request_options(args: argparse.Namespace) -> dict:
    """GenerationRequest fields from the output options."""
    fields = {"subseed": args.subseed, "subseed_strength": args.subseed_strength}
    if getattr(args, "hires", None) is not None:
        fields.update(hires_scale=args.hires, hires_strength=args.hires_strength, hires_steps=args.hires_steps,
                      hires_upscaler=args.hires_upscaler)
    return fields


def add_image_commands(commands, add_generation: AddOptions, add_model: AddOptions) -> None:
    """img2img, inpaint, outpaint, upscale and replay sub-commands."""
    img2img = commands.add_parser("img2img", help="image to image: redraw INPUT guided by the prompt")
    img2img.add_argument("input", help="PNG, JPEG or WEBP image")
    _img2img_options(img2img, add_generation, add_model)

    inpaint = commands.add_parser("inpaint", help="repaint the white part of MASK in INPUT")
    inpaint.add_argument("input", help="PNG, JPEG or WEBP image")
    inpaint.add_argument("mask", help="image of INPUT's size: white = repaint, black = keep")
    _img2img_options(inpaint, add_generation, add_model)
    _mask_options(inpaint)

    outpaint = commands.add_parser("outpaint", help="extend INPUT's canvas and paint the new border")
    outpaint.add_argument("input", help="PNG, JPEG or WEBP image")
    _img2img_options(outpaint, add_generation, add_model, strength=0.8)
    _mask_options(outpaint, blur=8, content="fill")
    for side in ("left", "right", "up", "down"):
        outpaint.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")

    upscale = commands.add_parser("upscale", help="4x upscale with the Stable Diffusion x4 upscaler")
    upscale.add_argument("input", help="PNG, JPEG or WEBP image")
    upscale.add_argument("prompt", nargs="?", default="", help="what the image shows (guides the new detail)")
    upscale.add_argument("--model", required=True, help="the x4 upscaler's diffusers folder")
    upscale.add_argument("--negative", default="")
    upscale.add_argument("--seed", type=int, default=-1)
    upscale.add_argument("--steps", type=int, default=20)
    upscale.add_argument("--sampler", default="DPM++ 2M")
    upscale.add_argument("--scheduler", default="automatic")
    upscale.add_argument("--cfg", type=float, default=9.0)
    upscale.add_argument("--noise-level", type=int, default=20, help="noise added to the input (0..350)")
    upscale.add_argument("--tile", type=int, default=128, help="U-Net tile in input pixels for large inputs")
    upscale.add_argument("--tile-overlap", type=int, default=32)
    upscale.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    upscale.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    upscale.add_argument("--out", default="outputs")
    upscale.add_argument("--format", default="png", choices=["png", "jpeg", "webp"])
    upscale.add_argument("--filename", default=None, metavar="PATTERN")

    replay = commands.add_parser("replay", help="regenerate an image from the parameters stored in it")
    replay.add_argument("image", help="an image written by sdgen (or AUTOMATIC1111)")
    replay.add_argument("--init", default=None, help="the input image of an img2img / inpainting result")
    replay.add_argument("--mask", default=None, help="the mask of an inpainting result")
    replay.add_argument("--out", default="outputs")
    replay.add_argument("--format", default="png", choices=["png", "jpeg", "webp"])
    replay.add_argument("--filename", default=None, metavar="PATTERN")
    replay.add_argument("--lora-dir", default=None, help="folder of the LoRAs the prompt names")
    add_model(replay)


def _img2img_options(parser, add_generation: AddOptions, add_model: AddOptions, strength: float = 0.75) -> None:
    add_generation(parser)
    add_model(parser)
    add_output_options(parser)
    group = parser.add_argument_group("image to image")
    group.add_argument("--strength", type=float, default=strength,
                       help="denoising strength: 0 returns the input, 1 ignores it")
    group.add_argument("--resize", default="stretch", choices=["stretch", "crop", "fill"],
                       help="fit the input to --width x --height (default: its size rounded down to multiples of 8)")


def _mask_options(parser, blur: int = 4, content: str = "original") -> None:
    group = parser.add_argument_group("mask")
    group.add_argument("--mask-blur", type=int, default=blur, help="Gaussian blur of the mask edge, in pixels")
    group.add_argument("--invert-mask", action="store_true", help="repaint the black part instead")
    group.add_argument("--masked-content", default=content, choices=["original", "fill", "latent noise", "latent nothing"],
                       help="what the masked area starts from")
    group.add_argument("--only-masked", action="store_true",
                       help="work on a crop around the mask at full resolution, then paste it back")
    group.add_argument("--only-masked-padding", type=int, default=32, help="pixels kept around the mask's crop")
    group.add_argument("--no-blend", action="store_true",
                       help="with an inpainting model, do not keep the unmasked latents at every step (diffusers' way)")


def _load_input(path: str):
    from sdgen.pipelines.images import read_image

    with read_image(path) as image:
        return image.copy()


def save_result(result, args: argparse.Namespace) -> list[Path]:
    """Save the images (pattern, format, metadata as asked), a grid with --grid, and print the paths."""
    from sdgen.pipelines.grids import image_grid
    from sdgen.pipelines.naming import save_grid

    metadata = not getattr(args, "strip_metadata", False)
    paths = result.save(Path(args.out), pattern=args.filename, image_format=args.format, metadata=metadata)
    for index, path in enumerate(paths):
        print(path)
        if getattr(result, "nsfw", None) and result.nsfw[index]:
            print(f"sdgen: {path.name} was flagged by the safety checker and blacked out", file=sys.stderr)
    if getattr(args, "grid", False) and result.images:
        grid = image_grid(result.images)
        paths.append(save_grid(grid, result.infotexts[0] if metadata else None, Path(args.out),
                               image_format=args.format))
        print(paths[-1])
    return paths


def run_xy(pipeline, request, args: argparse.Namespace, run: Callable) -> int:
    """--xy: one run per cell (`run(request) -> GenerationResult`), the cells saved, then the labelled plot."""
    from dataclasses import replace

    from sdgen.pipelines.grids import parse_axis, xy_plot
    from sdgen.pipelines.naming import save_grid

    if len(args.xy) > 2:
        raise UserError("--xy takes one or two axes (columns, then rows)")
    axes = [parse_axis(text) for text in args.xy]
    first = {}

    def cell(cell_request):
        result = run(replace(cell_request, n=1, batch_size=1))
        save_result(result, args)
        first.setdefault("infotext", result.infotexts[0])
        return result.images[0]

    grid, _ = xy_plot(cell, request.with_seed(), axes[0], axes[1] if len(axes) > 1 else None)
    metadata = not getattr(args, "strip_metadata", False)
    print(save_grid(grid, first["infotext"] if metadata else None, Path(args.out), image_format=args.format,
                    prefix="xy_grid"))
    return 0


def _img2img_request(args: argparse.Namespace, **extra):
    from sdgen.pipelines.request import Img2ImgRequest

    fields = dict(
        prompt=args.prompt, negative_prompt=args.negative, seed=args.seed, steps=args.steps, sampler=args.sampler,
        scheduler=args.scheduler, cfg_scale=args.cfg, width=args.width, height=args.height, n=args.n,
        batch_size=args.batch_size, clip_skip=args.clip_skip, init_image=_load_input(args.input),
        strength=args.strength, resize_mode=args.resize, **request_options(args), **extra)
    if hasattr(args, "mask_blur"):
        fields.update(mask_blur=args.mask_blur, mask_invert=args.invert_mask, masked_content=args.masked_content,
                      only_masked=args.only_masked, only_masked_padding=args.only_masked_padding,
                      inpaint_blend=not args.no_blend)
    return Img2ImgRequest(**fields)


def _load_pipeline(args: argparse.Namespace):
    import sdgen

    options = dict(vae=args.vae, config=args.config, prediction=args.prediction, device=args.device, dtype=args.dtype)
    if hasattr(args, "no_safety_checker"):
        options.update(safety_checker=not args.no_safety_checker, watermark=not args.no_watermark)
    return configure(sdgen.load(args.model, **options), args)


def run_img2img(args: argparse.Namespace) -> int:
    """sdgen img2img / inpaint / outpaint."""
    from sdgen.pipelines.img2img import outpaint_request

    extra = {}
    if args.command == "inpaint":
        extra["mask"] = _load_input(args.mask)
    request = _img2img_request(args, **extra)
    if args.command == "outpaint":
        request = outpaint_request(request, left=args.left, right=args.right, up=args.up, down=args.down)
    request.validate()
    pipeline = _load_pipeline(args)
    if args.xy:
        return run_xy(pipeline, request, args, lambda r: pipeline.img2img(r, progress=True))
    save_result(pipeline.img2img(request, progress=True), args)
    return 0


def run_upscale(args: argparse.Namespace) -> int:
    """sdgen upscale: the x4 upscaler on INPUT."""
    from sdgen.pipelines.upscale import StableDiffusionUpscaler, UpscaleRequest

    request = UpscaleRequest(image=_load_input(args.input), prompt=args.prompt, negative_prompt=args.negative,
                             seed=args.seed, steps=args.steps, sampler=args.sampler, scheduler=args.scheduler,
                             cfg_scale=args.cfg, noise_level=args.noise_level, tile=args.tile,
                             tile_overlap=args.tile_overlap)
    request.validate()
    upscaler = StableDiffusionUpscaler.load(args.model, device=args.device, dtype=args.dtype)
    save_result(upscaler.upscale(request, progress=True), args)
    return 0


def run_replay(args: argparse.Namespace) -> int:
    """sdgen replay IMAGE: the same request again, saved as a new file."""
    from sdgen.pipelines.image_files import read_infotext
    from sdgen.pipelines.replay import int8_of, replay, replay_request, step_cache_of, token_merging_of

    text = read_infotext(args.image)
    if not text:
        raise UserError(f"{args.image}: no generation parameters stored; nothing to replay")
    init = _load_input(args.init) if args.init else None
    mask = _load_input(args.mask) if args.mask else None
    replay_request(text, init_image=init, mask=mask)  # fails fast, before the model loads
    # step caching, token merging and int8 change the image: the same again
    args.step_cache = args.step_cache or step_cache_of(text)
    args.token_merging = args.token_merging or token_merging_of(text)
    args.int8 = args.int8 or int8_of(text)
    pipeline = _load_pipeline(args)
    save_result(replay(pipeline, text, init_image=init, mask=mask, progress=True), args)
    return 0


COMMANDS = {"img2img": run_img2img, "inpaint": run_img2img, "outpaint": run_img2img, "upscale": run_upscale,
            "replay": run_replay}
