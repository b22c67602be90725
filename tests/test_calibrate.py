"""calibrate: streamed histograms (mergeable as the range widens) and the minmax/percentile/entropy/mse ranges."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from graphopt import calibrate
from graphopt.calibrate import METHODS, TensorStats, collect
from tests.helpers import make_model, seeded_feeds

RNG = np.random.default_rng(0)


def stats_of(*batches, bins: int = 2048) -> TensorStats:
    s = TensorStats(bins)
    for b in batches:
        s.update(np.asarray(b, dtype=np.float32))
    return s


def with_outliers(n: int, outliers: list[float]) -> np.ndarray:
    """Standard normal bulk of `n` values with the given outliers appended."""
    return np.concatenate([RNG.standard_normal(n), outliers]).astype(np.float32)


def test_minmax_is_the_observed_min_and_max():
    a, b = RNG.standard_normal(1000) * 3, RNG.standard_normal(500) + 2
    s = stats_of(a, b)
    assert (s.minimum, s.maximum, s.count) == (pytest.approx(min(a.min(), b.min()), rel=1e-6), pytest.approx(max(a.max(), b.max()), rel=1e-6), 1500)
    assert s.range("minmax") == (pytest.approx(s.minimum), pytest.approx(s.maximum))
    t = max(-s.minimum, s.maximum)
    assert s.range("minmax", symmetric=True) == (-t, t)


def test_nan_and_inf_are_ignored():
    s = stats_of([1.0, np.nan, -2.0, np.inf, -np.inf])
    assert (s.minimum, s.maximum, s.count) == (-2.0, 1.0, 2)
    assert s.counts.sum() + s.zeros == 2


def test_percentile_matches_numpy_within_a_bin_width():
    x = RNG.standard_normal(100_000).astype(np.float32)
    s = stats_of(x)
    width = s.limit / s.bins
    lo, hi = s.range("percentile", percentile=99.0)
    assert abs(hi - np.percentile(x, 99.0)) <= width
    assert abs(lo - np.percentile(x, 1.0)) <= width
    lo, hi = s.range("percentile", percentile=99.9, symmetric=True)
    assert lo == -hi and abs(hi - np.percentile(np.abs(x), 99.9)) <= width


def test_histogram_of_batches_equals_histogram_of_concatenation():
    """The second batch is 40x wider: the first batch's bins are re-binned, exactly."""
    a = RNG.standard_normal(20_000).astype(np.float32)
    b = (RNG.standard_normal(20_000) * 40).astype(np.float32)
    streamed, whole = stats_of(a, b), stats_of(np.concatenate([a, b]))
    assert streamed.limit == whole.limit == 256.0
    np.testing.assert_array_equal(streamed.counts, whole.counts)
    merged = stats_of(b)
    merged.merge(stats_of(a))
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert (merged.minimum, merged.maximum, merged.count) == (whole.minimum, whole.maximum, whole.count)


def test_counts_widen_to_int64_before_int32_could_overflow():
    x = RNG.standard_normal(1000).astype(np.float32)
    s = stats_of(x, bins=64)
    assert s.counts.dtype == np.int32  # half the memory while it is safe
    s.count = np.iinfo(np.int32).max - 500  # as if two billion values had been seen
    before = s.counts.astype(np.int64)
    s.update(x)
    assert s.counts.dtype == np.int64
    np.testing.assert_array_equal(s.counts, 2 * before)
    merged = stats_of(x, bins=64)
    merged.count = np.iinfo(np.int32).max - 500
    merged.merge(stats_of(x * 100, bins=64))  # re-binned onto a wider range, as int64
    assert merged.counts.dtype == np.int64 and merged.counts.sum() == 2 * x.size


def test_histogram_counts_match_numpy_histogram():
    x = RNG.standard_normal(10_000).astype(np.float32)
    s = stats_of(x, bins=64)
    expected, _ = np.histogram(x, bins=s.edges)
    np.testing.assert_array_equal(s.counts, expected)


