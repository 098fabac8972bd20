"""Each gradient transform on plain tensors, against its closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_optloss.distributed.strategies import ShardLayout
from lightning_optloss.gradients import clipping, multipliers, statistics
from lightning_optloss.gradients.noise import (
    GradientNoise,
    noise_seed,
    truncated_normal,
)
from lightning_optloss.gradients.norms import global_norm, parameter_norms


def _grads(seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 2, 2), (1,)]
    return [torch.randn(shape, generator=generator) * scale for shape in shapes]


def test_parameter_norms_are_each_gradients_l2_norm():
    grads = _grads()
    norms = parameter_norms(grads)
    expected = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    torch.testing.assert_close(norms, expected)
    assert norms.dtype == torch.float32


def test_parameter_norms_of_half_precision_gradients_are_float32():
    grads = [g.to(torch.bfloat16) for g in _grads()]
    norms = parameter_norms(grads)
    assert norms.dtype == torch.float32
    expected = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
    torch.testing.assert_close(norms, expected)


def test_parameter_norms_keep_float64_and_mixed_dtypes_in_order():
    grads = _grads()
    grads[1] = grads[1].double()
    grads[2] = grads[2].to(torch.float16)
    norms = parameter_norms(grads)
    assert norms.dtype == torch.float64
    expected = [float(torch.linalg.vector_norm(g.double())) for g in grads]
    np.testing.assert_allclose(norms.numpy(), expected, rtol=1e-3)


def test_parameter_norms_sum_squares_over_shards_with_all_reduce_sum():
    full = torch.arange(12.0).reshape(6, 2)
    shards = [full[:3], full[3:]]
    # What an all-reduce over two processes computes, each holding one shard: sum of both squared norms.
    other_square = torch.linalg.vector_norm(shards[1]).square()
    norms = parameter_norms([shards[0]], all_reduce_sum=lambda squares: squares + other_square)
    torch.testing.assert_close(norms[0], torch.linalg.vector_norm(full))


def test_global_norm_is_the_norm_of_all_gradients_concatenated():
    grads = _grads()
    expected = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
    torch.testing.assert_close(global_norm(parameter_norms(grads)), expected)


def test_clip_leaves_small_gradients_untouched():
    grads = _grads(scale=0.01)
    before = [g.clone() for g in grads]
    norm = global_norm(parameter_norms(grads))
    factor = clipping.clip_by_global_norm_(grads, 1.0, norm)
    assert float(factor) == 1.0
    for g, b in zip(grads, before, strict=True):
        assert torch.equal(g, b)


def test_clip_scales_large_gradients_to_the_clip_norm():
    grads = _grads(scale=10.0)
    norm = global_norm(parameter_norms(grads))
    factor = clipping.clip_by_global_norm_(grads, 2.5, norm)
    assert float(global_norm(parameter_norms(grads))) == pytest.approx(2.5, rel=1e-6)
    assert float(factor) == pytest.approx(2.5 / float(norm), rel=1e-6)


def test_clip_matches_torch_clip_grad_norm():
    grads = _grads(scale=10.0)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.5)
    clipping.clip_by_global_norm_(grads, 1.5, global_norm(parameter_norms(grads)))
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_clip_with_infinite_norm_makes_every_gradient_nan_as_tf():
    grads = _grads()
    grads[0][0, 0] = math.inf
    norm = global_norm(parameter_norms(grads))
    clipping.clip_by_global_norm_(grads, 1.0, norm)
    assert all(torch.isnan(g).all() for g in grads)


def test_multipliers_scale_only_listed_gradients_linearly():
    grads = _grads()
    before = [g.clone() for g in grads]
    multipliers.multiply_(grads, [2.0, 1.0, -0.5, 2.0])
    torch.testing.assert_close(grads[0], before[0] * 2.0)
    assert torch.equal(grads[1], before[1])
    torch.testing.assert_close(grads[2], before[2] * -0.5)
    torch.testing.assert_close(grads[3], before[3] * 2.0)


def test_multipliers_need_one_factor_per_gradient():
    with pytest.raises(ValueError):
        multipliers.multiply_(_grads(), [1.0])


def test_gradient_statistics_are_mean_population_std_min_max_norm():
    grads = _grads()
    norms = parameter_norms(grads)
    stats = statistics.gradient_statistics(statistics.local_moments(grads, torch.float32), norms)
    assert stats.shape == (len(grads), 5)
    for row, grad in zip(stats.numpy(), grads, strict=True):
        values = grad.numpy().reshape(-1)
        expected = [values.mean(), values.std(), values.min(), values.max(), np.linalg.norm(values)]
        np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-7)


def test_moments_of_shards_combine_to_the_moments_of_the_whole():
    whole = torch.randn(11, 3, generator=torch.Generator().manual_seed(4)) * 3 + 1
    shards = [*torch.chunk(whole, 4, dim=0), whole[:0]]  # torch.chunk split, plus an empty shard
    parts = torch.stack([statistics.local_moments([shard], torch.float64) for shard in shards])
    combined = statistics.combine_moments(parts)
    torch.testing.assert_close(combined, statistics.local_moments([whole], torch.float64))


def test_noise_seed_depends_on_seed_step_and_chunk_and_fits_63_bits():
    seeds = {noise_seed(s, t, c) for s in range(3) for t in range(3) for c in range(3)}
    assert len(seeds) == 27
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert noise_seed(7, 100, 3) == noise_seed(7, 100, 3)


def test_truncated_normal_is_cut_at_two_with_std_0_88():
    generator = torch.Generator().manual_seed(0)
    sample = truncated_normal((400_000,), generator, torch.device("cpu"))
    assert sample.dtype == torch.float32
    assert float(sample.abs().max()) <= 2.0
    assert abs(float(sample.mean())) < 0.005
    assert float(sample.std()) == pytest.approx(GradientNoise.truncated_std, rel=0.01)
    # The density is a normal's: about 68.27/95.45 of the mass within one standard deviation.
    assert float((sample.abs() <= 1.0).float().mean()) == pytest.approx(0.6827 / 0.9545, rel=0.01)


def test_truncated_normal_follows_the_truncated_normal_law_into_its_tails():
    sample = truncated_normal((400_000,), torch.Generator().manual_seed(1), torch.device("cpu"))
    ordered = sample.double().sort().values
    phi = torch.special.ndtr
    law = (phi(ordered) - phi(torch.tensor(-2.0))) / (phi(torch.tensor(2.0)) - phi(torch.tensor(-2.0)))
    empirical = torch.arange(1, len(ordered) + 1, dtype=torch.float64) / len(ordered)
    assert float((law - empirical).abs().max()) < 1.63 / math.sqrt(len(ordered))  # Kolmogorov-Smirnov at 1 %
    assert ordered[0] < -1.999 and ordered[-1] > 1.999  # the tails reach the cut


def test_truncated_normal_into_out_gives_the_same_numbers():
    out = torch.full((1000,), 7.0)
    drawn = truncated_normal((1000,), torch.Generator().manual_seed(2), torch.device("cpu"), out=out)
    assert drawn is out
    assert torch.equal(out, truncated_normal((1000,), torch.Generator().manual_seed(2), torch.device("cpu")))


CPU = torch.device("cpu")


def test_gradient_noise_is_reproducible_per_step_and_parameter():
    sizes = {2: 20, 3: 20}
    first = GradientNoise(3, sizes).sample(2, step=7, device=CPU)
    again = GradientNoise(3, sizes).sample(2, step=7, device=CPU)
    assert first.shape == (20,)
    assert torch.equal(first, again)
    assert not torch.equal(first, GradientNoise(3, sizes).sample(2, step=8, device=CPU))
    assert not torch.equal(first, GradientNoise(3, sizes).sample(3, step=7, device=CPU))
    assert not torch.equal(first, GradientNoise(4, sizes).sample(2, step=7, device=CPU))


def test_gradient_noise_of_a_parameter_is_its_part_of_the_chunked_sequence():
    chunk = GradientNoise.chunk_size(CPU)
    sizes = {0: 10, 4: chunk - 3, 9: 2 * chunk + 5, 10: 7}  # parameter 9 spans three chunks
    noise = GradientNoise(1, sizes)
    sequence = torch.cat([noise.chunk(5, c, CPU) for c in range(4)])
    assert sequence.numel() == sum(sizes.values())
    offset = 0
    for index, size in sizes.items():
        torch.testing.assert_close(noise.sample(index, 5, CPU), sequence[offset : offset + size], rtol=0, atol=0)
        torch.testing.assert_close(noise.sample(index, 5, CPU, 3, 9), sequence[offset + 3 : offset + 9], rtol=0, atol=0)
        offset += size


def test_gradient_noise_adds_scaled_noise_in_place():
    grads = _grads()
    before = [g.clone() for g in grads]
    noise = GradientNoise(11, {5 + i: g.numel() for i, g in enumerate(grads)})
    noise.add_(grads, [5, 6, 7, 8], step=2, scale=0.25)
    for position, (grad, original) in enumerate(zip(grads, before, strict=True)):
        expected = original + 0.25 * noise.sample(5 + position, 2, grad.device).view(grad.shape)
        torch.testing.assert_close(grad, expected)
        assert float((grad - original).abs().max()) <= 0.5 + 1e-6


def _row_shards(full: torch.Tensor, parts: int) -> list[tuple[torch.Tensor, ShardLayout]]:
    """``full`` split like FSDP2's ``Shard(0)`` over ``parts`` processes, with each shard's layout."""
    layouts = [ShardLayout(full.shape, ((0, 0),), (rank,), (parts,), None) for rank in range(parts)]
    return [(layout.local_part(full).clone(), layout) for layout in layouts]


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_shards_get_their_slice_of_the_full_parameters_noise_across_chunk_boundaries(parts):
    chunk = GradientNoise.chunk_size(CPU)
    shapes = [(3, 7), (2 * chunk // 64 + 3, 64), (4,), (9, chunk // 8 + 1)]
    sizes = {index: math.prod(shape) for index, shape in enumerate(shapes)}
    whole = [torch.zeros(shape) for shape in shapes]
    GradientNoise(8, sizes).add_(whole, list(sizes), step=3, scale=0.5)
    for rank in range(parts):
        shards = [_row_shards(torch.zeros(shape), parts)[rank] for shape in shapes]
        grads, layouts = [grad for grad, _ in shards], [layout for _, layout in shards]
        GradientNoise(8, sizes).add_(grads, list(sizes), step=3, scale=0.5, layouts=layouts)
        for grad, layout, full in zip(grads, layouts, whole, strict=True):
            assert torch.equal(grad, layout.local_part(full))


def test_a_shard_that_is_not_one_range_gets_its_part_of_the_full_noise():
    full_shape = torch.Size((6, 10))
    layout = ShardLayout(full_shape, ((0, 1),), (1,), (3,), None)  # columns 4..7: not contiguous
    assert layout.flat_range() is None
    whole = torch.zeros(full_shape)
    GradientNoise(2, {0: 60}).add_([whole], [0], step=1, scale=1.0)
    shard = torch.zeros(6, 4)
    GradientNoise(2, {0: 60}).add_([shard], [0], step=1, scale=1.0, layouts=[layout])
    assert torch.equal(shard, layout.local_part(whole))


def test_gradient_noise_drawn_on_several_threads_equals_one_thread():
    chunk = GradientNoise.chunk_size(CPU)
    sizes = {0: 3 * chunk + 11, 1: 5}
    grads = {threads: [torch.zeros(size) for size in sizes.values()] for threads in (1, 2)}
    previous = torch.get_num_threads()
    try:
        for threads, tensors in grads.items():
            torch.set_num_threads(threads)
            GradientNoise(4, sizes).add_(tensors, [0, 1], step=9, scale=1.0)
    finally:
        torch.set_num_threads(previous)
    for one, several in zip(grads[1], grads[2], strict=True):
        assert torch.equal(one, several)
