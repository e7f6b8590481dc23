"""`python -m fl_sim.run num_clients=5000 ...`: simulate the fleet, write results.

Compose the config, load the data and cut each device's stream, pre-train the cloud on the
history (cached), then replay the streams round by round through the devices (clients/) and
the cloud (strategies/), on Flower's simulation engine over Ray or in this process.
Writes summary.json, rounds.parquet, devices.parquet and plots into output_dir.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fl_sim import resume, runfiles
from fl_sim.backends import BACKENDS
from fl_sim.cli import CONF_DIR, friendly_errors, output_dir, write_json
from fl_sim.config_check import check_ranges
from fl_sim.data import build_streams, load_dataset, select_devices
from fl_sim.devices import build_fleet
from fl_sim.engine import SHARD_TIMES, TIMES, Recorder, schedule
from fl_sim.errors import ConfigError
from fl_sim.memory import PeakMemory
from fl_sim.pretrain import deployment_users, pretrained, pretrained_path, stream_times


def check_trigger(cfg: DictConfig) -> None:
    """Build the trigger once here, so a bad `trigger.*` value stops the run before it starts."""
    from hydra.utils import instantiate

    from clients.triggers import Trigger

    try:
        trigger = instantiate(cfg.trigger)
    except Exception as exc:  # Hydra wraps the policy's own error; show its message
        cause = exc.__cause__ or exc
        raise ConfigError(f"trigger ({cfg.trigger.get('_target_')}): {cause}") from exc
    if not isinstance(trigger, Trigger):
        raise ConfigError(f"trigger._target_={cfg.trigger._target_} is not a clients.triggers.Trigger")


def simulate(cfg: DictConfig, out: Path | None = None, grid=None) -> dict:
    """The run `cfg` describes, into `out` (default: Hydra's output folder); with `grid` (under
    `flwr run`), on Flower's own SuperNodes instead of `sim.backend`."""
    start = time.perf_counter()
    if cfg.sim.backend not in ("ray", "inprocess"):
        raise ConfigError(f"sim.backend must be ray or inprocess, got {cfg.sim.backend!r}")
    if float(cfg.sim.round_s) <= 0:
        raise ConfigError(f"sim.round_s must be > 0, got {cfg.sim.round_s}")
    check_ranges(cfg)
    check_trigger(cfg)
    f = cfg.faults
    if (f.node_vanish > 0 or (f.shard_fail > 0 and f.shard_fail_partway)) and not cfg.sim.checkpoint_every:
        raise ConfigError("faults.node_vanish > 0 or faults.shard_fail_partway=true needs sim.checkpoint_every > 0 "
                          "(a lost shard is rebuilt from the last checkpoint)")
    if f.download_drop + f.payload_corrupt + f.payload_truncate > 1:
        raise ConfigError("faults.download_drop + faults.payload_corrupt + faults.payload_truncate must be <= 1")
    cand = cfg.sim.candidates
    if cand != "full" and not (isinstance(cand, int) and not isinstance(cand, bool) and cand >= 10):
        raise ConfigError(f"sim.candidates must be full or a number of items >= 10, got {cand!r}")
    if cfg.sim.precision not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"sim.precision must be fp32, fp16 or int8, got {cfg.sim.precision!r}")
    if cfg.sim.payload not in ("full", "delta"):
        raise ConfigError(f"sim.payload must be full or delta, got {cfg.sim.payload!r}")
    out = out or output_dir()
    n_shards = max(1, min(int(cfg.sim.nodes or os.cpu_count() or 1), int(cfg.num_clients)))
    make_backend = BACKENDS[cfg.sim.backend]
    if grid is not None:
        from fl_sim.backends import FlowerGrid

        n_shards = len(list(grid.get_node_ids()))
        if cfg.sim.nodes and int(cfg.sim.nodes) != n_shards:
            raise ConfigError(f"sim.nodes={cfg.sim.nodes}, but the federation has {n_shards} SuperNodes")
        if cfg.sim.checkpoint_every or cfg.resume:
            raise ConfigError("sim.checkpoint_every and resume need `python -m fl_sim.run` (not `flwr run`)")
        make_backend = lambda cfg, n: FlowerGrid(grid, n)  # noqa: E731
    backends: list = []  # at most one; a list so that it is closed whatever happens
    with PeakMemory() as memory:
        try:
            return _simulate(cfg, out, n_shards, backends, start, memory, make_backend)
        finally:
            for backend in backends:
                backend.close()


