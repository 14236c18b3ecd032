"""Render an instruction set (make_qa.py's qa-train.jsonl / qa-val.jsonl) as plain-text records.

Writes DST/train.jsonl and DST/valid.jsonl ({"text": ...} per example, the layout `mlx_lm.lora
--data DST` reads) and DST/valid.txt (the held-out examples as one text file, for `tinymoe eval
--data`), each example rendered with tinymoe's instruction template (tinymoe.data.instruct), so
both tools train and are scored on the same characters.

    python examples/qa_to_text.py runs/ft-qa runs/ft-qa/text
"""

import json
import sys
from pathlib import Path

from tinymoe.data.instruct import render


def main(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name, out in (("qa-train.jsonl", "train"), ("qa-val.jsonl", "valid")):
        texts = ["".join(piece for piece, _ in render(json.loads(line), f"{name}:{i + 1}"))
                 for i, line in enumerate((src / name).read_text().splitlines())]
        (dst / f"{out}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        (dst / f"{out}.txt").write_text("\n".join(texts))
    print(f"wrote {dst}/train.jsonl, valid.jsonl, valid.txt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
