"""The code in docs/writing-plugins.md is copied from the example plugins under plugins/ and
must stay identical to it.

A code block preceded by `<!-- source: PATH -->` must appear verbatim in PATH; with
`<!-- source: PATH#REGION -->` it must equal the lines between `# [docs: REGION]` and
`# [/docs: REGION]` in PATH. Every python and toml block must name its source, so no code in
the guide can drift from code that is tested.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "writing-plugins.md"
BLOCK = re.compile(r"(?:<!-- source: (?P<source>[^ ]+?)(?:#(?P<region>[^>]+?))? -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```",
                   re.DOTALL)


def blocks() -> list[dict[str, str | None]]:
    return [m.groupdict() for m in BLOCK.finditer(GUIDE.read_text())]


def sourced_blocks() -> list[dict[str, str | None]]:
    return [b for b in blocks() if b["source"]]


def region(text: str, name: str, path: str) -> str:
    match = re.search(rf"^# \[docs: {re.escape(name)}\]\n(.*?)^# \[/docs: {re.escape(name)}\]$", text, re.DOTALL | re.MULTILINE)
    assert match, f"{path} has no region '# [docs: {name}]' ... '# [/docs: {name}]'"
    return match.group(1)


def test_every_python_and_toml_block_names_its_source():
    unsourced = [b["code"].splitlines()[0] for b in blocks() if b["lang"] in ("python", "toml") and not b["source"]]
    assert not unsourced, f"blocks without a '<!-- source: PATH -->' line: {unsourced}"


def test_the_guide_shows_both_example_plugins():
    sources = {b["source"].split("/")[1] for b in sourced_blocks()}
    assert {"elbokit-vampprior", "elbokit-mmd"} <= sources


@pytest.mark.parametrize("block", sourced_blocks(), ids=lambda b: f"{b['source']}#{b['region'] or ''}")
def test_block_is_identical_to_its_source(block):
    path = ROOT / block["source"]
    assert path.is_file(), f"{block['source']} does not exist"
    text = path.read_text()
    if block["region"]:
        assert block["code"] == region(text, block["region"], block["source"]), (
            f"the block differs from region '{block['region']}' of {block['source']}: copy the region again")
    else:
        assert block["code"] in text, f"the block is not a verbatim excerpt of {block['source']}: copy it again"


def test_regions_in_the_example_plugins_are_well_formed():
    for path in (ROOT / "plugins").glob("*/**/*.py"):
        text = path.read_text()
        opened = re.findall(r"^# \[docs: ([^\]]+)\]$", text, re.MULTILINE)
        closed = re.findall(r"^# \[/docs: ([^\]]+)\]$", text, re.MULTILINE)
        assert opened == closed, f"{path.relative_to(ROOT)}: unbalanced docs regions {opened} vs {closed}"
