import pytest

from gpukernels_common.checks import check_numbers, check_sizes


@pytest.mark.parametrize("value", [0, -3, 2.0, 16.5, True, "8", None])
def test_check_sizes_refuses_a_bad_size_naming_it(value):
    with pytest.raises(ValueError, match=rf"d_model must be an integer >= 1, got {value!r}"):
        check_sizes(n_items=5, d_model=value)


def test_check_sizes_takes_integers_from_the_minimum():
    import numpy as np

    sizes = check_sizes(d_model=1, n_items=np.int64(7))
    assert sizes == (1, 7) and all(type(v) is int for v in sizes)  # Python ints, in the order given
    assert check_sizes(0, dropout_layers=0) == (0,)
    with pytest.raises(ValueError, match="layers must be an integer >= 0, got -1"):
        check_sizes(0, layers=-1)


@pytest.mark.parametrize("value, above, ok", [(0, False, True), (0, True, False), (0.5, True, True), (-1e-9, False, False),
                                              (float("nan"), False, False), (float("inf"), False, False),
                                              (True, False, False), ("1", False, False), (None, False, False)])
def test_check_numbers_takes_finite_reals_from_the_minimum(value, above, ok):
    if ok:
        check_numbers(0, above=above, coef=value)
    else:
        with pytest.raises(ValueError, match=rf"coef must be a finite number {'>' if above else '>='} 0, got "):
            check_numbers(0, above=above, coef=value)
