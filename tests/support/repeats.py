"""Repeated blocks of source code, found with the standard library alone.

A block is a run of six or more lines of code (blank lines, comments, import lines and lines of
punctuation alone passed over) that stands again elsewhere, the same or of the same shape: each
line is read as its tokens with every name that is not a keyword, every string and every number
replaced by one placeholder, so ``self.rows = rows`` and ``self.window = window`` read alike. The
rule tests use it where they hold modules to "no block written twice"; it stands in for the
workplace's ``duplicates`` tool, which a user's machine does not have.
"""
from __future__ import annotations

import ast
import functools
import io
import keyword
import pathlib
import tokenize
from dataclasses import dataclass
from typing import Iterable

MIN_LINES = 6
MOST_PLACES = 8          # a run found in more places than this is an idiom, not a block written again

_SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER, tokenize.ENCODING}
_FSTRING_START = getattr(tokenize, "FSTRING_START", None)      # Python 3.12 splits f-strings
_FSTRING_END = getattr(tokenize, "FSTRING_END", None)


@dataclass(frozen=True)
class Place:
    """Lines ``first`` to ``last`` (1-based, inclusive) of ``path``, in the function or class
    ``where`` (its qualified name; ``""`` at a module's top)."""
    path: str
    first: int
    last: int
    where: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.first}-{self.last}"


@dataclass(frozen=True)
class Repeat:
    """Two places that share ``lines`` lines of code of one shape."""
    one: Place
    other: Place
    lines: int

    def __str__(self) -> str:
        return f"{self.one} ~ {self.other} ({self.lines} lines: {self.one.where or '<module>'} ~ " \
               f"{self.other.where or '<module>'})"

    @property
    def names(self) -> tuple[str, str]:
        """The two places' functions or classes, in order: what a list of known repeats names."""
        one, other = self.one.where, self.other.where
        return (one, other) if one <= other else (other, one)


@functools.lru_cache(maxsize=None)
def shapes(text: str) -> list[tuple[int, str]]:
    """``(line number, shape)`` for each line of ``text`` that counts, in order."""
    words: dict[int, list[str]] = {}
    prose: dict[int, str] = {}
    depth = 0                                          # inside an f-string (3.12's tokens)
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == _FSTRING_START:
            depth += 1
            if depth == 1:
                words.setdefault(tok.start[0], []).append("S")
            continue
        if tok.type == _FSTRING_END:
            depth -= 1
            continue
        if depth or tok.type in _SKIPPED:
            continue
        if tok.type == tokenize.NAME:
            word = tok.string if keyword.iskeyword(tok.string) else "N"
        elif tok.type == tokenize.STRING:
            word = "S"
            if tok.start[0] != tok.end[0] and tok.line.strip().startswith(tok.string.split("\n")[0].strip()):
                prose[tok.start[0]] = tok.string         # a docstring of several lines: prose, as it is
        elif tok.type == tokenize.NUMBER:
            word = "0"
        else:
            word = tok.string
        words.setdefault(tok.start[0], []).append(word)
    out = []
    for line, ws in sorted(words.items()):
        if ws[0] in ("import", "from") or all(w in "()[]{},:;" for w in ws):
            continue
        out.append((line, prose.get(line) or " ".join(ws)))
    return out


def repeats(files: Iterable[tuple[str, str]], min_lines: int = MIN_LINES) -> list[Repeat]:
    """Every pair of places among ``files`` (``(name, text)``) that share a run of ``min_lines`` or
    more lines of one shape, each run at its longest, the longest first. Runs of one file that
    overlap are not a pair; a run found in more than :data:`MOST_PLACES` places is left out."""
    files = list(files)
    code = {name: shapes(text) for name, text in files}
    scopes = {name: _scopes(text) for name, text in files}
    starts: dict[tuple[str, ...], list[tuple[str, int]]] = {}
    for name, lines in code.items():
        for i in range(len(lines) - min_lines + 1):
            key = tuple(shape for _, shape in lines[i:i + min_lines])
            starts.setdefault(key, []).append((name, i))
    found: dict[tuple[Place, Place], Repeat] = {}
    for places in starts.values():
        if len(places) < 2 or len(places) > MOST_PLACES:
            continue
        for j, (a, i) in enumerate(places):
            for b, k in places[j + 1:]:
                if a == b and abs(i - k) < min_lines:
                    continue
                pair = _longest(code[a], i, code[b], k, same=a == b)
                one = Place(a, *pair[0], _where(scopes[a], pair[0][0]))
                other = Place(b, *pair[1], _where(scopes[b], pair[1][0]))
                found.setdefault((one, other), Repeat(one, other, pair[2]))
    return sorted(found.values(), key=lambda r: (-r.lines, str(r)))


def _longest(a: list, i: int, b: list, k: int, same: bool) -> tuple[tuple[int, int], tuple[int, int], int]:
    """The run through ``a[i]`` ~ ``b[k]`` grown both ways while the shapes agree (in one file, ``i``
    before ``k``, until the first side reaches the second): its two line spans and its length."""
    while i and k and a[i - 1][1] == b[k - 1][1]:
        i, k = i - 1, k - 1
    n = 0
    while i + n < len(a) and k + n < len(b) and a[i + n][1] == b[k + n][1] and not (same and i + n >= k):
        n += 1
    return (a[i][0], a[i + n - 1][0]), (b[k][0], b[k + n - 1][0]), n


@functools.lru_cache(maxsize=None)
def _scopes(text: str) -> list[tuple[int, int, str]]:
    """``(first line, last line, qualified name)`` of every function and class of ``text``."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                out.append((first, child.end_lineno or child.lineno, name))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(text), "")
    return out


def _where(scopes: list[tuple[int, int, str]], line: int) -> str:
    """The innermost function or class of ``scopes`` that holds ``line``."""
    inside = [(first, name) for first, last, name in scopes if first <= line <= last]
    return max(inside)[1] if inside else ""


def in_tree(root: pathlib.Path, names: Iterable[str]) -> list[tuple[str, str]]:
    """``(path relative to root, text)`` of each ``.py`` file named (a folder: every one below it)."""
    out = []
    for name in names:
        path = root / name
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            out.append((f.relative_to(root).as_posix(), f.read_text()))
    return out
