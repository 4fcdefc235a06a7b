"""``fastema._launch.cuda.kernel_refs`` held to ``fastema.kernels.cuda``: the factories it names and the
number of arguments each takes, and, for every variant of the shipped code (both sets' indexes), the
name its :class:`Kernel` has, its own launch bounds and its dispatcher equal the real factory's."""
import inspect
import json
import os
import re

import pytest

pytest.importorskip("numba.cuda")

from fastema._launch.cuda import device_code, kernel_refs  # noqa: E402
from fastema.kernels import cuda as K  # noqa: E402
from fastema.kernels._store.identity import VARIANTS  # noqa: E402


def _shipped_kernels() -> set:
    names = set()
    for set_name in ("cu12", "cu13"):
        path = os.path.join(device_code.device_dir(), set_name, "index.json")
        if os.path.exists(path):
            with open(path) as f:
                names |= {key.partition("[")[0] for key in json.load(f)["variants"]}
    return names


def test_the_factories_are_kernels_cudas():
    made = {name for name, f in vars(K).items() if callable(f) and hasattr(f, "cache_clear")
            and name.endswith("_kernel")}
    assert set(kernel_refs.FACTORIES) == made
    for name, count in kernel_refs.FACTORIES.items():
        assert len(inspect.signature(getattr(K, name)).parameters) == count, name


def test_every_shipped_variant_by_name_is_the_real_one():
    names = _shipped_kernels()
    if not names:
        pytest.skip("no shipped set here")
    for full in sorted(names):
        factory, numbers = re.fullmatch(r"(\w+)\(([\d,]*)\)", full).groups()
        numbers = tuple(int(n) for n in numbers.split(",") if n)
        ref = getattr(kernel_refs, factory)(*numbers)
        real = getattr(K, factory)(*numbers)
        assert ref.name == VARIANTS[real] == full
        assert ref.own_bounds == real.targetoptions.get("launch_bounds"), full
        assert ref.dispatcher() is real and kernel_refs.dispatcher(ref) is real
        assert kernel_refs.dispatcher(real) is real


def test_a_kernel_is_one_object_per_name_and_takes_its_arguments_by_position():
    assert kernel_refs.lerp_kernel(0, 1, False, True) is kernel_refs.lerp_kernel(0, 1, 0, 1)
    assert kernel_refs.lerp_kernel(0, 1, 0, 1) != kernel_refs.lerp_kernel(0, 1, 0, 0)
    with pytest.raises(TypeError, match="takes 4 arguments by position"):
        kernel_refs.lerp_kernel(0, 1, 0)
