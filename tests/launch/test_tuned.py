"""The launch layer's own ``with`` blocks, what the tests and ``python -m fastema warm`` change it
through instead of patching its names (tests/test_injection.py): ``config.tuned``,
``cpu.serial_twins``, ``cpu.kernels_from``, ``device_code.afresh``. Each sets what it says for the
block and puts it back however the block ends; ``tuned`` refuses what it cannot set, changing
nothing."""
import inspect

import numpy as np
import pytest

from fastema import ema_update_
from fastema._launch import config
from fastema._launch.cpu import pool as C
from fastema._launch.cuda import device_code as D
from fastema.kernels import cpu as K


def test_tuned_sets_the_tunables_for_the_block_and_puts_them_back():
    before = config.CUDA_CHUNK, config.CPU_THREADS, config.CUDA_CACHE, config.CPU_SERIAL_BELOW
    with config.tuned(CUDA_CHUNK=16, CPU_THREADS=2, CUDA_CACHE=not before[2], CPU_SERIAL_BELOW=0):
        assert (config.CUDA_CHUNK, config.CPU_THREADS, config.CUDA_CACHE, config.CPU_SERIAL_BELOW) == \
            (16, 2, not before[2], 0)
        with config.tuned(CUDA_CHUNK=32, CPU_THREADS=None):          # nested: the inner one wins
            assert config.CUDA_CHUNK == 32 and config.CPU_THREADS is None
        assert config.CUDA_CHUNK == 16 and config.CPU_THREADS == 2
    assert (config.CUDA_CHUNK, config.CPU_THREADS, config.CUDA_CACHE, config.CPU_SERIAL_BELOW) == before
    with pytest.raises(KeyError):                                      # however the block ends
        with config.tuned(CPU_CHUNK=16):
            raise KeyError
    assert config.CPU_CHUNK == 1 << 14


def test_the_launchers_read_a_tuned_value_at_the_next_call():
    """A serial threshold of 0 in the block takes the parallel kernel (where there are threads),
    the default after it the serial one: the ``parallel`` each kernel factory is asked for."""
    seen = []

    class Noting:                                        # fastema.kernels.cpu, noting the factories' calls
        def __getattr__(self, name):
            real = getattr(K, name)
            if not name.endswith("_kernel"):
                return real

            def factory(*a, **kw):
                seen.append(inspect.signature(real).bind(*a, **kw).arguments["parallel"])
                return real(*a, **kw)
            return factory

    a, b = np.zeros(1 << 12, np.float32), np.ones(1 << 12, np.float32)
    with C.kernels_from(Noting()):
        with config.tuned(CPU_SERIAL_BELOW=0, CPU_CHUNK=1 << 10):
            ema_update_(a, b, 0.5)
        ema_update_(a, b, 0.5)
    assert C.K is K                                      # put back
    assert seen == [C.team() > 0, False], seen
    np.testing.assert_allclose(a, 0.75)


@pytest.mark.parametrize("values, said", [
    ({"CUDA_CHUNKS": 16}, "CUDA_CHUNKS=16 (not a launch tunable: CPU_CHUNK, "),
    ({"CUDA_DISPATCHER_CACHE": True}, "CUDA_DISPATCHER_CACHE=True (not a launch tunable"),
    ({"CUDA_THREADS": 0}, "CUDA_THREADS=0 (takes a positive whole number)"),
    ({"CPU_SERIAL_BELOW": -1}, "CPU_SERIAL_BELOW=-1 (takes a whole number, 0 or more)"),
    ({"CPU_CHUNK": 16.0}, "CPU_CHUNK=16.0 (takes a positive whole number)"),
    ({"CUDA_MAX_BLOCKS": True}, "CUDA_MAX_BLOCKS=True (takes a positive whole number)"),
    ({"CUDA_CACHE": 1}, "CUDA_CACHE=1 (takes True or False)"),
    ({"CPU_THREADS": 0}, "CPU_THREADS=0 (takes a positive whole number, or None"),
    ({"CPU_CHUNK": 16, "CUDA_THREADS": None}, "CUDA_THREADS=None (takes a positive whole number)"),
])
def test_tuned_refuses_what_it_cannot_set_and_changes_nothing(values, said):
    before = {name: getattr(config, name) for name in config._TUNABLE}
    with pytest.raises(ValueError, match="fastema: config.tuned cannot set .*nothing was changed") as caught:
        with config.tuned(**values):
            pytest.fail("the block ran")
    assert said in str(caught.value)
    assert {name: getattr(config, name) for name in config._TUNABLE} == before


def test_serial_twins_and_afresh_put_back_what_they_change(tmp_path):
    parallel = C.PARALLEL
    with pytest.raises(KeyError):
        with C.serial_twins():
            assert C.PARALLEL is False
            raise KeyError
    assert C.PARALLEL is parallel
    shipped, warned = D.device_dir(), D._WARNED
    with D.afresh(str(tmp_path)):
        assert D.device_dir() == str(tmp_path) and D._WARNED == set() and D._WARNED is not warned
        with pytest.warns(RuntimeWarning) as said:
            assert D.sets() == {}
        assert sorted(str(w.message).split()[3] for w in said) == ["cu12", "cu13"]   # no shipped cuNN
        with D.afresh():                                 # the same folder, the records afresh again
            assert D.device_dir() == str(tmp_path) and D._WARNED == set()
    assert D.device_dir() == shipped and D._WARNED is warned
    assert D.sets.cache_info().currsize == 0             # read again from the shipped folder
