"""The oldest release of a framework each face runs on (the release CI tests, as ``pyproject.toml``'s
extra says), refused at the face's import by name, with what to do (``docs/install.md``, "Which
framework release"). Framework-free: the faces hand in their framework's version string."""
from __future__ import annotations

import re


def release(version: str) -> tuple[int, ...]:
    """``version``'s release numbers (``"2.13.0a0+git1a2b"`` -> ``(2, 13, 0)``): a pre-release or
    local build of a release counts as that release."""
    found = re.match(r"\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if found is None:
        raise ValueError(f"not a release number: {version!r}")
    return tuple(int(n) for n in found.groups() if n is not None)


def refuse_older(face: str, package: str, version: str, floor: tuple[int, ...], extra: str,
                 why: str, instead: str = "") -> None:
    """Raise :class:`ImportError` where ``version`` (``package``'s) is older than ``floor``, naming
    the face, both versions, why (``why``: what an older release got wrong) and what to do."""
    if release(version) < floor:
        wanted = ".".join(map(str, floor))
        raise ImportError(
            f"{face} needs {package} >= {wanted}, found {package} {version}: older releases are not "
            f"tested ({why}). Upgrade {package} (pip install -U '{package}>={wanted}', or install "
            f"'fastema[{extra}]')" + (f"; {instead}" if instead else ""))
