"""How an attached average tells DCP's calls (issue 72 item 3, ``torch/_state/dcp_calls.py``): the
one table of DCP's private names it relies on, held to this torch's real signatures; a torch
that renamed or changed one fails loudly, naming the torch version and what to do (a stand-in
module: nothing of torch's is patched); and every entry point of torch's that saves or loads
optimizer state, in one process, flatten on and off: ``get_state_dict`` / ``set_state_dict``,
``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, ``dcp.save`` / ``dcp.load``,
``dcp.async_save``. Each carries the average in the per-parameter entries (what DCP keeps), never
counts DCP's lr-0 dummy step, and resumes bit for bit against an uninterrupted run. The sharded
and multi-rank forms: ``test_attach_dcp.py``, ``test_attach_dcp_full.py``,
``test_attach_matrix.py``."""
import dataclasses
import inspect
import re
import types

import pytest
import torch
from support.attach import averaged, dcp_load, dcp_options, dcp_save, rank_step, same, save_load
from torch import nn

from fastema.torch import ATTACH_KEY, EMA
from fastema.torch._state import dcp_calls

sd = pytest.importorskip("torch.distributed.checkpoint.state_dict")
STEPS, MORE = 3, 2


def test_the_table_holds_this_torchs_real_signatures():
    """Every name of the table is in torch's module with the parameters (fields) it names, and the
    code the hooks look for is each function's own, under its decorators."""
    assert set(dcp_calls.CONTRACT) == {"_init_optim_state", "_get_optim_state_dict",
                                       "_load_optim_state_dict", "_StateDictInfo"}
    for name, (wanted, _) in dcp_calls.CONTRACT.items():
        obj = getattr(sd, name)
        if isinstance(obj, type):
            have = {f.name for f in dataclasses.fields(obj)}
        else:
            have = set(inspect.signature(inspect.unwrap(obj)).parameters)
        assert set(wanted) <= have, (name, wanted, have)
    codes = dcp_calls.check(sd)
    assert codes == {n: inspect.unwrap(getattr(sd, n)).__code__ for n in dcp_calls.CONTRACT
                     if n != "_StateDictInfo"}
    assert dcp_calls.verified(sd) is dcp_calls.verified(sd)      # checked once


def _stand_in(name, replacement):
    """A module holding what torch's does, but ``name`` (gone where ``replacement`` is None)."""
    module = types.ModuleType(dcp_calls.MODULE)
    module.__dict__.update({k: v for k, v in vars(sd).items() if k != name})
    if replacement is not None:
        module.__dict__[name] = replacement
    return module


def _renamed_parameters(model, optimizer, options):   # another torch's: other names
    return {}


@pytest.mark.parametrize("name", sorted(dcp_calls.CONTRACT))
@pytest.mark.parametrize("change", ["gone", "changed", "no code"])
def test_a_torch_that_renamed_or_changed_a_function_fails_loudly_naming_its_version(name, change):
    replacement = 3 if change == "no code" else None
    if change == "changed":
        replacement = (dataclasses.make_dataclass("_StateDictInfo", ["other"])
                       if name == "_StateDictInfo" else _renamed_parameters)
    module = _stand_in(name, replacement)
    said = {"gone": "is gone", "no code": "is of type int, not a function",
            "changed": "takes (" + ("other" if name == "_StateDictInfo"
                                    else "model, optimizer, options")}[change]
    wanted = ", ".join(dcp_calls.CONTRACT[name][0])
    for attempt in range(2):                       # nothing kept: checked (and refused) again
        with pytest.raises(dcp_calls.DCPContractBroken,
                           match=rf"torch {re.escape(torch.__version__)} changed them: "
                                 rf"{re.escape(name)}\({re.escape(wanted)}\).*{re.escape(said)}"
                                 rf".*detach\(\)"):
            dcp_calls.verified(module)
    with pytest.raises(dcp_calls.DCPContractBroken):   # what the hooks call, with that module
        dcp_calls.context(module)


def _model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 1)).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, EMA(model, 0.9).attach(opt)




def _keys(tree, at=""):
    """Every key path of a nested state dict, as ``a/b/c``."""
    if not isinstance(tree, dict):
        return [at]
    return [k for key, v in tree.items() for k in _keys(v, f"{at}/{key}" if at else str(key))]


def _save(model, opt, path, entry, flat):
    options = dcp_options(flat)
    if entry == "optimizer_state_dict":            # the optimizer's getter alone
        return save_load((sd.get_optimizer_state_dict(model, opt, options=options),
                          model.state_dict()))
    if entry == "state_dict":
        return save_load(sd.get_state_dict(model, opt, options=options)[::-1])
    how = "async_save" if entry == "async_save" else "save"
    return dcp_save(model, opt, path, options, how), None


def _load(model, opt, path, entry, flat, saved):
    osd, msd = saved
    options = dcp_options(flat)
    if entry == "optimizer_state_dict":            # no get first: DCP's dummy step runs here
        model.load_state_dict(msd)
        sd.set_optimizer_state_dict(model, opt, osd, options=options)
    elif entry == "state_dict":
        sd.set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd, options=options)
    else:
        dcp_load(model, opt, path, options)


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flatten"])
@pytest.mark.parametrize("entry", ["state_dict", "optimizer_state_dict", "save", "async_save"])
def test_every_dcp_entry_point_carries_the_average_in_one_process(tmp_path, entry, flat):
    """``save``/``async_save``: ``get_state_dict`` + ``dcp.save``/``dcp.async_save``, then
    ``get_state_dict`` + ``dcp.load`` + ``set_state_dict``. No process group: DCP's getter is told
    by its frame and gets the per-parameter form (plain float32 tensors)."""
    fresh_model, fresh_opt, fresh = _model(2)
    sd.get_optimizer_state_dict(fresh_model, fresh_opt, options=dcp_options(flat))
    assert fresh.updates == 0 and len(fresh_opt.state) > 0     # DCP's dummy step: no update
    model, opt, ema = _model(0)
    for s in range(STEPS):
        rank_step(model, opt, s)
    assert ATTACH_KEY in opt.state_dict()                      # outside DCP: the top-level key
    saved = _save(model, opt, str(tmp_path / "ckpt"), entry, flat)
    keys = _keys(saved[0])
    assert ATTACH_KEY not in saved[0] and any(f"/{ATTACH_KEY}" in k or f".{ATTACH_KEY}" in k
                                              for k in keys if k.startswith("state")), keys[:8]
    at_save = averaged(ema)
    for s in range(STEPS, STEPS + MORE):
        rank_step(model, opt, s)
    model, opt, resumed = _model(1)
    _load(model, opt, str(tmp_path / "ckpt"), entry, flat, saved)
    assert resumed.updates == STEPS and same(averaged(resumed), at_save)
    assert all(t.dtype == torch.float32 for t in averaged(resumed).values())
    for s in range(STEPS, STEPS + MORE):
        rank_step(model, opt, s)
    assert resumed.updates == ema.updates == STEPS + MORE
    assert same(averaged(resumed), averaged(ema))
