"""Every loader on malformed and edge-case files (hypothesis): it returns well-formed data or
raises the project's own error with the file named, never anything else; valid files read
back exactly what was written."""

import gzip
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from fl_sim import resume
from fl_sim.data import cache, formats
from fl_sim.devices.fleet import _real_phones
from fl_sim.devices.links import read_trace
from fl_sim.errors import FlSimError
from fl_sim.models import checkpoint

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # e.g. a silent cast of a bad value

# Derandomized: the same examples on every run (CI cannot fail by chance); 200 per test.
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

ids = st.integers(0, 10**6)
junk = st.sampled_from(["", " ", "::", "\t", "x", "-1", "1.5", "nan", "1e3", "\x00", "é", "9" * 30, ",", ";", "\r"])


def token(kind):
    return st.one_of(ids.map(str), junk) if kind == "int" else st.one_of(
        st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr), junk)


def lines(sep, kinds):
    return st.lists(st.tuples(*[token(k) for k in kinds]).map(lambda t: sep.join(t)), max_size=12)


def write(text: str, suffix: str, gz: bool) -> Path:
    folder = Path(tempfile.mkdtemp())
    path = folder / (suffix + (".gz" if gz else ""))
    data = text.encode("utf-8", "surrogatepass")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def well_formed(frame: pd.DataFrame) -> None:
    assert {"user", "item"} <= set(frame.columns) and len(frame) > 0
    assert frame["user"].notna().all() and frame["item"].notna().all()


def check(reader, path) -> pd.DataFrame | None:
    try:
        frame = reader(path)
    except FlSimError as exc:
        assert str(path.name) in str(exc) or str(path) in str(exc)
        return None
    well_formed(frame)
    return frame


LINE_READERS = [
    (formats.read_movielens_dat, "ratings.dat", "::", ["int", "int", "num", "int"]),
    (formats.read_u_data, "u.data", "\t", ["int", "int", "num", "int"]),
    (formats.read_sasrec_txt, "ml-1m.txt", " ", ["int", "int"]),
]


@pytest.mark.parametrize("reader, name, sep, kinds", LINE_READERS, ids=lambda p: getattr(p, "__name__", None))
@FUZZ
@given(data=st.data(), gz=st.booleans())
def test_line_formats_on_anything(reader, name, sep, kinds, data, gz):
    text = "\n".join(data.draw(lines(sep, kinds)))
    check(reader, write(text, name, gz))


@pytest.mark.parametrize("reader, name, sep, kinds", LINE_READERS, ids=lambda p: getattr(p, "__name__", None))
@FUZZ
@given(rows=st.lists(st.tuples(ids, ids, st.integers(1, 5), ids), min_size=1, max_size=20), gz=st.booleans())
def test_line_formats_read_back_valid_files(reader, name, sep, kinds, rows, gz):
    cols = [r[:len(kinds)] for r in rows]
    frame = check(reader, write("\n".join(sep.join(map(str, r)) for r in cols) + "\n", name, gz))
    assert frame is not None
    assert frame[["user", "item"]].to_numpy().tolist() == [list(r[:2]) for r in cols]
    if "ts" in frame:
        assert frame["ts"].tolist() == [r[3] for r in cols]


@FUZZ
@given(users=st.lists(st.lists(st.one_of(ids.map(str), junk), max_size=6), max_size=8), gz=st.booleans())
def test_s3rec_on_anything(users, gz):
    check(formats.read_s3rec_txt, write("\n".join(" ".join(u) for u in users), "Beauty.txt", gz))


@FUZZ
@given(rows=st.lists(st.tuples(st.one_of(ids.map(str), junk), st.one_of(ids.map(str), junk),
                               st.one_of(st.integers(0, 2 * 10**9).map(str), junk)), max_size=10),
       sep=st.sampled_from([",", ";", "\t"]), header=st.booleans())
