"""A debug-preset training config over a small text file: shared by the training-reliability tests."""

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
