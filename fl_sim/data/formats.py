"""Readers for the owners' original formats, plain or gzip.

Every reader returns a DataFrame in file order with columns `user`, `item` and, where the
format has them, `rating` and `ts` (unix seconds). A malformed line raises DataError naming
the file and the line number. The fast path is pandas' C parser; when it fails, a line-by-line
scan finds the first bad line so the message can point at it.
"""

from __future__ import annotations

import gzip
import io
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from fl_sim.errors import DataError


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_text(path: Path) -> io.TextIOBase:
    if is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _compression(path: Path) -> Optional[str]:
    return "gzip" if is_gzip(path) else None


def _is_int(token: str) -> bool:
    return token.lstrip("+-").isdigit()


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def scan_for_bad_line(path: Path, check: Callable[[str], Optional[str]]) -> None:
    """Raise DataError at the first non-blank line for which `check` returns a problem."""
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                text = line.strip()
                if not text:
                    continue
                problem = check(text)
                if problem:
                    raise DataError(f"{path}, line {lineno}: {problem}: {text[:120]!r}")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read the file ({exc})") from None


def _fields_check(sep: Optional[str], names: list[str], kinds: list[str]) -> Callable[[str], Optional[str]]:
    layout = (sep or " ").join(names)

    def check(text: str) -> Optional[str]:
        parts = text.split(sep)
        if len(parts) != len(names):
            return f"expected {len(names)} fields ({layout}), found {len(parts)}"
        for name, kind, token in zip(names, kinds, parts):
            ok = _is_int(token) if kind == "int" else _is_number(token)
            if not ok:
                return f"field '{name}' is not {'an integer' if kind == 'int' else 'a number'} ({token!r})"
        return None

    return check


