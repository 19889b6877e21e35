import pytest
import torch

from spark3d.masking import mask_grid, num_visible, random_mask, upsample_mask


def test_mask_grid_per_axis_and_error():
    assert mask_grid((96, 64, 32), (16, 16, 8)) == (6, 4, 4)
    assert mask_grid((224, 224), 32) == (7, 7)
    with pytest.raises(ValueError, match="not divisible.*axis 2"):
        mask_grid((96, 96, 40), (16, 16, 16))


def test_random_mask_exact_visible_count_every_sample():
    grid = (6, 5, 4)
    mask = random_mask(7, grid, 0.75)
    assert mask.dtype == torch.bool and mask.shape == (7, 1, *grid)
    expected = round(120 * 0.25)
    assert mask.flatten(1).sum(1).tolist() == [expected] * 7
    assert num_visible(grid, 0.75) == expected
    # samples differ (independent draws)
    assert not torch.equal(mask[0], mask[1])


def test_random_mask_reproducible_with_generator():
    a = random_mask(4, (7, 7), 0.6, generator=torch.Generator().manual_seed(3))
    b = random_mask(4, (7, 7), 0.6, generator=torch.Generator().manual_seed(3))
    c = random_mask(4, (7, 7), 0.6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_mask_is_uniform_over_cells():
    mask = random_mask(4000, (4, 4), 0.5, generator=torch.Generator().manual_seed(0))
    freq = mask.float().mean(0).flatten()
    assert torch.allclose(freq, torch.full_like(freq, 0.5), atol=0.04)


def test_upsample_mask_anisotropic():
    mask = random_mask(2, (2, 3, 4), 0.5, generator=torch.Generator().manual_seed(1))
    up = upsample_mask(mask, (4, 9, 4))
    assert up.shape == (2, 1, 4, 9, 4)
    for i in range(4):
        for j in range(9):
            for k in range(4):
                assert torch.equal(up[:, :, i, j, k], mask[:, :, i // 2, j // 3, k])
    with pytest.raises(ValueError, match="not a whole multiple"):
        upsample_mask(mask, (3, 9, 4))
