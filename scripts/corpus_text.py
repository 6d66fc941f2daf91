"""Text preparation shared by training, calibration and evaluation of the default model.

The shared Gutenberg books put one sentence per line and write quotes as `` and '' (NLTK style).
Training sees sentences joined into paragraph-sized chunks with normal quotes; calibration and held-out
evaluation must see text prepared the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def clean(text: str) -> str:
    return text.replace("`` ", '"').replace("``", '"').replace(" ''", '"').replace("''", '"')


def chunks(text: str, lines_per_chunk: int = 6) -> list[str]:
    """Sentences joined with spaces, six to a chunk; each chunk is one training document."""
    lines = [ln.strip() for ln in clean(text).split("\n") if ln.strip()]
    return [" ".join(lines[i:i + lines_per_chunk]) for i in range(0, len(lines), lines_per_chunk)]


def prepared(path: Path) -> str:
    """A book as continuous prose: chunks separated by blank lines."""
    return "\n\n".join(chunks(path.read_text(encoding="utf-8")))


def main() -> None:
    ap = argparse.ArgumentParser(description="write a book prepared as the default model was trained")
    ap.add_argument("book", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    args.out.write_text(prepared(args.book), encoding="utf-8")


if __name__ == "__main__":
    main()
