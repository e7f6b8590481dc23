"""`python -m fl_sim.data` as a user runs it: the dataset.json contract and friendly errors."""

import json
import urllib.error
import urllib.request
import zipfile

import pytest

from fl_sim.data import download
from fl_sim.errors import DataError
from helpers import make_cfg, run_module


def test_data_command_ml100k(shared_data, tmp_path):
    out = tmp_path / "out"
    res = run_module("fl_sim.data", "dataset=ml100k", f"dataset.path={shared_data / 'ml-100k'}",
                     f"output_dir={out}", env={"FL_SIM_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "dataset.json").read_text())
    assert report["raw"] == {"users": 943, "items": 1682, "interactions": 100_000}
    assert report["has_timestamps"] is True
    assert report["history_events"] + report["stream_events"] == report["filtered"]["interactions"]
    for key in ("devices", "stream_events", "sessions"):
        assert report[key] > 0


def test_data_command_synthetic(tmp_path):
    res = run_module("fl_sim.data", "num_clients=300", f"output_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "dataset.json").read_text())
    assert report["devices"] == 300 and report["interest_shifts"] > 0


def test_malformed_line_exits_cleanly(tmp_path, shared_data):
    lines = (shared_data / "ml-100k/u.data").read_text().splitlines()[:20]
    lines[6] = "196\t242\tthree\t881250949"
    bad = tmp_path / "u.data"
    bad.write_text("\n".join(lines) + "\n")
    res = run_module("fl_sim.data", "dataset=ml100k", f"dataset.path={bad}", f"output_dir={tmp_path}")
    assert res.returncode != 0
    assert "line 7" in res.stderr and str(bad) in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


@pytest.mark.parametrize("override,named", [("datset=ml1m", "datset"), ("dataset.pth=x", "dataset.pth"),
                                            ("streams.cutt=time", "streams.cutt")])
def test_unknown_key_is_refused(tmp_path, override, named):
    res = run_module("fl_sim.data", override, f"output_dir={tmp_path}")
    assert res.returncode != 0
    assert named in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "dataset.json").exists()


def test_missing_file_names_path_and_download(tmp_path):
    res = run_module("fl_sim.data", "dataset=ml1m", f"dataset.path={tmp_path / 'nope'}", f"output_dir={tmp_path}")
    assert res.returncode != 0
    assert str(tmp_path / "nope") in res.stderr and "dataset.download=true" in res.stderr
    assert "Traceback" not in res.stderr


def test_download_offline_says_what_to_place(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as err:
        download.fetch("ml1m", tmp_path)
    message = str(err.value)
    assert "ml-1m.zip" in message and str(tmp_path / "downloads" / "ml-1m" / "ratings.dat") in message


def _zip_of(tmp_path, member_text: str):
    src = tmp_path / "src.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("ml-100k/u.data", member_text)
    return src


def test_download_checksum(tmp_path, monkeypatch):
    src = _zip_of(tmp_path, "1\t2\t3\t4\n")
    with pytest.raises(DataError, match="checksum mismatch"):
        download.fetch("ml100k", tmp_path / "cache", url=src.as_uri())
    assert not any((tmp_path / "cache" / "downloads").glob("*.zip*"))
    # With the archive's true checksum the same path unpacks and is found next time offline.
    monkeypatch.setitem(download.ARCHIVES, "ml100k",
                        download.Archive(src.as_uri(), download.md5sum(src), "ml-100k", "u.data"))
    folder = download.fetch("ml100k", tmp_path / "cache")
    assert (folder / "u.data").read_text() == "1\t2\t3\t4\n"
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded twice"))
    assert download.fetch("ml100k", tmp_path / "cache") == folder


@pytest.mark.parametrize("override,named", [("sim.ema=0", "sim.ema"), ("sim.ema=1.5", "sim.ema"),
                                            ("devices.memory_share=0", "devices.memory_share"),
                                            ("model.dropout=2", "model.dropout"), ("num_clients=0", "num_clients"),
                                            ("sim.round_s=-5", "sim.round_s"), ("train.batch=1.5", "train.batch"),
                                            ("method.tau=0", "method.tau"),
                                            ("faults.payload_corrupt=1.5", "faults.payload_corrupt"),
                                            ("faults.cloud_queue=-1", "faults.cloud_queue"),
                                            ("sim.checkpoint_every=-2", "sim.checkpoint_every")])
def test_out_of_range_values_are_refused(override, named):
    from fl_sim.config_check import check_ranges
    from fl_sim.errors import ConfigError

    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        check_ranges(make_cfg(override))
    check_ranges(make_cfg())  # the defaults pass


def test_run_refuses_out_of_range_with_the_key(tmp_path):
    res = run_module("fl_sim.run", "sim.ema=2", f"output_dir={tmp_path}")
    assert res.returncode == 2 and "error: sim.ema must be in (0, 1]" in res.stderr
    assert "Traceback" not in res.stderr
