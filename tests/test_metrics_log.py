"""metrics.jsonl readers tolerate a line torn by a crash; resume trims it; malformed lines elsewhere
are skipped with a warning (docs/errors.md)."""

import json

import pytest
from debug_run import configs, write_corpus

from tinymoe.io.loader import load_training_state
from tinymoe.io import metrics_log
from tinymoe.train.trainer import Trainer


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


@pytest.mark.parametrize("tail", ['{"step": 5, "loss": 1.2', '{"ste', "\x00\x00\x00", '{"step": 5}garbage\n'])
def test_resume_trims_a_torn_last_line(tmp_path, corpus, capsys, tail):
    # Before: the resume died in json.loads (traceback), so the run could not be continued.
    model_cfg, tr = configs(corpus, steps=4)
    run = tmp_path / "run"
    Trainer(model_cfg, tr, run, progress=False).run()
    log = run / "metrics.jsonl"
    with open(log, "a") as f:
        f.write(tail)  # what a kill -9 in the middle of a write leaves behind
    state = load_training_state(run)  # step 4
    model_cfg, tr = configs(corpus, steps=6)
    Trainer(model_cfg, tr, run, resume=state, progress=False).run()
    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line parses
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "warning" not in capsys.readouterr().err


def test_a_malformed_line_before_the_last_is_skipped_with_a_warning(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, oops}\n"just a string"\n{"step": 3}\n{"step": 4}\n')
    assert [r["step"] for _, r in metrics_log.read_records(log)] == [1, 3, 4]
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {log}:2: not a metrics record (malformed line); skipped",
                   f"warning: {log}:3: not a metrics record (malformed line); skipped"]
    metrics_log.trim(log, 3)
    assert log.read_text() == '{"step": 1}\n{"step": 3}\n'


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}')
    metrics_log.trim(log, 5)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'  # appending now starts a new line
