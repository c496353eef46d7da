"""`sdgen serve` flags, kept here so the CLI module only hands over (imports nothing heavy)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdgen.pipelines.request import Limits
from sdgen.server.config import DEFAULT_PORT, MODEL_PREVIEW_DECODER, ServerConfig, default_data_dir

FAST_HELP = ("CPU fast paths: weights prepacked for oneDNN, upsampling convolutions split by output phase;"
             " in bf16, sdgen's compiled attention, GEGLU and GroupNorm kernels where built (rounding changes only)")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig.__dataclass_fields__["limits"].default
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--listen", action="store_true", help="listen on all interfaces (needs --api-auth)")
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; 0.0.0.0 with --listen)")
    parser.add_argument("--api-auth", default=None, metavar="USER:PASSWORD[,USER:PASSWORD]",
                        help="HTTP basic credentials for every route, the web UI included")
    parser.add_argument("--insecure", action="store_true", help="allow --listen without --api-auth (warns loudly)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="an extra Host header name a loopback server answers (e.g. behind a proxy)")
    parser.add_argument("--data-dir", default=None, help=f"jobs database and images (default {default_data_dir()})")
    parser.add_argument("--model", default=None, help="default model: diffusers folder, .safetensors or .ckpt "
                                                      "(default: the embedded model)")
    parser.add_argument("--models-dir", default=None, help="a folder of checkpoints offered in /sdapi/v1/sd-models")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--fast", action="store_true", help=FAST_HELP)
    parser.add_argument("--queue-size", type=int, default=32, help="queued + running jobs before 503")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="width x height limit")
    parser.add_argument("--max-side", type=int, default=defaults.max_side, help="width or height limit")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--max-images", type=int, default=defaults.max_images, help="n_iter x batch_size limit")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars)
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="request body cap (413 above it)")
    parser.add_argument("--preview-every", type=int, default=3, help="live preview every N steps (0: none)")
    parser.add_argument("--preview-decoder", default=None, metavar="PATH",
                        help="previews through a tiny decoder instead of the cheap linear map: a TAESD decoder file "
                             "or AutoencoderTiny folder for the model's latent space, or 'model' for each model "
                             "folder's own tiny_decoder.safetensors (the embedded model ships one)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """A ServerConfig from parsed flags; ValueError for a limit that is not positive."""
    limits = Limits(max_side=args.max_side, max_pixels=args.max_pixels, max_steps=args.max_steps,
                    max_images=args.max_images, max_batch_size=args.max_batch_size,
                    max_prompt_chars=args.max_prompt_chars)
    for name in ("max_side", "max_pixels", "max_steps", "max_images", "max_batch_size", "max_prompt_chars",
                 "queue_size", "port"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    return ServerConfig(
        host=host, port=args.port, data_dir=Path(args.data_dir).expanduser() if args.data_dir else default_data_dir(),
        model=args.model, models_dir=args.models_dir, api_auth=args.api_auth, insecure=args.insecure,
        allowed_hosts=tuple(args.allowed_host), limits=limits, max_queue=args.queue_size,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024), preview_every=max(0, args.preview_every),
        device=args.device, dtype=args.dtype, fast=args.fast,
        preview_decoder=(MODEL_PREVIEW_DECODER if args.preview_decoder == MODEL_PREVIEW_DECODER else
                         Path(args.preview_decoder).expanduser() if args.preview_decoder else None))


def run_serve(args: argparse.Namespace) -> int:
    from sdgen.errors import UserError
    from sdgen.server.app import serve

    try:
        config = config_from_args(args)
    except ValueError as error:
        raise UserError(str(error)) from None
    serve(config)
    return 0
