"""The CPU benchmark: sdgen against diffusers (same weights, sampler and dtype) and the other peers.

    .venv/bin/python bench/run.py                 # full run, SD 1.5 shapes, writes bench/RESULTS.md
    .venv/bin/python bench/run.py --sdxl          # also SDXL's U-Net step at 1024x1024 and its memory
    .venv/bin/python bench/run.py --smoke         # tiny models, a few iterations (CI: tests/test_bench_smoke.py)
    .venv/bin/python bench/run.py --peers sdcpp   # stable-diffusion.cpp only as a peer (built on first use)

Random weights with the published full-size shapes are written once as a diffusers folder of
fp16 safetensors (no downloads); both systems load that folder. Timings in one process
alternate between the systems and are reported as ratios to diffusers; peak memory is measured
per system in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SPECS, load_reference, random_init_, sdgen_from_reference, sdgen_unet, write_folder  # noqa: E402
from report import Report, image_quality, write_section  # noqa: E402
from timing import count_flops, gemm_peak, interleaved, machine_line  # noqa: E402

import peers  # noqa: E402
from sdgen.models.tiny_decoder import TinyDecoder  # noqa: E402
from sdgen.runtime import kernels  # noqa: E402
from sdgen.runtime.allocator import keep_freed_memory  # noqa: E402
from sdgen.runtime.fast import FastOptions, accelerate, accelerate_pipeline  # noqa: E402
from sdgen.runtime.int8 import int8_supported  # noqa: E402

PROMPT, NEGATIVE, CFG = "a tranquil lake with the mountains at sunset", "", 7.5
STEP_CACHE = 3  # DeepCache interval of the "step cache" variant: the whole U-Net every third step
TOKEN_MERGING = 0.5  # ToMe ratio of the "token merging" variant (ToMe for SD's usual setting)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_START = time.perf_counter()


def log(text: str) -> None:
    """Progress on stderr, with the time since the start (a full run takes a while)."""
    print(f"[bench {time.perf_counter() - _START:7.1f} s] {text}", file=sys.stderr, flush=True)


def quiet() -> None:
    """Silence the reference's progress bars and advice, which would drown the report."""
    import diffusers
    import transformers

    warnings.filterwarnings("ignore")
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


