"""`python -m fl_sim.data dataset=... output_dir=DIR`: load a dataset, write DIR/dataset.json."""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from fl_sim.cli import CONF_DIR, friendly_errors, output_dir, write_json
from fl_sim.data import build_streams, load_dataset, select_devices


def describe(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    inter, info = load_dataset(cfg.dataset, num_clients=cfg.num_clients, seed=cfg.seed, cache_dir=cfg.cache_dir)
    filtered = inter.counts()
    inter = select_devices(inter, cfg.num_clients, cfg.seed)
    streams = build_streams(inter, cfg.streams, cfg.seed)
    report = {
        "dataset": cfg.dataset.name,
        "path": info["path"],
        "raw": info["raw"],
        "filtered": filtered,
        "has_timestamps": inter.has_timestamps,
        "num_clients": cfg.num_clients,
        **streams.summary(),
    }
    if inter.shifts is not None:
        stream_start = streams.inter.ts[streams.split.clip(max=len(inter) - 1)]
        shift_dev = inter.shifts["device"].to_numpy()
        report["interest_shifts"] = len(inter.shifts)
        report["interest_shifts_in_stream"] = int((inter.shifts["time"].to_numpy() >= stream_start[shift_dev]).sum())
    report["cache"] = info.get("cache")
    report["wall_s"] = round(time.perf_counter() - start, 3)
    return report


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
@friendly_errors
def main(cfg: DictConfig) -> None:
    report = describe(cfg)
    out = output_dir() / "dataset.json"
    write_json(out, report)
    raw, kept = report["raw"], report["filtered"]
    print(f"{report['dataset']}: raw {raw['users']:,} users / {raw['items']:,} items / "
          f"{raw['interactions']:,} interactions; filtered {kept['users']:,} / {kept['items']:,} / "
          f"{kept['interactions']:,}; {report['devices']:,} devices, {report['stream_events']:,} stream events "
          f"-> {out}")


if __name__ == "__main__":
    main()
