import torch

import gpukernels_common
from gpukernels_common.testing import assert_close


def test_public_api():
    assert gpukernels_common.__version__.count(".") == 2
    assert gpukernels_common.select_backend(torch.zeros(1)) in tuple(gpukernels_common.Backend)
    assert_close(torch.ones(3), torch.ones(3))