def unet_inputs(spec, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Batch 2 (a prompt with guidance): latents, timesteps, text context."""
    generator = torch.Generator().manual_seed(0)
    side = size // spec.vae.downsample_factor
    x = torch.randn(2, spec.unet.in_channels, side, side, generator=generator)
    context = torch.randn(2, 77, spec.unet.cross_attention_dim, generator=generator)
    return x.to(dtype), torch.tensor([500.0, 500.0]), context.to(dtype)


# Previews through a tiny decoder of TAESD's shape (random weights: its time, not its pictures).
TINY_DECODER = "sdgen tiny decoder, previews only,"

# The bf16 fast path with PyTorch's operations in place of sdgen's compiled kernels, timed in the
# same rounds to show what the kernels give (only where they are built).
WITHOUT_KERNELS = "sdgen bf16 fast, no compiled kernels"


def without_kernels(call):
    def run():
        with kernels.suspended():
            return call()
    return run


def with_unet_options(pipe, options: FastOptions, call):
    """`call` with the pipeline's U-Net switched to `options`, then back to the default fast paths
    (one pipeline serves every variant: a second prepacked copy would double the memory)."""
    def run():
        accelerate(pipe.unet, options)
        try:
            return call()
        finally:
            accelerate(pipe.unet)
    return run


def bench_dtype(args, spec, folder: Path, dtype_name: str, report: Report, fp32_images: dict) -> None:
    """Every in-process comparison for one dtype: U-Net step, text encoding, VAE decode, txt2img."""
    dtype = DTYPES[dtype_name]
    start = time.perf_counter()
    ref = load_reference(folder, dtype)
    report.note(f"diffusers {dtype_name} load (in the comparison process): {time.perf_counter() - start:.1f} s")
    ours = sdgen_from_reference(ref, dtype)
    fast = accelerate_pipeline(sdgen_from_reference(ref, dtype))
    # beyond the peers, off by default: DeepCache step caching, reported with its image difference
    cached = (accelerate_pipeline(sdgen_from_reference(ref, dtype), FastOptions(step_cache=STEP_CACHE))
              if dtype_name == "bf16" else None)
    rounds = args.rounds

    with torch.inference_mode():
        for size in args.unet_sizes:
            x, t, context = unet_inputs(spec, size, dtype)
            systems = {f"diffusers {dtype_name}": lambda: ref.unet(x, t, context).sample,
                       f"sdgen {dtype_name}": lambda: ours.unet(x, t, context)}
            if fast:
                systems[f"sdgen {dtype_name} fast"] = lambda: fast.unet(x, t, context)
            if dtype_name == "bf16" and kernels.attention_kernel() is not None:
                systems[WITHOUT_KERNELS] = without_kernels(lambda: fast.unet(x, t, context))
            if dtype_name == "bf16" and int8_supported():  # beyond the peers: changes the images
                systems["sdgen bf16 fast int8"] = with_unet_options(fast, FastOptions(int8=True),
                                                                    lambda: fast.unet(x, t, context))
            if args.peers and "openvino" in args.peers:
                for precision in (["bf16"] if dtype_name == "bf16" else ["f32"]):
                    converted = peers.openvino_unet(ref.unet, (x, t, context), precision)
                    if converted:
                        systems[f"openvino {precision}"] = converted.call
                        report.note(f"openvino {precision} U-Net at {size}: convert {converted.convert_s:.1f} s, "
                                    f"compile {converted.compile_s:.1f} s (one-off)")
            log(f"{dtype_name} U-Net step {size}: {', '.join(systems)}")
            timings = interleaved(f"U-Net step {size}x{size}, batch 2", systems, rounds, warmup=1)
            timings.flops = count_flops(lambda: ours.unet(x, t, context))
            report.add(timings, dtype_name)
            del systems

        log(f"{dtype_name} text encoding and VAE decode")
        tokens = {"diffusers": lambda: ref.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE),
                  "sdgen": lambda: (ours.encode_prompt(PROMPT), ours.encode_prompt(NEGATIVE))}
        timings = interleaved("text encoding (prompt + negative)", {f"{k} {dtype_name}": v for k, v in tokens.items()},
                              rounds, warmup=1)
        timings.flops = count_flops(tokens["sdgen"])
        report.add(timings, dtype_name)

        side = args.vae_size // spec.vae.downsample_factor
        latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))
        decoders = {f"diffusers {dtype_name}": lambda: ref.vae.decode(latents.to(dtype)).sample,
                    f"sdgen {dtype_name}": lambda: ours.vae.decode(latents.to(dtype))}
        if fast:
            decoders[f"sdgen {dtype_name} fast"] = lambda: fast.vae.decode(latents.to(dtype))
        if dtype_name == "bf16" and kernels.attention_kernel() is not None:
            decoders[WITHOUT_KERNELS] = without_kernels(lambda: fast.vae.decode(latents.to(dtype)))
        if fast:  # beyond the peers: a tiny (TAESD-shaped) decoder, for previews only
            tiny = accelerate(random_init_(TinyDecoder(), seed=5).to(dtype).eval())
            decoders[f"{TINY_DECODER} {dtype_name}"] = lambda: tiny(latents.to(dtype))
        timings = interleaved(f"VAE decode {args.vae_size}x{args.vae_size}", decoders, rounds, warmup=1)
        timings.flops = count_flops(decoders[f"sdgen {dtype_name}"])
        report.add(timings, dtype_name)
        if dtype_name == "fp32":
            fp32_images["decode"] = ours.vae.decode(latents).float()
        elif "decode" in fp32_images:
            for name, system in (("sdgen bf16", ours), ("sdgen bf16 fast", fast), ("diffusers bf16", None)):
                image = (system.vae.decode(latents.to(dtype)) if system else ref.vae.decode(latents.to(dtype)).sample)
                report.quality(f"VAE decode {args.vae_size}: {name} vs sdgen fp32",
                               *image_quality(image.float(), fp32_images["decode"]))

    for size in ([] if "txt2img" in args.skip else args.txt2img_sizes):
        def run_reference():
            return ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=CFG,
                       height=size, width=size, generator=torch.Generator().manual_seed(0)).images[0]

        def run_sdgen(pipe):
            return lambda: pipe.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=args.steps, sampler="Euler",
                                         cfg_scale=CFG, width=size, height=size, seed=0).images[0]

        systems = {f"diffusers {dtype_name}": run_reference, f"sdgen {dtype_name}": run_sdgen(ours)}
        if fast:
            systems[f"sdgen {dtype_name} fast"] = run_sdgen(fast)
        if cached:
            systems[f"sdgen {dtype_name} fast + step cache {STEP_CACHE}"] = run_sdgen(cached)
        log(f"{dtype_name} txt2img {size}")
        timings = interleaved(f"txt2img {size}x{size}, {args.steps} Euler steps, CFG (text + U-Net + decode)",
                              systems, max(1, rounds - 1), warmup=0)
        report.add(timings, dtype_name)
        images = {name: _pixels(image) for name, image in timings.outputs.items()}
        key = f"txt2img {size}"
        if dtype_name == "fp32":
            fp32_images[key] = images["sdgen fp32"]
            report.quality(f"{key}: sdgen fp32 vs diffusers fp32", *image_quality(images["sdgen fp32"],
                                                                                  images["diffusers fp32"]))
            if "sdgen fp32 fast" in images:
                report.quality(f"{key}: sdgen fp32 fast vs sdgen fp32", *image_quality(images["sdgen fp32 fast"],
                                                                                      images["sdgen fp32"]))
        elif key in fp32_images:
            for name, image in images.items():
                report.quality(f"{key}: {name} vs sdgen fp32", *image_quality(image, fp32_images[key]))
    del ref, ours, fast, cached


def bench_fastest(args, spec, folder: Path, report: Report) -> None:
    """Each system's fastest CPU path, interleaved, as ratios to diffusers bf16 (the issue's yardstick).

    sdgen's fastest path is `--fast` in whichever dtype this CPU multiplies faster: bf16 where it
    has fast bf16 dot products (measured here: 4x fp32 on one AVX-512 BF16 machine), fp32 where
    bf16 is emulated or slow (0.6x fp32 on another). The GEMM peaks decide, and the group measures
    that path against the peers' bf16 paths in the same rounds.
    """
    group = "fastest"
    report.baselines[group] = "diffusers bf16"
    peaks = report.peaks or {"fp32": gemm_peak(torch.float32, 2048), "bf16": gemm_peak(torch.bfloat16, 2048)}
    ours_name = "bf16" if peaks["bf16"] > peaks["fp32"] else "fp32"
    ours_dtype, system = DTYPES[ours_name], f"sdgen {ours_name} fast"
    report.note(f"fastest group: sdgen in {ours_name} (GEMM peaks fp32 {peaks['fp32']:.0f}, "
                f"bf16 {peaks['bf16']:.0f} GFLOP/s)")
    ref = load_reference(folder, torch.bfloat16)
    # one pipeline (prepacked weights cost a copy): the step cache is switched on per call
    fast = accelerate_pipeline(sdgen_from_reference(ref if ours_name == "bf16" else
                                                    load_reference(folder, torch.float32), ours_dtype))
    with torch.inference_mode():
        for size in args.unet_sizes:
            x, t, context = unet_inputs(spec, size, torch.bfloat16)
            ours_x, ours_context = x.to(ours_dtype), context.to(ours_dtype)
            systems = {"diffusers bf16": lambda: ref.unet(x, t, context).sample,
                       system: lambda: fast.unet(ours_x, t, ours_context)}
            if int8_supported():
                systems[f"{system} + int8"] = with_unet_options(fast, FastOptions(int8=True),
                                                                lambda: fast.unet(ours_x, t, ours_context))
            if args.peers and "openvino" in args.peers:
                converted = peers.openvino_unet(ref.unet, (x, t, context), "bf16")
                if converted:
                    systems["openvino bf16"] = converted.call
            log(f"fastest U-Net step {size}: {', '.join(systems)}")
            timings = interleaved(f"U-Net step {size}x{size}, batch 2", systems, args.rounds, warmup=1)
            # the reference's own graph: FLOP counting does not see the prepacked oneDNN calls
            timings.flops = count_flops(lambda: ref.unet(x, t, context))
            report.add(timings, group)
            del systems

        side = args.vae_size // spec.vae.downsample_factor
        latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))
        decoders = {"diffusers bf16": lambda: ref.vae.decode(latents.to(torch.bfloat16)).sample,
                    system: lambda: fast.vae.decode(latents.to(ours_dtype))}
        log("fastest VAE decode")
        timings = interleaved(f"VAE decode {args.vae_size}x{args.vae_size}", decoders, args.rounds, warmup=1)
        timings.flops = count_flops(decoders["diffusers bf16"])
        report.add(timings, group)

    for size in ([] if "txt2img" in args.skip else args.txt2img_sizes[-1:]):
        def run_sdgen(**options):
            return with_unet_options(fast, FastOptions(**options), lambda: fast.generate(
                prompt=PROMPT, negative_prompt=NEGATIVE, steps=args.steps, sampler="Euler", cfg_scale=CFG,
                width=size, height=size, seed=0).images[0])

        cached, merged = f"{system} + step cache {STEP_CACHE}", f"{system} + token merging {TOKEN_MERGING}"
        both = f"{system} + step cache {STEP_CACHE} + token merging {TOKEN_MERGING}"
        systems = {"diffusers bf16": lambda: ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps,
                                                 guidance_scale=CFG, height=size, width=size,
                                                 generator=torch.Generator().manual_seed(0)).images[0],
                   system: run_sdgen(), cached: run_sdgen(step_cache=STEP_CACHE),
                   merged: run_sdgen(token_merging=TOKEN_MERGING),
                   both: run_sdgen(step_cache=STEP_CACHE, token_merging=TOKEN_MERGING)}
        variants = [cached, merged, both]
        if int8_supported():
            quantized, quantized_cached = f"{system} + int8", f"{system} + int8 + step cache {STEP_CACHE}"
            systems[quantized] = run_sdgen(int8=True)
            systems[quantized_cached] = run_sdgen(int8=True, step_cache=STEP_CACHE)
            variants += [quantized, quantized_cached]
        log(f"fastest txt2img {size}")
        timings = interleaved(f"txt2img {size}x{size}, {args.steps} Euler steps, CFG (text + U-Net + decode)",
                              systems, max(1, args.rounds - 1), warmup=0)
        report.add(timings, group)
        images = {name: _pixels(image) for name, image in timings.outputs.items()}
        for name in (*variants, "diffusers bf16"):
            report.quality(f"txt2img {size}: {name} vs {system}", *image_quality(images[name], images[system]))
    del ref, fast


def _pixels(image) -> torch.Tensor:
    """A PIL image as a float tensor in [-1, 1]."""
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)


def measure_memory(args, folder: Path, report: Report) -> None:
    """Each system in a fresh process: load the folder, one txt2img image; load time and peak RSS."""
    systems = [("diffusers", "bf16", False), ("sdgen", "bf16", False)]
    if not args.smoke:
        systems += [("sdgen", "bf16", True), ("diffusers", "fp32", False), ("sdgen", "fp32", False),
                    ("sdgen", "fp32", True)]
    for system, dtype_name, fast in systems:
        command = [sys.executable, __file__, "--child-memory", system, "--dtype", dtype_name, "--folder", str(folder),
                   "--size", str(args.memory_size), "--steps", "2", "--threads", str(args.threads)]
        command += ["--fast"] if fast else []
        log(f"memory: {' '.join(command[3:6])}{' --fast' if fast else ''}")
        result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        label = f"{system} {dtype_name}{' fast' if fast else ''}"
        if result.returncode != 0:
            report.memory(label, None, child_failure(result))
            continue
        report.memory(label, json.loads(result.stdout.strip().splitlines()[-1]), None)


def peak_rss_kib() -> int:
    """This process's peak resident memory (VmHWM). Not `ru_maxrss`: Linux carries the forking
    parent's peak into it across exec, so a child of a 16 GiB benchmark process reported 16 GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_failure(result: subprocess.CompletedProcess) -> str:
    """Why a memory child failed, in one line: its last error line, or the signal that killed it."""
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    lines = result.stderr.strip().splitlines()
    return lines[-1][:200] if lines else f"exit status {result.returncode}"


