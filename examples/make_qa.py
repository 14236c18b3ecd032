"""Build a small instruction set from the bundled corpus: who speaks a given line of the play.

Each speech of tinymoe/corpus/prose/shakespeare.txt ("NAME:" then its lines) becomes one
example: the prompt quotes the speech's first line, the target is the speaker's name. Every
third example is written as a chat (`messages`), the others as `prompt`/`completion`, so both
formats are exercised. Every tenth example goes to the held-out file. Standard library only.

    python examples/make_qa.py OUT_DIR      writes OUT_DIR/qa-train.jsonl and OUT_DIR/qa-val.jsonl
"""

import json
import sys
from pathlib import Path

PLAY = Path(__file__).resolve().parent.parent / "tinymoe" / "corpus" / "prose" / "shakespeare.txt"


def speeches(text: str):
    """(speaker, first line) of every speech, in order."""
    for block in text.split("\n\n"):
        lines = [line for line in block.strip().split("\n") if line.strip()]
        if len(lines) >= 2 and lines[0].endswith(":") and len(lines[0]) < 40:
            yield lines[0][:-1].strip(), lines[1].strip()


def example(i: int, speaker: str, line: str) -> dict:
    question = f"Who says: {line}"
    if i % 3 == 0:
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": speaker}]}
    return {"prompt": question, "completion": speaker}


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, val = [], []
    for i, (speaker, line) in enumerate(speeches(PLAY.read_text(encoding="utf-8"))):
        (val if i % 10 == 9 else train).append(json.dumps(example(i, speaker, line)))
    (out / "qa-train.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
    (out / "qa-val.jsonl").write_text("\n".join(val) + "\n", encoding="utf-8")
    print(f"wrote {len(train)} training and {len(val)} held-out examples to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/make_qa.py OUT_DIR")
    main(sys.argv[1])