def test_csv_tables_on_anything(rows, sep, header):
    head = sep.join(["user_id", "item_id", "timestamp"]) + "\n" if header else ""
    path = write(head + "\n".join(sep.join(r) for r in rows), "events.csv", gz=False)
    cols = {"user": "user_id", "item": "item_id", "ts": "timestamp"}
    check(lambda p: formats.read_table(p, cols), path)


@FUZZ
@given(blob=st.binary(max_size=300))
def test_binary_files_refused_everywhere(blob):
    """Random bytes where a table, a parquet file, a checkpoint or a trace should be."""
    folder = Path(tempfile.mkdtemp())
    for name, reader in [("t.parquet", lambda p: formats.read_table(p, {"user": "u", "item": "i"})),
                         ("ratings.dat", formats.read_movielens_dat), ("Beauty.txt", formats.read_s3rec_txt)]:
        (folder / name).write_bytes(blob)
        check(reader, folder / name)
    (folder / "model.pt").write_bytes(blob)
    with pytest.raises(checkpoint.CheckpointError, match="model.pt"):
        checkpoint.load(folder / "model.pt", None, {})
    (folder / "trace.log").write_bytes(blob)
    try:
        dur, rate = read_trace(folder / "trace.log")
        assert (dur > 0).all() and (rate >= 0).all() and len(dur) >= 1
    except FlSimError as exc:
        assert "trace.log" in str(exc)


@FUZZ
@given(rows=st.lists(st.tuples(st.floats(-10, 1e4, allow_nan=False), st.floats(-5, 100, allow_nan=False)),
                     max_size=8), extra=st.sampled_from(["", "x y\n", "1\n", "nan nan\n", "1 2 3\n"]))
def test_bandwidth_traces_on_edge_cases(rows, extra):
    path = write("".join(f"{t} {r}\n" for t, r in rows) + extra, "trace.log", gz=False)
    try:
        dur, rate = read_trace(path)
    except FlSimError as exc:
        assert "trace.log" in str(exc)
        return
    assert len(dur) == len(rate) >= 1 and (dur > 0).all() and (rate >= 0).all() and np.isfinite(rate).all()


phone = st.fixed_dictionaries({}, optional={"CPU_F_AI_Score": st.one_of(st.integers(0, 10**5), junk, st.none()),
                                            "RAM": st.one_of(st.sampled_from(["4GB", "8 GB", "12gb", "GB", "-2GB"]),
                                                             st.integers(0, 16), junk)})


@FUZZ
@given(phones=st.one_of(st.lists(phone, max_size=6), st.just({}), st.just("text"), st.just(None)),
       raw=st.sampled_from(["", "[", "{\"a\": 1}", None]))
def test_phone_table_on_anything(phones, raw):
    folder = Path(tempfile.mkdtemp())
    (folder / "devices").mkdir()
    (folder / "devices" / "raw_ai_benchmark_list.json").write_text(raw if raw is not None else json.dumps(phones))
    dcfg = OmegaConf.create({"path": str(folder), "flops_per_cpu_score": 1e6})
    try:
        compute, memory, tier = _real_phones(dcfg, np.arange(5), 0)
    except FlSimError as exc:
        assert "raw_ai_benchmark_list.json" in str(exc)
        return
    assert len(compute) == len(memory) == len(tier) == 5
    assert np.isfinite(compute).all() and (compute > 0).all() and (memory > 0).all()


@FUZZ
@given(blob=st.binary(max_size=200), text=st.text(max_size=40))
def test_damaged_dataset_cache_and_checkpoint_pointers(blob, text):
    folder = Path(tempfile.mkdtemp())
    (folder / "processed").mkdir()
    (folder / "processed" / "k.npz").write_bytes(blob)
    assert cache.load(folder, "k") is None  # never trusted: recomputed
    ck = resume.folder(folder)
    ck.mkdir(parents=True)
    (ck / "latest.json").write_text(text)
    with pytest.raises(FlSimError):
        resume.latest(folder)
    (ck / "state.pt").write_bytes(blob)
    with pytest.raises(FlSimError, match="state.pt"):
        resume.load_state(ck / "state.pt")
