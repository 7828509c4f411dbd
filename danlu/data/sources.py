"""Reading labelled text from CSV, TSV, JSONL or a folder of class sub-folders.

Every example remembers where it came from (file and line), so that bad input is reported where it is.
"""
from __future__ import annotations

import codecs
import csv
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass

from danlu.registry import ConfigError


class DataError(ConfigError):
    """Bad input data: the message names the file, the line and what was expected."""


@dataclass
class Examples:
    texts: list
    labels: list  # strings (classification), floats (regression) or None (unlabelled)
    origins: list  # "file:line" per example
    skipped: int = 0
    fields: list | None = None  # with keep_fields: each example's record as read (all its columns)


DATA_OPTIONS = {"text_column": "data.text_column", "label_column": "data.label_column",
                "on_bad_rows": "data.on_bad_rows=skip", "encoding": "data.encoding"}
"""How a user sets each reading option, for the hints of error messages: in a config. A verb with flags
of its own passes its names instead (None: the verb has no such option, and no hint names one)."""


FORMATS = (".csv", ".tsv", ".txt", ".jsonl", ".json", ".ndjson")  # .txt: a table with a header (Excel's "Unicode Text")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def read_examples(path, text_column="text", label_column="label", on_bad_rows="error", need_labels=True, numeric=False,
                  encoding="auto", keep_fields=False, options=DATA_OPTIONS):
    """Read (text, label) examples from a file or a folder; fail or skip on bad rows. `keep_fields`: also
    keep each example's whole record (`Examples.fields`); `options`: how the caller's user sets each
    option (DATA_OPTIONS), which error messages suggest.

    A CSV file may also be separated by semicolons, tabs or bars: when the header read with commas lacks
    the columns, the first of those separators whose header has them is used. A .txt file is read as such
    a table (Excel saves "Unicode Text" as a tab-separated UTF-16 .txt).

    >>> ex = read_examples("reviews.csv", text_column="review", label_column="stars")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    out = Examples([], [], [], fields=[] if keep_fields else None)
    bad = _BadRows(path, on_bad_rows, options.get("on_bad_rows"))
    undecoded = _undecoded(encoding, options.get("encoding"))
    if os.path.isdir(path):
        rows = _folder_rows(path, bad, text_column, label_column, encoding, undecoded)
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext not in FORMATS:
            raise DataError(f"{path}: unknown file type {ext or '(none)'!r}; expected one of: {', '.join(FORMATS)} or a folder")
        with open(path, "rb") as f:
            raw = f.read()
        text, used = decode(raw, encoding)
        _refuse_binary(path, text, options.get("encoding"))
        if encoding == "auto" and used == "gb18030":
            _read_as_gb18030(path)
        if ext in (".jsonl", ".json", ".ndjson"):
            rows = _jsonl_rows(path, text, bad)
        else:
            rows = _csv_rows(path, text, "\t" if ext == ".tsv" else ",", text_column, label_column, need_labels,
                             options)
    for line, record in rows:
        where = f"{path}:{line}" if line else record.pop("_file", path)
        text_value = record.get(text_column)
        if text_column not in record:
            bad(line, f"no {text_column!r} field{_set_by(options, 'text_column')}; fields found: "
                      f"{', '.join(map(str, record)) or 'none'}")
            continue
        if not isinstance(text_value, str):
            bad(line, f"{text_column!r} must be a string, got {json.dumps(text_value, ensure_ascii=False)}")
            continue
        if _has_bad_bytes(text_value):
            bad(line, undecoded)
            continue
        if not text_value.strip():
            bad(line, f"empty text in {text_column!r}")
            continue
        label = None
        if need_labels:
            label = record.get(label_column)
            if label is None or (isinstance(label, str) and not label.strip()):
                bad(line, f"missing label in {label_column!r}{_set_by(options, 'label_column')}")
                continue
            if isinstance(label, (dict, list)):
                bad(line, f"label must be a string or number, got {json.dumps(label, ensure_ascii=False)}")
                continue
            if numeric:
                try:
                    label = float(label)
                except ValueError:
                    bad(line, f"label {label!r} is not a number (task: regression)")
                    continue
            else:
                label = _label_str(label)
                if _has_bad_bytes(label):
                    bad(line, undecoded)
                    continue
        out.texts.append(text_value)
        out.labels.append(label)
        out.origins.append(where)
        if keep_fields:
            out.fields.append(record)
    out.skipped = bad.count
    if not out.texts:
        raise DataError(f"{path}: no usable examples" + (f" ({bad.count} bad rows skipped)" if bad.count else ""))
    return out


class _BadRows:
    def __init__(self, path, mode, skip_option="data.on_bad_rows=skip"):
        self.path, self.mode, self.count, self.skip_option = path, mode, 0, skip_option

    def __call__(self, line, message):
        if self.mode == "error":
            where = f"{self.path}, line {line}" if line else self.path
            fix = f"Fix the row, or set {self.skip_option} to skip bad rows." if self.skip_option else "Fix the row."
            raise DataError(f"{where}: {message}. {fix}")
        self.count += 1


def _set_by(options, key):
    """' (data.text_column)': how the user names this option, as a hint after a message about it."""
    return f" ({options[key]})" if options.get(key) else ""


def _refuse_binary(path, text, encoding_option, sample=4096):
    """A table is text: a NUL character, or control characters in more than 2% of its start, mean another
    kind of file under a table's name (a spreadsheet, an archive, an image; in random bytes one in ten is a
    control character), whose bytes would otherwise be read as a header of garbage. Text in another encoding
    is not refused here: its rows are reported as not decoding, with the hint to set the encoding."""
    head = text[:sample]
    controls = sum(1 for ch in head if ch < " " and ch not in "\t\n\r\f\v")
    if "\x00" in head or controls > len(head) / 50:
        utf16 = f" (UTF-16 text without a byte-order mark? set {encoding_option}=utf-16)" if encoding_option else ""
        raise DataError(f"{path}: not a text table: the file holds binary data{utf16}; expected CSV, TSV or JSONL "
                        f"text (an Excel workbook must be saved as CSV first)")


def _label_str(label):
    if isinstance(label, float) and label.is_integer():
        return str(int(label))
    return str(label).strip()


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # UTF-32 first: its little-endian
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # mark begins with UTF-16's


def decode(raw, encoding="auto"):
    """Bytes of a file -> (text, encoding used). Bytes that do not decode become lone surrogates
    (U+DC80-U+DCFF), which the row checks report as bad rows naming their line. "auto" reads UTF-16 or
    UTF-32 when the file starts with their byte-order mark (Excel's "Unicode Text" is UTF-16), else UTF-8
    (a BOM is dropped), or GB18030 when the bytes are not UTF-8 but are GB18030 throughout."""
    if encoding != "auto":
        try:
            return raw.decode(encoding, errors="surrogateescape"), encoding
        except LookupError:
            raise _unknown_encoding(encoding) from None
    codec, text = _first_fit(raw)
    if text is None:
        text = raw.decode(codec, errors="surrogateescape")
    return text, "utf-8" if codec == "utf-8-sig" else codec


def _first_fit(raw, final=True):
    """(codec, text): the codec "auto" reads `raw` with — UTF-16 / UTF-32 after their byte-order mark, else
    UTF-8 (a BOM dropped) when the bytes decode as it, else GB18030 likewise, else UTF-8 — and the text
    when decoding it already produced it (None otherwise). `final=False`: `raw` may end inside a character."""
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            return codec, None
    for codec in ("utf-8-sig", "gb18030"):
        try:
            return codec, codecs.getincrementaldecoder(codec)().decode(raw, final=final)
        except UnicodeDecodeError:
            pass
    return "utf-8-sig", None


def _unknown_encoding(encoding):
    return ConfigError(f"data.encoding: unknown encoding {encoding!r}; expected auto or a codec name "
                       f"such as utf-8, gb18030, big5")


def _undecoded(encoding, option="data.encoding"):
    also = f", or set {option} to its encoding" if option else ""
    return f"not valid {'UTF-8' if encoding == 'auto' else encoding} text (save the file as UTF-8{also})"


def _has_bad_bytes(s):
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _csv_rows(path, text, delimiter, text_column, label_column, need_labels, options=DATA_OPTIONS):
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty; expected a header line with {text_column!r} and {label_column!r}") from None
    header = [h.strip() for h in header]
    wanted = [text_column] + ([label_column] if need_labels else [])
    missing = [c for c in wanted if c not in header]
    if missing and delimiter == ",":  # a CSV separated by something else: the first separator that explains the header
        first = text.split("\n", 1)[0]
        for other in (";", "\t", "|"):
            if other in first and all(c in [h.strip() for h in next(csv.reader([first], delimiter=other))] for c in wanted):
                return _csv_rows(path, text, other, text_column, label_column, need_labels, options)
    if missing:
        setters = [options.get(k) for k in ("text_column", "label_column")[: len(wanted)] if options.get(k)]
        fix = f" Set {' / '.join(setters)} to the right name{'s' if len(setters) > 1 else ''}." if setters else ""
        raise DataError(f"{path}, line 1: no column {missing[0]!r}; the header has: {', '.join(header)}.{fix}")
    rows = []
    for row in reader:
        if not row or all(not c.strip() for c in row):
            continue
        record = {h: row[i] if i < len(row) else None for i, h in enumerate(header)}
        rows.append((reader.line_num, record))
    return rows


def jsonl_records(path, errors="strict", encoding="auto"):
    """Yield (line number, parsed value) for each non-blank line of a JSONL file, reading it as a stream;
    a line that is not JSON raises DataError naming the file and line. The encoding is found as
    `text_lines` finds it; errors="strict" stops at the first line that does not decode, "replace" warns."""
    for number, line in text_lines(path, encoding, errors):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield number, record


SNIFF_BYTES = 1 << 20
_CODEC_NAMES = {"utf-8-sig": "UTF-8", "utf-16": "UTF-16", "utf-32": "UTF-32", "gb18030": "GB18030"}
_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that did not decode, as surrogateescape keeps them


def sniff_encoding(path, sample=SNIFF_BYTES):
    """The codec `decode` would choose for a file, judged on its first MB so that large files can stream:
    UTF-16 / UTF-32 after their byte-order mark, else UTF-8 (a BOM dropped), else GB18030."""
    with open(path, "rb") as f:
        raw = f.read(sample)
    return _first_fit(raw, final=len(raw) < sample)[0]  # the sample may end inside a character


def text_lines(path, encoding="auto", errors="replace"):
    """Yield (line number, line) of a text file as a stream. "auto" finds the encoding (`sniff_encoding`)
    and says when it is GB18030. A line with bytes that do not decode raises DataError naming it
    (errors="strict"), or has them replaced by U+FFFD, with one warning for the file saying how many
    lines and the first (errors="replace")."""
    codec = sniff_encoding(path) if encoding == "auto" else encoding
    if encoding == "auto" and codec == "gb18030":
        _read_as_gb18030(path)
    try:
        codecs.lookup(codec)
    except LookupError:
        raise _unknown_encoding(encoding) from None
    bad, first = 0, 0
    with open(path, encoding=codec, errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if _UNDECODED.search(line):
                if errors == "strict":
                    raise DataError(f"{path}:{number}: {_undecoded(_CODEC_NAMES.get(codec, codec))}")
                bad, first = bad + 1, first or number
                line = _UNDECODED.sub("\ufffd", line)
            yield number, line
    if bad:
        warnings.warn(f"{path}: {bad:,} line(s) hold bytes that are not {_CODEC_NAMES.get(codec, codec)} text (the "
                      f"first: line {first}); they were replaced by U+FFFD (set data.encoding if the file has another "
                      f"encoding)", stacklevel=2)


def _jsonl_rows(path, text, bad):
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            bad(number, f"not valid JSON ({e.msg} at column {e.colno}); expected one object per line")
            continue
        if not isinstance(record, dict):
            bad(number, f"expected a JSON object per line, got {type(record).__name__}")
            continue
        rows.append((number, record))
    return rows


def _read_as_gb18030(path):
    warnings.warn(f"{path} is not UTF-8 but reads cleanly as GB18030 (GBK, what Excel writes for Chinese text); "
                  f"read as GB18030 (set data.encoding to choose)", stacklevel=3)


def _folder_rows(path, bad, text_column, label_column, encoding="auto", undecoded=None):
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise DataError(f"{path}: a folder of examples needs one sub-folder per class, holding .txt files; found none")
    rows, gb18030 = [], False
    for label in classes:
        for name in sorted(os.listdir(os.path.join(path, label))):
            if not name.endswith(".txt"):
                continue
            file = os.path.join(path, label, name)
            with open(file, "rb") as f:
                text, used = decode(f.read(), encoding)
            if _has_bad_bytes(text):
                bad(0, f"{file}: {undecoded or _undecoded(encoding)}")
                continue
            gb18030 = gb18030 or used == "gb18030"
            rows.append((0, {text_column: text.strip(), label_column: label, "_file": file}))
    if gb18030 and encoding == "auto":
        _read_as_gb18030(path + " (some files)")
    return rows
