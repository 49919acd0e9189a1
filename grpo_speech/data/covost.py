"""CoVoST 2 from disk, one language pair (`data.covost_pair`, default en_de), in either layout:
- the split TSVs `*.{pair}.{train,dev,test}.tsv` (path, sentence, translation, client_id) that
  facebookresearch/covost `get_covost_splits.py` writes (or `prepare covost2`, the same join), with
  Common Voice v4 clips under `data.audio_root` (default: DIR/clips), mp3 at 48 kHz, resampled when
  a batch is built. pandas writes them tab separated with `quoting=QUOTE_NONE, escapechar="\\"`:
  a quote, tab, backslash or newline inside a field is preceded by a backslash, and read back the
  same way (reading without the escape character leaves `\\"` in the references);
- the hub's parquet copies (columns client_id, file, audio {bytes, path}, sentence, translation,
  id) as `<pair>/<split>-0000k-of-0000n.parquet` or `<pair>/<split>/0000.parquet`, split train,
  validation (or dev) or test. A row's audio stays in its file (ParquetAudio) until its batch.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from grpo_speech.data.audio import ParquetAudio
from grpo_speech.data.rows import DataError, RowChecker, Split, example, header_seconds

SPLIT_NAMES = {"train": ("train",), "validation": ("dev", "validation"), "test": ("test",)}
# A language pair as CoVoST names it: en_de, en_zh-CN, sv-SE_en.
PAIR = r"[a-z]{2,3}(?:-[A-Za-z]+)?_[a-z]{2,3}(?:-[A-Za-z]+)?"
TSV_NAME = re.compile(rf"(?:.*\.)?({PAIR})\.(train|dev|test)\.tsv")
SHARD_NAME = re.compile(r"(train|validation|dev|test)-\d+-of-\d+\.parquet")
AUTO_NAME = re.compile(r"\d+\.parquet")
# The escaping of get_covost_splits.py (pandas read_csv/to_csv with these arguments use the csv
# module's rules: the delimiter, the quote character, the escape character itself and line breaks
# inside a field are written after a backslash).
TSV_FORMAT = dict(delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")


def read_tsv(path: Path):
    """(header, iterator of (line number, cells)) of a TSV in the release's escaping. The line
    number is the file line where the row starts (a row with an escaped line break spans more)."""
    f = open(path, encoding="utf-8", newline="")
    reader = csv.reader(f, **TSV_FORMAT)
    header = next(reader, None)

    def rows():
        with f:
            start = reader.line_num + 1
            for cells in reader:
                if cells:  # pandas skips blank lines
                    yield start, cells
                start = reader.line_num + 1
    return header, rows()


def write_tsv(path: Path, header: list[str], rows) -> None:
    """Write rows exactly as get_covost_splits.py's pandas `to_csv` does (same escaping, "\\n")."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n", **TSV_FORMAT)
        writer.writerow(header)
        writer.writerows(rows)


def _pair_of(path: Path, root: Path) -> str | None:
    """The language pair a parquet file belongs to: the nearest folder named like one, from the
    file up to `root` itself; None when none is."""
    for d in [path.parent, *path.parent.parents]:
        if re.fullmatch(PAIR, d.name):
            return d.name
        if d == root:
            return None
    return None


def find_files(root: Path) -> dict[tuple[str | None, str], list[Path]]:
    """{(pair, split): files} of every CoVoST split file under root; split is train, validation or
    test. Parquet files directly in a folder not named like a pair have pair None."""
    found: dict[tuple[str | None, str], list[Path]] = {}
    split_of = {n: s for s, names in SPLIT_NAMES.items() for n in names}
    for p in sorted(root.rglob("*.tsv")):
        m = TSV_NAME.fullmatch(p.name)
        if m:
            found.setdefault((m.group(1), split_of[m.group(2)]), []).append(p)
    for p in sorted(root.rglob("*.parquet")):
        if SHARD_NAME.fullmatch(p.name):
            split = split_of[SHARD_NAME.fullmatch(p.name).group(1)]
        elif AUTO_NAME.fullmatch(p.name) and p.parent.name in split_of:
            split = split_of[p.parent.name]
        else:
            continue
        found.setdefault((_pair_of(p, root), split), []).append(p)
    return found


def split_files(root: Path, pair: str, split: str) -> list[Path]:
    """The files of one split of one pair. Files of other pairs are never mixed in: when `pair`
    has none, the error names the pairs there are."""
    found = find_files(root)
    pairs = sorted({p for p, _ in found if p is not None})
    if pairs and pair not in pairs:
        raise DataError(f"{root}: no CoVoST 2 files of data.covost_pair={pair!r}; found the pairs "
                        f"{pairs} (set data.covost_pair to one of them)")
    files = found.get((pair, split)) or ([] if pairs else found.get((None, split), []))
    if files:
        # One copy of a split: one TSV, or the parquet files of one layout in one folder. Two
        # copies (TSV and parquet, both hub layouts, two folders) would give every row twice.
        layouts = {"tsv" if p.suffix == ".tsv" else "shards" if SHARD_NAME.fullmatch(p.name)
                   else "auto" for p in files}
        copies = len(files) if layouts == {"tsv"} else len(layouts) * len({p.parent for p in files})
        if copies > 1:
            raise DataError(f"{root}: CoVoST 2 {pair} {split} is there more than once "
                            f"({[str(p) for p in files]}); keep one copy, or point data.dir at it")
        return files
    joined = sorted(root.rglob(f"covost_v2.{pair}.tsv"))
    hint = (f"; {joined[0]} is the translation table before the join: run `python -m grpo_speech "
            f"prepare covost2` (README, Data) to write the split files" if joined else "")
    name = SPLIT_NAMES[split][0]
    raise DataError(f"{root}: no CoVoST 2 {pair} {split} file (covost_v2.{pair}.{name}.tsv, "
                    f"{pair}/{SPLIT_NAMES[split][-1]}-00000-of-0000N.parquet or "
                    f"{pair}/{SPLIT_NAMES[split][-1]}/0000.parquet){hint}")


