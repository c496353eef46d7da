"""`sdgen finetune` flags (kohya-ss names where they exist) and the command behind them."""

from __future__ import annotations

import argparse

METHODS = ("lora", "textual-inversion", "dreambooth")  # here, so building the parser imports no torch


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("data", help="folder of images with captions (NAME.txt beside each image, or metadata.jsonl)")
    parser.add_argument("--out", required=True, help="run folder: checkpoints, loss curve, samples and the result")
    parser.add_argument("--model", default=None, help="base model (default: the embedded model)")
    parser.add_argument("--name", default="finetuned", help="output name; for textual inversion the prompt word")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-4 LoRA, 5e-3 TI, 5e-6 DreamBooth)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1, help="gradient accumulation: micro-batches per step")
    parser.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep an EMA of the weights (e.g. 0.999)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (default: bf16 autocast)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None, help="bucket area side (default: the model's size)")
    parser.add_argument("--no-buckets", action="store_true", help="centre-crop every image square")
    captions = parser.add_argument_group("captions")
    captions.add_argument("--caption", default=None, help="caption of images that have none (instance prompt)")
    captions.add_argument("--caption-column", default="text", help="metadata.jsonl caption field")
    captions.add_argument("--shuffle-captions", action="store_true", help="shuffle comma-separated tags")
    captions.add_argument("--keep-tokens", type=int, default=0, help="tags kept in front when shuffling")
    captions.add_argument("--caption-dropout", type=float, default=0.0, help="probability of an empty caption")
    captions.add_argument("--tag-dropout", type=float, default=0.0, help="probability of dropping each tag")
    method = parser.add_argument_group("method")
    method.add_argument("--rank", type=int, default=4, help="LoRA rank (network_dim)")
    method.add_argument("--alpha", type=float, default=1.0, help="LoRA alpha (network_alpha)")
    method.add_argument("--conv-rank", type=int, default=None,
                        help="LoRA on the ResNet blocks' 3x3 convolutions too, with this rank (kohya's conv_dim)")
    method.add_argument("--conv-alpha", type=float, default=None, help="alpha of those (default: --alpha)")
    method.add_argument("--text-encoder", action="store_true", help="LoRA / DreamBooth: train the text encoder too")
    method.add_argument("--vectors", type=int, default=1, help="textual inversion: vectors per token")
    method.add_argument("--init-text", default="*", help="textual inversion: initialization text")
    method.add_argument("--embedding-format", choices=["safetensors", "pt"], default="safetensors")
    method.add_argument("--class-prompt", default=None, help="DreamBooth: prompt of the prior-preservation images")
    method.add_argument("--class-data", default=None, help="DreamBooth: folder of class images (drawn if missing)")
    method.add_argument("--class-images", type=int, default=50, help="DreamBooth: number of class images")
    method.add_argument("--prior-weight", type=float, default=1.0, help="DreamBooth: prior-preservation loss weight")
    method.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR loss weighting (e.g. 5)")
    samples = parser.add_argument_group("checkpoints and samples")
    samples.add_argument("--save-every", type=int, default=100, help="checkpoint and draw samples every N steps")
    samples.add_argument("--sample-prompt", action="append", default=[], help="sample prompt (repeatable)")
    samples.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def run_finetune_command(args: argparse.Namespace) -> int:
    import torch

    from sdgen.train.finetune.data import CaptionOptions
    from sdgen.train.finetune.training import FinetuneConfig, run_finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        captions = CaptionOptions(shuffle=args.shuffle_captions, keep_tokens=args.keep_tokens,
                                  tag_dropout=args.tag_dropout, dropout=args.caption_dropout)
        config = FinetuneConfig(
            method=args.method, data=args.data, out=args.out, model=args.model, name=args.name, steps=args.steps,
            lr=args.lr, batch_size=args.batch_size, accumulate=args.accumulate, ema_decay=args.ema,
            bf16=not args.no_bf16, seed=args.seed, resolution=args.resolution, buckets=not args.no_buckets,
            caption=args.caption, caption_column=args.caption_column, captions=captions, rank=args.rank,
            alpha=args.alpha, conv_rank=args.conv_rank, conv_alpha=args.conv_alpha,
            train_text_encoder=args.text_encoder, num_vectors=args.vectors,
            init_text=args.init_text, class_data=args.class_data, class_prompt=args.class_prompt,
            num_class_images=args.class_images, prior_weight=args.prior_weight, snr_gamma=args.snr_gamma,
            save_every=args.save_every, sample_prompts=tuple(args.sample_prompt), sample_steps=args.sample_steps,
            device=args.device, embedding_format=args.embedding_format)
        config.validate()
    except ValueError as error:
        from sdgen.errors import UserError

        raise UserError(str(error)) from None
    for path in run_finetune(config).outputs:
        print(path)
    return 0
