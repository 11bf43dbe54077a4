"""Build small, deterministic text datasets from the WordNet 3.0 noun database.

The WordNet database files (``data.noun``, ``index.noun``) are parsed directly by
``scripts/wordnet_db.py``, so no network access and no nltk download is needed.  On
Debian/Ubuntu they come with ``apt-get install wordnet-base`` (installed under
``/usr/share/wordnet``).  This script samples the datasets and writes them.

Outputs (under ``--out``, default ``data``):

* ``wordnet_supersense10/{train,test}.parquet``: 10 noun supersense classes,
  300 train / 100 test synsets per class; columns ``text``, ``label``, ``label_name``.
* ``wordnet_supersense20/{train,test}.parquet``: 20 classes, 150 train / 50 test per class.
* ``wordnet_instruct/{define,category,hypernym,synonym}/{train,test}.jsonl``:
  400 train / 100 test ``{"prompt", "response"}`` pairs per task, words disjoint
  between train and test within a task.
* ``README.md`` and ``LICENSE-WordNet`` (the licence notice copied from ``data.noun``).
  README.md ends with ``README_KEPT_MARKER``; a rebuild keeps what an existing README.md has after it.

Every random choice uses ``random.Random(f"{seed}:{tag}")`` (string seeds are hashed
with SHA-512, independent of PYTHONHASHSEED) and rows are written in sorted order, so
reruns with the same seed and library versions give byte-identical files.

Usage::

    python scripts/build_wordnet_data.py --out data
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: its wordnet_db module
from wordnet_db import check_wordnet_dir, load_noun_index, load_wordnet_nouns, read_license  # noqa: E402

EXCLUDED_LEXNAMES = ("noun.Tops",)
MAX_TEXT_LEMMAS = 4  # lemmas shown in front of a supersense gloss
SUPERSENSE_SETS = {
    # name: (number of classes, minimum synsets per class, train per class, test per class)
    "supersense10": (10, 0, 300, 100),
    "supersense20": (20, 600, 150, 50),
}
INSTRUCT_TASKS = ("define", "category", "hypernym", "synonym")
INSTRUCT_TRAIN, INSTRUCT_TEST = 400, 100
MAX_DEFINE_WORDS = 20
WORD_RE = re.compile(r"^[a-z]{3,12}$")
PROMPTS = {
    "define": "Define the word '{}'.",
    "category": "Which category does the noun '{}' belong to? Answer with one word.",
    "hypernym": "Name a more general term for '{}'.",
    "synonym": "Give a synonym of '{}'.",
}


# --------------------------------------------------------------------------- writing


def atomic_write(path: Path, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` on a temp file next to ``path``, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False, compression="zstd"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n" for row in rows)
    write_text(path, text)


# --------------------------------------------------------------------------- supersense


def short_name(lexname: str) -> str:
    return lexname.split(".", 1)[1]


def synset_text(synset: dict) -> str:
    """``"lemma1, lemma2: definition"`` with underscores replaced by spaces."""
    lemmas = [lemma.replace("_", " ") for lemma in synset["lemmas"][:MAX_TEXT_LEMMAS]]
    return f"{', '.join(lemmas)}: {synset['definition']}"


def supersense_candidates(nouns: list[dict]) -> dict[str, list[dict]]:
    """Lexname -> synsets usable as examples (non-empty definition, unique text), by offset."""
    by_class: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for synset in sorted(nouns, key=lambda s: s["offset"]):
        if synset["lexname"] in EXCLUDED_LEXNAMES or not synset["definition"]:
            continue
        text = synset_text(synset)
        if text in seen:
            continue
        seen.add(text)
        by_class.setdefault(synset["lexname"], []).append(synset)
    return by_class


def choose_classes(by_class: dict[str, list[dict]], n_classes: int, min_size: int) -> tuple[list[str], bool]:
    """Pick the ``n_classes`` largest classes with ``>= min_size`` synsets (ties by name).

    If fewer qualify, the ``n_classes`` largest are taken and the flag is True.
    Returned lexnames are sorted alphabetically: that order defines the label ids.
    """
    ranked = sorted(by_class, key=lambda name: (-len(by_class[name]), name))
    qualified = [name for name in ranked if len(by_class[name]) >= min_size]
    fallback = len(qualified) < n_classes
    chosen = (ranked if fallback else qualified)[:n_classes]
    return sorted(chosen, key=str.lower), fallback


def build_supersense(nouns: list[dict], set_name: str, seed: int) -> dict[str, pd.DataFrame]:
    """Seeded per-class sample of disjoint train/test synsets; rows sorted by (label, offset)."""
    n_classes, min_size, n_train, n_test = SUPERSENSE_SETS[set_name]
    by_class = supersense_candidates(nouns)
    classes, _ = choose_classes(by_class, n_classes, min_size)
    rows: dict[str, list[tuple]] = {"train": [], "test": []}
    for label, lexname in enumerate(classes):
        pool = by_class[lexname]
        if len(pool) < n_train + n_test:
            raise ValueError(f"{lexname} has only {len(pool)} synsets, need {n_train + n_test}")
        picked = random.Random(f"{seed}:{set_name}:{lexname}").sample(pool, n_train + n_test)
        for split, part in (("train", picked[:n_train]), ("test", picked[n_train:])):
            rows[split] += [(label, s["offset"], synset_text(s), short_name(lexname)) for s in part]
    frames = {}
    for split, split_rows in rows.items():
        split_rows.sort()
        frames[split] = pd.DataFrame(
            {
                "text": [r[2] for r in split_rows],
                "label": pd.array([r[0] for r in split_rows], dtype="int64"),
                "label_name": [r[3] for r in split_rows],
            }
        )
    return frames


# --------------------------------------------------------------------------- instruct


def primary_senses(nouns: list[dict], index: dict[str, dict]) -> dict[str, dict]:
    """Word -> its most frequent noun synset, for short, common, lower-case single words.

    A word qualifies if it matches ``[a-z]{3,12}``, is sense-tagged at least once in
    SemCor (index.noun tagsense_cnt > 0) and appears verbatim among the lemmas of its
    first (most frequent) sense, which drops capitalised proper-noun senses.
    """
    by_offset = {s["offset"]: s for s in nouns}
    senses = {}
    for word, entry in index.items():
        if not WORD_RE.match(word) or entry["tagged"] < 1:
            continue
        synset = by_offset[entry["offsets"][0]]
        if word in synset["lemmas"]:
            senses[word] = synset
    return senses


def instruct_response(task: str, word: str, synset: dict, by_offset: dict[str, dict]) -> str | None:
    """The answer for ``task`` about ``word`` (its primary synset), or None if not applicable."""
    if task == "define":
        first = synset["definition"].split(";")[0].strip()
        return first if first and len(first.split()) <= MAX_DEFINE_WORDS else None
    if task == "category":
        return None if synset["lexname"] in EXCLUDED_LEXNAMES else short_name(synset["lexname"])
    if task == "hypernym":
        if not synset["hypernyms"]:
            return None
        answer = by_offset[synset["hypernyms"][0]]["lemmas"][0].replace("_", " ")
        return None if answer.lower() == word else answer
    if task == "synonym":
        # Skip trivial variants that contain the word ("dune" -> "sand dune"); prefer single words.
        others = [lemma for lemma in synset["lemmas"] if word not in lemma.lower()]
        others.sort(key=lambda lemma: "_" in lemma)  # stable: keeps WordNet order otherwise
        return others[0].replace("_", " ") if others else None
    raise ValueError(f"unknown task {task!r}")


def build_instruct_task(task: str, senses: dict[str, dict], by_offset: dict[str, dict], seed: int) -> dict:
    """Seeded disjoint-word train/test split for one task; rows sorted by word."""
    pairs = []
    for word in sorted(senses):
        response = instruct_response(task, word, senses[word], by_offset)
        if response is not None:
            pairs.append((word, response))
    need = INSTRUCT_TRAIN + INSTRUCT_TEST
    if len(pairs) < need:
        raise ValueError(f"task {task}: only {len(pairs)} candidate words, need {need}")
    picked = random.Random(f"{seed}:instruct:{task}").sample(pairs, need)
    splits = {"train": sorted(picked[:INSTRUCT_TRAIN]), "test": sorted(picked[INSTRUCT_TRAIN:])}
    return {
        split: [{"prompt": PROMPTS[task].format(word), "response": response} for word, response in rows]
        for split, rows in splits.items()
    }


def build_instruct(nouns: list[dict], index: dict[str, dict], seed: int) -> dict[str, dict]:
    by_offset = {s["offset"]: s for s in nouns}
    senses = primary_senses(nouns, index)
    return {task: build_instruct_task(task, senses, by_offset, seed) for task in INSTRUCT_TASKS}


# --------------------------------------------------------------------------- README


def describe_classes(nouns: list[dict]) -> list[str]:
    """README lines listing the chosen classes (label id order) of each supersense set."""
    by_class = supersense_candidates(nouns)
    lines = []
    for set_name, (n_classes, min_size, n_train, n_test) in SUPERSENSE_SETS.items():
        classes, fallback = choose_classes(by_class, n_classes, min_size)
        rule = f"the {n_classes} largest noun supersenses" + (f" with >= {min_size} synsets" if min_size else "")
        lines.append(f"### `wordnet_{set_name}` ({n_train} train / {n_test} test synsets per class)\n")
        lines.append(f"Classes: {rule} (excluding {', '.join(EXCLUDED_LEXNAMES)}); label ids follow")
        lines.append("alphabetical order of the class names.")
        if fallback:
            lines.append(f"**Note:** fewer than {n_classes} supersenses have >= {min_size} synsets, so the")
            lines.append(f"{n_classes} largest were taken regardless of size.")
        left_out = [c for c in by_class if c not in classes and len(by_class[c]) >= max(min_size, 1)]
        if min_size and left_out:
            names = ", ".join(f"{c} ({len(by_class[c])})" for c in sorted(left_out))
            lines.append(f"Qualifying but not among the {n_classes} largest: {names}.")
        lines.append("\n| label | label_name | lexicographer file | eligible synsets |\n|---|---|---|---|")
        lines += [f"| {i} | {short_name(c)} | {c} | {len(by_class[c])} |" for i, c in enumerate(classes)]
        lines.append("")
    return lines


README_HEAD = """# WordNet-derived datasets

