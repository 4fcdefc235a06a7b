"""The allow-list unpickler of DCP metadata: a security boundary.

A snapshot folder may come from anyone, and reading one executes nothing from it. Safetensors and
JSON hold no code; the one pickle, a DCP snapshot's ``.metadata``, is read by
:class:`DcpMetadataUnpickler`, which builds DCP's metadata classes and nothing else: no class,
function, module or shared object of the process gets state from the file, refused or not.

Trusted, and looked up in their modules' own namespaces (never through a module's ``__getattr__``,
which could import): the globals of :data:`~.dcp_trust.ALLOWED` (DCP's metadata classes,
``torch.Size``, dtypes, layouts by name, paths, ``OrderedDict``), each called (REDUCE) only with the
arguments DCP gives it (``torch.Size`` a list of ints, a layout or a path strings, an enum member an
int, ``OrderedDict`` none), and the opcodes that build plain data
(:data:`~.dcp_trust.DATA_OPCODES`). Objects (NEWOBJ, no arguments) of DCP's metadata dataclasses
only (:func:`~.dcp_trust.field_types`); their state (BUILD) set once, on an instance it made and
placed nowhere yet, declared fields only, each of the exact type DCP gives it. Appends and item sets
only into the lists and dicts it made, before they are placed in another; dict keys are strings,
ints or built ``MetadataIndex`` (nothing deep is ever hashed).

Refused (``pickle.UnpicklingError``, saying what the file asked for): anything else, persistent
ids, extension codes, INST/OBJ, sets, bytearrays and out-of-band buffers included. Bounded:
objects nest at most :data:`~.dcp_trust.MAX_DEPTH` deep; no string, line or frame over
:data:`~.dcp_trust.MAX_ITEM`, and no more than the file's size, is read
(:class:`~.dcp_trust.BoundedInput`); every :data:`~.dcp_trust.LOOK_EVERY` opcodes the memory the
parse holds is looked at: beyond half of what was free when it began, a MemoryError. What it builds
is then checked whole, by exact types, before anything reads it
(:func:`fastema._io.dcp.load_dcp_metadata`). Importing this imports no framework (torch: when used).
"""
from __future__ import annotations

import pickle
from typing import Any, Callable, ClassVar, NoReturn

from .dcp_trust import (
    ALLOWED,
    DATA_OPCODES,
    DCP_METADATA,
    FILESYSTEM,
    LOOK_EVERY,
    MAX_DEPTH,
    MAX_METADATA,
    PATHS,
    BoundedInput,
    field_types,
    named,
    size_args,
)
from .safe_files import memory_available, resident

__all__ = ["MAX_METADATA", "PATHS", "DcpMetadataUnpickler", "named"]