def child_memory(args) -> None:
    """Runs in its own process: prints load time, RSS after loading and peak RSS as JSON."""
    quiet()
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    if args.child_memory == "decode":  # the VAE alone: a latent of the given image size, decoded (tiled)
        import sdgen

        pipe = sdgen.load(args.folder, dtype=args.dtype, device="cpu")
        if args.fast:
            accelerate_pipeline(pipe)
        loaded = time.perf_counter() - start
        rss_loaded = peak_rss_kib()
        side = args.size // pipe.latent_factor
        pipe.decode(torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)))
    elif args.child_memory == "diffusers":
        pipe = load_reference(Path(args.folder), dtype)
        loaded = time.perf_counter() - start
        rss_loaded = peak_rss_kib()
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=CFG,
             height=args.size, width=args.size, generator=torch.Generator().manual_seed(0))
    else:
        import sdgen

        pipe = sdgen.load(args.folder, dtype=args.dtype, device="cpu")
        if args.fast:
            accelerate_pipeline(pipe)
        loaded = time.perf_counter() - start
        rss_loaded = peak_rss_kib()
        pipe.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=args.steps, sampler="Euler", cfg_scale=CFG,
                      width=args.size, height=args.size, seed=0)
    peak = peak_rss_kib()
    print(json.dumps({"load_s": loaded, "rss_loaded_gib": rss_loaded / 2**20, "peak_gib": peak / 2**20}))