Small, deterministic text datasets derived from the Princeton WordNet 3.0 noun database
(Debian package `wordnet-base`, files `/usr/share/wordnet/data.noun` and `index.noun`).

Built with (WordNet 3.0, seed {seed}):

```
python scripts/build_wordnet_data.py --out data{seed_arg}
```

Rows are sorted (supersense sets: by label, then synset offset; instruct tasks: by word),
so shuffle before training.  Rerunning with the same seed and pandas/pyarrow versions gives
byte-identical files.

## Supersense classification

`text` is `"<lemma1>, <lemma2>, ...: <gloss>"` (at most {max_lemmas} lemmas, underscores replaced
by spaces, quoted example sentences removed), `label` an int id, `label_name` the supersense
(lexicographer file without the `noun.` prefix).  Each class is sampled without replacement
with `random.Random(f"{{seed}}:{{set}}:{{lexname}}")`, so train and test synsets are disjoint.

"""

README_INSTRUCT = """## Instruction stream `wordnet_instruct`

Four tasks, each `{task}/{{train,test}}.jsonl` with `{{"prompt", "response"}}` rows,
{n_train} train / {n_test} test, words disjoint between train and test within a task.
Words are lower-case single nouns matching `[a-z]{{3,12}}` that are sense-tagged in SemCor
(`index.noun` tagsense_cnt > 0); each word uses its first (most frequent) noun sense.

