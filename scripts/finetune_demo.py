"""Before/after proof that fine-tuning teaches the embedded model a new concept (an arrow called
"zorp"): how often a detector finds it in generated images, before and after each method.

    python scripts/finetune_demo.py --out runs/finetune-demo            # LoRA, the embedded model
    python scripts/finetune_demo.py --out runs/finetune-demo --method all --threads 2
"""

from __future__ import annotations

import argparse
import sys

import torch

from sdgen.train.finetune.concept_demo import concept_demo

METHODS = ("lora", "textual-inversion", "dreambooth")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder (each method resumes where it stopped)")
    parser.add_argument("--model", default=None, help="base model (default: the embedded model)")
    parser.add_argument("--method", choices=METHODS + ("all",), default="lora")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--images", type=int, default=8, help="training images of the concept")
    parser.add_argument("--prompts", type=int, default=48, help="images generated for each rate")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate of every method run (default: sdgen finetune's, per method)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: sdgen finetune's)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha")
    parser.add_argument("--conv-rank", type=int, default=None, help="LoRA on the ResNet convolutions too")
    parser.add_argument("--text-encoder", action="store_true", help="LoRA / DreamBooth: train the text encoder too")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    given = {"lr": args.lr, "rank": args.rank, "alpha": args.alpha, "conv_rank": args.conv_rank,
             "train_text_encoder": args.text_encoder or None}
    options = {name: value for name, value in given.items() if value is not None}
    if args.threads:
        torch.set_num_threads(args.threads)
    for method in METHODS if args.method == "all" else (args.method,):
        report = concept_demo(args.out, args.model, method, steps=args.steps, images=args.images,
                              prompts=args.prompts, sample_steps=args.sample_steps, **options)
        print("\n".join(report.lines()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