def sdxl_and_tiled_memory(args, report: Report) -> None:
    """SDXL at 1024x1024 (bf16, sdgen fast and diffusers) and a tiled 2048x2048 decode (sdgen), each in its own process."""
    xl_spec, spec = SPECS[args.sdxl_spec], SPECS[args.spec]
    sdxl = write_folder(xl_spec, args.workdir / xl_spec.key())
    sd15 = write_folder(spec, args.workdir / spec.key())
    xl, big = xl_spec.image_size, 1088 if args.smoke else 2048  # 1088: just above the tiling threshold
    runs = [("sdgen", sdxl, xl, False, f"SDXL {xl}x{xl}"), ("sdgen", sdxl, xl, True, f"SDXL {xl}x{xl}"),
            ("diffusers", sdxl, xl, False, f"SDXL {xl}x{xl}"),
            ("decode", sd15, big, False, f"{spec.name} VAE decode {big}x{big} (tiled)")]
    for system, folder, size, fast, what in runs:
        command = [sys.executable, __file__, "--child-memory", system, "--dtype", "bf16", "--folder", str(folder),
                   "--size", str(size), "--steps", "2", "--threads", str(args.threads)] + (["--fast"] if fast else [])
        log(f"memory: {what} {system}")
        result = subprocess.run(command, capture_output=True, text=True, timeout=7200)
        label = f"{what}: {system if system != 'decode' else 'sdgen'} bf16{' fast' if fast else ''}"
        if result.returncode != 0:
            report.memory(label, None, child_failure(result))
        else:
            report.memory(label, json.loads(result.stdout.strip().splitlines()[-1]), None)