def _checked_frame(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        raise DataError(f"{path}: the file holds no interactions")
    return frame


def _fast_or_scan(path: Path, parse: Callable[[], pd.DataFrame], check: Callable[[str], Optional[str]]) -> pd.DataFrame:
    try:
        return _checked_frame(path, parse())
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # any parser failure: find and name the line
        scan_for_bad_line(path, check)
        raise DataError(f"{path}: cannot parse the file ({exc})") from None


def read_movielens_dat(path: Path) -> pd.DataFrame:
    """MovieLens-1M/10M `ratings.dat`: `user::item::rating::timestamp`."""
    names = ["user", "item", "rating", "ts"]
    check = _fields_check("::", names, ["int", "int", "num", "int"])

    def parse() -> pd.DataFrame:
        # Splitting on ':' gives empty separator columns 1, 3, 5; they must stay empty.
        raw = pd.read_csv(
            path, sep=":", header=None, names=list(range(7)), compression=_compression(path),
            dtype={0: "int64", 2: "int64", 4: "float64", 6: "int64", 1: "float64", 3: "float64", 5: "float64"},
        )
        if raw[[1, 3, 5]].notna().to_numpy().any():
            raise ValueError("unexpected value between separators")
        return pd.DataFrame({"user": raw[0], "item": raw[2], "rating": raw[4], "ts": raw[6]})

    return _fast_or_scan(path, parse, check)


def read_u_data(path: Path) -> pd.DataFrame:
    """MovieLens-100K `u.data`: `user \\t item \\t rating \\t timestamp`."""
    names = ["user", "item", "rating", "ts"]
    check = _fields_check("\t", names, ["int", "int", "num", "int"])

    def parse() -> pd.DataFrame:
        return pd.read_csv(
            path, sep="\t", header=None, names=names, compression=_compression(path),
            dtype={"user": "int64", "item": "int64", "rating": "float64", "ts": "int64"},
        )

    return _fast_or_scan(path, parse, check)


def read_sasrec_txt(path: Path) -> pd.DataFrame:
    """SASRec text: one `user item` pair per line, each user's items in time order."""
    names = ["user", "item"]
    check = _fields_check(None, names, ["int", "int"])

    def parse() -> pd.DataFrame:
        return pd.read_csv(
            path, sep=r"\s+", header=None, names=names, compression=_compression(path),
            dtype={"user": "int64", "item": "int64"},
        )

    return _fast_or_scan(path, parse, check)


def read_s3rec_txt(path: Path) -> pd.DataFrame:
    """S3Rec text: one line per user, `user item1 item2 ...` in time order."""
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 2:
                    raise DataError(f"{path}, line {lineno}: expected 'user item1 item2 ...', found no items: {line.strip()[:120]!r}")
                try:
                    seq = np.array(parts, dtype=np.int64)
                except (ValueError, OverflowError):
                    bad = next((p for p in parts if not _is_int(p)), None)
                    what = f"{bad!r} is not an integer id" if bad else "an id is out of the 64-bit range"
                    raise DataError(f"{path}, line {lineno}: {what}: {line.strip()[:120]!r}") from None
                users.append(np.full(len(seq) - 1, seq[0], dtype=np.int64))
                items.append(seq[1:])
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read the file ({exc})") from None
    if not users:
        raise DataError(f"{path}: the file holds no interactions")
    return pd.DataFrame({"user": np.concatenate(users), "item": np.concatenate(items)})


def read_table(path: Path, columns: dict) -> pd.DataFrame:
    """A CSV (any delimiter pandas can sniff: `,` `;` tab) or Parquet file with named columns.

    `columns` maps `user`, `item` and optionally `rating`, `ts` to the file's column names.
    """
    want = {k: v for k, v in columns.items() if v}
    for key in ("user", "item"):
        if key not in want:
            raise DataError(f"dataset.columns.{key} must name the {key} column of {path}")
    parquet = path.suffix.lower() in (".parquet", ".pq")
    try:
        if parquet:
            frame = pd.read_parquet(path)
        else:
            # index_col=False: rows with a field too many must not turn the first column into the
            # index; pandas' warning that it would drop fields becomes an error (no silent loss).
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)
                frame = pd.read_csv(path, sep=None, engine="python", dtype=str, skip_blank_lines=False,
                                    index_col=False, compression=_compression(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot parse the file ({exc})") from None
    missing = [c for c in want.values() if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {list(frame.columns)} "
                        "(set dataset.columns.* to the names used)")
    frame = frame[list(want.values())].rename(columns={v: k for k, v in want.items()})
    where = (lambda i: f"row {i + 1}") if parquet else (lambda i: f"line {i + 2}")
    if not parquet:
        frame = frame[frame.notna().any(axis=1)]  # blank lines
    for key in ("user", "item"):
        bad = frame[key].isna().to_numpy()
        if bad.any():
            raise DataError(f"{path}, {where(int(frame.index[bad.argmax()]))}: empty '{want[key]}'")
    for key in ("rating", "ts"):
        if key not in frame:
            continue
        values = pd.to_numeric(frame[key], errors="coerce")
        if key == "ts" and values.isna().all():
            values = pd.to_datetime(frame[key], errors="coerce", utc=True, format="ISO8601")
            values = (values - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
        bad = values.isna().to_numpy()
        if bad.any():
            i = int(frame.index[bad.argmax()])
            raise DataError(f"{path}, {where(i)}: '{want[key]}' is not a number ({frame[key].loc[i]!r})")
        frame[key] = values.astype("float64" if key == "rating" else "int64")
    for key in ("user", "item"):
        as_num = pd.to_numeric(frame[key], errors="coerce")
        frame[key] = as_num.astype("int64") if as_num.notna().all() and (as_num % 1 == 0).all() else frame[key].astype(str)
    return _checked_frame(path, frame.reset_index(drop=True))


READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    "movielens_dat": read_movielens_dat,
    "u_data": read_u_data,
    "sasrec_txt": read_sasrec_txt,
    "s3rec_txt": read_s3rec_txt,
}
