"""The README's support table is the one the capability checks and the parity matrix give today."""
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from softprompt_kernels.hf import support  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_support_table_is_current():
    text = README.read_text()
    assert support.rewrite(text, support.markdown()) == text, (
        "the README's support table is stale: run python -m softprompt_kernels.hf.support --write README.md")


def test_every_refused_family_names_a_reason_and_the_required_families_are_tested():
    rows = {family: (status, why) for family, status, why in support.rows()}
    assert all(why for status, why in rows.values())
    for family in ("gemma2", "gemma3_text", "phi3", "phi", "mixtral", "qwen2_moe", "qwen3_moe", "olmo2", "granite",
                   "cohere2", "starcoder2", "gpt_oss"):
        assert rows[family][0] == "tested", family
    assert sum(status == "tested" for status, _ in rows.values()) >= 30