@pytest.mark.parametrize("method", ["entropy", "mse"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_one_huge_outlier_is_clipped_above_the_bulk(method, symmetric):
    """1e6 normal values and one at 100: the whole bulk is kept, the outlier clipped."""
    x = with_outliers(1_000_000, [100.0])
    lo, hi = stats_of(x).range(method, symmetric=symmetric)
    bulk = np.percentile(np.abs(x), 99.9)  # ~3.3
    assert bulk < hi < 0.5 * 100.0
    assert -0.5 * 100.0 < lo < -bulk
    if method == "mse":
        # n * step**2 / 12 + (100 - t)**2 with step = span / 255 is a * span**2 + (100 - t)**2,
        # a = n / (12 * 255**2), span = 2t (symmetric) or t - min(x): least at the t given here
        a = x.size / (12 * 255**2)
        expected = 100.0 / (1 + 4 * a) if symmetric else (100.0 + a * x.min()) / (1 + a)
        assert hi == pytest.approx(expected, rel=0.05)


def test_entropy_clips_several_outliers_near_the_bulk():
    """Ten outliers at +-30..60 beside 2e5 normal values: KL keeps the bulk (~4.4) and drops the outliers."""
    x = with_outliers(200_000, list(RNG.uniform(30, 60, 10) * RNG.choice([-1, 1], 10)))
    for symmetric in (False, True):
        lo, hi = stats_of(x).range("entropy", symmetric=symmetric)
        assert np.percentile(np.abs(x), 99.9) < hi < 10.0
        assert -10.0 < lo < -np.percentile(np.abs(x), 99.9)


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_uniform_distribution_keeps_nearly_the_whole_range(method):
    x = RNG.uniform(-1, 3, 200_000).astype(np.float32)
    lo, hi = stats_of(x).range(method)
    assert lo <= -0.97 and hi >= 2.95
    lo, hi = stats_of(x).range(method, symmetric=True)
    assert -lo == hi >= 2.9


def test_relu_like_data_gets_a_one_sided_range():
    """Exact zeros (half the values) are counted apart and do not pull the clip in."""
    x = np.maximum(RNG.standard_normal(200_000), 0).astype(np.float32)
    s = stats_of(x)
    assert s.zeros == np.count_nonzero(x == 0)
    for method in ("entropy", "mse"):
        lo, hi = s.range(method)
        assert lo == 0.0 and 3.0 < hi <= x.max()


@pytest.mark.parametrize("method", METHODS)
def test_range_always_contains_zero(method):
    for batch in ([1.0, 2.0, 1.5, 1.25], [-3.0, -1.0, -2.5], [0.0, 0.0]):
        lo, hi = stats_of(np.repeat(batch, 100)).range(method)
        assert lo <= 0.0 <= hi
    pos = stats_of(np.repeat([1.0, 2.0], 100))
    assert pos.range(method)[0] == 0.0 and pos.range(method)[1] >= 1.0
    neg = stats_of(np.repeat([-1.0, -2.0], 100))
    assert neg.range(method)[1] == 0.0 and neg.range(method)[0] <= -1.0


def test_nothing_observed_gives_an_empty_range():
    assert TensorStats().range("entropy") == (0.0, 0.0)


def test_unknown_method_and_bad_bins_are_refused():
    with pytest.raises(ValueError, match="minmax, percentile, entropy, mse"):
        stats_of([1.0]).range("kl")
    with pytest.raises(ValueError, match="power of two"):
        TensorStats(1000)


def test_collect_streams_intermediate_tensor_ranges():
    """x -> Relu -> y -> Mul(c) -> z"""
    c = np.array([0.5, -2.0, 3.0], dtype=np.float32)
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Mul", ["y", "c"], ["z"]), helper.make_node("Shape", ["z"], ["s"])],
        [helper.make_tensor_value_info("x", TP.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("z", TP.FLOAT, [4, 3]), helper.make_tensor_value_info("s", TP.INT64, [2])],
        [numpy_helper.from_array(c, "c")],
    )
    feeds = seeded_feeds(model, n=5)
    stats = collect(model, feeds, ["y", "z", "s"])
    assert set(stats) == {"y", "z"}  # the int64 Shape output is skipped
    ys = np.stack([np.maximum(f["x"], 0) for f in feeds])
    zs = ys * c
    for name, values in (("y", ys), ("z", zs)):
        assert stats[name].count == values.size
        assert stats[name].range("minmax") == (pytest.approx(min(values.min(), 0)), pytest.approx(max(values.max(), 0)))
    merged = TensorStats()
    merged.update(zs)
    np.testing.assert_array_equal(stats["z"].counts, merged.counts)


def test_min_max_only_stats_keep_no_histogram_and_agree_with_full_ones():
    """bins=0 (what minmax needs): the same minmax range and counts as with a histogram, across batches
    that widen the range and a merge, and no histogram memory."""
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=500).astype(np.float32), 40 * rng.normal(size=300).astype(np.float32), np.zeros(7, np.float32)]
    full, bare = TensorStats(64), TensorStats(calibrate.bins_for("minmax"))
    for b in batches[:2]:
        full.update(b)
        bare.update(b)
    other_full, other_bare = stats_of(batches[2], bins=64), stats_of(batches[2], bins=0)
    full.merge(other_full)
    bare.merge(other_bare)
    assert bare.range("minmax") == full.range("minmax")
    assert (bare.count, bare.zeros, bare.limit) == (full.count, full.zeros, full.limit)
    assert bare.counts.size == 0
    assert calibrate.bins_for("entropy") == calibrate.BINS


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_methods_refuse_min_max_only_stats(method):
    with pytest.raises(ValueError, match=f"{method}.*needs a histogram.*bins=0"):
        stats_of([1.0, -3.0, 2.0], bins=0).range(method)


