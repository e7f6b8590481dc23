"""The compute floor of a fleet run: its stream events scored in plain batched passes, with no
simulation around them (no rounds, replay, triggers, cloud, transport).

    python benchmarks/floor.py num_clients=5000 [--check] [--run=OUTPUT_DIR] [--processes=2] [more fl_sim.run overrides]

Every device gets its deployment model, as in a run's first round (its first request, the
cloud's answer, installed). Then every real-time event is scored once with that model: each
device's timeline in the same anchored chunks a run scores (clients/scoring.py), each chunk's
sequence one row of a batch of `sim.batch` rows of equal structure (the simulator's scorer
mixes structures in a pass, as an exchange has few devices of each; with full batches, as here,
mixing measured no faster: 7.2-12.2 s against 7.4-10.3 s at 5,000 devices, three runs each),
one backbone pass per batch with the device's generated terms, and the target ranked among the
device's candidates with the items it saw before left out (clients.scoring.rank_targets). Only
that is timed.

What it leaves out of a run: later model versions (a run installs new ones when devices ask;
their structures come from the same controller, so their cost per event is alike) and every
step around scoring. The events, sequences, batch size and ranking are the run's. As a check
that the floor computes the right thing, the same events are also scored through the
simulator's own scorer (clients.scoring.score) with the same models (`--check`): NDCG@10
must agree. With `--run=DIR` (a finished run of the same overrides), also the floor that
scores each chunk once per model version the run installed (its installs.parquet): what the
run must compute at the least, as a device's model changes; and, apart, what the run's
requests (its requests.parquet) compute on their devices in plain batched calls, the
structure and interest each uploads (not scoring, so not in the floor). With
`--processes=N`, also both floors split over N one-thread processes running at once, the
devices dealt as a run deals them to its N shards (the floor in the shape of the run; the
slowest part's seconds). Prints JSON: floor seconds, events, ms per event, NDCG@10.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients import inbox, outbox  # noqa: E402
from clients.scoring import rank_targets, score  # noqa: E402
from clients.state import Devices, load_fixed  # noqa: E402
from fl_sim import runfiles  # noqa: E402
from fl_sim.cli import CONF_DIR  # noqa: E402
from fl_sim.data import build_streams, load_dataset, select_devices  # noqa: E402
from fl_sim.memory import steady_heap  # noqa: E402
from fl_sim.pretrain import deployment_users, pretrained  # noqa: E402
from fl_sim.privacy import request_ends  # noqa: E402
from fl_sim.training import left_pad  # noqa: E402
from strategies.cloud import Cloud  # noqa: E402


def run_files(overrides: list[str], folder: Path) -> Path:
    """The run files `python -m fl_sim.run` writes for these overrides (pre-training cached)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    inter, _ = load_dataset(cfg.dataset, num_clients=cfg.num_clients, seed=cfg.seed, cache_dir=cfg.cache_dir)
    streams = build_streams(select_devices(inter, cfg.num_clients, cfg.seed), cfg.streams, cfg.seed)
    model, fp, _ = pretrained(cfg, streams)
    runfiles.write(folder, cfg, streams, model, fp, deployment_users(cfg, streams, model)[0])
    return folder


def deployed(run_dir: str, shard: int = 0, shards: int = 1):
    """A shard (by default one holding every device), each device with its deployment model installed."""
    fx = load_fixed(run_dir, shard, shards)
    st = Devices.new(fx)
    rows = np.arange(len(fx.devices))
    t0 = float(np.min(fx.s.ts[fx.s.split[fx.s.split < fx.s.indptr[1:]]]))
    req = outbox.build(fx, st, rows, fx.s.split[fx.devices], np.full(len(rows), t0),
                       outbox.first_user_vectors(fx, rows), first=True)
    cloud = Cloud(run_dir)
    inbox.receive(fx, st, cloud.answer(cloud.admit([req])))
    return fx, st


