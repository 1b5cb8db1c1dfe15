"""Packaging facts a wheel user depends on: one version string, declared version ranges equal to the ones
checked at run time, the check's messages, and the extras pyproject promises."""
import re
import tomllib
import warnings
from pathlib import Path

import pytest

import softprompt_kernels as sk
from softprompt_kernels import versions

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _declared():
    """distribution -> specifier of every requirement in pyproject (dependencies and extras)."""
    project = PYPROJECT["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    declared = {}
    for requirement in requirements:
        name, spec = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?(.*)", requirement).groups()
        declared.setdefault(name, set()).add(spec.strip())
    return declared


def test_one_version_string():
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "softprompt_kernels._version.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", sk.__version__)


def test_license_is_an_spdx_string():
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and (ROOT / "LICENSE").is_file()


def test_declared_ranges_are_the_tested_ranges():
    declared = _declared()
    for name, tested in versions.TESTED.items():
        assert declared.get(name) == {tested.specifier}, (name, declared.get(name), tested.specifier)


def test_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"hf", "triton", "serve", "vllm", "bench", "train", "test", "all"} <= set(extras)
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["softprompt_kernels*"]


def test_csrc_goes_into_the_sdist():
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "recursive-include csrc *.h *.cpp *.cu *.cuh" in manifest


@pytest.mark.parametrize("found, error, untested", [
    ({"torch": "2.13.0+cpu", "transformers": "5.24.0", "peft": "0.21.2", "triton": "3.9.0"}, [], []),
    ({"torch": "2.11.0+cu130", "transformers": "5.17.0", "triton": "3.6.0"}, [], []),
    ({"transformers": "5.30.1"}, [], ["transformers 5.30.1 is outside the tested range >=5.17,<5.25"]),
    ({"peft": "0.16.0"}, ["peft 0.16.0 is too old: softprompt-kernels needs peft>=0.17 (tested: >=0.21,<0.22)"], []),
    ({"torch": None}, [], []),
])
def test_version_problems_name_the_version_and_the_range(found, error, untested):
    assert versions.version_problems(found) == (error, untested)


def test_check_warns_once_per_process(monkeypatch):
    monkeypatch.setattr(versions, "_checked", set())
    monkeypatch.setattr(versions, "installed_version", lambda name: {"transformers": "5.99.0"}.get(name))
    with pytest.warns(versions.UntestedVersionWarning, match=r"transformers 5\.99\.0 .*>=5\.17,<5\.25"):
        versions.check_tested_versions(["transformers"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        versions.check_tested_versions(["transformers"])


def test_check_refuses_a_version_below_the_minimum(monkeypatch):
    monkeypatch.setattr(versions, "_checked", set())
    monkeypatch.setattr(versions, "installed_version", lambda name: "4.57.0")
    with pytest.raises(versions.UnsupportedVersionError, match=r"transformers 4\.57\.0 is too old"):
        versions.check_tested_versions(["transformers"])


def test_this_machine_is_within_the_tested_ranges():
    found = {name: versions.installed_version(name) for name in versions.TESTED}
    assert versions.version_problems(found) == ([], []), found
