"""Build the cleaned Jane Austen corpus that the bundled model is trained on.

Source: Debian's ``r-cran-janeaustenr`` (1.0.0-1), which ships Julia Silge's R package
janeaustenr (https://github.com/juliasilge/janeaustenr, MIT) with the six completed novels
taken from Project Gutenberg (the texts themselves are public domain).

The R package keeps its data as an R *lazy-load database* (``data/Rdata.rdb`` +
``data/Rdata.rdx``), not a plain ``.rda``. The ``.rdx`` index is itself an RDS file whose
``variables`` entry maps each object name to ``(offset, length)`` in the ``.rdb``; each such
slice is a 4-byte big-endian uncompressed length followed by one zlib stream holding one
serialized R object (see R's ``src/library/base/R/lazyload.R`` and ``makeLazyLoadDB``).
We read it with the ``rdata`` package (``read_rds`` for the index, ``parser.parse_data`` +
``conversion.convert`` for each object) rather than a hand-written R parser.

Cleaning, kept deliberately simple:

* the R data is one printed text line per row, with blank rows between paragraphs: lines are
  joined into paragraphs and every run of whitespace becomes one space, so the output is
  one paragraph per line;
* front matter (title, "by Jane Austen", the Northanger Abbey advertisement) is dropped by
  starting each novel at its first chapter heading; chapter/volume headings are dropped;
* each novel stops before its end marker ("THE END", "FINIS", Northanger's "A NOTE ON THE TEXT");
* paragraphs with no letters ("* * * * *" scene breaks) are dropped;
* Gutenberg's ``_underscores_`` for italics are removed (markup, not Austen's text).

Split: the last 5% of every novel's paragraphs (at least one) is the validation split and is
never trained on, so validation measures text the model has not seen, from all six novels.

Output (committed, so retraining needs neither apt nor R):
``data/austen/train.txt.gz`` and ``data/austen/valid.txt.gz`` (UTF-8, one paragraph per
line, novels in :data:`NOVELS` order) and ``data/austen/splits.json`` (paragraph and
character counts per novel and split, in file order, so a novel's lines can be recovered).

Run: ``python -m kvviz.training.prepare_data --rdata-dir .../janeaustenr/data``
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import zlib
from pathlib import Path

import numpy as np
import rdata

#: (name in the R package, title), in publication order; also the order in the output files.
NOVELS: list[tuple[str, str]] = [
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
]

VALID_FRACTION = 0.05
REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data" / "austen"
DEFAULT_RDATA_DIR = Path("/tmp/austen/x/usr/lib/R/site-library/janeaustenr/data")

# "CHAPTER I", "Chapter 1", "CHAPTER XLV", "VOLUME II" (optionally with a trailing period).
_HEADING = re.compile(r"^(chapter|volume)\s+[ivxlc\d]+\.?$", re.IGNORECASE)
_END_MARKERS = {"the end", "finis", "a note on the text"}


def read_novel_lines(rdata_dir: Path) -> dict[str, list[str]]:
    """Return ``{r_name: [text line, ...]}`` for every object in the lazy-load database."""
    index = rdata.read_rds(str(rdata_dir / "Rdata.rdx"))
    blob = (rdata_dir / "Rdata.rdb").read_bytes()
    novels: dict[str, list[str]] = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset) : int(offset) + int(length)]
        # 4-byte header = uncompressed size; the rest is one zlib stream (index["compressed"]).
        parsed = rdata.parser.parse_data(zlib.decompress(chunk[4:]))
        lines = rdata.conversion.convert(parsed)
        novels[str(name)] = [str(s) for s in np.asarray(lines)]
    return novels


def clean_paragraphs(lines: list[str]) -> list[str]:
    """Join printed lines into paragraphs and drop front matter, headings and end notes."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:  # the sentinel flushes the last paragraph
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(re.sub(r"\s+", " ", " ".join(current)).replace("_", ""))
            current = []

    first_heading = next(i for i, p in enumerate(paragraphs) if _HEADING.match(p))
    kept: list[str] = []
    for p in paragraphs[first_heading:]:
        if p.lower() in _END_MARKERS:
            break
        if _HEADING.match(p) or not re.search(r"[A-Za-z]", p):
            continue
        kept.append(p)
    return kept


def split_paragraphs(paragraphs: list[str], valid_fraction: float = VALID_FRACTION) -> tuple[list[str], list[str]]:
    """Split one novel into (train, valid): valid is the last ``valid_fraction`` of paragraphs."""
    n_valid = max(1, round(len(paragraphs) * valid_fraction))
    return paragraphs[:-n_valid], paragraphs[-n_valid:]


def write_corpus(novels: dict[str, list[str]], out_dir: Path = DATA_DIR) -> dict:
    """Clean, split and write the corpus; return the ``splits.json`` summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train_all: list[str] = []
    valid_all: list[str] = []
    summary: dict = {"valid_fraction": VALID_FRACTION, "novels": []}
    for r_name, title in NOVELS:
        train, valid = split_paragraphs(clean_paragraphs(novels[r_name]))
        train_all += train
        valid_all += valid
        summary["novels"].append(
            {
                "r_name": r_name,
                "title": title,
                "train_paragraphs": len(train),
                "valid_paragraphs": len(valid),
                "train_chars": sum(map(len, train)),
                "valid_chars": sum(map(len, valid)),
            }
        )
    for split, paragraphs in (("train", train_all), ("valid", valid_all)):
        # mtime=0 makes the .gz byte-identical across reruns (no spurious diffs in git).
        with (
            open(out_dir / f"{split}.txt.gz", "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
        ):
            gz.write(("\n".join(paragraphs) + "\n").encode("utf-8"))
    (out_dir / "splits.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_split(split: str, data_dir: Path = DATA_DIR) -> list[str]:
    """Paragraphs of ``split`` ("train" or "valid") from the committed corpus, in file order."""
    with gzip.open(data_dir / f"{split}.txt.gz", "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def load_split_by_novel(split: str, data_dir: Path = DATA_DIR) -> list[tuple[str, list[str]]]:
    """``[(title, paragraphs), ...]`` for ``split``, using the counts in ``splits.json``."""
    paragraphs = load_split(split, data_dir)
    summary = json.loads((data_dir / "splits.json").read_text())
    out: list[tuple[str, list[str]]] = []
    start = 0
    for novel in summary["novels"]:
        n = novel[f"{split}_paragraphs"]
        out.append((novel["title"], paragraphs[start : start + n]))
        start += n
    assert start == len(paragraphs), "splits.json does not match the corpus; rerun prepare_data"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rdata-dir",
        type=Path,
        default=DEFAULT_RDATA_DIR,
        help="janeaustenr/data directory holding Rdata.rdb and Rdata.rdx "
        "(apt-get download r-cran-janeaustenr && dpkg-deb -x FILE x)",
    )
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args()
    summary = write_corpus(read_novel_lines(args.rdata_dir), args.out_dir)
    for n in summary["novels"]:
        print(
            f"{n['title']:<22} train {n['train_paragraphs']:5d} paragraphs {n['train_chars']:8,d} chars"
            f" | valid {n['valid_paragraphs']:4d} paragraphs {n['valid_chars']:7,d} chars"
        )


if __name__ == "__main__":
    main()