@torch.no_grad()
def floor(fx, st, installs: dict | None = None) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(seconds, events scored, their NDCG@10, the entropy of their scores over what is ranked):
    plain batched passes over every stream event. `installs` (device -> times a run installed
    a new model): each chunk is then scored in one pass per model version, as the run must, cut
    where an install takes over (every version costed with the deployment model)."""
    bb, s, C, T = fx.model.backbone, fx.s, fx.chunk, fx.model.backbone.maxlen
    batch = int(fx.cfg.sim.batch)
    start = time.perf_counter()
    # Every piece of every chunk: (device row, first event, end event, the chunk's end), by structure.
    groups: dict[tuple, list] = {}
    for j, g in enumerate(fx.devices):
        model = st.held[j]
        if model is None:  # its budget fitted no model: a run ranks none of its events either
            continue
        base, lo, end = s.indptr[g], s.split[g], s.indptr[g + 1]
        times = (installs or {}).get(int(g), ())
        cuts = set((lo + np.searchsorted(s.ts[lo:end], times, side="left")).tolist()) if len(times) else set()
        c0 = lo
        while c0 < end:
            c1 = min(end, base + ((c0 - base) // C + 1) * C)
            edges = [c0, *sorted(x for x in cuts if c0 < x < c1), c1]
            for a, b in zip(edges[:-1], edges[1:]):
                groups.setdefault((model.blocks.tobytes(), model.weights is None), []).append((j, a, b, c1))
            c0 = c1
    events, ndcg, entropy = [], [], []
    for jobs in groups.values():
        kept = np.flatnonzero(st.held[jobs[0][0]].blocks).tolist()
        jobs.sort(key=lambda job: min(job[3], s.indptr[fx.devices[job[0]]] + T) - s.indptr[fx.devices[job[0]]])
        for b0 in range(0, len(jobs), batch):
            part = jobs[b0:b0 + batch]
            first = [max(s.indptr[fx.devices[j]], ce - T) for j, _, _, ce in part]
            seq = left_pad([fx.ids[f:ce] for f, (_, _, _, ce) in zip(first, part)], T)
            params = None if st.held[part[0][0]].weights is None else [None] * bb.n_blocks
            for k in kept if params is not None else []:
                terms = torch.from_numpy(np.stack([st.held[j].weights[k] for j, _, _, _ in part]))
                mapper = fx.model.mapper  # (None: finetune's own flat vectors)
                params[k] = mapper.params_from_terms(bb.blocks[k], k, terms) if mapper else bb.blocks[k].unflatten(terms)
            hidden = bb(seq, params=params, blocks=kept)
            # The state before each event ranks it (an event with nothing before it is not ranked).
            b_idx, pos, ev, rows = [], [], [], []
            for b, ((j, a, e1, ce), f) in enumerate(zip(part, first)):
                e = np.arange(max(a, f + 1), e1)
                b_idx.append(np.full(len(e), b)), pos.append(e - 1 - f + seq.shape[1] - (ce - f))
                ev.append(e), rows.append(np.full(len(e), j))
            b_idx, pos, ev, rows = (np.concatenate(x) for x in (b_idx, pos, ev, rows))
            h = hidden[torch.from_numpy(b_idx), torch.from_numpy(pos)]
            rank, ent = rank_targets(fx, h, rows, ev, [st.held[j].candidates for j in rows])
            events.append(ev), ndcg.append(np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0)), entropy.append(ent)
    seconds = time.perf_counter() - start
    return seconds, np.concatenate(events), np.concatenate(ndcg), np.concatenate(entropy)


@torch.no_grad()
def encode_requests(fx, run_output: str) -> tuple[float, int]:
    """(seconds, requests): what the run's real-time requests of this part's devices
    (requests.parquet) compute on the device, the controller's structure and the extractor's
    interest over each one's window (clients.outbox.upload_vectors), in plain batched calls.
    Not scoring, so not in the floor; the device's own work a run must do as well."""
    import pandas as pd

    req = pd.read_parquet(Path(run_output) / "requests.parquet")
    device = req["device"].to_numpy()
    mine = np.isin(device, fx.devices)
    g = device[mine]
    ends = request_ends(fx.s.split, g, req["event"].to_numpy()[mine])
    windows = outbox.recent_items(fx, g, ends)
    start = time.perf_counter()
    outbox.upload_vectors(fx.model, windows, g, ends, int(fx.cfg.seed))
    return time.perf_counter() - start, int(len(g))


def read_installs(run_output: str) -> tuple[dict, int]:
    """(device -> the times a finished run installed a new model, installs in all)."""
    import pandas as pd

    inst = pd.read_parquet(Path(run_output) / "installs.parquet")
    return {int(d): np.sort(g["install_time"].to_numpy()) for d, g in inst.groupby("device")}, len(inst)