def _reference(task: str, row: dict) -> str:
    if task == "ast":
        return row["translation"].strip()
    if task == "asr":
        return row["sentence"].strip()
    raise DataError(f"CoVoST 2 has no task {task!r} (ast or asr)")


def load(root: Path, audio_root: Path | None, split: str, task: str, checker: RowChecker,
         pair: str = "en_de") -> Split:
    _reference(task, {"translation": "", "sentence": ""})  # unknown task: fail before reading
    files = split_files(root, pair, split)
    if files[0].suffix == ".tsv":
        return _load_tsv(files, audio_root or root / "clips", split, task, checker)
    return _load_parquet(files, split, task, checker)


def _audio_file(clips: Path, name: str) -> Path:
    """A clip under `clips`, or under clips/clips (data.audio_root given as Common Voice's en/)."""
    audio = clips / name
    if not audio.is_file() and (clips / "clips" / name).is_file():
        return clips / "clips" / name
    return audio


def _load_tsv(files: list[Path], clips: Path, split: str, task: str, checker: RowChecker) -> Split:
    examples = []
    for path in files:
        header, rows = read_tsv(path)
        need = ("path", "sentence", "translation")
        if header is None or any(k not in header for k in need):
            raise DataError(f"{path}: header must name {need}, got {header}")
        # Headers are read first, all at once (header_seconds), then rows checked in file order:
        # the first bad row is the one reported.
        lines = list(rows)
        audio_of = [_audio_file(clips, cells[header.index("path")])
                    if len(cells) == len(header) else None for _, cells in lines]
        known = iter(header_seconds([a for a in audio_of if a is not None]))
        for (line_no, cells), audio in zip(lines, audio_of):
            where = f"{path} line {line_no}"
            result = next(known) if audio is not None else None
            if len(cells) != len(header):
                checker.bad("malformed_row", where,
                            f"{len(cells)} tab-separated fields, header has {len(header)}")
                continue
            row = dict(zip(header, cells))
            if not checker.texts(where, row, need):
                continue
            seconds = checker.audio(where, audio, known=result)
            if seconds is None:
                continue
            examples.append(example(f"covost2-{split}-{Path(row['path']).stem}", task, str(audio),
                                    seconds, {}, _reference(task, row), where=where))
    return checker.split(examples)


def _name(path: Path, row: int, audio: dict) -> str:
    return f"{path} row {row} ({audio.get('path') or 'embedded audio'})"


def _load_parquet(files: list[Path], split: str, task: str, checker: RowChecker) -> Split:
    """Reads the files a batch of rows at a time: a row's encoded audio is held only while its
    header is read, and the example keeps (file, row) instead."""
    import pyarrow.parquet as pq

    examples = []
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        names = pf.schema_arrow.names
        missing = [k for k in ("audio", "sentence", "translation") if k not in names]
        if missing:
            raise DataError(f"{path}: missing columns {missing} (has {names})")
        columns = [k for k in ("audio", "sentence", "translation", "id") if k in names]
        first = 0  # the file's row number of the batch's first row
        for batch in pf.iter_batches(batch_size=256, columns=columns):
            rows = batch.to_pylist()
            # The headers of the rows that hold encoded audio are read together (header_seconds),
            # then the rows are checked in order.
            encoded = {j: r["audio"]["bytes"] for j, r in enumerate(rows)
                       if isinstance(r["audio"], dict) and isinstance(r["audio"].get("bytes"), bytes)}
            known = dict(zip(encoded, header_seconds(
                list(encoded.values()), [_name(path, first + j, rows[j]["audio"]) for j in encoded])))
            for j, row in enumerate(rows):
                n, where = first + j, f"{path} row {first + j}"
                if j not in encoded:
                    checker.bad("malformed_row", where, "audio must be a struct with encoded bytes")
                    continue
                if not checker.texts(where, row, ("sentence", "translation")):
                    continue
                name = _name(path, n, row["audio"])
                seconds = checker.audio(where, encoded[j], name, known=known[j])
                if seconds is None:
                    continue
                ex_id = str(row.get("id") or Path(row["audio"].get("path") or f"{path.stem}-{n}").stem)
                examples.append(example(f"covost2-{split}-{ex_id}", task, ParquetAudio(str(path), n),
                                        seconds, {}, _reference(task, row), where=name))
            first += len(rows)
    return checker.split(examples)