def _pretrain(cfg: DictConfig, streams, backends: list, n_shards: int, run_dir: Path, make_backend):
    # Ray comes up while the cached model loads; when the model must be trained, only after
    # training, so that Ray's processes do not add to the training's peak memory.
    if pretrained_path(cfg, streams).exists():
        backends.append(make_backend(cfg, n_shards))
    bar = tqdm(desc="pre-train", unit="epoch", mininterval=0.5)
    model, fp, training = pretrained(cfg, streams, progress=lambda row: bar.update(1))
    bar.close()
    if not backends:
        backends.append(make_backend(cfg, n_shards))
    shutil.rmtree(resume.folder(run_dir), ignore_errors=True)  # a fresh run: no earlier run's checkpoints
    users, _ = deployment_users(cfg, streams, model)  # the cloud's view of each history (cached with the model)
    runfiles.write(run_dir, cfg, streams, model, fp, users, training)
    return model, training


def _simulate(cfg: DictConfig, out: Path, n_shards: int, backends: list, start: float, memory: PeakMemory,
              make_backend) -> dict:
    inter, _ = load_dataset(cfg.dataset, num_clients=cfg.num_clients, seed=cfg.seed, cache_dir=cfg.cache_dir)
    inter = select_devices(inter, cfg.num_clients, cfg.seed)
    streams = build_streams(inter, cfg.streams, cfg.seed)
    run_dir = out / ".sim"
    resume_from = None
    if cfg.resume:  # the run's own files, written when it started, and its last checkpoint
        resume_from = resume.latest(run_dir)
        resume.check_config(runfiles.load_config(str(run_dir)), cfg)
        backends.append(make_backend(cfg, n_shards))
        model, training = runfiles.load_model(str(run_dir)), {**runfiles.load_training(str(run_dir)), "cached": True}
    else:
        model, training = _pretrain(cfg, streams, backends, n_shards, run_dir, make_backend)
    backend = backends[0]
    sched = schedule(stream_times(streams), float(cfg.sim.round_s))
    if cfg.sim.max_rounds:
        sched.truncate(int(cfg.sim.max_rounds))
    if cfg.sim.candidates != "full" and cfg.sim.candidates > inter.n_items:
        raise ConfigError(f"sim.candidates={cfg.sim.candidates} exceeds the catalogue ({inter.n_items} items)")
    n_shards = backend.n_shards
    if inter.n_users < n_shards:
        raise ConfigError(f"sim.nodes={n_shards} shards for {inter.n_users} devices: use at most one shard per device")
    # From here on the run's files hold the streams (memory-mapped, shared with the shards):
    # the data as loaded is dropped rather than held through the simulation.
    shifts = inter.shifts
    del inter, streams
    backend.load(str(run_dir))

    from strategies.cloud import Cloud

    cloud = Cloud(str(run_dir))
    every = int(cfg.sim.checkpoint_every)
    rec = Recorder(cloud, sched, n_shards, model.backbone.n_blocks, int(cfg.faults.max_shard_failures),
                   rebuildable=every > 0, keep_uploads=bool(cfg.privacy.log_uploads))
    if resume_from is not None:
        backend.restore_shards(str(resume_from))
        rec.restore(resume.load_state(resume_from / "recorder.pt"))
        rec.checkpoint_dir = str(resume_from)
    checkpoint_s: list[float] = []  # wall time of each checkpoint saved
    if every:
        def checkpoint(r: int) -> None:
            # Not while a shard is lost (it is rebuilt first; the next multiple saves it).
            if (r + 1) % every == 0 and rec.next_round() is not None and not rec.lost:
                t = time.perf_counter()
                rec.checkpointed(str(resume.save(run_dir, r, rec.state(), backend.save_shards)))
                checkpoint_s.append(time.perf_counter() - t)
        rec.on_round_end = checkpoint
    bar = tqdm(total=sched.rounds + 1, initial=len(rec.rounds), desc="rounds", unit="round", mininterval=0.5)
    totals = {"ndcg": sum(r["ndcg_sum"] for r in rec.rounds), "scored": sum(r["scored"] for r in rec.rounds),
              "requests": sum(r["requests"] for r in rec.rounds)}  # rounds restored by resume=true

    def progress(row: dict) -> None:
        totals["ndcg"] += row["ndcg_sum"]
        totals["scored"] += row["scored"]
        totals["requests"] += row["requests"]
        bar.update(1)
        bar.set_postfix(day=f"{(row['t1'] - sched.t0) / 86400:.1f}",
                        ndcg10=f"{totals['ndcg'] / max(totals['scored'], 1):.4f}", requests=totals["requests"])

    rec.progress = progress
    sim_start = time.perf_counter()
    backend.run(rec)
    bar.close()
    sim_wall = time.perf_counter() - sim_start
    summary = write_results(cfg, out, rec, runfiles.load_streams(str(run_dir)), shifts, cloud, n_shards, training,
                            start, sim_wall, memory, backend, checkpoint_s)
    shutil.rmtree(run_dir, ignore_errors=True)
    return summary


