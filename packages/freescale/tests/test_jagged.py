import pytest
import torch

from freescale import KeyedJagged
from freescale.jagged import gather_runs


def _kj():
    return KeyedJagged.from_dict({"a": [torch.tensor([1, 2]), torch.tensor([], dtype=torch.long), torch.tensor([3])],
                                  "b": [torch.tensor([7]), torch.tensor([8, 9, 10]), torch.tensor([11])]})


def test_layout_and_access():
    kj = _kj()
    assert kj.batch_size == 3 and kj.lengths.tolist() == [2, 0, 1, 1, 3, 1]
    assert kj.offsets.tolist() == [0, 2, 2, 3, 4, 7, 8]
    vals, lens = kj["b"]
    assert vals.tolist() == [7, 8, 9, 10, 11] and lens.tolist() == [1, 3, 1]
    assert kj.sample_lengths().tolist() == [3, 3, 2]


def test_permute_split_concat_roundtrip():
    kj = _kj()
    p = kj.permute(torch.tensor([2, 0, 1]))
    assert p["a"][0].tolist() == [3, 1, 2] and p["b"][1].tolist() == [1, 1, 3]
    parts = kj.split([1, 2])
    assert KeyedJagged.concat(parts) == kj
    assert kj.permute(torch.tensor([1])).values.tolist() == [8, 9, 10]
    d = kj.to_dict()
    assert KeyedJagged.from_dict(d) == kj


def test_bad_inputs():
    with pytest.raises(ValueError, match="sum to"):
        KeyedJagged(["a"], torch.arange(3), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="multiple"):
        KeyedJagged(["a", "b"], torch.arange(3), torch.tensor([3]))
    with pytest.raises(ValueError, match="distinct"):
        KeyedJagged(["a", "a"], torch.arange(2), torch.tensor([1, 1]))
    with pytest.raises(IndexError):
        _kj().permute(torch.tensor([3]))
    with pytest.raises(ValueError, match="split sizes"):
        _kj().split([1, 1])
    with pytest.raises(KeyError, match=r"no key 'zz' in these features \(keys: \['a', 'b'\]\)"):
        _kj()["zz"]


def test_sample_major_matches_a_loop_and_round_trips():
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 5, (3 * 7,), generator=g)  # 3 keys, 7 samples, empty runs included
    kj = KeyedJagged(["a", "b", "c"], torch.randint(0, 100, (int(lengths.sum()),), generator=g), lengths)
    order = torch.tensor([4, 0, 6, 6, 2])  # a subset, reordered, with a repeat
    values, per_key = kj.sample_major(order)
    chunks = kj.to_dict()
    expected = [chunks[key][i] for i in order.tolist() for key in kj.keys]
    assert torch.equal(values, torch.cat(expected))
    assert per_key.tolist() == [[chunks[key][i].numel() for key in kj.keys] for i in order.tolist()]
    assert KeyedJagged.from_sample_major(kj.keys, values, per_key) == kj.permute(order)
    empty_values, empty_lengths = kj.sample_major(torch.tensor([], dtype=torch.long))
    assert empty_values.numel() == 0 and empty_lengths.shape == (0, 3)
    with pytest.raises(IndexError):
        kj.sample_major(torch.tensor([7]))


@pytest.mark.parametrize("runs, mean", [(37, 3), (5, 900)])  # the index gather, then slices joined by cat
def test_gather_runs_equals_slicing(runs, mean):
    g = torch.Generator().manual_seed(runs)
    lengths = torch.randint(0, 2 * mean + 1, (runs,), generator=g)
    values = torch.randn(int(lengths.sum()) + 7, generator=g)
    starts = torch.randint(0, 8, (runs,), generator=g) + (torch.cumsum(lengths, 0) - lengths)
    order = torch.randperm(runs, generator=g)
    starts, lengths = starts[order], lengths[order]
    expected = torch.cat([values[a : a + n] for a, n in zip(starts.tolist(), lengths.tolist())])
    assert torch.equal(gather_runs(values, starts, lengths), expected)
    assert torch.equal(gather_runs(values, starts, lengths.zero_()), values[:0])


def test_permute_refuses_masks_and_float_indices():
    """A bool mask was read as the indices 0/1 and float indices were truncated."""
    kj = _kj()
    with pytest.raises(ValueError, match="bool"):
        kj.permute(torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="float32"):
        kj.permute(torch.tensor([1.9]))
    with pytest.raises(ValueError, match="integers"):
        kj.sample_major(torch.tensor([True, False, True]))
    assert kj.permute(torch.tensor([True, False, True]).nonzero()[:, 0]) == kj.permute([0, 2])
    assert kj.permute([]).batch_size == 0 and kj.permute(torch.tensor([2], dtype=torch.int32)) == kj.permute([2])


