"""The README is tested: every ```python and ```bash block of README.md runs (#21).

Each block runs in a fresh temporary folder, in a subprocess of this interpreter (shell blocks:
each command in order, ``dissect`` being ``python -m dissect``), so a snippet that stops working
fails here. A block is self-contained unless an HTML comment right before its fence says
otherwise. Directives, one per comment line, ``<!-- readme-test: DIRECTIVE -->``:

- ``skip REASON``: never run here (installs, ``make``, several GPUs, the real Broden); the case
  is reported as skipped with REASON.
- ``skip-command "PREFIX" (REASON)``: in a shell block, the commands starting with PREFIX are
  not run (the rest are); a warning names them with REASON.
- ``needs-gpu``: run only where CUDA is available, else skipped.
- ``continues "HEADING"``: the block (python or shell) runs after the first ```python block of
  the section titled HEADING (which may itself continue another), in the same folder.
- ``shrink "OLD" -> "NEW"``: replace OLD by NEW in the block (and in the blocks it continues)
  before running it: smaller sizes only, so the suite stays fast; the README shows the real ones.

Every folder holds the fixtures snippets name without making them: ``cat.jpg`` (scikit-image's
chelsea photograph). Set ``DISSECT_README_FULL=1`` to run the blocks without their ``shrink``
directives (the sizes the README shows; slow).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
DIRECTIVE = re.compile(r"^\s*<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$")
SHRINK = re.compile(r'^shrink\s+"(.*?)"\s*->\s*"(.*)"$')
SKIP_COMMAND = re.compile(r'^skip-command\s+"(.*?)"\s+(\(.+\))$')
RUNNABLE = {"python": "python", "bash": "bash", "sh": "bash"}
TIMEOUT = 600


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str  # "python" or "bash"
    code: str
    heading: str
    directives: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang}"


def parse(text: str) -> list[Block]:
    """Every fenced python/bash/sh block with the section it sits in and its directives."""
    lines = text.splitlines()
    blocks: list[Block] = []
    heading = ""
    i = 0
    while i < len(lines):
        m = HEADING.match(lines[i])
        if m:
            heading = m.group(1)
        f = FENCE.match(lines[i])
        if not f or not f.group(2):
            i += 1
            continue
        indent, lang = f.group(1), f.group(2)
        j = i + 1
        while not re.match(rf"^{re.escape(indent)}```\s*$", lines[j]):
            j += 1
        if lang in RUNNABLE:
            body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip()
                    for ln in lines[i + 1:j]]
            directives = []
            k = i - 1
            while k >= 0 and DIRECTIVE.match(lines[k]):
                directives.insert(0, DIRECTIVE.match(lines[k]).group(1))
                k -= 1
            blocks.append(Block(i + 1, RUNNABLE[lang], "\n".join(body) + "\n", heading,
                                directives))
        i = j + 1
    return blocks


BLOCKS = parse(README.read_text(encoding="utf-8"))


def _strip(heading: str) -> str:
    return heading.replace("`", "").strip()


def chain(block: Block) -> list[Block]:
    """The blocks ``block`` continues, first one first, then ``block``."""
    out = [block]
    seen = {block.line}
    while True:
        parent = [d for d in out[0].directives if d.startswith("continues ")]
        if not parent:
            return out
        title = _strip(shlex.split(parent[0])[1])
        found = [b for b in BLOCKS if b.lang == "python" and _strip(b.heading) == title]
        assert found, f"{block.id}: no python block under a heading {title!r}"
        assert found[0].line not in seen, f"{block.id}: circular 'continues'"
        seen.add(found[0].line)
        out.insert(0, found[0])


def shrunk(code: str, blocks: list[Block]) -> str:
    if os.environ.get("DISSECT_README_FULL"):
        return code
    for b in blocks:
        for d in b.directives:
            m = SHRINK.match(d)
            if d.startswith("shrink"):
                assert m, f"{b.id}: malformed directive {d!r}"
                assert m.group(1) in code, f"{b.id}: {m.group(1)!r} is not in the block"
                code = code.replace(m.group(1), m.group(2))
    return code


def commands(code: str) -> list[str]:
    """Shell commands, one per logical line (backslash continuations joined), comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(line)
    return out


def prepare(folder: Path) -> None:
    """The files snippets name without making them."""
    from skimage import data
    from skimage.io import imsave

    imsave(folder / "cat.jpg", data.chelsea(), check_contrast=False)


def run(argv: list[str] | str, cwd: Path, what: str, shell: bool = False) -> None:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["MPLBACKEND"] = "Agg"
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, shell=shell, executable="/bin/bash" if shell else None)
    if proc.returncode != 0:
        pytest.fail(f"{what} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                    f"\n--- stderr\n{proc.stderr[-6000:]}", pytrace=False)


def test_readme_has_blocks():
    assert len(BLOCKS) >= 20
    for b in BLOCKS:
        for d in b.directives:
            assert d.split()[0] in {"skip", "skip-command", "needs-gpu", "continues",
                                    "shrink"}, (b.id, d)
            if d.startswith("skip-command"):
                assert SKIP_COMMAND.match(d) and b.lang == "bash", (b.id, d)
            if d.split()[0] == "skip":
                assert len(d.split()) > 1, f"{b.id}: a skip needs a reason"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, tmp_path: Path):
    for d in block.directives:
        if d.startswith("skip "):
            pytest.skip(f"README {block.id}: {d[4:].strip()}")
        if d == "needs-gpu":
            import torch

            if not torch.cuda.is_available():
                pytest.skip(f"README {block.id}: needs a CUDA GPU")
    prepare(tmp_path)
    if block.lang == "python":
        blocks = chain(block)
        code = shrunk("\n".join(b.code for b in blocks), blocks)
        script = tmp_path / "snippet.py"
        script.write_text(code, encoding="utf-8")
        run([sys.executable, str(script)], tmp_path, f"README {block.id} (python)")
        return
    before = chain(block)[:-1]  # a shell block that continues a section: its python first
    if before:
        script = tmp_path / "snippet.py"
        script.write_text(shrunk("\n".join(b.code for b in before), before), encoding="utf-8")
        run([sys.executable, str(script)], tmp_path, f"README {block.id} (python before it)")
    omit = [SKIP_COMMAND.match(d).groups() for d in block.directives
            if d.startswith("skip-command")]
    for cmd in commands(shrunk(block.code, [block])):
        reasons = [why for prefix, why in omit if cmd.startswith(prefix)]
        if reasons:
            warnings.warn(f"README {block.id}: not run: {cmd} {reasons[0]}", stacklevel=1)
            continue
        if cmd.split()[0] == "dissect":
            cmd = f"{shlex.quote(sys.executable)} -m dissect {cmd[len('dissect'):]}"
        elif cmd.split()[0] == "python":
            cmd = f"{shlex.quote(sys.executable)} {cmd[len('python'):]}"
        run(cmd, tmp_path, f"README {block.id}: {cmd}", shell=True)
