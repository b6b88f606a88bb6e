"""The general-text held-out set that forgetting is measured on: `datasets/general/heldout.jsonl`.

Hugging Face PEFT's method comparison measures forgetting as the cross-entropy change on Wikipedia text; no
corpus can be downloaded here, so the shipped one is taken from text every CPython installation carries: the
prose of the Python Language Reference, in `pydoc_data/topics.py` (Python Software Foundation License 2.0,
which permits redistribution). It is general expository English about a subject none of our tasks touch.
Paragraphs of 300 to 1,200 characters with no indented (code or grammar) lines are kept, in sorted topic
order, the first `PASSAGES`; the file records the Python version it came from.

Regenerate with `python -m nemo_adapt.data.general_corpus [OUT]` (the shipped file is the output on CPython 3.11).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

PASSAGES = 64
"""Passages in the set: at about 150 tokens each, ~10k tokens — seconds per model on a CPU."""
DEFAULT = Path(__file__).resolve().parents[2] / "datasets" / "general" / "heldout.jsonl"
"""The shipped set (in a source checkout)."""


def passages(n: int = PASSAGES) -> list[str]:
    """The first `n` prose paragraphs of the Language Reference topics (see the module docstring)."""
    from pydoc_data.topics import topics

    out: list[str] = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            lines = para.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines) or re.fullmatch(r"[*=\-]+", lines[-1].strip()):
                continue  # code, grammar or a heading
            text = " ".join(line.strip() for line in lines).strip()
            if 300 <= len(text) <= 1200:
                out.append(text)
            if len(out) == n:
                return out
    return out


def write(out: str | Path = DEFAULT) -> Path:
    """Write the set as JSONL: one `{"text": ...}` per passage, after a first line naming its source."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = {"source": "Python Language Reference, pydoc_data/topics.py of CPython "
                        f"{sys.version.split()[0]}", "licence": "PSF License 2.0"}
    rows = [json.dumps(source)] + [json.dumps({"text": t}, ensure_ascii=False) for t in passages()]
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def load(path: str | Path = DEFAULT) -> list[str]:
    """The passages of a held-out text file: JSONL rows with `text` (rows without it, like the source line, are
    skipped), or a .txt file split at blank lines.

    Raises:
        ConfigError: missing file, invalid JSON (file and line named), or no passage.
    """
    from nemo_adapt.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"general-text file {str(path)!r} does not exist")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        texts = [p.strip() for p in re.split(r"\n\s*\n", raw) if p.strip()]
    else:
        from nemo_adapt.data.formats import jsonl_objects

        texts = [row["text"] for _, row in jsonl_objects(raw, path)
                 if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip()]
    if not texts:
        raise ConfigError(f"{path}: no passages (JSONL rows with a non-empty `text`, or .txt paragraphs)")
    return texts


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else DEFAULT))
