"""Prompt editing over the sampling core: which conditioning the guided denoiser uses at each call.

AUTOMATIC1111 1.10 schedules `[from:to:when]` and `[a|b]` over the sampler's "total steps"
(twice the steps for second-order samplers) and picks the conditioning by its denoiser call
counter (`CFGDenoiser.step`, `reconstruct_cond_batch`); a hires pass schedules over its own
steps counting on from the first pass. Positive and negative prompts have their own schedules;
at every boundary of either, the pair is encoded as the model encodes one prompt pair (for SD
1.x / 2.x: A1111's long-prompt encoding, the shorter padded with the empty prompt's chunk).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from sdgen.diffusion.denoisers import cfg_denoiser
from sdgen.diffusion.registry import SamplerSpec
from sdgen.pipelines.request import GenerationRequest
from sdgen.prompting.schedule import prompt_at_step, prompt_schedule

Conditioning = dict[str, torch.Tensor]
Schedule = list[tuple[int, Conditioning, Conditioning | None]]


def total_steps(spec: SamplerSpec, steps: int) -> int:
    """A1111's SamplerData.total_steps: denoiser calls the prompt schedule is laid over."""
    return steps * 2 if spec.options.get("second_order") else steps


def conditioning_schedule(pipe, request: GenerationRequest, width: int, height: int, steps: int,
                          first_pass_steps: int | None = None) -> Schedule:
    """[(until_call, cond, uncond)] for a pass of `steps` total steps (a hires pass: after `first_pass_steps`)."""
    positive = prompt_schedule(request.prompt, first_pass_steps or steps, steps if first_pass_steps else None)
    negative = prompt_schedule(request.negative_prompt, first_pass_steps or steps, steps if first_pass_steps else None)
    boundaries = sorted({until for until, _ in positive} | {until for until, _ in negative})
    encoded: dict[tuple[str, str], tuple[Conditioning, Conditioning | None]] = {}
    schedule: Schedule = []
    for until in boundaries:
        texts = (prompt_at_step(positive, until), prompt_at_step(negative, until))
        if texts not in encoded:
            encoded[texts] = pipe.prompt_conditioning(replace(request, prompt=texts[0], negative_prompt=texts[1]),
                                                      width, height)
        schedule.append((until, *encoded[texts]))
    return schedule


def expand_rows(conditioning: Conditioning, count: int) -> Conditioning:
    """Batch-1 conditioning tensors repeated (as views) for `count` images."""
    return {key: value.expand(count, *value.shape[1:]) for key, value in conditioning.items()}


def scheduled_cfg_denoiser(denoiser, schedule: Schedule, count: int, extra: Conditioning,
                           cfg_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Classifier-free guidance whose conditioning follows `schedule` by call count (one fixed pair if one entry)."""
    guided = [(until, cfg_denoiser(denoiser, {**expand_rows(cond, count), **extra},
                                   None if uncond is None else {**expand_rows(uncond, count), **extra}, cfg_scale))
              for until, cond, uncond in schedule]
    if len(guided) == 1:
        return guided[0][1]
    calls = {"step": 0}

    def scheduled(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        step, calls["step"] = calls["step"], calls["step"] + 1
        return prompt_at_step(guided, step)(x, sigma)

    return scheduled
