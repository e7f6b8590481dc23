"""Run outputs as the report reads them: one `Run` per directory holding a summary.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd
import yaml

from fl_sim.errors import DataError


@dataclass
class Run:
    path: Path

    @cached_property
    def summary(self) -> dict:
        try:
            return json.loads((self.path / "summary.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{self.path / 'summary.json'}: not a readable run summary ({exc})") from exc

    @cached_property
    def config(self) -> dict:
        path = self.path / "config.yaml"
        return yaml.safe_load(path.read_text()) if path.exists() else {}

    def table(self, name: str) -> pd.DataFrame | None:
        path = self.path / f"{name}.parquet"
        return pd.read_parquet(path) if path.exists() else None

    @property
    def days(self) -> float:
        return max(self.summary["sim_time_s"] / 86_400.0, 1e-9)


def find_runs(paths: list[str]) -> list[Run]:
    """Each path is a run directory, or a folder of them (a Hydra multirun sweep)."""
    runs = []
    for p in map(Path, paths):
        if (p / "summary.json").exists():
            runs.append(Run(p))
            continue
        found = sorted(q.parent for q in p.glob("*/summary.json"))
        if not found:
            raise DataError(f"{p}: no summary.json in it or in its subfolders")
        runs.extend(Run(q) for q in sorted(found, key=lambda q: (len(q.name), q.name)))
    return runs


def _flatten(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


IGNORED = ("output_dir", "cache_dir", "sim.backend", "sim.nodes", "sim.ray.")


def labels(runs: list[Run]) -> list[str]:
    """A short label per run from the config values that differ between the runs compared.
    Where a group's identity differs (`trigger._target_`, `method.name`, ...) the label names
    it (`budgeted/drift` for a wrapper and its inner trigger) and leaves out its parameters."""
    flat = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f})
    differ = [k for k in keys if not k.startswith(IGNORED) and len({repr(f.get(k)) for f in flat}) > 1]
    named = {k.split(".")[0] for k in differ if k.endswith(("._target_", ".name")) and k.count(".") == 1}
    out = []
    for r, f in zip(runs, flat):
        parts = []
        for group in sorted(named):
            ids = [f[k] for k in keys if k.startswith(group + ".") and k.endswith(("_target_", ".name")) and f.get(k)]
            parts.append("/".join(str(v).rsplit(".", 1)[-1].lower() for v in ids))
        parts += [f"{k.split('.')[-1]}={f.get(k)}" for k in differ if k.split(".")[0] not in named]
        out.append(", ".join(p for p in parts if p) or r.path.name)
    return out