| task | prompt | response |
|---|---|---|
| define | `Define the word 'X'.` | first `;`-separated part of the gloss (<= {max_words} words) |
| category | `Which category does the noun 'X' belong to? Answer with one word.` | supersense, e.g. `animal` |
| hypernym | `Name a more general term for 'X'.` | first lemma of the first hypernym (`@`) |
| synonym | `Give a synonym of 'X'.` | another lemma of the same synset not containing X (single words first) |

## Licence

The data are derived from WordNet 3.0; the licence notice from the WordNet database files
is reproduced below and in `LICENSE-WordNet`.

```
{license}```
"""


def build_readme(nouns: list[dict], license_text: str, seed: int = 0) -> str:
    seed_arg = f" --seed {seed}" if seed else ""
    head = README_HEAD.format(max_lemmas=MAX_TEXT_LEMMAS, seed=seed, seed_arg=seed_arg)
    instruct = README_INSTRUCT.format(
        task="{" + ",".join(INSTRUCT_TASKS) + "}",
        n_train=INSTRUCT_TRAIN,
        n_test=INSTRUCT_TEST,
        max_words=MAX_DEFINE_WORDS,
        license=license_text,
    )
    return head + "\n".join(describe_classes(nouns)) + "\n" + instruct


README_KEPT_MARKER = (
    "<!-- the sections below are not generated by scripts/build_wordnet_data.py: a rebuild keeps them -->"
)


def merge_readme(generated: str, old: str | None) -> str:
    """``generated``, the marker line, then what follows the marker in ``old`` (nothing if ``old`` lacks it)."""
    kept = old.partition(README_KEPT_MARKER)[2].removeprefix("\n") if old and README_KEPT_MARKER in old else ""
    return f"{generated}\n{README_KEPT_MARKER}\n{kept}"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet", help="WordNet 3.0 dict directory")
    parser.add_argument("--out", default="data", help="output directory (default: data)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--only", choices=[*SUPERSENSE_SETS, "instruct"], help="build only this dataset")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wordnet_dir = check_wordnet_dir(args.wordnet_dir)
    out = Path(args.out)
    nouns = load_wordnet_nouns(wordnet_dir)
    for set_name in SUPERSENSE_SETS:
        if args.only in (None, set_name):
            frames = build_supersense(nouns, set_name, args.seed)
            for split, df in frames.items():
                write_parquet(out / f"wordnet_{set_name}" / f"{split}.parquet", df)
            counts = Counter(frames["train"]["label"].tolist())
            print(
                f"wordnet_{set_name}: {len(counts)} classes, train {len(frames['train'])}, test {len(frames['test'])}"
            )
    if args.only in (None, "instruct"):
        tasks = build_instruct(nouns, load_noun_index(wordnet_dir), args.seed)
        for task, splits in tasks.items():
            for split, rows in splits.items():
                write_jsonl(out / "wordnet_instruct" / task / f"{split}.jsonl", rows)
        sizes = ", ".join(f"{task} {len(s['train'])}/{len(s['test'])}" for task, s in tasks.items())
        print(f"wordnet_instruct: {sizes}")
    license_text = read_license(wordnet_dir)
    write_text(out / "LICENSE-WordNet", license_text)
    readme = out / "README.md"
    old = readme.read_text(encoding="utf-8") if readme.exists() else None
    write_text(readme, merge_readme(build_readme(nouns, license_text, args.seed), old))
    print(f"wrote {out}/README.md and {out}/LICENSE-WordNet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