def _error_after(f, x: np.ndarray, window: tuple[float, float]) -> float:
    """Mean squared error of f(x) when x is quantized to 255 uint8 steps over `window` (zero exact)."""
    lo, hi = window
    scale = (hi - lo) / 255.0
    zero = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zero, 0, 255)
    return float(np.mean((f((q - zero) * scale) - f(x)) ** 2))


@pytest.mark.parametrize("transfer", ["silu", "sigmoid"])
def test_transfer_window_minimizes_the_error_after_the_function(transfer):
    """A Conv output read by SiLU (or Sigmoid) with a long negative tail: measured after the function,
    the tail where the function is flat is clipped, and the actual error of the function's output is
    lower than with the plain mse or the minmax window."""
    x = np.concatenate([RNG.normal(-20, 10, 50_000), RNG.normal(2, 3, 50_000)]).astype(np.float32)
    s = stats_of(x, bins=8192)
    f = calibrate.TRANSFERS[transfer][0]
    after = s.range("mse", transfer=transfer)
    assert -15 < after[0] < -2 and after[0] > s.minimum
    errors = {w: _error_after(f, x.astype(np.float64), s.range(w)) for w in ("minmax", "mse")}
    assert _error_after(f, x.astype(np.float64), after) < 0.5 * min(errors.values())


def test_transfer_window_is_the_best_pair_of_a_brute_force_grid():
    """Both ends are searched apart: no window on a coarse grid of (lo, hi) does better by the same
    error model (bins, f' inside, f at the edge outside)."""
    x = np.concatenate([RNG.normal(-6, 4, 20_000), RNG.exponential(3, 20_000)]).astype(np.float32)
    s = stats_of(x, bins=1024)
    f, slope = calibrate.TRANSFERS["silu"]
    width = s.limit / s.bins
    centres = (np.arange(2 * s.bins) - s.bins + 0.5) * width
    h = s.counts.astype(np.float64)

    def cost(lo, hi):
        inside = (centres >= lo) & (centres < hi)
        clipped = f(np.clip(centres, lo, hi))
        return float(np.sum(h * np.where(inside, slope(centres) ** 2 * ((hi - lo) / 255) ** 2 / 12, (f(centres) - clipped) ** 2)))

    best = cost(*s.range("mse", transfer="silu"))
    grid = [cost(lo, hi) for lo in np.linspace(s.minimum, 0, 40, endpoint=False) for hi in np.linspace(s.maximum, 0.1, 40)]
    assert best <= min(grid) * 1.01


def test_transfer_is_refused_outside_asymmetric_mse():
    s = stats_of(RNG.standard_normal(100))
    for kwargs in ({"transfer": "silu"}, {"transfer": "tanh", "method": "mse"}, {"transfer": "silu", "method": "mse", "symmetric": True}):
        with pytest.raises(ValueError, match="only asymmetric mse"):
            s.range(kwargs.pop("method", "minmax"), **kwargs)
