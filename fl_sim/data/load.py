"""`load_dataset(cfg)`: the one entry point from a `dataset` config to Interactions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fl_sim.data import cache, download, formats, synthetic
from fl_sim.data.interactions import Interactions
from fl_sim.data.preprocess import raw_counts, threshold, to_interactions
from fl_sim.errors import ConfigError, DataError


@dataclass(frozen=True)
class Source:
    format: str
    files: tuple[str, ...]  # file names looked for when dataset.path is a folder
    download: Optional[str] = None  # key into download.ARCHIVES


SOURCES = {
    "ml100k": Source("u_data", ("u.data", "u.data.gz"), "ml100k"),
    "ml1m": Source("movielens_dat", ("ratings.dat", "ratings.dat.gz"), "ml1m"),
    "ml1m_sas": Source("sasrec_txt", ("ml-1m-sas.txt.gz", "ml-1m-sas.txt", "ml-1m.txt")),
    "beauty": Source("s3rec_txt", ("Beauty.txt", "Beauty.txt.gz")),
}
FORMATS = (*formats.READERS, "table")


def resolve_path(name: str, path: Optional[str], source: Source, cache_dir: Path, allow_download: bool) -> Path:
    if path is None:
        if allow_download and source.download:
            folder = download.fetch(source.download, cache_dir)
            return resolve_path(name, str(folder), source, cache_dir, False)
        hint = " or add dataset.download=true" if source.download else ""
        raise DataError(f"dataset={name} needs dataset.path= (a {' or '.join(source.files)} file or its folder){hint}")
    p = Path(path).expanduser()
    if p.is_dir():
        for f in source.files:
            if (p / f).is_file():
                return p / f
        expected = p / source.files[0]
    elif p.is_file():
        return p
    else:
        expected = p
    hint = " (or set dataset.download=true to fetch it)" if source.download else ""
    raise DataError(f"dataset={name}: expected {expected}, which does not exist{hint}")


def _options(dcfg: DictConfig) -> dict:
    opts = {
        "min_rating": dcfg.get("min_rating"),
        "min_user": int(dcfg.get("min_user_interactions") or 0),
        "min_item": int(dcfg.get("min_item_interactions") or 0),
    }
    for key in ("min_user", "min_item"):
        if opts[key] < 0:
            raise ConfigError(f"dataset.{key}_interactions must be >= 0, got {opts[key]}")
    return opts


def load_dataset(dcfg: DictConfig, num_clients: int, seed: int, cache_dir: str | Path) -> tuple[Interactions, dict]:
    """Load, filter and remap a dataset. Returns the Interactions and a report of raw/filtered counts."""
    name = dcfg.name
    opts = _options(dcfg)
    if name == "synthetic":
        frame, extras = synthetic.generate(dcfg, num_devices=num_clients, seed=seed)
        inter = _process(frame, opts)
        synthetic.attach_ground_truth(inter, extras)
        return inter, {"raw": raw_counts(frame), "path": None}
    if name == "custom":
        fmt = dcfg.get("format", "table")
        if fmt not in FORMATS:
            raise ConfigError(f"dataset.format={fmt!r} is not one of {list(FORMATS)}")
        source = Source(fmt, ("interactions.csv", "interactions.parquet"))
    elif name in SOURCES:
        source = SOURCES[name]
    else:
        raise ConfigError(f"dataset.name={name!r} is not one of {['synthetic', 'custom', *SOURCES]}")
    path = resolve_path(name, dcfg.get("path"), source, Path(cache_dir), bool(dcfg.get("download", False)))
    columns = OmegaConf.to_container(dcfg.columns) if source.format == "table" else None
    key = cache.cache_key(path, {"format": source.format, "columns": columns, **opts})
    hit = cache.load(cache_dir, key) if dcfg.get("cache", True) else None
    if hit is not None:
        inter, raw = hit
        return inter, {"raw": raw, "path": str(path.resolve()), "cache": "hit"}
    frame = formats.read_table(path, columns) if source.format == "table" else formats.READERS[source.format](path)
    inter = _process(frame, opts)
    raw = raw_counts(frame)
    if dcfg.get("cache", True):
        cache.store(cache_dir, key, inter, raw)
    return inter, {"raw": raw, "path": str(path.resolve()), "cache": "miss"}


def _process(frame: pd.DataFrame, opts: dict) -> Interactions:
    frame = threshold(frame, opts["min_rating"])
    return to_interactions(frame, opts["min_user"], opts["min_item"])
