"""Shared plumbing for the Hydra commands (`fl_sim.data`, `fl_sim.train`, `fl_sim.run`)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fl_sim.errors import FlSimError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def friendly_errors(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn an FlSimError into `error: <message>` on stderr and exit code 2."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except FlSimError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapped


def output_dir() -> Path:
    """The directory of this run (`output_dir=` for a single run, a numbered subdir in multirun)."""
    out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