def write_results(cfg, out: Path, rec: Recorder, s: runfiles.Streams, shifts: pd.DataFrame | None, cloud, n_shards,
                  training: dict, start, sim_wall, memory: PeakMemory, backend, checkpoint_s: list[float]) -> dict:
    dev = rec.device_table()
    installs = rec.install_table()
    fleet = build_fleet(cfg.devices, s.n_devices, cfg.seed)
    table = pd.DataFrame({k: v for k, v in dev.items()})
    table["tier"] = fleet.tier[table["device"]]
    table["link_class"] = fleet.link_class[table["device"]]
    table["ndcg10"] = table["ndcg"] / table["scored"].where(table["scored"] > 0)
    table.to_parquet(out / "devices.parquet", index=False)
    rounds = pd.DataFrame(rec.rounds)
    rounds.to_parquet(out / "rounds.parquet", index=False)
    requests = pd.DataFrame(rec.request_table())
    requests["event"] = stream_ordinal(s, requests["device"].to_numpy(), requests["time"].to_numpy())
    requests.to_parquet(out / "requests.parquet", index=False)
    uploads = rec.upload_table()
    if uploads is not None:  # privacy.log_uploads: what the cloud received, row for row
        np.savez(out / "uploads.npz", **uploads)
    pd.DataFrame({"device": installs[:, 0].astype(np.int64), "request_time": installs[:, 1],
                  "install_time": installs[:, 2]}).to_parquet(out / "installs.parquet", index=False)
    if shifts is not None:  # ground truth of synthetic data: when each device's interests moved
        shifts = shifts[["device", "time"]].copy()
        d, ind = shifts["device"].to_numpy(), s.indptr
        has_history = s.split[d] > ind[d]
        last_history = np.where(has_history, s.ts[np.maximum(s.split[d] - 1, 0)], -np.inf)
        shifts = shifts[shifts["time"].to_numpy() > last_history].reset_index(drop=True)  # during the stream
        d = shifts["device"].to_numpy()
        shifts["event"] = stream_ordinal(s, d, shifts["time"].to_numpy())
        shifts["events_after"] = ind[1:][d] - s.split[d] - shifts["event"]
        shifts.to_parquet(out / "shifts.parquet", index=False)
    scored = float(table["scored"].sum())
    sim_time = rec.sched.span_s
    summary = {
        "num_devices": int(s.n_devices), "rounds": rec.sched.rounds,
        "ndcg10": float(table["ndcg"].sum() / max(scored, 1)), "hit10": float(table["hit"].sum() / max(scored, 1)),
        "events_total": int(table["events"].sum()), "events_evaluated": int(scored),
        "events_no_context": int(table["no_context"].sum()), "events_no_model": int(table["no_model"].sum()),
        "requests": int(table["requests"].sum()), "bytes_up": float(table["bytes_up"].sum()),
        "bytes_down": float(table["bytes_down"].sum()),
        "bytes_per_device_per_day": float((table["bytes_up"].sum() + table["bytes_down"].sum())
                                          / len(table) / max(sim_time / 86400, 1e-9)),
        "bytes_first_model": float(table["bytes_first"].sum()),  # the download at deployment
        "bytes_down_model": float(table["bytes_model"].sum()),  # sub-model weights delivered after deployment
        "bytes_down_candidates": float(table["bytes_candidates"].sum()),  # candidates delivered after deployment
        "update_bytes_per_device_per_day": float((table["bytes_up"].sum() + table["bytes_down"].sum()
                                                  - table["bytes_first"].sum()) / len(table)
                                                 / max(sim_time / 86400, 1e-9)),
        "mean_flops_per_inference": float(table["flops"].sum() / max(scored, 1)),
        "mean_params_on_device": float(table["params"].sum() / max(scored, 1)),
        "local_updates": int(table["local_updates"].sum()),  # on-device fine-tuning (method=finetune)
        "items_revealed": int(table["items_revealed"].sum()),  # item ids requests sent after deployment (DIET)
        "train_flops_per_device_per_day": float(table["train_flops"].sum() / len(table) / max(sim_time / 86400, 1e-9)),
        "budget_violations": int(table["budget_violations"].sum()),
        "budget_unservable": cloud.counts["unservable"],
        # every request is answered, unservable or refused (by reason)
        "requests_answered": cloud.counts["answered"] - cloud.counts["first"],
        "requests_unservable": cloud.counts["unservable"] - cloud.counts["first_unservable"],
        "requests_refused": dict(sorted(cloud.refused.items())),  # malformed or over capacity, by reason
        "requests_not_served": int(table["not_served"].sum()),  # refused, unservable or given up, told to the device
        "over_budget_events": int(table["over_budget_events"].sum()),
        "offline_deferred": int(table["offline_deferred"].sum()),
        "download_retries": int(table["offline_waits"].sum()),  # offline at the answer: waited to be online
        "request_to_install_s": install_delays(installs, fleet),
        "events_waiting": int(table["waiting"].sum()),  # ranked with the old model while an answer was on its way
        "by_tier": by_group(table, "tier", installs, fleet),
        "by_link": by_group(table, "link_class", installs, fleet),
        "faults": {  # what went wrong and how it was handled (conf/faults); zero in a clean run
            "shard_rounds_failed": rec.failed_shards,  # each caught up with the shard's next exchange
            "nodes_lost": rec.nodes_lost,  # shards rebuilt from a checkpoint (node gone, or failed part-way)
            "rounds_replayed": rec.rounds_replayed,  # to rebuild them
            "catch_up_rounds": max(0, len(rec.rounds) - rec.sched.rounds - 1),
            **{k: int(table[k].sum()) for k in ("downloads_dropped", "payloads_corrupt", "payloads_truncated",
                                                "downloads_failed")},
            "bytes_wasted": float(table["bytes_wasted"].sum()),  # moved by failed download attempts
            "requests_queued": cloud.capacity.queued, "max_queue": cloud.capacity.max_queue,
            "requests_refused_capacity": cloud.refused.get("capacity", 0),
        },
        "failed_shards": rec.failed_shards,
        # seconds to save each checkpoint (sim.checkpoint_every): count, median, max
        "checkpoint_s": {"n": len(checkpoint_s), "median": float(np.median(checkpoint_s)) if checkpoint_s else None,
                         "max": max(checkpoint_s, default=None)},
        "sim_time_s": sim_time, "t_start": rec.sched.t0, "t_end": rec.sched.t0 + sim_time,
        "wall_s": time.perf_counter() - start, "sim_wall_s": sim_wall,
        "time_s": time_breakdown(rounds, sim_wall, rec.loop_s, parallel=backend.name != "inprocess"),
        "pretrain_cached": training["cached"],
        # the cloud's pre-training: epochs, the epoch whose weights were kept, sequences trained on, why it stopped
        "pretrain": {k: training.get(k) for k in ("epochs", "best_epoch", "sequences", "stopped")},
        "resumed": bool(cfg.resume),  # wall_s, sim_wall_s and peak_rss_mb then cover the resumed part only
        # this process and all it started (Ray included), plus on a cluster each other node's Ray
        # processes (the sum of their peaks), PSS
        "peak_rss_mb": memory.result_mb() + backend.remote_peak_mb(),
        "backend": backend.name, "nodes": n_shards, "placement": backend.placement_report(),
        "method": cfg.method.name, "trigger": cfg.trigger._target_, "dataset": cfg.dataset.name, "seed": cfg.seed,
    }
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_json(out / "summary.json", summary)
    _plot(rounds, out)
    return summary