def bench_sdxl(args, report: Report) -> None:
    """SDXL's U-Net step at 1024x1024 (batch 2) in bf16, diffusers against sdgen and sdgen fast."""
    spec = SPECS[args.sdxl_spec]
    folder = write_folder(spec, args.workdir / spec.key())
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch.bfloat16, local_files_only=True).eval()
    ours, fast = sdgen_unet(ref), accelerate(sdgen_unet(ref))
    x, t, context = unet_inputs(spec, spec.image_size, torch.bfloat16)
    side = float(spec.image_size)
    added = {"text_embeds": torch.randn(2, spec.text_2.projection_dim).bfloat16(),
             "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2)}
    with torch.inference_mode():
        timings = interleaved(f"SDXL U-Net step {spec.image_size}x{spec.image_size}, batch 2", {
            "diffusers bf16": lambda: ref(x, t, context, added_cond_kwargs=added).sample,
            "sdgen bf16": lambda: ours(x, t, context, added),
            "sdgen bf16 fast": lambda: fast(x, t, context, added)}, max(1, args.rounds - 1), warmup=1)
        timings.flops = count_flops(lambda: ours(x, t, context, added))
    report.add(timings, "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models and few iterations (CI)")
    parser.add_argument("--sdxl", action="store_true", help="also SDXL's U-Net step at 1024x1024")
    parser.add_argument("--out", type=Path, help="results file (default: bench/RESULTS.md, or stdout with --smoke)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sdgen-bench",
                        help="where the random-weight model folders are written and kept")
    parser.add_argument("--rounds", type=int, help="timed rounds per comparison")
    parser.add_argument("--peers", help="comma-separated extra peers: openvino, sdcpp, or none (default: openvino, "
                        "and sdcpp once `bash bench/setup.sh` has built it; none with --smoke)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: fp32,bf16,fastest,txt2img,memory,peak,"
                        "sdxl-step (with --sdxl: its memory only)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores; 1 with --smoke, where "
                        "tiny ops would mostly wait on each other)")
    # internal: one system's memory measurement in its own process
    parser.add_argument("--child-memory", choices=["sdgen", "diffusers", "decode"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    default_peers = "openvino,sdcpp" if peers.sdcpp_built() else "openvino"
    args.peers = args.peers if args.peers is not None else ("none" if args.smoke else default_peers)
    args.peers = [] if args.peers in ("", "none") else args.peers.split(",")
    args.threads = args.threads or (1 if args.smoke else os.cpu_count())
    args.skip = set(filter(None, args.skip.split(",")))
    if args.smoke:
        args.spec, args.unet_sizes, args.vae_size, args.txt2img_sizes, args.memory_size = "tiny", [64], 64, [64], 64
        args.sdxl_spec = "tiny-xl"
        args.steps, args.rounds = args.steps or 2, args.rounds or 2
    else:
        args.spec, args.unet_sizes, args.vae_size, args.txt2img_sizes, args.memory_size = "sd15", [256, 512], 512, [256, 512], 512
        args.sdxl_spec = "sdxl"
        args.steps, args.rounds = args.steps or 20, args.rounds or 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args)
        return 0
    quiet()
    command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = Report(command.strip(), datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine_line(),
                    args.smoke)
    log(machine_line())
    if keep_freed_memory():  # as sdgen does when it loads a model on the CPU
        report.note("glibc keeps freed memory for the next call (sdgen's CPU setting, sdgen.runtime.allocator); "
                    "it is process-wide, so diffusers and OpenVINO in this process run with it too")
    if "peak" not in args.skip:
        size = 1024 if args.smoke else 4096
        report.peaks = {"fp32": gemm_peak(torch.float32, size), "bf16": gemm_peak(torch.bfloat16, size)}
    spec = SPECS[args.spec]
    log("GEMM peaks done; writing or reusing the random-weight folder")
    start = time.perf_counter()
    folder = write_folder(spec, args.workdir / spec.key())
    report.note(f"random-weight {spec.name} folder ready in {time.perf_counter() - start:.1f} s: {folder}")
    fp32_images: dict = {}
    for dtype_name in ("fp32", "bf16"):
        if dtype_name not in args.skip:
            bench_dtype(args, spec, folder, dtype_name, report, fp32_images)
    if "fastest" not in args.skip:
        bench_fastest(args, spec, folder, report)
    if "sdcpp" in args.peers:  # stable-diffusion.cpp's CLI, each run in its own process (bench/sdcpp.py)
        peers.bench_sdcpp(folder, args.workdir, report, smoke=args.smoke, size=max(args.unet_sizes),
                          steps=args.steps, threads=args.threads, log=log)
    if "memory" not in args.skip:
        measure_memory(args, folder, report)
    if args.sdxl:
        if "sdxl-step" not in args.skip:
            bench_sdxl(args, report)
        if "memory" not in args.skip:
            sdxl_and_tiled_memory(args, report)
    report.unavailable.update(peers.unavailable)
    if not args.smoke and "sdcpp" not in args.peers:
        report.unavailable.setdefault(peers.SDCPP, peers.sdcpp_status())
    report.end_line = machine_line()
    text = report.markdown()
    out = args.out or (None if args.smoke else Path(__file__).resolve().parent / "RESULTS.md")
    if out is None:
        print(text)
    else:
        write_section(out, text)
        print(text)
        print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
