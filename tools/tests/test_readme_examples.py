"""Every ```python block of the READMEs (root and packages/*) runs, each in a fresh interpreter
(custom ops register process-wide, and TRITON_INTERPRET must be set before triton is imported)
with a temporary directory as its working directory, so the examples cannot drift from the API.

A block that cannot run on a CPU test machine (several processes under torchrun, a GPU, a big
download, a long training) carries `<!-- readme-test: skip (reason) -->` on the line just before
its fence and is not collected."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READMES = [ROOT / "README.md", *sorted(ROOT.glob("packages/*/README.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*$")
SKIP = re.compile(r"^\s*<!-- readme-test: skip \((?P<reason>[^)]+)\) -->\s*$")
BLOCK_TIMEOUT_S = 120  # each block takes a few seconds; this only stops a hang


def python_blocks(text: str) -> list[dict]:
    """Each ```python block: its index in the README, first code line (1-based), dedented code and
    skip reason (None unless the line before the fence is the skip marker)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, start = fence["indent"], i + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"```python block opened on line {i + 1} is never closed")
        skip = SKIP.match(lines[i - 1]) if i else None
        # a block inside a list item is indented like its fence
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[start:end])
        blocks.append({"index": len(blocks), "line": start + 1, "code": code + "\n", "skip": skip and skip["reason"]})
        i = end + 1
    return blocks


def _cases():
    for readme in READMES:
        for block in python_blocks(readme.read_text()):
            if block["skip"] is None:
                name = readme.parent.name if readme.parent != ROOT else "root"
                yield pytest.param(readme, block, id=f"{name}-{block['index']}")


CASES = list(_cases())


@pytest.mark.parametrize(("readme", "block"), CASES)
def test_readme_block_runs(readme, block, tmp_path):
    # padded and compiled under the README's path: a traceback names the README line and shows it
    source = tmp_path / "readme_block.py"
    source.write_text("\n" * (block["line"] - 1) + block["code"])
    runner = ("import sys; path, name = sys.argv[1:]; "
              "exec(compile(open(path).read(), name, 'exec'), {'__name__': '__main__'})")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", runner, str(source), str(readme)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert proc.returncode == 0, (f"{readme.relative_to(ROOT)}, block {block['index']} (line {block['line']}):\n"
                                  f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def test_every_block_is_collected():
    # counted without the parser: a parser that stops finding blocks fails here, not silently
    collected = {}
    for case in CASES:
        collected[case.values[0]] = collected.get(case.values[0], 0) + 1
    for readme in READMES:
        text = readme.read_text()
        fences = len(re.findall(r"^[ \t]*```python[ \t]*$", text, flags=re.M))
        blocks = python_blocks(text)
        assert len(blocks) == fences, readme
        if fences:
            assert collected.get(readme, 0) >= 1, f"{readme}: has ```python blocks but none is run"
        assert collected.get(readme, 0) == sum(b["skip"] is None for b in blocks), readme
    assert sum(collected.values()) >= len(list(ROOT.glob("packages/*/README.md")))


def test_parser_reads_indented_blocks_and_skip_markers():
    text = "\n".join([
        "intro", "```python", "a = 1", "```",
        "- item:", "  ```python", "  b = 2", "    c = 3", "  ```",
        "<!-- readme-test: skip (needs two GPUs) -->", "```python", "gpu()", "```",
        "```bash", "echo no", "```",
    ])
    blocks = python_blocks(text)
    assert [b["code"] for b in blocks] == ["a = 1\n", "b = 2\n  c = 3\n", "gpu()\n"]
    assert [b["line"] for b in blocks] == [3, 7, 12]
    assert [b["skip"] for b in blocks] == [None, None, "needs two GPUs"]
    with pytest.raises(ValueError, match="never closed"):
        python_blocks("```python\nx = 1\n")