def test_from_dict_dtype():
    """An empty batch (a rank's share of a final partial batch) gets the ids' dtype, not int64."""
    assert KeyedJagged.from_dict({"a": []}).values.dtype == torch.int64
    assert KeyedJagged.from_dict({"a": []}, dtype=torch.int32).values.dtype == torch.int32
    kj = KeyedJagged.from_dict({"a": [torch.tensor([1, 2]), torch.tensor([])]}, dtype=torch.int32)
    assert kj.values.dtype == torch.int32 and kj.values.tolist() == [1, 2] and kj.lengths.tolist() == [2, 0]


def test_from_dict_empty_samples_keep_the_ids_dtype():
    """torch.tensor([]) is float32: an empty history beside int64 ones turned every id into a float."""
    kj = KeyedJagged.from_dict({"a": [torch.tensor([1, 2]), torch.tensor([]), torch.tensor([3])]})
    assert kj.values.dtype == torch.int64 and kj.values.tolist() == [1, 2, 3]
    assert KeyedJagged.from_dict({"a": [[1, 2], []]}).values.dtype == torch.int64  # lists work as samples too
    with pytest.raises(ValueError, match="at least one key"):
        KeyedJagged.from_dict({})


def test_device_features_take_host_or_device_indices():
    """A GPU batch cut or reordered by a plan's host indices and windows (the exchange under
    cap/split), or by device indices: the index arithmetic stays beside the lengths. Run on a
    stand-in device that refuses host tensors as CUDA does; the arange of the key rows and the
    windows' start/stop were made on the host."""
    from gpukernels_common.testing.devices import device_factories, on_device

    host = _kj()
    with device_factories():
        kj = KeyedJagged(host.keys, on_device(host.values), on_device(host.lengths))
        for indices in (torch.tensor([2, 0]), on_device(torch.tensor([2, 0]))):
            assert kj.permute(indices).values.device == kj.values.device
            assert kj.permute(indices).values.tolist() == host.permute(torch.tensor([2, 0])).values.tolist()
            values, lengths = kj.sample_major(indices)
            want_values, want_lengths = host.sample_major(torch.tensor([2, 0]))
            assert values.tolist() == want_values.tolist() and lengths.tolist() == want_lengths.tolist()
        aligned = KeyedJagged(["x", "y"], on_device(torch.arange(10)), on_device(torch.tensor([2, 3, 2, 3])))
        cut = aligned.windows(torch.tensor([1, 0]), torch.tensor([1, 0]), torch.tensor([3, 1]))
        assert cut.values.tolist() == [3, 4, 0, 8, 9, 5] and cut.lengths.tolist() == [2, 1, 2, 1]
        assert [part.values.tolist() for part in kj.split([1, 2])] == [[1, 2, 7], [3, 8, 9, 10, 11]]


