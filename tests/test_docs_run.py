"""Docs are tests: every shell command in README.md and docs/*.md runs as written, page by page
(tests/docs_check.py), and the parser finds what a reader would run."""

import pytest

import docs_check


def test_parser_reads_blocks_continuations_heredocs_and_skips(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n"
        "```sh\n"
        "# a comment\n"
        "tinymoe doctor\n"
        "tinymoe train --preset tiny \\\n"
        "    --out runs/a\n"
        "cat > s.toml <<'EOF'\n"
        "[[stage]]\n"
        "EOF\n"
        "```\n"
        "```text\n"
        "tinymoe not-run\n"
        "```\n"
        "<!-- docs-check: skip (needs the network) -->\n"
        "```sh\n"
        "tinymoe import org/name\n"
        "```\n"
        "```bash\n"
        "echo last\n"
        "```\n")
    cmds = docs_check.commands(page)
    assert [c.text for c in cmds] == ["tinymoe doctor", "tinymoe train --preset tiny  --out runs/a",
                                      "cat > s.toml <<'EOF'\n[[stage]]\nEOF", "echo last"]
    assert [c.line for c in cmds] == [4, 5, 7, 19]


def test_a_failing_or_colliding_command_fails_the_page(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```sh\nmkdir made\nmkdir made\n```\n")
    with pytest.raises(AssertionError, match=r"page.md:3: exit 1: mkdir made"):
        docs_check.run_page(page, tmp_path / "work")


@pytest.mark.parametrize("page", docs_check.pages(), ids=lambda p: p.name)
def test_page_runs_as_written(page, tmp_path):
    docs_check.run_page(page, tmp_path)
