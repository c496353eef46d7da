"""Token merging (ToMe): the merge plan, merge and unmerge on small token grids, and its place in
the U-Net's fast path (off by default, the highest-resolution attention level only)."""

from __future__ import annotations

import pytest
import torch

from sdgen.runtime.token_merging import check_ratio, plan_merge


def grid_tokens(batch: int, height: int, width: int, channels: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, height * width, channels, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("height, width", [(8, 8), (6, 10), (5, 7)])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_merge_shortens_by_the_ratio_and_unmerge_restores_every_position(height, width, ratio):
    x = grid_tokens(2, height, width, 16)
    plan = plan_merge(x, height, width, ratio)
    count = min(int(height * width * ratio), height * width - len(plan.destinations))
    merged = plan.merge(x)
    assert merged.shape == (2, height * width - count, 16)
    back = plan.unmerge(merged)
    assert back.shape == x.shape
    for b in range(2):
        kept = plan.sources[plan.kept[b]]
        assert torch.equal(back[b, kept], x[b, kept])  # untouched tokens pass through
        gone = plan.sources[plan.merged[b]]
        partners = plan.destinations[plan.partner[b]]
        assert torch.equal(back[b, gone], back[b, partners])  # merged tokens share their partner's value
        for destination in plan.destinations.tolist():
            group = [destination] + gone[partners == destination].tolist()
            torch.testing.assert_close(back[b, destination], x[b, group].mean(0))  # a mean of its group


def test_identical_neighbours_merge_without_loss():
    """Tokens equal to a destination are the most similar: merging them changes nothing."""
    cells = torch.randn(1, 4 * 4, 8, generator=torch.Generator().manual_seed(1)).view(1, 4, 4, 8)
    x = cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(1, 64, 8)  # 2x2 blocks alike
    plan = plan_merge(x, 8, 8, 0.5)
    torch.testing.assert_close(plan.unmerge(plan.merge(x)), x)


def test_the_most_similar_sources_are_merged_first():
    x = grid_tokens(1, 4, 4, 8, seed=2)
    x[0, 1] = x[0, 0] * 3  # same direction as the destination at 0: similarity 1
    plan = plan_merge(x, 4, 4, 1 / 16)  # one token
    assert plan.sources[plan.merged[0]].tolist() == [1]
    assert plan.destinations[plan.partner[0]].tolist() == [0]


def test_nothing_to_merge_gives_no_plan():
    x = grid_tokens(1, 4, 4, 8)
    assert plan_merge(x, 4, 4, 0.0) is None
    assert plan_merge(x, 4, 4, 0.01) is None  # less than one token
    assert plan_merge(x, 2, 8, 0.5) is not None and plan_merge(x, 1, 16, 0.5) is None


@pytest.mark.parametrize("bad", [-0.1, 0.8, "0.5", True, float("nan")])
def test_ratio_is_checked(bad):
    with pytest.raises(ValueError, match="token merging ratio"):
        check_ratio(bad)


def test_bf16_tokens_merge_too():
    x = grid_tokens(2, 8, 8, 16).bfloat16()
    plan = plan_merge(x, 8, 8, 0.5)
    assert plan.unmerge(plan.merge(x)).dtype == torch.bfloat16


@torch.no_grad()
def test_unet_merges_only_at_its_top_attention_level_and_restores():
    from reference_models import make_reference_unet, unet_example_inputs
    from sdgen.models import layers
    from sdgen.models.unet import UNet, UNetConfig
    from sdgen.runtime.fast import FastOptions, accelerate, restore

    reference = make_reference_unet("sd1", seed=3)
    with torch.device("meta"):
        ours = UNet(UNetConfig.from_diffusers(dict(reference.config)))
    ours.load_state_dict(reference.state_dict(), assign=True)
    inputs = unet_example_inputs("sd1", size=16)
    run = lambda: ours(inputs["x"], inputs["timesteps"], inputs["context"])  # noqa: E731
    exact = run()
    plans = []
    original = layers.plan_merge
    layers.plan_merge = lambda h, height, width, ratio: plans.append((height, width)) or original(h, height, width, ratio)
    try:
        accelerate(ours, FastOptions(fp32_attention=False, prepack=False, blocked_attention=False, token_merging=0.5))
        merged = run()
        top = {(h, w) for h, w in plans}
        assert top == {(16, 16)}  # the 16x16 level only, never the deeper ones
        assert not torch.equal(merged, exact)
        errors = []
        for ratio in (0.05, 0.25, 0.75):  # random weights: tokens are unlike each other, the worst case
            accelerate(ours, FastOptions(fp32_attention=False, prepack=False, blocked_attention=False,
                                         token_merging=ratio))
            errors.append(((run() - exact).pow(2).mean() / exact.pow(2).mean()).sqrt().item())
        assert errors == sorted(errors) and errors[0] < 0.3 and errors[-1] < 1  # the more merged, the further
        restore(ours)
        plans.clear()
        assert torch.equal(run(), exact) and plans == []
    finally:
        layers.plan_merge = original


def test_fast_options_check_the_ratio():
    from reference_models import make_reference_unet
    from sdgen.models.unet import UNet, UNetConfig
    from sdgen.runtime.fast import FastOptions, accelerate

    reference = make_reference_unet("sd1", seed=3)
    ours = UNet(UNetConfig.from_diffusers(dict(reference.config)))
    with pytest.raises(ValueError, match="token merging ratio"):
        accelerate(ours, FastOptions(token_merging=0.9))
