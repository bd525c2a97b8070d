import pytest
import torch

from optimum_oats.algorithms.quantize import (
    GroupSpec,
    codes_of,
    expand_scales,
    group_scales,
    pack_codes,
    packed_bytes,
    quantize_rtn,
    round_to_grid,
    unpack_codes,
)


def _pruned(rows=16, cols=200, keep=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    threshold = weight.abs().flatten().kthvalue(int((1 - keep) * weight.numel())).values
    return weight * (weight.abs() > threshold)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("group", [7, 64, 128, 1000])
def test_rtn_keeps_zeros_and_the_mask_and_lands_on_the_grid(bits, group):
    weight = _pruned()
    spec = GroupSpec(bits, group)
    values, scales = quantize_rtn(weight, spec)
    assert scales.shape == (16, spec.num_groups(200))
    assert torch.equal(scales, scales.half().float())  # what is stored (fp16) is what was used
    assert torch.equal(values != 0, weight != 0)  # no level at zero: the mask is unchanged
    codes = codes_of(values, scales, spec)
    assert int(codes.max()) <= 2**bits - 1
    per_column = expand_scales(scales, 200, spec)
    rebuilt = (codes.float() - spec.offset) * per_column * (weight != 0)
    assert torch.equal(rebuilt, values)  # the codes decode bit-exactly to the values
    assert torch.equal(round_to_grid(values, per_column, spec), values)  # on the grid: rounding again is a no-op


def test_error_falls_with_bits_and_smaller_groups():
    weight = _pruned(rows=32, cols=512)

    def error(bits, group):
        values, _ = quantize_rtn(weight, GroupSpec(bits, group))
        return float((values - weight).norm() / weight.norm())

    errors = [error(bits, 128) for bits in (3, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01
    assert error(4, 32) < error(4, 512)


def test_clip_search_never_loses_to_min_max():
    weight = _pruned(rows=32, cols=256, seed=3)
    spec = GroupSpec(3, 64)
    searched = group_scales(weight, spec)
    min_max = group_scales(weight, spec, ratios=(1.0,))
    cols = weight.shape[1]
    a = round_to_grid(weight, expand_scales(searched, cols, spec), spec) - weight
    b = round_to_grid(weight, expand_scales(min_max, cols, spec), spec) - weight
    assert a.square().sum() < b.square().sum()


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_pack_round_trip_and_true_size(bits, count):
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(count), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def test_four_bit_packing_is_two_nibbles_low_first():
    assert pack_codes(torch.tensor([1, 2, 15, 0], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F]


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="`bits`"):
        GroupSpec(16, 64)
    with pytest.raises(ValueError, match="`group_size`"):
        GroupSpec(4, 0)


@pytest.mark.parametrize("bits", [4, 8])
def test_factor_grid_has_a_zero_level_and_keeps_zeros_decodable(bits):
    g = torch.Generator().manual_seed(1)
    factor = torch.randn(12, 150, generator=g)
    factor[:, 5] = 0  # a dead input's column
    spec = GroupSpec(bits, 64, zero_level=True)
    values, scales = quantize_rtn(factor, spec)
    codes = codes_of(values, scales, spec)
    decoded = (codes.float() - spec.offset) * expand_scales(scales, 150, spec)
    assert torch.equal(decoded, values)  # no mask needed: zeros decode to zero
    assert (values[:, 5] == 0).all()
    assert float((values - factor).norm() / factor.norm()) < (0.12 if bits == 4 else 0.01)
