"""Read the WordNet 3.0 noun database files (``data.noun``, ``index.noun``, ``lexnames``; see wndb(5WN)).

The files are parsed directly, so no network access and no nltk download is needed.  Used by
``scripts/build_wordnet_data.py``, which builds the datasets from what this module returns.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Standard WordNet lexicographer file numbers for nouns (used when ``lexnames`` is absent).
NOUN_LEXNAMES = {
    3: "noun.Tops",
    4: "noun.act",
    5: "noun.animal",
    6: "noun.artifact",
    7: "noun.attribute",
    8: "noun.body",
    9: "noun.cognition",
    10: "noun.communication",
    11: "noun.event",
    12: "noun.feeling",
    13: "noun.food",
    14: "noun.group",
    15: "noun.location",
    16: "noun.motive",
    17: "noun.object",
    18: "noun.person",
    19: "noun.phenomenon",
    20: "noun.plant",
    21: "noun.possession",
    22: "noun.process",
    23: "noun.quantity",
    24: "noun.relation",
    25: "noun.shape",
    26: "noun.state",
    27: "noun.substance",
    28: "noun.time",
}
EXAMPLE_RE = re.compile(r'[;:]\s*"')


def check_wordnet_dir(wordnet_dir: str | Path) -> Path:
    """Return the WordNet dir as a Path, or exit with an install hint if it is unusable."""
    path = Path(wordnet_dir)
    missing = [name for name in ("data.noun", "index.noun") if not (path / name).is_file()]
    if missing:
        sys.exit(
            f"error: WordNet 3.0 database not found in {path} (missing {', '.join(missing)}). "
            "Install it with 'apt-get install wordnet-base' or pass --wordnet-dir."
        )
    return path


def read_lexnames(wordnet_dir: Path) -> dict[int, str]:
    """Lexicographer file number -> name, from ``lexnames`` if present, else the standard list."""
    lexnames_file = wordnet_dir / "lexnames"
    if not lexnames_file.is_file():
        return dict(NOUN_LEXNAMES)
    table = {}
    for line in lexnames_file.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit():
            table[int(fields[0])] = fields[1]
    return table


def strip_examples(gloss: str) -> str:
    """Drop the quoted example sentences that follow the definition (``...; "example"``)."""
    definition = EXAMPLE_RE.split(gloss, maxsplit=1)[0].strip()
    return definition.rstrip(";:, ").strip()


def parse_data_line(line: str, lexnames: dict[int, str]) -> dict:
    """Parse one synset line of ``data.noun`` (see wndb(5WN))."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    w_cnt = int(fields[3], 16)
    lemmas = fields[4 : 4 + 2 * w_cnt : 2]
    p_idx = 4 + 2 * w_cnt
    p_cnt = int(fields[p_idx])
    pointers = [fields[p_idx + 1 + 4 * k : p_idx + 5 + 4 * k] for k in range(p_cnt)]
    lex_filenum = int(fields[1])
    return {
        "offset": fields[0],
        "lexname": lexnames.get(lex_filenum, f"lexfile{lex_filenum:02d}"),
        "lemmas": lemmas,
        "gloss": gloss.strip(),
        "definition": strip_examples(gloss.strip()),
        "hypernyms": [p[1] for p in pointers if p[0] == "@" and p[2] == "n"],
        "instance_hypernyms": [p[1] for p in pointers if p[0] == "@i" and p[2] == "n"],
    }


def load_wordnet_nouns(wordnet_dir: str | Path = "/usr/share/wordnet") -> list[dict]:
    """Return all noun synsets of ``data.noun`` in file order.

    Each dict has ``offset`` (8-digit str), ``lexname`` (e.g. ``"noun.animal"``), ``lemmas``
    (list of str, underscores kept), ``gloss`` (full gloss), ``definition`` (gloss without
    example sentences), ``hypernyms`` and ``instance_hypernyms`` (lists of noun offsets).
    """
    wordnet_dir = check_wordnet_dir(wordnet_dir)
    lexnames = read_lexnames(wordnet_dir)
    with open(wordnet_dir / "data.noun", encoding="utf-8") as f:
        return [parse_data_line(line, lexnames) for line in f if not line.startswith("  ")]


def load_noun_index(wordnet_dir: str | Path) -> dict[str, dict]:
    """Return ``index.noun`` as ``lemma -> {"offsets": [...] in sense order, "tagged": int}``."""
    index = {}
    with open(Path(wordnet_dir) / "index.noun", encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split()
            synset_cnt, p_cnt = int(fields[2]), int(fields[3])
            tagged = int(fields[5 + p_cnt])
            index[fields[0]] = {"offsets": fields[-synset_cnt:], "tagged": tagged}
    return index


def read_license(wordnet_dir: str | Path) -> str:
    """Return the licence header of ``data.noun`` (lines starting with two spaces)."""
    lines = []
    with open(Path(wordnet_dir) / "data.noun", encoding="utf-8") as f:
        for line in f:
            if not line.startswith("  "):
                break
            match = re.match(r"^\s+\d+ ?(.*)$", line.rstrip("\n"))
            lines.append((match.group(1) if match else line).rstrip())
    return "\n".join(lines).strip() + "\n"