# the pure-Python unpickler: its dispatch is ours
class DcpMetadataUnpickler(pickle._Unpickler):
    """Builds what DCP's ``.metadata`` holds and nothing else, with an allow-list of opcodes and
    globals: what it trusts, refuses and bounds is this module's docstring."""

    dispatch: ClassVar[dict] = {}              # opcode -> handler: _make_dispatch()'s table
    # the pure-Python unpickler's own (typeshed does not declare them)
    stack: list
    metastack: list
    append: Callable[[Any], None]
    pop_mark: Callable[[], list]
    read: Callable[[int], bytes]
    readline: Callable[[], bytes]
    readinto: Callable[[Any], int]
    _file_read: Callable[[int], bytes]
    _file_readline: Callable[[], bytes]
    proto: int

    def __init__(self, file: Any, size: int = MAX_METADATA) -> None:
        super().__init__(BoundedInput(file, size))
        import collections
        import importlib

        import torch

        self._globals: dict = {}
        for module, names in ALLOWED.items():
            try:
                space = vars(importlib.import_module(module))
            except ImportError:                       # pathlib._local: Python >= 3.13 only
                continue
            for name in names:
                if name in space:
                    self._globals[(module, name)] = space[name]
        self._globals[("torch", "Size")] = torch.Size
        self._torch = vars(torch)
        self._dtype = torch.dtype
        md = importlib.import_module(DCP_METADATA)
        self._props = md.TensorProperties
        self._index = md.MetadataIndex
        self._encoding = md._MEM_FORMAT_ENCODING
        self._ordered = collections.OrderedDict
        paths = tuple(v for (m, n), v in self._globals.items()
                      if n in PATHS and m.startswith("pathlib"))
        one_str = lambda a: len(a) == 1 and type(a[0]) is str  # noqa: E731
        layout = self._globals[("torch.serialization", "_get_layout")]
        self._calls = [(torch.Size, size_args), (layout, one_str),
                       (self._encoding, lambda a: len(a) == 1 and type(a[0]) is int),
                       (self._ordered, lambda a: not a)]
        self._calls += [(p, lambda a: len(a) <= 4096 and all(type(x) is str for x in a))
                        for p in paths]
        self._fields = field_types(md, importlib.import_module(FILESYSTEM), torch, paths)
        # id -> [object, depth, placed, built]: what this unpickler made (kept alive)
        self._made: dict = {}

    def find_class(self, module: str, name: str):
        found = self._globals.get((module, name))
        if found is not None:
            return found
        if module == "torch" and type(self._torch.get(name)) is self._dtype:
            return self._torch[name]
        raise pickle.UnpicklingError(f"it asks to load {module}.{name}, which DCP metadata never "
                                     "holds")

    def load(self) -> Any:
        """The pure-Python ``load`` (Python 3.9-3.13), with a look at the memory every
        :data:`LOOK_EVERY` opcodes."""
        unframer = pickle._Unframer                  # type: ignore[attr-defined]
        self._unframer = unframer(self._file_read, self._file_readline)
        self.read = self._unframer.read
        self.readinto = self._unframer.readinto
        self.readline = self._unframer.readline
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch = self.read, self.dispatch
        start, free = resident(), memory_available()
        count = 0
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                dispatch[key[0]](self)
                count += 1
                if count % LOOK_EVERY == 0 and start is not None and free is not None:
                    held = (resident() or start) - start
                    if held > free // 2:
                        raise MemoryError(f"building it took {held} bytes of memory after {count} "
                                          f"opcodes, over half of the {free} bytes free when it "
                                          "began")
        except pickle._Stop as stop:                  # type: ignore[attr-defined]
            return stop.value

    def _refuse(self, what: str) -> NoReturn:
        raise pickle.UnpicklingError(f"it {what}, which DCP metadata never does")

    # -- bookkeeping: what it made, how deep, placed in another yet, built yet

    def _place(self, items) -> int:
        """Mark what this unpickler made among ``items`` placed (never changed again); their
        depth."""
        depth = 0
        made = self._made
        for item in items:
            entry = made.get(id(item))               # ids are its own objects': they are kept alive
            if entry is not None:
                entry[2] = True
                if entry[1] > depth:
                    depth = entry[1]
        return depth

    def _made_of(self, obj, items=()) -> None:
        self._made[id(obj)] = entry = [obj, 1, False, False]
        self._grow(entry, self._place(items))

    def _grow(self, entry: list, depth: int) -> None:
        if depth >= MAX_DEPTH:
            self._refuse(f"nests objects more than {MAX_DEPTH} deep")
        if depth + 1 > entry[1]:
            entry[1] = depth + 1

    def _open(self, target, kinds: tuple, what: str) -> list:
        """The entry of ``target``, a list or dict this unpickler made and placed nowhere yet."""
        entry = self._made.get(id(target))
        if type(target) not in kinds or entry is None:
            self._refuse(f"{what} a {type(target).__name__} it did not make")
        if entry[2]:
            self._refuse(f"{what} a {type(target).__name__} after placing it in another")
        return entry

    def _key_ok(self, key) -> bool:
        kind = type(key)
        if kind is str or kind is int:
            return True
        entry = self._made.get(id(key))
        # its fields checked: a flat hash
        return kind is self._index and entry is not None and entry[3]

    # -- the container opcodes

    def _load_mark(self) -> None:
        if len(self.metastack) >= MAX_DEPTH:
            self._refuse(f"opens more than {MAX_DEPTH} marks at once")
        self.metastack.append(self.stack)
        self.stack = []
        self.append = self.stack.append

    def _load_empty_list(self) -> None:
        self.append([])
        self._made_of(self.stack[-1])

    def _load_empty_dict(self) -> None:
        self.append({})
        self._made_of(self.stack[-1])

    def _load_list(self) -> None:
        items = self.pop_mark()
        self._made_of(items, items)
        self.append(items)

    def _load_tuple(self) -> None:
        items = tuple(self.pop_mark())
        self._made_of(items, items)
        self.append(items)

    def _load_tuple1(self) -> None:
        self.stack[-1] = items = (self.stack[-1],)
        self._made_of(items, items)

    def _load_tuple2(self) -> None:
        items = (self.stack[-2], self.stack[-1])
        self.stack[-2:] = [items]
        self._made_of(items, items)

    def _load_tuple3(self) -> None:
        items = (self.stack[-3], self.stack[-2], self.stack[-1])
        self.stack[-3:] = [items]
        self._made_of(items, items)

    def _load_dict(self) -> None:
        items = self.pop_mark()
        d: dict = {}
        self._made_of(d)
        self._fill(d, items)
        self.append(d)

    def _load_append(self) -> None:
        value = self.stack.pop()
        entry = self._open(self.stack[-1], (list,), "appends to")
        self._grow(entry, self._place((value,)))
        self.stack[-1].append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        entry = self._open(self.stack[-1], (list,), "appends to")
        self._grow(entry, self._place(items))
        self.stack[-1].extend(items)

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._fill(self.stack[-1], [key, value])

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        self._fill(self.stack[-1], items)

    def _fill(self, target, items: list) -> None:
        entry = self._open(target, (dict, self._ordered), "sets items of")
        if len(items) % 2:
            self._refuse("sets an item without a value")
        for key in items[::2]:
            if not self._key_ok(key):
                self._refuse(f"uses {named(key)} as a key")
        self._grow(entry, self._place(items))
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    # -- calls, objects, state

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        # by identity: nothing is hashed
        check = next((ok for f, ok in self._calls if f is func), None)
        if check is None:
            self._refuse(f"calls {named(func)}")
        if type(args) is not tuple or not check(args):
            self._refuse(f"calls {named(func)} with arguments DCP never gives it")
        self.stack[-1] = result = func(*args)
        if type(result) is self._ordered:
            self._made_of(result)

    def _new(self, cls, args, kwargs) -> None:
        if next((f for c, f in self._fields.items() if c is cls), None) is None:
            self._refuse(f"makes an object of {named(cls)}")
        if type(args) is not tuple or args or type(kwargs) is not dict or kwargs:
            self._refuse(f"makes a {cls.__name__} with arguments")
        inst = cls.__new__(cls)
        self._made_of(inst)
        self.append(inst)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        self._new(self.stack.pop(), args, {})

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self._new(self.stack.pop(), args, kwargs)

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        cls = type(inst)
        fields = next((f for c, f in self._fields.items() if c is cls), None)
        entry = self._made.get(id(inst))
        if fields is None or entry is None:
            self._refuse(f"sets the state of {named(inst)}")
        if entry[2] or entry[3]:
            self._refuse(f"sets the state of a {cls.__name__} twice, or after placing it")
        values: list
        # TensorProperties: its own __setstate__, on a checked tuple
        if cls is self._props:
            values = list(state) if type(state) is tuple else []
            want = fields["__state__"]
            if len(values) != len(want) or any(type(v) is not t for v, t in zip(values, want)):
                self._refuse("sets the state of a TensorProperties from anything but (dtype, "
                             "layout, bool, memory format, bool)")
            cls.__setstate__(inst, state)
        else:
            pairs = self._build_state(cls, fields, state)
            for key, value in pairs:
                # frozen dataclasses too (MetadataIndex), as pickle does
                object.__setattr__(inst, key, value)
            values = [v for _, v in pairs]
        self._grow(entry, self._place(values))
        entry[3] = True

    def _build_state(self, cls, fields: dict, state) -> list:
        """``[(field, value)]`` of a BUILD's state (a dict, or a (dict, slots) pair), each
        checked."""
        slots = None
        if type(state) is tuple and len(state) == 2:
            state, slots = state
        out = []
        for part in (state, slots):
            if part is None:
                continue
            if type(part) is not dict:
                self._refuse(f"sets the state of a {cls.__name__} from a {type(part).__name__}")
            for key, value in part.items():
                if type(key) is not str or key not in fields:
                    name = repr(key[:40]) if type(key) is str else named(key)
                    self._refuse(f"sets {cls.__name__}.{name}, not a field of it")
                if type(value) not in fields[key]:
                    self._refuse(f"sets {cls.__name__}.{key} to {named(value)}")
                out.append((key, value))
        return out


