"""The results file: ratios to diffusers first, seconds and GFLOP/s alongside, memory, quality and notes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdgen.runtime.files import write_atomically
from timing import Timings

# A full run replaces only the text between these markers: RESULTS.md also holds figures that
# other commands produced (the embedded model's evaluation, the load test, earlier notes).
SECTION_BEGIN = "<!-- bench/run.py writes from here to the end marker; the next full run replaces it -->"
SECTION_END = "<!-- end of bench/run.py's section -->"


def image_quality(image: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean absolute difference in 8-bit pixel steps and PSNR (dB) of images in [-1, 1]."""
    a = ((image.float().clamp(-1, 1) + 1) * 127.5).round()
    b = ((reference.float().clamp(-1, 1) + 1) * 127.5).round()
    mae = (a - b).abs().mean().item()
    mse = (a - b).pow(2).mean().item()
    return mae, (math.inf if mse == 0 else 10 * math.log10(255**2 / mse))


@dataclass
class Report:
    """Everything one run measured, rendered by `markdown`."""

    command: str
    date: str
    machine: str
    smoke: bool
    peaks: dict[str, float] = field(default_factory=dict)  # dtype -> GEMM GFLOP/s
    rows: list[tuple[Timings, str]] = field(default_factory=list)
    qualities: list[tuple[str, float, float]] = field(default_factory=list)
    memories: list[tuple[str, dict | None, str | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    end_line: str = ""
    # group -> the system its ratios divide by; "diffusers <group>" unless set here
    baselines: dict[str, str] = field(default_factory=dict)

    def add(self, timings: Timings, dtype_name: str) -> None:
        self.rows.append((timings, dtype_name))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def quality(self, what: str, mae: float, psnr: float) -> None:
        self.qualities.append((what, mae, psnr))

    def memory(self, system: str, figures: dict | None, error: str | None) -> None:
        self.memories.append((system, figures, error))

    def markdown(self) -> str:
        lines = ["## CPU benchmark: sdgen against diffusers and the peers", "",
                 f"- command: `{self.command}`", f"- date: {self.date}", f"- machine: {self.machine}"]
        if self.end_line:
            lines.append(f"- at the end: {self.end_line.split('load average')[-1].join(['load average', ''])}")
        if self.smoke:
            lines.append("- **smoke run**: tiny models, figures only show that the harness works")
        if self.peaks:
            lines.append("- matmul peak (4096^3 GEMM, best of 5): " + ", ".join(
                f"{name} {value:.0f} GFLOP/s" for name, value in self.peaks.items()))
        lines += ["", "Ratios are sdgen (or peer) time / diffusers time in the same dtype, the median of "
                  "per-round ratios with the systems run in alternation; below 1 is faster than diffusers.", ""]
        lines += [f"In the {group} group, every ratio is to {baseline} instead." for group, baseline in
                  self.baselines.items() if any(name == group for _, name in self.rows)]
        lines += [""] if lines[-1] != "" else []
        lines += ["| workload | dtype | system | ratio | median s | GFLOP/s | % of GEMM peak |",
                  "|---|---|---|---|---|---|---|"]
        for timings, dtype_name in self.rows:
            baseline = self.baselines.get(dtype_name, f"diffusers {dtype_name}")
            for name in timings.seconds:
                ratio = timings.ratio(name, baseline) if baseline in timings.seconds else float("nan")
                median = timings.median(name)
                rate = timings.flops / median / 1e9 if timings.flops else None
                peak = self.peaks.get("bf16" if "bf16" in name else "fp32")
                lines.append(f"| {timings.workload} | {dtype_name} | {name} | {ratio:.3f} | {median:.3f} | "
                             f"{'' if rate is None else f'{rate:.0f}'} | "
                             f"{'' if rate is None or not peak else f'{100 * rate / peak:.0f}%'} |")
        if self.memories:
            lines += ["", "### Memory (each system in its own process: load the folder, one txt2img image)", "",
                      "| system | load s | RSS after load GiB | peak RSS GiB |", "|---|---|---|---|"]
            for system, figures, error in self.memories:
                if figures is None:
                    lines.append(f"| {system} | failed: {error} | | |")
                else:
                    lines.append(f"| {system} | {figures['load_s']:.1f} | {figures['rss_loaded_gib']:.2f} | "
                                 f"{figures['peak_gib']:.2f} |")
        if self.qualities:
            lines += ["", "### Image differences", "", "| images | mean abs diff (8-bit steps) | PSNR dB |",
                      "|---|---|---|"]
            lines += [f"| {what} | {mae:.2f} | {psnr:.1f} |" for what, mae, psnr in self.qualities]
        if self.unavailable:
            lines += ["", "### Peers that did not run", ""]
            lines += [f"- {name}: {why}" for name, why in self.unavailable.items()]
        if self.notes:
            lines += ["", "### Notes", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Put one run's section into the results file, keeping every other section as it was."""
    block = f"{SECTION_BEGIN}\n{section.rstrip()}\n{SECTION_END}\n"
    old = path.read_text() if path.exists() else "# sdgen benchmark results\n"
    if SECTION_BEGIN in old and SECTION_END in old:
        head, rest = old.split(SECTION_BEGIN, 1)
        tail = rest.split(SECTION_END, 1)[1].strip("\n")
        new = head + block + (f"\n{tail}\n" if tail else "")
    else:  # first run into this file: right under its title
        title, _, body = old.partition("\n")
        new = f"{title}\n\n{block}\n{body.lstrip()}"
    write_atomically(path, lambda stream: stream.write(new.encode()))