def time_breakdown(rounds: pd.DataFrame, sim_wall: float, loop_s: float, parallel: bool) -> dict:
    """Where the simulation's wall time went: the backend's engine (on Ray, Flower's simulation
    engine starting, its ClientApp workers starting, and stopping after the last reply: a fixed
    cost, whatever the fleet's size), and the round loop (`rounds`), split into the cloud
    (admitting and answering requests), the shards (`parallel`: the slowest shard of each
    exchange, as they run side by side; else all of them, one after another), and the rest
    (messages between the cloud and the shards, routing, checkpoints); and each shard step's
    seconds summed over shards (receive: downloads and installs; score: ranking events;
    replay: walking events and triggers; request: building requests)."""
    total = {k: float(rounds[k].sum()) if k in rounds else 0.0 for k in TIMES}
    shards = total["time_shard_slowest"] if parallel else sum(total[k] for k in SHARD_TIMES)
    return {"simulation": sim_wall, "engine": sim_wall - loop_s, "rounds": loop_s, "cloud": total["time_cloud"],
            "shards": shards, "transport_and_loop": loop_s - total["time_cloud"] - shards,
            "shard_steps_summed": {k.removeprefix("time_"): total[k] for k in SHARD_TIMES}}


def _quantiles(x: np.ndarray) -> dict:
    if not len(x):
        return {"n": 0, "median": None, "p90": None}
    return {"n": int(len(x)), "median": float(np.median(x)), "p90": float(np.quantile(x, 0.9))}