def _make_dispatch() -> dict:
    import pickletools

    def refuse(name: str):
        def op(self):
            raise pickle.UnpicklingError(f"it holds the pickle opcode {name}, which DCP metadata "
                                         "never holds")
        return op

    base = pickle._Unpickler.dispatch                  # type: ignore[attr-defined]
    table = {code: refuse(f"0x{code:02x}") for code in range(256)}
    for op in pickletools.opcodes:
        table[ord(op.code.encode("latin-1"))] = refuse(op.name)
    for name in DATA_OPCODES:
        code = getattr(pickle, name)[0]
        table[code] = base[code]
    ours = {"MARK": "_load_mark", "EMPTY_LIST": "_load_empty_list",
            "EMPTY_DICT": "_load_empty_dict", "LIST": "_load_list", "TUPLE": "_load_tuple",
            "TUPLE1": "_load_tuple1", "TUPLE2": "_load_tuple2", "TUPLE3": "_load_tuple3",
            "DICT": "_load_dict", "REDUCE": "_load_reduce", "NEWOBJ": "_load_newobj",
            "NEWOBJ_EX": "_load_newobj_ex", "BUILD": "_load_build", "APPEND": "_load_append",
            "APPENDS": "_load_appends", "SETITEM": "_load_setitem", "SETITEMS": "_load_setitems"}
    for name, method in ours.items():
        table[getattr(pickle, name)[0]] = getattr(DcpMetadataUnpickler, method)
    return table


DcpMetadataUnpickler.dispatch = _make_dispatch()
