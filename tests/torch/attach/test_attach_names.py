"""Names by construction (issue 77 H2 and item 2): every key an attached average writes into a
state dict or DCP comes back as the name it was, for any name torch accepts for a module, a
parameter or a buffer (``/``, ``//``, a trailing ``/``, digits, unicode, ``%``, spaces...). The
per-parameter form keys the record's rows by their index in the list of names it holds
(``_state/attached.py``): no key is a name, so DCP's flattening (which splits keys at dots) cannot
change one. Each carrier path saves and resumes bit for bit: the top-level key
(``optimizer.state_dict()``, ``torch.save``), DCP's ``get_state_dict`` / ``set_state_dict`` with
``flatten_optimizer_state_dict`` off and on, ``dcp.save`` / ``dcp.load``, and FSDP2 on 2 gloo
ranks: no path saves what it cannot load. On the base (``.`` written as ``/``), every DCP resume
of a name holding ``/`` was refused ("checkpoint does not match this model")."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.attach import averaged, dcp_options, same, save_load
from torch import nn

from fastema.torch import ATTACH_KEY, EMA

sd = pytest.importorskip("torch.distributed.checkpoint.state_dict")

#: names torch accepts that an escape of '.' as '/' (or '/' as '//') cannot tell apart
HOSTILE = ("enc/0", "bn/1", "head", "a//b", "a/", "/0", "0", "é/名", "%2E", "a b", "fastema",
           "names", "meta", "0/1", "/", "//", "a/b/", "~/", "others")


def _legal(name: str) -> bool:
    """A name ``ModuleDict`` and ``register_parameter`` / ``register_buffer`` take."""
    return (bool(name) and "." not in name and name not in ("blocks", "_hostile")
            and not hasattr(nn.ModuleDict(), name) and not hasattr(nn.Module(), name))


NAMES = st.one_of(st.sampled_from(HOSTILE),
                  st.text(st.characters(blacklist_characters=".", blacklist_categories=("Cs",)),
                          min_size=1, max_size=6)).filter(_legal)


class Hostile(nn.Module):
    """A frozen Linear, a BatchNorm (copied float and integer buffers), a trainable Linear, all in
    a ModuleDict under ``names[:3]``; a parameter, a float buffer and an integer buffer of the
    root under ``names[3:6]``."""

    def __init__(self, names, seed):
        super().__init__()
        torch.manual_seed(seed)
        self._hostile = list(names)
        self.blocks = nn.ModuleDict({names[0]: nn.Linear(4, 4), names[1]: nn.BatchNorm1d(4),
                                     names[2]: nn.Linear(4, 4)})
        self.blocks[names[0]].requires_grad_(False)
        self.register_parameter(names[3], nn.Parameter(torch.randn(4)))
        self.register_buffer(names[4], torch.randn(4))
        self.register_buffer(names[5], torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        for m in self.blocks.values():
            x = m(x)
        getattr(self, self._hostile[5]).add_(1)
        return x * getattr(self, self._hostile[3]) + getattr(self, self._hostile[4])


def _make(names, seed, buffers="copy"):
    model = Hostile(names, seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt, EMA(model, 0.9, buffers=buffers).attach(opt)


def _train(model, opt, steps, at=0):
    g = torch.Generator().manual_seed(100 + at)
    for _ in range(steps):
        model(torch.randn(5, 4, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _whole(ema):
    """Every tensor of the average's state, by section and name."""
    out = {}
    for k, v in ema.state_dict().items():
        if isinstance(v, dict):
            out.update({f"{k}/{n}": t.clone() for n, t in v.items()})
    return out


def _save(model, opt, path, tmp):
    """``(what the path saved, ...)`` for the resume (a file's contents, as ``weights_only``)."""
    if path == "top":
        return save_load((model.state_dict(), opt.state_dict()))
    if path in ("dcp", "dcp-flat"):
        msd, osd = sd.get_state_dict(model, opt, options=dcp_options(path == "dcp-flat"))
        return save_load((msd, osd))
    import torch.distributed.checkpoint as dcp

    msd, osd = sd.get_state_dict(model, opt, options=dcp_options(path == "file-flat"))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    return None


def _load(model, opt, path, saved, tmp):
    if path == "top":
        model.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
    elif path in ("dcp", "dcp-flat"):
        sd.set_state_dict(model, opt, model_state_dict=saved[0], optim_state_dict=saved[1],
                          options=dcp_options(path == "dcp-flat"))
    else:
        import torch.distributed.checkpoint as dcp

        options = dcp_options(path == "file-flat")
        msd, osd = sd.get_state_dict(model, opt, options=options)   # the template (a fresh run's)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(tmp))
        sd.set_state_dict(model, opt, model_state_dict=state["model"],
                          optim_state_dict=state["optim"], options=options)


def _resumes(names, path, tmp, buffers="copy"):
    """Train 2 steps, save through ``path``, train 1 more: the uninterrupted run; a fresh run
    (other weights) loads the save and trains 1 more: every tensor of the average, its count and
    the weights bit for bit those of the uninterrupted run."""
    model, opt, ema = _make(names, 0, buffers)
    _train(model, opt, 2)
    saved = _save(model, opt, path, tmp)
    at_save = _whole(ema)
    _train(model, opt, 1, at=1)
    model2, opt2, ema2 = _make(names, 1, buffers)
    _load(model2, opt2, path, saved, tmp)
    assert ema2.updates == 2 and same(_whole(ema2), at_save)
    _train(model2, opt2, 1, at=1)
    assert ema2.updates == ema.updates == 3 and same(_whole(ema2), _whole(ema))
    assert all(torch.equal(p, q) for p, q in zip(model2.state_dict().values(),
                                                 model.state_dict().values()))
    return saved


