"""The oldest release of each framework a face runs on (:data:`FLOORS`), refused at the face's
import by name, with what to do (``docs/install.md``, "Which framework release": every release
tried, and why each floor is where it is). Framework-free: a face hands in its framework's version.
``pyproject.toml``'s extras say the same (a test holds each)."""
from __future__ import annotations

import re

#: package -> the oldest release fastema's tests of its face passed on (torch's tests on 2.10-2.12
#: with the differences the install guide names; CI runs 2.13 on the CPU, the GPU runs 2.11)
FLOORS: dict[str, tuple[int, ...]] = {"torch": (2, 10), "jax": (0, 6, 2), "tensorflow": (2, 20), "keras": (3, 7)}


def release(version: object) -> tuple[int, ...] | None:
    """``version``'s release numbers (``"2.13.0a0+git1a2b"`` -> ``(2, 13, 0)``: a pre-release or
    local build of a release counts as that release); None where it names none (a build that
    says ``"unknown"``: not judged)."""
    found = re.match(r"\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(version))
    return None if found is None else tuple(int(n) for n in found.groups() if n is not None)


def older(package: str, version: object) -> bool:
    """Whether ``version`` of ``package`` is a release older than its floor (:data:`FLOORS`)."""
    found = release(version)
    return found is not None and found < FLOORS[package]


def floor(package: str) -> str:
    """``package``'s floor as it is written (``"2.13"``)."""
    return ".".join(map(str, FLOORS[package]))


def refuse_older(face: str, package: str, version: object, why: str, instead: str = "") -> None:
    """Raise :class:`ImportError` where ``version`` (``package``'s) is older than its floor, naming
    the face, both versions, why (``why``: what an older release got wrong) and what to do (the
    upgrade, or fastema's extra of the same name)."""
    if older(package, version):
        wanted, also = floor(package), f"; {instead}" if instead else ""
        raise ImportError(f"{face} needs {package} >= {wanted}, found {package} {version}: {why}. Upgrade "
                          f"{package} (pip install -U '{package}>={wanted}', or install 'fastema[{package}]'){also}")
