"""The layout maps of README.md ("Layout") and docs/DESIGN.md (section 5) match the tree: every file they name
exists, and every package, top-level module and op-level source file of the tree is named."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILE = re.compile(r"[\w+-]+\.(?:py|h|cpp|cu|cuh|sh|md|toml)\b")


def _tracked():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [Path(p) for p in out.split()]
    except (OSError, subprocess.CalledProcessError):  # an sdist: no git
        return [p.relative_to(ROOT) for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]


def _block(document: str, heading: str) -> str:
    text = (ROOT / document).read_text()
    start = text.index(heading)
    fence = text.index("```", start)
    return text[fence + 3:text.index("```", fence + 3)]


MAPS = {"README.md": "## Layout", "docs/DESIGN.md": "## 5. Layout"}


@pytest.mark.parametrize("document", MAPS)
def test_every_file_a_map_names_exists(document):
    names = {p.name for p in _tracked()}
    missing = sorted({name for name in FILE.findall(_block(document, MAPS[document])) if name not in names})
    assert not missing, f"{document} names files the tree does not have: {missing}"


@pytest.mark.parametrize("document", MAPS)
def test_every_package_module_and_op_source_is_named(document):
    block = _block(document, MAPS[document])
    tracked = _tracked()
    wanted = set()
    for path in tracked:
        parts = path.parts
        if parts[0] in ("softprompt_kernels", "csrc") and len(parts) > 2:
            wanted.add(parts[-2] + "/")  # every directory, by its name
        if parts[0] == "softprompt_kernels" and len(parts) == 2 and path.suffix == ".py" \
                and path.stem not in ("__init__", "__main__"):
            wanted.add(path.name)  # every top-level module
        if parts[:2] in (("softprompt_kernels", "hf"), ("softprompt_kernels", "serving")) and path.suffix == ".py" \
                and path.stem != "__init__":
            wanted.add(path.name)  # the modules of the layers other packages import from
        if parts[0] == "csrc" and (len(parts) == 2 or parts[1] in ("prefix_attention", "prompt_insertion")):
            wanted.add(path.name)  # the op-level C++ sources (kernels are summarised by directory)
    missing = sorted(name for name in wanted if name not in block)
    assert not missing, f"{document}'s layout does not name: {missing}"
