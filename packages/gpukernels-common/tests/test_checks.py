import pytest

from gpukernels_common.checks import check_sizes


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