def measure(overrides: list[str], check: bool = False, run_output: str | None = None, processes: int = 1) -> dict:
    """The floor for a run with these overrides; `check`: also score the same events through
    the simulator's scorer in one call and report both NDCG@10s (they must agree);
    `run_output`: a finished run's folder (same overrides), whose installs.parquet gives the
    model versions: then also the floor with one pass per version (`floor_versions_s`).
    `processes` > 1: also the same floors split as a run splits its devices over that many
    one-thread shard processes, running at once (`parallel`: the slowest part's seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = str(run_files(overrides, Path(tmp)))
        fx, st = deployed(run_dir)
        seconds, events, ndcg, _ = floor(fx, st)
        out = {"overrides": overrides, "devices": int(len(fx.devices)), "events_ranked": int(len(events)),
               "floor_s": round(seconds, 3), "ms_per_event": 1000 * seconds / max(len(events), 1),
               "ndcg10_floor": float(ndcg.mean()), "threads": torch.get_num_threads()}
        if run_output is not None:
            installs, n_installs = read_installs(run_output)
            seconds_v, events_v, _, _ = floor(fx, st, installs)
            out.update({"floor_versions_s": round(seconds_v, 3), "installs": n_installs,
                        "events_ranked_versions": int(len(events_v))})
            seconds_r, n_requests = encode_requests(fx, run_output)
            out.update({"requests_s": round(seconds_r, 3), "requests": n_requests})
        if check:
            rows = np.arange(len(fx.devices))
            lo, hi = fx.s.split[fx.devices].copy(), fx.s.indptr[fx.devices + 1].copy()
            start = time.perf_counter()
            sc = score(fx, st, rows, lo, hi)
            out.update({"scorer_one_call_s": round(time.perf_counter() - start, 3),
                        "events_ranked_scorer": int(sc.scored.sum()),
                        "ndcg10_scorer": float(sc.ndcg[sc.scored].mean())})
        if processes > 1:
            del fx, st  # (the parts load their own)
            out["parallel"] = in_parts(run_dir, processes, run_output)
            par = out["parallel"]
            if par["events_ranked"] != out["events_ranked"] or not np.isclose(par["ndcg10"], out["ndcg10_floor"]):
                raise SystemExit(f"the parts ranked {par['events_ranked']} events at NDCG@10 {par['ndcg10']}, "
                                 f"one process {out['events_ranked']} at {out['ndcg10_floor']}")
    return out


def in_parts(run_dir: str, n: int, run_output: str | None) -> dict:
    """The floors over n one-thread processes, device g in part g % n (as a run's shards), each
    timed section started in all parts at once: {floor_s, floor_versions_s: the slowest part's,
    parts: each part's}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--part", run_dir, str(i), str(n), run_output or ""],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for i in range(n)]
    sections = 3 if run_output else 1
    for _ in range(sections):  # a barrier before each timed section
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise SystemExit(f"floor part failed before its timed section (said {line!r})")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
    parts = [json.loads(p.communicate()[0]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a floor part failed")
    out = {"processes": n, "threads_each": 1, "floor_s": max(p["floor_s"] for p in parts), "parts": parts}
    if run_output:
        out["floor_versions_s"] = max(p["floor_versions_s"] for p in parts)
        out["requests_s"] = max(p["requests_s"] for p in parts)
        out["floor_versions_and_requests_s"] = max(p["floor_versions_s"] + p["requests_s"] for p in parts)
    out["events_ranked"] = sum(p["events_ranked"] for p in parts)
    out["ndcg10"] = sum(p["ndcg10_sum"] for p in parts) / max(out["events_ranked"], 1)
    return out


def part(run_dir: str, shard: int, n: int, run_output: str) -> None:
    """One part of `in_parts`: waits for "go" on stdin before each timed section."""
    torch.set_num_threads(1)
    fx, st = deployed(run_dir, shard, n)
    installs = read_installs(run_output)[0] if run_output else None

    def go():
        print("ready", flush=True)
        sys.stdin.readline()

    def timed(inst):
        go()
        seconds, events, ndcg, _ = floor(fx, st, inst)
        return round(seconds, 3), int(len(events)), float(ndcg.sum())

    out = dict(zip(("floor_s", "events_ranked", "ndcg10_sum"), timed(None)))
    if installs is not None:
        out["floor_versions_s"] = timed(installs)[0]
        go()
        seconds, out["requests"] = encode_requests(fx, run_output)
        out["requests_s"] = round(seconds, 3)
    print(json.dumps({"shard": shard, **out}), flush=True)


def main() -> None:
    steady_heap()  # the allocator settings of the run's processes (fl_sim.memory)
    args = sys.argv[1:]
    if args[:1] == ["--part"]:
        run_dir, shard, n, run_output = args[1:5]
        return part(run_dir, int(shard), int(n), run_output)
    run_output = next((a.split("=", 1)[1] for a in args if a.startswith("--run=")), None)
    processes = int(next((a.split("=", 1)[1] for a in args if a.startswith("--processes=")), 1))
    overrides = [a for a in args if a != "--check" and not a.startswith(("--run=", "--processes="))]
    print(json.dumps(measure(overrides, check="--check" in args, run_output=run_output, processes=processes)))


if __name__ == "__main__":
    main()
