"""The dropout keep-mask recipe: Philox known answers, keep rate, thresholds."""

import math

import pytest
import torch

from lorafusion_compiler.ops.dropout_mask import LANES_PER_COUNTER, PHILOX_ROUNDS, drop_threshold, keep_mask, philox4x32


# Known answers of Triton's tl.randint4x(seed, 123456789 + i, rounds) (recorded with the Triton
# interpreter): 10 rounds is Triton's default, 7 the mask's (PHILOX_ROUNDS).
@pytest.mark.parametrize(
    "rounds, seed, words",
    [
        (10, 0, [3312208130, 3064327959, 1729284979, 4013493118]),
        (10, 42, [1593944992, 3061779824, 4066282839, 4255630440]),
        (10, 2**40 + 7, [2438419657, 208528801, 937072107, 3294285765]),
        (10, 2**62 - 1, [2883921267, 1952984366, 2589274252, 62380519]),
        (7, 0, [391937151, 3818982354, 4017951932, 3586622748]),
        (7, 42, [1789310387, 975692910, 844064148, 2237689425]),
        (7, 2**40 + 7, [2008249087, 3565209735, 2168023377, 219591659]),
        (7, 2**62 - 1, [1752551897, 1919796465, 2956620499, 2667388854]),
    ],
)
def test_philox_matches_triton_known_answers(rounds, seed, words):
    out = philox4x32(torch.tensor(seed), torch.tensor([123456789]), rounds)
    assert [int(w.item()) for w in out] == words


def test_mask_uses_seven_rounds():
    assert PHILOX_ROUNDS == 7
    words = philox4x32(torch.tensor(99), torch.tensor([0]), 7)
    mask = keep_mask(torch.tensor(99), 0.3, 1, 8)
    lanes = [(int(words[i // 2].item()) >> (16 * (i % 2))) & 0xFFFF for i in range(8)]
    assert mask[0].tolist() == [lane >= drop_threshold(0.3) for lane in lanes]


def test_philox_words_are_32_bit_and_vary():
    out = torch.stack(philox4x32(torch.tensor(7), torch.arange(4096)))
    assert out.min() >= 0 and out.max() < 2**32
    assert out.unique().numel() > 0.99 * out.numel()


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_within_4_sigma(p):
    rows, cols = 301, 257  # odd sizes: the last Philox counter is only partly used
    mask = keep_mask(torch.tensor(1234), p, rows, cols)
    n = rows * cols
    realised_p = drop_threshold(p) / 65536
    sigma = math.sqrt(realised_p * (1 - realised_p) / n)
    assert abs(mask.float().mean().item() - (1 - realised_p)) < 4 * sigma
    assert abs(realised_p - p) <= 0.5 / 65536


def test_mask_layout_and_determinism():
    a = keep_mask(torch.tensor(99), 0.3, 13, 11)
    b = keep_mask(torch.tensor(99), 0.3, 13, 11)
    c = keep_mask(torch.tensor(100), 0.3, 13, 11)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # element (i, j) depends only on its flat offset: a wider matrix shares the prefix
    flat = keep_mask(torch.tensor(99), 0.3, 1, 13 * 11).reshape(13, 11)
    assert torch.equal(a, flat)
    words = philox4x32(torch.tensor(99), torch.tensor([0]))
    lane0 = int(words[0].item()) & 0xFFFF
    assert a[0, 0].item() == (lane0 >= drop_threshold(0.3))
    assert LANES_PER_COUNTER == 8


def test_p_zero_keeps_everything():
    assert keep_mask(torch.tensor(5), 0.0, 4, 9).all()


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_probability_names_value(p):
    with pytest.raises(ValueError, match=f"p={p!r}"):
        drop_threshold(p)


def test_keep_bits_pack_unpack_round_trip():
    from lorafusion_compiler.ops.dropout_mask import pack_keep_bits, unpack_keep_bits

    mask = keep_mask(torch.tensor(99), 0.4, 7, 24)
    bits = pack_keep_bits(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (7, 3)
    assert torch.equal(unpack_keep_bits(bits), mask)
    # bit i of byte (m, q) is element (m, 8q + i)
    assert int(bits[2, 1]) == sum(int(mask[2, 8 + i]) << i for i in range(8))
    with pytest.raises(ValueError, match="K % 8 == 0, got K=10"):
        pack_keep_bits(torch.ones(2, 10, dtype=torch.bool))


def test_reference_da_writes_bits_that_dx_reads():
    from lorafusion_compiler.ops import reference as ref
    from lorafusion_compiler.ops.dropout_mask import new_keep_bits

    g = torch.Generator().manual_seed(0)
    x, ds, dy = torch.randn(9, 16, generator=g), torch.randn(9, 3, generator=g), torch.randn(9, 5, generator=g)
    a, w, seed = torch.randn(3, 16, generator=g), torch.randn(5, 16, generator=g), torch.tensor(7)
    bits = new_keep_bits(x, 0.25, 3)
    da = ref.da(x, ds, seed, 0.25, torch.float32, keep_bits=bits)
    assert torch.equal(da, ref.da(x, ds, seed, 0.25, torch.float32))
    assert torch.equal(ref.dx(dy, w, ds, a, seed, 0.25, torch.float32, keep_bits=bits),
                       ref.dx(dy, w, ds, a, seed, 0.25, torch.float32))