@pytest.mark.parametrize("path", ["top", "dcp", "dcp-flat", "file", "file-flat"])
@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_names_holding_slashes_save_and_resume_on_every_path(tmp_path, path, buffers):
    """The reproduction of H2 (a ``ModuleDict`` key ``enc/0``, a BatchNorm under ``bn/1``), with
    every hostile name at once, through every path, to a file and back."""
    saved = _resumes(HOSTILE[:6], path, tmp_path / "ckpt", buffers)
    if path in ("dcp", "dcp-flat"):                 # the per-parameter form: no key is a name
        sep = "." if path == "dcp-flat" else "\x00"     # flattened: one key, dots between
        ours = [k.split(f"{sep}{ATTACH_KEY}{sep}", 1)[1].replace(sep, "\x00")
                for k in _key_paths(saved[1]) if f"{sep}{ATTACH_KEY}{sep}" in k]   # below the entry

        assert ours and all(p in ("meta", "names", "averaged") or p.split("\x00")[-1].isdigit()
                            for p in ours), ours


def _key_paths(tree, at=()):
    if not isinstance(tree, dict):
        return ["\x00".join(map(str, at))]
    return [k for key, v in tree.items() for k in _key_paths(v, (*at, key))]


@settings(max_examples=30)
@given(names=st.lists(NAMES, min_size=6, max_size=6, unique=True),
       path=st.sampled_from(["top", "dcp", "dcp-flat"]))
def test_any_name_torch_accepts_comes_back_as_it_was(names, path):
    """Hypothesis over the names of modules, parameters and buffers: each carrier path in memory
    (the files: the test above) resumes bit for bit."""
    _resumes(names, path, None)


def test_a_damaged_name_list_is_refused_by_name_and_loads_nothing():
    model, opt, ema = _make(HOSTILE[:6], 0)
    _train(model, opt, 2)
    msd, osd = sd.get_state_dict(model, opt)
    holder = next(v[ATTACH_KEY] for v in osd["state"].values() if "meta" in v.get(ATTACH_KEY, {}))
    holder["copied"] = {**holder["copied"], "7": torch.zeros(4)}      # an entry no name indexes
    model2, opt2, ema2 = _make(HOSTILE[:6], 1)
    before = averaged(ema2)
    with pytest.raises(ValueError, match=r"'copied' entry does not match the names its record "
                                         r"holds.*nothing was loaded"):
        sd.set_state_dict(model2, opt2, model_state_dict=msd, optim_state_dict=osd)
    assert same(averaged(ema2), before) and ema2.updates == 0


# ------------------------------------------------------------ FSDP2 on 2 gloo ranks


def _fsdp_resume(rank, world, folder):
    """A few hostile names, FSDP2 over 2 ranks: dcp.save of get_state_dict (flatten off and on),
    then fresh runs load one each; every row of the average bit for bit the uninterrupted run's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    out = {}
    for i, (names, flat) in enumerate(((HOSTILE[:6], False),
                                       (("a//b", "/", "é/名", "0/1", "%2E", "a/"), True))):
        if True:
            def make(seed, names=names):
                model = Hostile(names, seed)
                for m in model.blocks.values():
                    fully_shard(m)
                fully_shard(model)
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                        lr=1e-2)
                return model, opt, EMA(model, 0.9, buffers="average").attach(opt)

            path = f"{folder}/ckpt{i}{int(flat)}"
            model, opt, ema = make(0)
            _train(model, opt, 2)
            msd, osd = sd.get_state_dict(model, opt, options=dcp_options(flat))
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
            _train(model, opt, 1, at=1)
            model2, opt2, ema2 = make(1)
            msd, osd = sd.get_state_dict(model2, opt2, options=dcp_options(flat))
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=path)
            sd.set_state_dict(model2, opt2, model_state_dict=state["model"],
                              optim_state_dict=state["optim"], options=dcp_options(flat))
            _train(model2, opt2, 1, at=1)
            a, b = ema.state_dict()["averaged"], ema2.state_dict()["averaged"]
            assert a.keys() == b.keys() and ema2.updates == ema.updates == 3
            for n in a:
                for side, t in (("a", a[n]), ("b", b[n])):   # buffers are plain tensors
                    whole = t.full_tensor() if hasattr(t, "full_tensor") else t
                    out[f"{i}{int(flat)}/{n}/{side}"] = whole.clone()
    return out


def test_fsdp2_saves_and_resumes_hostile_names_on_two_ranks(tmp_path):
    from dist import run_ranks

    torch_dist = pytest.importorskip("torch.distributed")
    if not torch_dist.is_available() or not torch_dist.is_gloo_available():
        pytest.skip("needs gloo")
    for r in run_ranks(_fsdp_resume, tmp_path, 2, str(tmp_path)):
        pairs = sorted(k[:-2] for k in r if k.endswith("/a"))
        assert len(pairs) >= 2 * 6
        for k in pairs:
            assert torch.equal(r[f"{k}/a"], r[f"{k}/b"]), k
