"""The sub-spot branch's parts, in torch alone: the disc, the start, the count likelihoods, the trunk's maps."""

import math

import numpy as np
import pytest
import torch


def test_disc_weights_cover_the_disc_area():
    from st_predict.nn import disc_weights

    w = disc_weights(16, 16, 5.3)
    assert w.shape == (16, 16)
    assert float(w.sum()) == pytest.approx(math.pi * 5.3**2, rel=0.01)
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.T)  # centred: flips and rotations keep it
    assert float(w[0, 0]) == 0 and float(w[8, 8]) == 1


def test_square_footprints_cover_the_square_and_weigh_bins_as_the_disc_cannot():
    from st_predict._utils import footprint_fraction
    from st_predict.nn import disc_weights

    sq = disc_weights(16, 16, 3.25, square=True)  # a Visium HD bin of 6.5 cells, at the grid's centre
    assert float(sq.sum()) == pytest.approx(6.5**2, rel=1e-3) and float(sq[8, 8]) == 1 and float(sq[8, 1]) == 0
    assert float(sq[5, 5]) == 1 > float(disc_weights(16, 16, 3.25)[5, 5])  # a corner of the square, outside the disc
    union = disc_weights(16, 16, 2.0, centres=[(-2.0, -2.0), (2.0, 2.0)], square=True)
    assert float(union.sum()) == pytest.approx(2 * 16 - 0.0, rel=1e-3)  # two 4 x 4 squares, touching at a corner
    # a bin of side 2 against a spot of half-side / radius 4 at the origin: inside, at the corner, across the edge
    centres = np.array([[0.0, 0.0], [3.0, 3.0], [4.0, 0.0], [9.0, 0.0]])
    spots = np.zeros((4, 2))
    np.testing.assert_allclose(footprint_fraction(centres, 2.0, spots, 4.0, square=True), [1, 1, 0.5, 0])
    disc = footprint_fraction(centres, 2.0, spots, 4.0)
    assert disc[0] == 1 and disc[1] < 0.5 and disc[3] == 0  # the corner bin lies mostly outside the disc
    np.testing.assert_allclose(footprint_fraction(centres[:2], 2.0, spots[:2], 4.0, square=[True, False]),
                               [1, disc[1]])


def test_bin_module_starts_at_the_mean_share_and_only_the_disc_counts():
    from st_predict.module import BinModule
    from st_predict.nn import disc_weights

    share0 = torch.tensor([0.2, 0.01, 0.5])
    fp = disc_weights(4, 4, 1.5)[None]
    bins = BinModule(3, 6, 5, share0, fp, hidden=8)
    fine, final = torch.randn(2, 6, 4, 4), torch.randn(2, 5, 1, 1)
    rho = bins.rates(fine, final)
    torch.testing.assert_close(rho, share0[None, :, None, None].expand(2, 3, 4, 4))
    rho = rho.detach().requires_grad_(True)
    loss = bins.loss(rho, torch.tensor([[30.0, 2.0, 40.0], [10.0, 0.0, 90.0]]), torch.tensor([100.0, 150.0]),
                     torch.tensor([0, 0]))
    loss.backward()
    outside = fp[0] == 0
    assert outside.any() and torch.all(rho.grad[:, :, outside] == 0)
    assert torch.all(rho.grad[:, :, ~outside].abs().sum((0, 1)) > 0)


def test_count_nll_is_lowest_at_the_observed_count():
    from st_predict.nn import count_nll

    x = torch.tensor([0.0, 3.0, 40.0])
    for loss in ("nb", "poisson"):
        mean = torch.tensor([0.5, 3.0, 40.0], requires_grad=True)
        count_nll(x, mean, loss, torch.full((3,), 5.0)).sum().backward()
        assert abs(float(mean.grad[1])) < 1e-5 and abs(float(mean.grad[2])) < 1e-5
        assert float(mean.grad[0]) > 0  # a zero count pulls the mean down
    # the NB is the Poisson as theta grows
    nb = count_nll(x, torch.tensor([1.0, 2.0, 30.0]), "nb", torch.full((3,), 1e5))
    torch.testing.assert_close(nb, count_nll(x, torch.tensor([1.0, 2.0, 30.0]), "poisson"), atol=1e-2, rtol=1e-3)
    with pytest.raises(Exception, match="bin_loss"):
        count_nll(x, x, "gaussian")


def test_fine_map_of_the_resnet_and_refusals():
    from st_predict._utils import InputError
    from st_predict.nn import build_resnet18_trunk, fine_and_final

    trunk = build_resnet18_trunk().eval()
    fine, final = fine_and_final(trunk, torch.randn(2, 3, 64, 64))
    assert fine.shape == (2, 6 + 64 + 128, 8, 8) and final.shape == (2, 512, 2, 2)
    # the first channels are the cell's own mean colour
    x = torch.randn(1, 3, 64, 64)
    np.testing.assert_allclose(fine_and_final(trunk, x)[0][0, :3, 2, 5].detach().numpy(),
                               x[0, :, 16:24, 40:48].mean((1, 2)).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="nn.Sequential"):
        fine_and_final(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 64, 64))
    with pytest.raises(InputError, match="cells of 8 px"):
        fine_and_final(trunk, torch.randn(1, 3, 60, 60))


def test_union_footprint_is_the_sum_of_separate_discs():
    from st_predict.nn import apply_dihedral, disc_weights

    centres = [(-4.0, -4.0), (4.0, -4.0), (-4.0, 4.0), (4.0, 4.0)]
    union = disc_weights(16, 16, 3.0, centres=centres)
    one = disc_weights(16, 16, 3.0)
    assert float(union.sum()) == pytest.approx(4 * float(one.sum()), rel=1e-6)
    assert float(union[4, 4]) == 1 and float(union[8, 8]) == 0  # the members' centres in, the middle out
    lopsided = disc_weights(16, 16, 2.0, centres=[(5.0, 0.0)])
    turned = apply_dihedral(lopsided[None], torch.tensor([1]))[0]  # a quarter turn moves the disc off the x axis
    assert not torch.equal(turned, lopsided) and float(turned.sum()) == pytest.approx(float(lopsided.sum()))