def install_delays(installs: np.ndarray, fleet) -> dict:
    """Seconds from a request to its answer installed (upload, the cloud's queue and time,
    download with its waits and retries), overall and per link class."""
    delay = installs[:, 2] - installs[:, 1]
    link = fleet.link_class[installs[:, 0].astype(np.int64)]
    out = {"all": _quantiles(delay)}
    out.update({str(c): _quantiles(delay[link == c]) for c in np.unique(fleet.link_class)})
    return out


def by_group(table: pd.DataFrame, column: str, installs: np.ndarray, fleet) -> dict:
    """Per device tier (or link class): requests, the share of answers whose budget removed
    blocks the structure chose, mean kept blocks and FLOPs of the answers, FLOPs per inference,
    NDCG@10, and the request-to-install delay."""
    out = {}
    group_of = getattr(fleet, column)[installs[:, 0].astype(np.int64)]
    for name, g in table.groupby(column, sort=True):
        answers = float(g["answers"].sum())
        scored = float(g["scored"].sum())
        delay = installs[group_of == name]
        out[str(name)] = {
            "devices": int(len(g)), "requests": int(g["requests"].sum()), "answers": int(answers),
            "share_budget_cut": float(g["budget_cut"].sum() / answers) if answers else None,
            "mean_kept_blocks": float(g["kept_blocks_sum"].sum() / answers) if answers else None,
            "mean_answer_flops": float(g["answer_flops_sum"].sum() / answers) if answers else None,
            "mean_flops_per_inference": float(g["flops"].sum() / scored) if scored else None,
            "ndcg10": float(g["ndcg"].sum() / scored) if scored else None,
            "hit10": float(g["hit"].sum() / scored) if scored else None,
            "share_events_waiting": float(g["waiting"].sum() / scored) if scored else None,
            "request_to_install_s": _quantiles(delay[:, 2] - delay[:, 1]),
        }
    return out


def stream_ordinal(s: runfiles.Streams, device: np.ndarray, t: np.ndarray) -> np.ndarray:
    """How many of its stream events each device had seen by time t (a request made at an
    event counts that event): one sort of the stream events and the queries by (device, time),
    an event before a query at the same time."""
    device = np.asarray(device, dtype=np.int64)
    n_stream = s.indptr[1:] - s.split
    ev_dev = np.repeat(np.arange(s.n_devices), n_stream)
    starts = np.concatenate([[0], np.cumsum(n_stream)])
    ev = np.arange(starts[-1]) - np.repeat(starts[:-1] - s.split, n_stream)  # global index of each stream event
    dev = np.concatenate([ev_dev, device])
    when = np.concatenate([np.asarray(s.ts[ev], dtype=float), np.asarray(t, dtype=float)])
    query = np.concatenate([np.zeros(len(ev), bool), np.ones(len(device), bool)])
    order = np.lexsort((query, when, dev))
    seen = np.cumsum(~query[order])  # stream events up to each position, in (device, time) order
    out = np.empty(len(device), np.int64)
    at = query[order]
    out[order[at] - len(ev)] = seen[at] - starts[dev[order[at]]]
    return out


def _plot(rounds: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = rounds[rounds["kind"] == "window"]
    if r.empty:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    day = (r["t1"] - r["t0"].min()) / 86400
    ax[0].plot(day, r["ndcg_sum"].cumsum() / r["scored"].cumsum().clip(lower=1))
    ax[0].set(xlabel="simulated day", ylabel="running NDCG@10")
    ax[1].plot(day, r["requests"].cumsum())
    ax[1].set(xlabel="simulated day", ylabel="requests so far")
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=110)
    plt.close(fig)


def simulate_on_grid(grid, run_config: dict) -> dict:
    """`flwr run`: the run config's `overrides` (as on the command line of `python -m
    fl_sim.run`) and `output-dir` make the config; Flower's SuperNodes are the shards."""
    import shlex

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = shlex.split(str(run_config.get("overrides", "")))
    out = Path(str(run_config.get("output-dir", "outputs/flwr-run"))).expanduser().resolve()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose(config_name="config", overrides=[*overrides, f"output_dir={out}"])
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"run config overrides: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    return simulate(cfg, out=out, grid=grid)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
@friendly_errors
def main(cfg: DictConfig) -> None:
    summary = simulate(cfg)
    keys = ("num_devices", "rounds", "ndcg10", "hit10", "requests", "events_total", "events_evaluated",
            "mean_flops_per_inference", "wall_s")
    print(json.dumps({k: summary[k] for k in keys}))


if __name__ == "__main__":
    main()
