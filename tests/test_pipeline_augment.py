"""Batched augmentation: exact identities, gradients, determinism, CutMix."""
import torch
import torch.nn.functional as F

from unidd_fast.pipeline.augment import Augment, cutmix, make_augment


def test_identity_flip_and_shift_are_exact(gen):
    x = torch.randn(3, 2, 8, 8, generator=gen, dtype=torch.float64)
    identity = Augment(scale=(1, 1), ratio=(1, 1), shift=0.0, flip=False)
    # float64 bilinear sampling at pixel centres: rounding only
    torch.testing.assert_close(identity(x, gen), x, atol=1e-12, rtol=0)
    theta = identity.theta(3, gen, x.device, x.dtype)
    theta[:, 0, 0] = -1
    flipped = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-12, rtol=0)
    theta = identity.theta(3, gen, x.device, x.dtype)
    theta[:, 0, 2] = 2 * 2 / 8  # two pixels to the right in input coordinates
    shifted = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    torch.testing.assert_close(shifted[..., :6], x[..., 2:], atol=1e-12, rtol=0)
    assert shifted[..., 6:].abs().max() == 0  # zeros (the mean colour) come in at the border


def test_crop_sizes_lie_in_the_configured_range(gen):
    aug = make_augment("rrc", crop_min=0.25)
    theta = aug.theta(2000, gen, torch.device("cpu"))
    area = (theta[:, 0, 0].abs() * theta[:, 1, 1])
    assert area.min() >= 0.25 - 1e-6 and area.max() <= 1 + 1e-6
    assert (theta[:, 0, 0] < 0).float().mean().sub(0.5).abs() < 0.05  # flips about half
    assert (theta[:, 0, 2].abs() <= 1 - theta[:, 0, 0].abs() + 1e-6).all()  # crop stays inside


def test_gradients_reach_the_images(gen):
    aug = make_augment("recover", crop_min=0.5, shift=0.125)
    x = torch.randn(2, 1, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    torch.autograd.gradcheck(lambda t: aug(t, torch.Generator().manual_seed(seed)), (x,))


def test_same_generator_state_same_output(gen):
    x = torch.randn(4, 3, 8, 8, generator=gen)
    aug = make_augment("recover", 0.3, 0.1)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, aug(x, torch.Generator().manual_seed(8)))


def test_cutmix_pastes_boxes_from_the_next_image(gen):
    x = torch.randn(5, 2, 8, 8, generator=gen)
    assert cutmix(x, 0.0, gen) is x
    mixed = cutmix(x, 1.0, gen)
    from_self = (mixed == x).all(1)
    from_next = (mixed == x.roll(1, 0)).all(1)
    assert (from_self | from_next).all()
    assert from_next.any()
