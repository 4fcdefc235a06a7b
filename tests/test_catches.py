"""Errors are caught on purpose (docs/architecture.md, rules): a handler in ``fastema/`` or
``kernels/`` that catches everything (``except Exception``, ``except BaseException``, a bare
``except:`` or a tuple holding one of them) either ends by re-raising what it caught (a clean-up, a
restore) or is listed here with its reason. A broad catch that swallowed a TypeError once read
"the driver refused" and lost every shipped kernel. Checked from the AST."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).parents[1]
_BROAD = ("Exception", "BaseException")

# (file, the function holding it) -> the reason of each broad catch in it that does not end by
# re-raising, in source order. The rule fails on one not listed and on a listed one that is gone.
BROAD_CATCHES = {
    # -- swallowed, each with what is done instead
    ("fastema/_launch/compiler.py", "lowered"): [
        "the ISA probe at build: any failure of the lowering or the link means this toolchain cannot "
        "make the newer ISA, and the PTX it was given ships instead (owned by the launch layer)"],
    ("fastema/_backends/torch.py", "Torch.layout_guard"): [
        "torch's private TensorGuards of another signature: the streamed check, which is always "
        "right, runs instead (owned by the torch backend)"],
    ("fastema/_backends/torch.py", "_tensor_guards"): [
        "torch's private TensorGuards probed once on known tensors: any failure or wrong answer "
        "means it is not used (owned by the torch backend)"],
    ("fastema/_launch/drivers.py", "_Numba.any_capturing"): [
        "another framework's current-stream getter asked before deferred frees (CuPy's at interpreter "
        "shutdown, a test's reader): its failure is not the launch's, so it counts as capturing and the "
        "frees stay deferred until a later safe point (owned by the launch layer)"],
    ("fastema/merge/_core.py", "_merge"): [
        "a second error while closing the inputs after the merge failed: the first, which stopped "
        "the merge, is the one raised; the partial output is discarded either way"],
    ("fastema/torch/_placement/folds.py", "_before_fork"): [
        "a fork hook never raises (os.fork would fail in the parent for a fold's error); the "
        "queue's own error is kept and raised by its next use"],
    ("kernels/_cache.py", "_checked.CheckedFile._load_index"): [
        "numba's cache index unpickled from disk: a truncated, emptied or garbled file raises "
        "whatever the byte it stops at gives; warned (RuntimeWarning naming the file) and read "
        "as empty, so the next save rewrites it"],
    ("kernels/_cache.py", "_checked.CheckedFile._load_data"): [
        "a cached kernel unpickled from disk, damaged likewise: warned and read as a miss; the "
        "save after the compile overwrites it (an OSError, the file gone meanwhile, re-raised "
        "before, is numba's own miss)"],
    # -- handed on: kept and raised later in another place
    ("fastema/_launch/cpu.py", "start_pool.start"): [
        "the pool starter's thread: whatever it raised is raised in the caller's thread"],
    ("fastema/merge/_core.py", "_close"): [
        "every input closes; the first error is raised after all"],
    # -- converted into the library's error, the original as its cause or first line
    ("fastema/_io/dcp.py", "load_dcp_metadata"): [
        "fastema's own unpickler on a truncated or garbled file: EOFError, struct and index errors "
        "at whatever byte it stops; a ValueError naming the file and the first line of the cause"],
    ("fastema/_io/dcp.py", "dcp_reader.read"): [
        "torch's dcp.load on a file the user gave: CheckpointException wrapping each rank's "
        "failure, or what its reader hits; the root cause named (out of memory, a refused "
        "pickle, its first line)"],
    ("fastema/merge/_torch_inputs.py", "DcpSource._tensor"): [
        "torch's dcp.load on an input of the merge: a MergeError naming the tensor and the root "
        "cause's first line"],
    ("fastema/cli/warm.py", "_warm_cuda"): [
        "numba's own compile of the missing variants: any failure is the exit status 1 with its "
        "type and message, and the CUDA check to run (a command line's last word)"],
    ("fastema/torch/_state/attach_checks.py", "_refuse_dropping"): [
        "the user's optimizer's state_dict() override, called once at attach() to check that it "
        "keeps the average's entry: whatever it raises (a state not consolidated yet) becomes the "
        "RuntimeError naming the call and what to do, the error its cause; nothing attached"],
    ("fastema/torch/_state/attached.py", "_decode"): [
        "the attached average's counter record decoded from a checkpoint: any failure of json.loads "
        "(RecursionError of a deeply nested record too) is damage, a ValueError on every rank"],
    ("fastema/jax/_face.py", "EMA.update"): [
        "re-raised unless a leaf of the tree was donated before this read, which is then named"],
    ("fastema/torch/_swap.py", "ShadowSwap.exchange"): [
        "re-raised unless a split average is still swapped in: then the error says what this "
        "rank holds, with the original as its cause"],
    ("fastema/torch/compat/ema_pytorch/_model.py", "_EmaPytorchBase._make_ema_model"): [
        "copy.deepcopy of the user's model: whatever it raises (LazyLinear's, a module's own "
        "__deepcopy__) becomes the TypeError saying to pass ema_model=, the error its cause"],
    ("fastema/torch/compat/ema_pytorch/_pytree.py", "EMAPytree.__init__"): [
        "copy.deepcopy of the user's tree likewise: the TypeError saying to pass ema_pytree="],
}


def _caught(handler: ast.ExceptHandler) -> list:
    t = handler.type
    if t is None:
        return ["<bare>"]
    return [ast.unparse(e) for e in (t.elts if isinstance(t, ast.Tuple) else [t])]


def _re_raises(handler: ast.ExceptHandler) -> bool:
    """Whether the handler ends by raising what it caught: a bare ``raise`` (or ``raise name`` of
    its own ``as name``) as its last statement."""
    last = handler.body[-1]
    return isinstance(last, ast.Raise) and last.cause is None and (
        last.exc is None or isinstance(last.exc, ast.Name) and last.exc.id == handler.name)


def broad_catches(source: str):
    """``(line, function, caught)`` of each broad handler in ``source`` that does not end by
    re-raising; ``function`` the dotted name of the functions and classes around it."""
    out = []

    def walk(node, where):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                walk(child, where + [child.name])
                continue
            if isinstance(child, ast.ExceptHandler):
                caught = _caught(child)
                if any(c in _BROAD or c == "<bare>" for c in caught) and not _re_raises(child):
                    out.append((child.lineno, ".".join(where) or "<module>", "/".join(caught)))
            walk(child, where)

    walk(ast.parse(source), [])
    return sorted(out)


def test_every_broad_catch_is_listed_with_its_reason():
    """Each broad catch that does not re-raise is in :data:`BROAD_CATCHES` with its reason (one
    reason per catch of that function); an added one fails until it names the errors it means or
    is listed, and a listed one that is gone fails until it is removed from the list."""
    found: dict = {}
    for package in ("fastema", "kernels"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for line, function, caught in broad_catches(path.read_text()):
                found.setdefault((rel, function), []).append(f"{rel}:{line} except {caught}")
    unlisted = [f"{where} (in {key[1]}): name the errors meant, re-raise, or list it with its reason"
                for key, wheres in found.items()
                for where in wheres[len(BROAD_CATCHES.get(key, [])):]]
    assert not unlisted, "\n".join(unlisted)
    stale = {key: len(reasons) - len(found.get(key, [])) for key, reasons in BROAD_CATCHES.items()
             if len(found.get(key, [])) < len(reasons)}
    assert not stale, f"BROAD_CATCHES lists catches that are gone (how many): {stale}; remove them"
    assert all(r.strip() for reasons in BROAD_CATCHES.values() for r in reasons)


def test_the_rule_sees_what_it_forbids():
    """Known cases: swallowed, converted, a tuple holding Exception, a bare except, a nested
    function's, a conditional re-raise (listed); a clean-up that re-raises, a named error (not)."""
    source = ("def f():\n    try: g()\n    except Exception: pass\n"
              "class C:\n    def m(self):\n        try: g()\n"
              "        except (OSError, Exception) as e: raise ValueError() from e\n"
              "        def inner():\n            try: g()\n            except: return 1\n"
              "def h():\n    try: g()\n    except BaseException as err:\n        if x: raise\n"
              "        return err\n"
              "def ok():\n    try: g()\n    except Exception: undo(); raise\n"
              "    try: g()\n    except BaseException as err: undo(); raise err\n"
              "    try: g()\n    except (OSError, ValueError): pass\n"
              "    try: g()\n    except Exception as err: raise err from None\n")
    got = [(line, where, caught) for line, where, caught in broad_catches(source)]
    assert got == [(3, "f", "Exception"), (7, "C.m", "OSError/Exception"),
                   (10, "C.m.inner", "<bare>"), (13, "h", "BaseException"),
                   (24, "ok", "Exception")], got
