"""The `sdgen` command: a thin front end that builds requests and calls the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdgen.errors import UserError


def _step_cache_interval(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an interval of at least 2 steps, got {text!r}")
    return value


def _token_merging_ratio(text: str) -> float:
    from sdgen.runtime.token_merging import MAX_RATIO

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_RATIO:
        raise argparse.ArgumentTypeError(f"expected a share of tokens above 0 and at most {MAX_RATIO}, got {text!r}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from sdgen.server.arguments import FAST_HELP  # the serve command's parser imports it too

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="diffusers folder, .safetensors or .ckpt (default: the embedded model)")
    group.add_argument("--vae", default=None, help="replace the model's VAE (folder or single file)")
    group.add_argument("--config", default=None, help="diffusers folder whose configs describe a single-file checkpoint")
    group.add_argument("--prediction", choices=["eps", "v"], default=None, help="override the model's prediction type")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    group.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute precision (fp16 is refused on a CPU)")
    group.add_argument("--fast", action="store_true", help=FAST_HELP)
    group.add_argument("--step-cache", type=_step_cache_interval, default=0, metavar="N",
                       help="implies --fast: the whole U-Net only every N-th step (DeepCache); faster, images change")
    group.add_argument("--token-merging", type=_token_merging_ratio, default=0.0, metavar="RATIO",
                       help="implies --fast: merge this share of similar tokens before self-attention at the "
                            "top level (ToMe; 0.5 is usual); faster at 512x512 and up, images change")
    group.add_argument("--int8", action="store_true",
                       help="implies --fast: the U-Net's wide convolutions and linear layers as int8 products "
                            "(CPUs with AVX-512 VNNI); faster, images change")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--negative", default="", help="negative prompt: what to steer away from")
    parser.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed (recorded in the image)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="Euler a", help="see `sdgen samplers`; legacy names like 'DPM++ 2M Karras' work")
    parser.add_argument("--scheduler", default="automatic", help="automatic, uniform, karras, exponential, ...")
    parser.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (1 skips the unconditional pass)")
    parser.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's native size)")
    parser.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's native size)")
    parser.add_argument("--n", type=int, default=1, help="number of images")
    parser.add_argument("--batch-size", type=int, default=1, help="images per U-Net call (never changes an image)")
    parser.add_argument("--clip-skip", type=int, default=1, help="use the output of an earlier text-encoder layer")
    parser.add_argument("--out", default="outputs", help="output folder")
    provenance = parser.add_argument_group("safety and provenance")
    provenance.add_argument("--no-safety-checker", action="store_true",
                            help="do not screen images with the model folder's safety checker (prints a warning)")
    provenance.add_argument("--no-watermark", action="store_true",
                            help="do not embed the invisible watermark in images of 256 px or more")
    provenance.add_argument("--strip-metadata", action="store_true",
                            help="write no generation parameters (infotext) into the image files")


def _add_sdxl_options(parser: argparse.ArgumentParser) -> None:
    from sdgen.pipelines.sdxl_conditioning import parse_crop, parse_size

    group = parser.add_argument_group("SDXL")
    group.add_argument("--refiner", default=None, help="SDXL refiner checkpoint: takes over the schedule at --switch-at")
    group.add_argument("--switch-at", type=float, default=None,
                       help="fraction of the schedule the base model runs before the refiner (default 0.8)")
    group.add_argument("--original-size", type=parse_size, default=None, metavar="WxH",
                       help="micro-conditioning: the size the model is told the image had (default: the output size)")
    group.add_argument("--crop", type=parse_crop, default=None, metavar="TOP,LEFT",
                       help="micro-conditioning: crop offset the model is told of (default 0,0)")
    group.add_argument("--aesthetic-score", type=float, default=None, help="refiner conditioning (default 6.0)")
    group.add_argument("--zero-negative", action=argparse.BooleanOptionalAction, default=None,
                       help="an empty negative prompt gives zero embeddings (default, as A1111 1.10 and diffusers); "
                            "--no-zero-negative encodes the empty string")
    rank = parser.add_argument_group("ranking")
    rank.add_argument("--rank", choices=["clip"], default=None, help="score the images against the prompt with CLIP")
    rank.add_argument("--keep", type=int, default=None, help="with --rank: keep the best N in --out, the rest in --out/rejected")
    rank.add_argument("--clip-model", default=None, help="CLIP folder (transformers layout; default: the embedded CLIP)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdgen", description="Stable Diffusion on your own machine.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="text to image")
    _add_generation_options(generate)
    _add_model_options(generate)
    _add_sdxl_options(generate)
    from sdgen.pipelines.commands import add_image_commands, add_output_options

    add_output_options(generate, hires=True)
    add_image_commands(commands, _add_generation_options, _add_model_options)

    commands.add_parser("samplers", help="list samplers and schedule types")

    info = commands.add_parser("info", help="print the generation parameters stored in an image")
    info.add_argument("image")

    rank = commands.add_parser("rank", help="rank the images of a folder by CLIP similarity to a prompt")
    rank.add_argument("folder")
    rank.add_argument("prompt")
    rank.add_argument("--clip-model", default=None, help="CLIP folder (transformers layout; default: the embedded CLIP)")
    rank.add_argument("--keep", type=int, default=None, help="print only the best N")

    train = commands.add_parser("train", help="train the embedded model (resumable)")
    train.add_argument("stage", choices=["autoencoder", "decoder", "clip", "unet", "tiny_decoder", "export", "all"])
    train.add_argument("--config", default="configs/embedded.toml")
    train.add_argument("--run", default="runs/embedded", help="run folder: checkpoints, logs, loss curves")
    train.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    train.add_argument("--steps", type=int, default=None, help="override the stage's step count (smoke tests)")
    train.add_argument("--out", default=None, help="export folder (default: the packaged embedded model)")
    train.add_argument("--init-from", default=None, metavar="FOLDER",
                       help="start stages the run has no checkpoint for from an exported model folder "
                            "(e.g. src/sdgen/data/embedded) at the steps its training.json records")
    evaluate = commands.add_parser("eval", help="score a model on scene prompts (held-out set by default)")
    evaluate.add_argument("--model", default=None, help="model folder or file (default: the embedded model)")
    evaluate.add_argument("--prompts", default=None, help="file of captions, one per line (default: the held-out set)")
    evaluate.add_argument("--count", type=int, default=150, help="number of held-out prompts")
    evaluate.add_argument("--steps", type=int, default=20)
    evaluate.add_argument("--cfg", type=float, default=7.5)
    evaluate.add_argument("--sampler", default="Euler a")
    evaluate.add_argument("--seed", type=int, default=1000)
    evaluate.add_argument("--out", default="outputs/eval", help="folder for the contact sheet and report.json")

    from sdgen.server.arguments import add_serve_arguments

    add_serve_arguments(commands.add_parser("serve", help="HTTP API (AUTOMATIC1111-compatible), job queue, web UI"))
    from sdgen.batch.arguments import add_batch_arguments
    from sdgen.train.finetune.arguments import add_finetune_arguments

    add_finetune_arguments(commands.add_parser("finetune", help="LoRA, textual inversion or DreamBooth on your images"))
    add_batch_arguments(commands.add_parser("batch", help="generate a JSON-lines file of requests (resumable, Ray)"))
    return parser


def run_eval(args: argparse.Namespace) -> int:
    from sdgen.train.evaluate import evaluate

    report = evaluate(args.model, args.prompts, count=args.count, steps=args.steps, cfg_scale=args.cfg,
                      sampler=args.sampler, seed=args.seed, out=args.out)
    print("\n".join(report.lines()))
    print(f"contact sheet: {Path(args.out) / 'contact-sheet.png'}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import sdgen
    from sdgen.pipelines.commands import configure, request_options, run_xy, save_result
    from sdgen.pipelines.request import GenerationRequest

    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative, seed=args.seed, steps=args.steps,
        sampler=args.sampler, scheduler=args.scheduler, cfg_scale=args.cfg, width=args.width,
        height=args.height, n=args.n, batch_size=args.batch_size, clip_skip=args.clip_skip,
        **request_options(args),
    )
    request.validate()
    sdxl = {name: value for name, value in (
        ("refiner_checkpoint", args.refiner), ("refiner_switch_at", args.switch_at), ("original_size", args.original_size),
        ("crop", args.crop), ("aesthetic_score", args.aesthetic_score), ("zero_negative", args.zero_negative),
    ) if value is not None}
    if args.switch_at is not None and args.refiner is None:
        raise UserError("--switch-at needs --refiner")
    if args.keep is not None and args.rank is None:
        raise UserError("--keep needs --rank clip")
    ranker = None
    if args.rank:
        from sdgen.pipelines.ranking import CLIPRanker, check_keep

        check_keep(args.keep)
        ranker = CLIPRanker.from_folder(args.clip_model)  # before the model loads: a bad path fails fast
    if args.no_safety_checker:
        print("sdgen: warning: the safety checker is off; images are not screened for NSFW content", file=sys.stderr)
    pipeline = sdgen.load(args.model, vae=args.vae, config=args.config, prediction=args.prediction,
                          device=args.device, dtype=args.dtype, safety_checker=not args.no_safety_checker,
                          watermark=not args.no_watermark)
    if sdxl and not pipeline.family.startswith("sdxl"):
        raise UserError("--refiner, --switch-at, --original-size, --crop, --aesthetic-score and --zero-negative "
                        f"apply to SDXL models; {pipeline.name} is {pipeline.family}")
    configure(pipeline, args)
    if args.xy:
        return run_xy(pipeline, request, args, lambda r: pipeline.generate(r, progress=True, **sdxl))
    result = pipeline.generate(request, progress=True, **sdxl)
    if ranker is not None:
        from sdgen.pipelines.ranking import rank_result

        print("\n".join(rank_result(result, ranker, Path(args.out), args.keep, metadata=not args.strip_metadata)))
        return 0
    save_result(result, args)
    return 0


def run_samplers(_: argparse.Namespace) -> int:
    from sdgen.diffusion.registry import SAMPLERS, list_schedulers

    print("Samplers (--sampler):")
    for spec in SAMPLERS:
        aliases = ", ".join(spec.aliases)
        print(f"  {spec.name:<18} automatic schedule: {spec.default_schedule:<18} aliases: {aliases}")
    print("Schedule types (--scheduler):")
    for item in list_schedulers():
        print(f"  {item['name']:<18} {item['label']}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from sdgen.pipelines.image_files import read_infotext
    from sdgen.pipelines.images import read_image
    from sdgen.provenance import describe_watermark

    text = read_infotext(args.image)  # PNG chunk, or EXIF UserComment in JPEG / WEBP
    print(text if text is not None else f"{args.image}: no generation parameters stored")
    with read_image(args.image) as image:
        print(f"Invisible watermark: {describe_watermark(image)}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from sdgen.train.embedded import run_training

    run_training(args.stage, config_path=args.config, run_dir=args.run, threads=args.threads,
                 steps=args.steps, out=args.out, init_from=args.init_from)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from sdgen.server.arguments import run_serve as serve

    return serve(args)


def run_finetune(args: argparse.Namespace) -> int:
    from sdgen.train.finetune.arguments import run_finetune_command

    return run_finetune_command(args)


def run_batch(args: argparse.Namespace) -> int:
    from sdgen.batch.arguments import run_batch_command

    return run_batch_command(args)


COMMANDS = {"generate": run_generate, "samplers": run_samplers, "info": run_info, "train": run_train,
            "eval": run_eval, "serve": run_serve, "finetune": run_finetune, "batch": run_batch}


def run_rank(args: argparse.Namespace) -> int:
    from sdgen.pipelines.ranking import CLIPRanker, check_keep, rank_folder

    check_keep(args.keep)
    print("\n".join(rank_folder(args.folder, args.prompt, CLIPRanker.from_folder(args.clip_model), args.keep)))
    return 0


COMMANDS["rank"] = run_rank


def run_image_command(args: argparse.Namespace) -> int:
    from sdgen.pipelines.commands import COMMANDS as IMAGE_COMMANDS

    return IMAGE_COMMANDS[args.command](args)


COMMANDS.update(dict.fromkeys(["img2img", "inpaint", "outpaint", "upscale", "replay"], run_image_command))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        print(f"sdgen: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
