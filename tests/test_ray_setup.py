"""The Ray set-up module's pure parts (no Ray instance started)."""

from __future__ import annotations

import pytest

from gaelle_ray.ray_setup import check_cpu_budget


def test_check_cpu_budget():
    assert check_cpu_budget(4, 2, 1.0, 1.0) == 2
    assert check_cpu_budget(3, 2, 1.0, 1.0) == 1
    assert check_cpu_budget(2.5, 2, 1.0, 0.5) == 0.5
    with pytest.raises(ValueError, match="deadlock"):
        check_cpu_budget(2, 2, 1.0, 1.0)  # the classic local 2-CPU deadlock
    with pytest.raises(ValueError, match="data.crop_cpus"):
        check_cpu_budget(8, 2, 3.0, 3.0)
    with pytest.raises(ValueError, match="crop_cpus"):
        check_cpu_budget(8, 1, 1.0, 0.0)
