"""Shared test helpers: a debug-preset training config over a small text file, running a CLI
command, and the check that a command failed with one `error:` line."""

from tinymoe.config import TrainConfig, load_preset

FOX_LINE = "the quick brown fox jumps over the lazy dog. "


def write_corpus(folder, repeats: int = 80):
    """`folder/corpus.txt`: one short sentence `repeats` times (80: about 3.6 KB, a few windows)."""
    path = folder / "corpus.txt"
    path.write_text(FOX_LINE * repeats)
    return path


def configs(corpus, **train):
    """(model config, train config) of the debug preset trained on `corpus`, logging every step."""
    model, tr = load_preset("debug")
    return model, TrainConfig(**{**tr.__dict__, "data": [str(corpus)], "eval_every": 0, "log_every": 1, **train})


def one_error_line(result, *fragments):
    """The CLI result's single `error:` line (exit code 2), holding every fragment."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def invoke(*args):
    """Run `tinymoe ARGS...` in-process (arguments may be paths or numbers)."""
    from click.testing import CliRunner

    from tinymoe.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args):
    """`invoke`, asserting the command succeeded."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result