def test_concat_refuses_parts_of_other_dtypes():
    """int32 ids in one part and int64 in another were promoted to int64 (ids and float weights to
    floats), silently; now a ValueError naming the part and both dtypes. A part without values
    takes the others' dtype (as an empty sample does in from_dict); lengths are int64 whatever
    int dtype the parts were built with."""
    a = KeyedJagged(["x"], torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([1, 2]))
    b = KeyedJagged(["x"], torch.tensor([4, 5]), torch.tensor([2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"parts\[1\] has values of dtype torch.int64, parts\[0\] torch.int32"):
        KeyedJagged.concat([a, b])
    weights = KeyedJagged(["x"], torch.tensor([0.5, 1.5]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"parts\[1\] has values of dtype torch.float32, parts\[0\] torch.int64"):
        KeyedJagged.concat([b, weights])
    empty = KeyedJagged.from_dict({"x": [[]]})  # int64: from_dict's default for a batch without values
    for parts in ([a, empty], [empty, a]):
        joined = KeyedJagged.concat(parts)
        assert joined.values.dtype == torch.int32 and joined.values.tolist() == [1, 2, 3]
    assert KeyedJagged.concat([b, a.permute([])]).lengths.tolist() == [2]
    with pytest.raises(TypeError, match=r"parts\[1\] is a Tensor"):
        KeyedJagged.concat([a, torch.arange(3)])


@pytest.mark.parametrize("sizes", [[-1, 4], [1.5, 1.5], [True, 2], [1, None]])
def test_split_refuses_negative_or_non_integer_sizes(sizes):
    """[-1, 4] (summing to the batch) ended in torch.arange's RuntimeError, [1.5, 1.5] in an
    error about sample indices the caller never passed."""
    with pytest.raises(ValueError, match=r"split: sizes must be non-negative integers summing to the batch size 3"):
        _kj().split(sizes)


def test_split_takes_integer_sizes_of_any_kind():
    import numpy as np

    kj = _kj()
    expected = [p.values.tolist() for p in kj.split([1, 2])]
    for sizes in ((1, 2), [np.int64(1), 2], torch.tensor([1, 2]), [0, 1, 2, 0]):
        assert [p.values.tolist() for p in kj.split(sizes) if p.batch_size] == expected
    with pytest.raises(TypeError, match="sizes must be a sequence"):
        kj.split(3)


def test_split_takes_a_numpy_array_of_sizes():
    """split(np.array([1, 2])) (np.bincount's counts, say) worked before sizes were checked; the
    check took tensors and sequences only and refused it with a TypeError."""
    import numpy as np

    kj = _kj()
    expected = [p.values.tolist() for p in kj.split([1, 2])]
    for sizes in (np.array([1, 2]), np.array([1, 2], dtype=np.int32)):
        assert [p.values.tolist() for p in kj.split(sizes)] == expected
    with pytest.raises(ValueError, match=r"split: sizes must be non-negative integers .* got \[1.0, 2.0\]"):
        kj.split(np.array([1.0, 2.0]))
    for sizes in (np.array(3), torch.tensor(3), np.array([[1, 2]])):  # not 1-D: no sizes to go through
        with pytest.raises(TypeError, match=r"split: sizes must be a 1-D sequence of sample counts, got shape"):
            kj.split(sizes)


@pytest.mark.parametrize("indices", [torch.tensor([[0], [2]]), torch.tensor([[0, 2]]), torch.tensor(1), [[0, 2]]])
def test_permute_refuses_indices_that_are_not_1d(indices):
    """(2, 1) indices broadcast against the key rows: x came from sample 0 and y from sample 2 in
    one sample (a batch of 1), silently; a 0-d index was a batch of one."""
    kj = _kj()
    with pytest.raises(ValueError, match=r"sample indices must be a 1-D tensor \(or list\), got shape"):
        kj.permute(indices)
    with pytest.raises(ValueError, match="1-D"):
        kj.sample_major(indices)


def test_permute_out_of_range_names_the_range():
    with pytest.raises(IndexError, match=r"must be in \[0, 3\) \(the batch size\), got \[-1, 1\]"):
        _kj().permute(torch.tensor([1, -1]))
    # the upper bound too: index batch_size read the next key's first sample (or torch's own error)
    for method in ("permute", "sample_major"):
        with pytest.raises(IndexError, match=r"must be in \[0, 3\) \(the batch size\), got \[0, 3\]"):
            getattr(_kj(), method)(torch.tensor([0, 3]))


def test_aligned_lengths_checks_every_sample():
    ragged = KeyedJagged(["x", "y"], torch.arange(8), torch.tensor([1, 2, 1, 4]))  # aligned in sample 0 only
    with pytest.raises(ValueError, match="same length in every sample"):
        ragged.aligned_lengths()


def test_windows_refuse_float_positions():
    """start/stop were cast to int64: 0.5 was truncated to 0 silently."""
    kj = KeyedJagged(["x", "y"], torch.arange(12), torch.tensor([1, 2, 3, 1, 2, 3]))
    with pytest.raises(ValueError, match="start must be integers, got dtype torch.float32"):
        kj.windows([2], [0.5], [2])
    with pytest.raises(ValueError, match="stop must be integers"):
        kj.windows([2], [0], torch.tensor([2.0]))
    assert kj.windows([2], [1], [3]).values.tolist() == [4, 5, 10, 11]


def test_from_sample_major_refuses_flat_lengths():
    """Key-major (flat) lengths were read as one key's lengths per sample."""
    kj = _kj()
    values, per_key = kj.sample_major(torch.arange(3))
    with pytest.raises(ValueError, match=r"lengths must be \(samples, keys\) = \(\*, 2\), got shape \(6,\)"):
        KeyedJagged.from_sample_major(kj.keys, values, per_key.reshape(-1))
    assert KeyedJagged.from_sample_major(kj.keys, values, per_key) == kj


@pytest.mark.parametrize("values, lengths, match", [
    (torch.arange(10), [[1, 2], [3, 0]], "sum to 6 but values has 10"),  # the last 4 values were dropped, silently
    (torch.arange(3), [[1, 2], [3, 0]], "sum to 6 but values has 3"),  # an IndexError from the gather
    (torch.arange(3), [[4, -1]], "non-negative integer"),  # repeat_interleave's "repeats can not be negative"
    (torch.arange(3), [[1.0, 2.0]], "non-negative integer"),  # repeat_interleave's NotImplementedError
])
def test_from_sample_major_refuses_lengths_that_do_not_fit_the_values(values, lengths, match):
    with pytest.raises(ValueError, match=match):
        KeyedJagged.from_sample_major(["a", "b"], values, torch.tensor(lengths))


def test_equality_requires_the_same_values_dtype_and_device():
    kj = _kj()
    as_int32 = KeyedJagged(kj.keys, kj.values.int(), kj.lengths.int())
    assert as_int32 != kj and kj != as_int32
    assert KeyedJagged(kj.keys, kj.values.float(), kj.lengths) != kj
    assert KeyedJagged(kj.keys, kj.values.int(), kj.lengths) == as_int32
    # another device is unequal (torch.equal would raise across devices, and meta has no equal)
    on_meta = KeyedJagged(kj.keys, kj.values.to("meta"), kj.lengths)
    assert on_meta != kj and kj != on_meta
