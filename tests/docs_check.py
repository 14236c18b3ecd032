"""Run the shell commands of README.md and docs/*.md as a reader would, page by page.

A fenced block whose info string is `sh` (or `bash`, `shell`) is a list of commands; each one
runs with bash, in page order, in a fresh folder per page that holds the repository's files
(links to them) but none of its outputs, so a page that reuses an output folder, or uses one before
creating it, fails here as it would for a reader. A command spans several lines when they end
with a backslash or hold a heredoc. A block right after `<!-- docs-check: skip (why) -->` is not
run: commands that need a network, a Mac or minutes of their own.

Runs are shortened, not edited: the check sets TINYMOE_MAX_STEPS (each training command stops
after that many steps and saves, as if interrupted) and TINYMOE_QUICK (evaluations score two
batches, benchmarks measure their smallest case once); tinymoe/quick.py and docs/runs.md.

    python tests/docs_check.py [PAGE.md ...]      # default: README.md and docs/*.md
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_LANGS = {"sh", "bash", "shell"}
SKIP = re.compile(r"<!--\s*docs-check:\s*skip\b.*-->")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
# What a page's folder links to: the checkout's files, never its outputs or environments.
NOT_LINKED = {".git", ".venv", "runs", "hf", "build", ".pytest_cache", "__pycache__"}
ENV = {"TINYMOE_MAX_STEPS": "2", "TINYMOE_QUICK": "1", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Command:
    page: str
    line: int  # 1-based line of the command's first line in the page
    text: str


def pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def commands(page: Path) -> list[Command]:
    """The commands of `page`'s runnable blocks, in order."""
    lines = page.read_text().splitlines()
    out, i, skip_next = [], 0, False
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if SKIP.search(lines[i]):
            skip_next = True
        elif fence:
            marker, lang = fence.group(1), fence.group(2).lower()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(marker)), len(lines))
            if lang in RUN_LANGS and not skip_next:
                out += _split(page.name, lines[i + 1:end], i + 2)
            skip_next = False
            i = end
        elif lines[i].strip():
            skip_next = False  # the skip comment must come right before its block
        i += 1
    return out


def _split(page: str, body: list[str], first_line: int) -> list[Command]:
    cmds, i = [], 0
    while i < len(body):
        start, text = i, body[i]
        if not text.strip() or text.lstrip().startswith("#"):
            i += 1
            continue
        while text.endswith("\\") and i + 1 < len(body):
            i += 1
            text = text[:-1] + " " + body[i].strip()
        heredoc = HEREDOC.search(text)
        if heredoc:
            end = next((j for j in range(i + 1, len(body)) if body[j].strip() == heredoc.group(1)), len(body) - 1)
            text = "\n".join([text, *body[i + 1:end + 1]])
            i = end
        cmds.append(Command(page, first_line + start, text))
        i += 1
    return cmds


def folder_for(page: Path, parent: Path) -> Path:
    """A fresh folder holding links to the checkout's files."""
    folder = parent / page.stem
    folder.mkdir(parents=True)
    for item in ROOT.iterdir():
        if item.name not in NOT_LINKED and not item.name.endswith(".egg-info"):
            (folder / item.name).symlink_to(item)
    return folder


def environment() -> dict:
    env = dict(os.environ, **ENV)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run_page(page: Path, parent: Path, timeout: float = 600) -> list[tuple[Command, float]]:
    """Run every command of `page`; raises AssertionError at the first that fails."""
    folder, env, timings = folder_for(page, parent), environment(), []
    for cmd in commands(page):
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(["bash", "-eo", "pipefail", "-c", cmd.text], cwd=folder, env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{cmd.page}:{cmd.line}: still running after {timeout:.0f} s: {cmd.text}") from None
        timings.append((cmd, time.perf_counter() - t0))
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
            raise AssertionError(f"{cmd.page}:{cmd.line}: exit {proc.returncode}: {cmd.text}\n" + "\n".join(tail))
    return timings


def main(argv: list[str]) -> int:
    chosen = [Path(a).resolve() for a in argv] or pages()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="tinymoe-docs-") as tmp:
        for page in chosen:
            try:
                timings = run_page(page, Path(tmp))
            except AssertionError as exc:
                failed += 1
                print(f"FAIL {exc}")
                continue
            total = sum(t for _, t in timings)
            print(f"ok   {page.relative_to(ROOT)}: {len(timings)} commands, {total:.1f} s")
            for cmd, t in timings:
                print(f"     {t:6.1f} s  :{cmd.line}  {cmd.text.splitlines()[0][:100]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
