"""The fleet simulation end to end at small scale: contract, accounting, determinism."""

import pandas as pd
import pytest

from helpers import SMALL, accounted, make_cfg, run_module, simulate


def test_summary_contract_and_accounting(baseline):
    summary, out = baseline
    for key in ("num_devices", "rounds", "ndcg10", "hit10", "events_total", "events_evaluated", "requests",
                "bytes_up", "bytes_down", "mean_flops_per_inference", "mean_params_on_device",
                "budget_violations", "sim_time_s", "wall_s", "peak_rss_mb", "backend", "nodes"):
        assert key in summary, key
    assert summary["num_devices"] == 40 and 0 < summary["rounds"] <= 24  # windows without events are skipped
    assert summary["events_total"] == (summary["events_evaluated"] + summary["events_no_context"]
                                       + summary["events_no_model"])
    assert summary["events_evaluated"] > 0 and summary["requests"] > 0
    assert summary["budget_violations"] == 0
    devices = pd.read_parquet(out / "devices.parquet")
    assert len(devices) == 40 and {"tier", "link_class", "ndcg10", "requests"} <= set(devices.columns)
    assert devices["events"].sum() == summary["events_total"]
    rounds = pd.read_parquet(out / "rounds.parquet")
    assert len(rounds) == summary["rounds"] + 1 and rounds["requests"].sum() == summary["requests"]
    assert (out / "rounds.png").exists()
    t = summary["time_s"]  # where the simulation's wall time went: parts of it, none negative
    steps = t["shard_steps_summed"]
    assert set(steps) == {"receive", "score", "replay", "request"} and min(steps.values()) >= 0
    assert t["cloud"] > 0 and steps["score"] > 0 and t["transport_and_loop"] >= 0
    assert t["cloud"] + t["shards"] + t["transport_and_loop"] == pytest.approx(t["rounds"])
    assert t["engine"] >= 0 and t["engine"] + t["rounds"] == pytest.approx(t["simulation"])
    assert t["simulation"] == summary["sim_wall_s"] and t["simulation"] < summary["wall_s"]


def test_same_results_whatever_the_shard_count(tmp_path, cache):
    one, _ = simulate(tmp_path, "one", "sim.backend=inprocess", "sim.nodes=1", cache=cache)
    three, _ = simulate(tmp_path, "three", "sim.backend=inprocess", "sim.nodes=3", cache=cache)
    for key in ("events_total", "events_evaluated", "requests", "bytes_up", "bytes_down", "budget_violations"):
        assert one[key] == three[key], key
    for key in ("ndcg10", "hit10", "mean_flops_per_inference"):
        assert one[key] == pytest.approx(three[key], rel=1e-6), key


def test_device_rec_ships_its_model_once_and_candidates_with_every_answer(tmp_path, cache):
    summary, out = simulate(tmp_path, "dr", "method=device_rec", "sim.backend=inprocess", "sim.nodes=2", cache=cache)
    assert summary["requests"] > 0 and summary["bytes_down_candidates"] > 0
    assert summary["bytes_down_model"] == 0  # after deployment its requests bring candidates only
    devices = pd.read_parquet(out / "devices.parquet")
    assert devices["bytes_first"].nunique() == 1  # the same full model for every device, once
    assert (devices["block_0"] == devices["scored"]).all()  # every block, at every event


def test_delta_payloads_change_bytes_not_models(tmp_path, cache):
    """`sim.payload=delta` ships the generated terms (and a block's shared weights once): the
    devices hold the same models, so every accuracy number is the same; the bytes follow the
    block's sizes by hand. DUET (both blocks, affine terms), SMALL's d=16: a block's whole
    weights are 6,784 bytes at fp32, its terms 640."""
    duet = ("method=duet", "sim.backend=inprocess")
    full, out_full = simulate(tmp_path, "full", *duet, "sim.nodes=2", cache=cache)
    delta, out = simulate(tmp_path, "delta", *duet, "sim.nodes=3", "sim.payload=delta", cache=cache)
    for key in ("events_total", "events_evaluated", "requests", "requests_answered", "bytes_up",
                "bytes_down_candidates"):
        assert delta[key] == full[key], key
    for key in ("ndcg10", "hit10", "mean_flops_per_inference"):
        assert delta[key] == pytest.approx(full[key], rel=1e-12), key
    for tier, row in full["by_tier"].items():
        assert delta["by_tier"][tier]["ndcg10"] == pytest.approx(row["ndcg10"], rel=1e-12), tier
    a = pd.read_parquet(out_full / "devices.parquet").set_index("device")
    b = pd.read_parquet(out / "devices.parquet").set_index("device")
    whole, terms = 6784, 640
    both = a["kept_blocks_sum"] == 2 * a["answers"]  # every answer kept both blocks
    assert both.sum() >= 20
    # after deployment: every answer ships both blocks whole, or both blocks' terms
    assert (a.loc[both, "bytes_model"] % (2 * whole) == 0).all() and (a.loc[both, "bytes_model"] > 0).any()
    assert (b.loc[both, "bytes_model"] * whole == a.loc[both, "bytes_model"] * terms).all()
    # the first model: both blocks' shared weights, and their terms on top
    assert (b.loc[both, "bytes_first"] - a.loc[both, "bytes_first"] == 2 * terms).all()
    assert delta["bytes_down_model"] < full["bytes_down_model"] / 5
    # smaller answers install sooner (here never after the device's next event, so the scores match)
    assert delta["request_to_install_s"]["all"]["median"] < full["request_to_install_s"]["all"]["median"]


def test_ray_backend_matches_inprocess(tmp_path, cache, baseline):
    """Flower on Ray, with the shard count changed too: the same seed, the same results."""
    local, _ = baseline
    ray, out = simulate(tmp_path, "ray", "sim.backend=ray", "sim.nodes=3", cache=cache)
    assert ray["backend"] == "ray" and ray["nodes"] == 3 and ray["failed_shards"] == 0
    assert ray["events_no_model"] == 0  # every device got its first model
    for key in ("events_total", "events_evaluated", "events_no_context", "requests", "bytes_up", "bytes_down",
                "download_retries", "offline_deferred"):
        assert ray[key] == local[key], key
    for key in ("ndcg10", "hit10", "mean_flops_per_inference"):
        assert ray[key] == pytest.approx(local[key], rel=1e-6), key
    assert len(pd.read_parquet(out / "devices.parquet")) == 40


def test_candidate_and_budget_errors_name_the_key(tmp_path):
    from fl_sim.config_check import check_ranges
    from fl_sim.errors import ConfigError
    from helpers import make_cfg

    for key in ("devices.latency_s=0", "devices.latency_s=2.0", "devices.compute_share=1.5",
                "devices.memory_share=-1.0"):
        with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
            check_ranges(make_cfg(key))
    for value in ("5", "100000"):  # below 10; above the catalogue
        res = run_module("fl_sim.run", *SMALL, f"sim.candidates={value}", f"output_dir={tmp_path / value}")
        assert res.returncode == 2 and "sim.candidates" in res.stderr, res.stderr[-500:]


def test_results_do_not_depend_on_the_round_length(tmp_path, cache):
    """Answers install when the network delivers them, inside a round too: 10-minute, 1-hour and
    4-hour rounds give the same run."""
    runs = [simulate(tmp_path, f"r{r}", "sim.backend=inprocess", "sim.max_rounds=null", "dataset.days=3",
                     f"sim.round_s={r}", cache=cache)[0] for r in (600, 3600, 14400)]
    assert runs[0]["rounds"] > runs[1]["rounds"] > runs[2]["rounds"]
    for other in runs[1:]:
        for key in ("events_total", "events_evaluated", "events_no_model", "requests", "requests_answered",
                    "bytes_up", "bytes_down", "bytes_down_candidates", "offline_deferred", "budget_violations",
                    "request_to_install_s", "by_tier"):
            assert other[key] == runs[0][key], key
        for key in ("ndcg10", "hit10", "mean_flops_per_inference"):
            assert other[key] == pytest.approx(runs[0][key], rel=1e-9), key


def test_finetune_trains_on_device_whatever_the_sharding(tmp_path, cache):
    short = ("method=finetune", "sim.backend=inprocess", "sim.max_rounds=12")
    one, _ = simulate(tmp_path, "ft1", *short, "sim.nodes=1", cache=cache)
    three, _ = simulate(tmp_path, "ft3", *short, "sim.nodes=3", cache=cache)
    assert one["requests"] > 0 and one["bytes_down_model"] == 0  # the cloud sends candidates, never a model
    assert one["local_updates"] > 0 and one["train_flops_per_device_per_day"] > 0
    assert one["events_no_model"] == 0
    for key in ("local_updates", "events_evaluated", "bytes_down"):
        assert one[key] == three[key], key
    assert one["ndcg10"] == pytest.approx(three["ndcg10"], rel=1e-6)


def test_duet_requests_full_structures(tmp_path, cache):
    summary, out = simulate(tmp_path, "duet", "method=duet", "sim.backend=inprocess", cache=cache)
    assert summary["requests"] > 0 and summary["budget_violations"] == 0
    devices = pd.read_parquet(out / "devices.parquet")
    held = devices[[c for c in devices.columns if c.startswith("block_")]].sum()
    assert (held > 0).all()  # every block is used (no structure selection), where budgets allow


def test_impossible_budgets_are_counted_not_fatal(tmp_path, cache):
    """Memory for no model at all: every request is unservable, each device is told and keeps
    ranking nothing; every event is accounted for."""
    summary, _ = simulate(tmp_path, "tiny", "sim.backend=inprocess", "devices.memory_share=1e-9", cache=cache)
    assert summary["budget_unservable"] > 0 and summary["requests_not_served"] == summary["budget_unservable"]
    assert summary["events_no_model"] > 0 and summary["budget_violations"] == 0
    assert summary["events_total"] == (summary["events_evaluated"] + summary["events_no_context"]
                                       + summary["events_no_model"])


def test_one_seed_fixes_a_run_pretraining_included(tmp_path):
    """Two runs from empty caches (each pre-trains its own cloud model) give the same results."""
    a, _ = simulate(tmp_path, "a", "sim.backend=inprocess", cache=tmp_path / "cache_a")
    b, _ = simulate(tmp_path, "b", "sim.backend=inprocess", cache=tmp_path / "cache_b")
    assert a["pretrain_cached"] is False and b["pretrain_cached"] is False
    for key in ("ndcg10", "hit10", "requests", "bytes_down", "mean_flops_per_inference", "pretrain"):
        assert a[key] == b[key], key
    assert a["pretrain"]["epochs"] == 1 and a["pretrain"]["stopped"] == "max_epochs"  # SMALL: one epoch


def test_pretrained_cache_is_keyed_by_the_code(tmp_path, monkeypatch):
    """A cached model is served only to the code that trained it: with any source of the data,
    the models or the training changed, the cloud trains again (and caches under another name)."""
    from fl_sim import pretrain
    from fl_sim.data import build_streams, load_dataset, select_devices

    cfg = make_cfg(*SMALL, f"cache_dir={tmp_path / 'cache'}")
    inter, _ = load_dataset(cfg.dataset, num_clients=cfg.num_clients, seed=cfg.seed, cache_dir=cfg.cache_dir)
    streams = build_streams(select_devices(inter, cfg.num_clients, cfg.seed), cfg.streams, cfg.seed)
    _, _, first = pretrain.pretrained(cfg, streams)
    _, _, again = pretrain.pretrained(cfg, streams)
    assert first["cached"] is False and again == {**first, "cached": True}
    path = pretrain.pretrained_path(cfg, streams)
    monkeypatch.setattr(pretrain, "code_digest", lambda: "another-version")
    assert pretrain.pretrained_path(cfg, streams) != path
    _, _, changed = pretrain.pretrained(cfg, streams)
    assert changed["cached"] is False


def test_a_device_waits_for_its_model_before_asking_again(tmp_path, cache):
    """Links so slow that a download outlasts many events, and a trigger that fires at every
    event: a request stays outstanding until its sub-model is installed, so no delivery ever
    replaces one still on its way (the shard refuses that outright) and slow links mean fewer
    requests."""
    base = ["sim.backend=inprocess", "trigger=always", "model.d=64", "sim.max_rounds=12"]  # blocks of ~200 kB
    slow = ["~devices.links", "+devices.links={slow: {share: 1.0, down_mbps: 0.00001, up_ratio: 0.5, sigma: 0.1}}"]
    fast, _ = simulate(tmp_path, "fast", *base, cache=cache)
    summary, _ = simulate(tmp_path, "slow", *base, *slow, cache=cache)  # the link's floor: 1 kB/s
    assert 0 < summary["requests"] < fast["requests"]
    assert accounted(summary)


def test_stream_ordinal_counts_each_devices_stream_events_up_to_a_time():
    """Recomputed per query with a plain search of the device's own stream."""
    import numpy as np

    from fl_sim.run import stream_ordinal
    from fl_sim.runfiles import Streams

    rng = np.random.default_rng(0)
    lens = rng.integers(0, 20, 50)
    indptr = np.concatenate([[0], np.cumsum(lens)])
    ts = np.concatenate([np.sort(rng.integers(0, 30, n)).astype(float) for n in lens])  # ties included
    split = indptr[:-1] + (rng.random(50) * (lens + 1)).astype(int)
    s = Streams(item=np.zeros(len(ts), np.int32), ts=ts, session=ts, indptr=indptr, split=split, n_items=5)
    dev, t = rng.integers(0, 50, 300), rng.integers(-1, 32, 300).astype(float)
    want = [np.searchsorted(ts[split[d]:indptr[d + 1]], x, side="right") for d, x in zip(dev, t)]
    assert stream_ordinal(s, dev, t).tolist() == [int(w) for w in want]
    assert stream_ordinal(s, dev[:0], t[:0]).tolist() == []


def test_the_scorer_agrees_with_a_plain_batched_pass(cache, monkeypatch, tmp_path):
    """The compute floor (benchmarks/floor.py) scores every stream event in plain batched passes,
    written apart from the simulator's scorer: both must rank each event alike."""
    import sys

    import numpy as np

    from clients.scoring import score
    from helpers import ROOT

    monkeypatch.setenv("FL_SIM_CACHE", str(cache))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from floor import deployed, floor, run_files

    fx, st = deployed(str(run_files(SMALL, tmp_path / "run")))
    _, events, ndcg, entropy = floor(fx, st)
    rows = np.arange(len(fx.devices))
    sc = score(fx, st, rows, fx.s.split[fx.devices].copy(), fx.s.indptr[fx.devices + 1].copy())
    # the scorer's events, in device order, at their global indices
    ev = np.concatenate([np.arange(a, b) for a, b in zip(fx.s.split[fx.devices], fx.s.indptr[fx.devices + 1])])
    order = np.argsort(events)
    assert (ev[sc.scored] == events[order]).all() and len(events) > 500
    assert np.allclose(sc.ndcg[sc.scored], ndcg[order]) and ndcg.sum() > 0
    assert np.allclose(sc.entropy[sc.scored], entropy[order], atol=1e-5)
    # Cut at model versions (installs), each piece read with its chunk's context: the same
    # models give the same scores, in more passes.
    g = fx.devices[::3]
    installs = {int(d): np.sort(fx.s.ts[fx.s.split[d]:fx.s.indptr[d + 1]][1::4]) for d in g}
    _, events_v, ndcg_v, entropy_v = floor(fx, st, installs)
    order_v = np.argsort(events_v)
    assert (events_v[order_v] == events[order]).all()
    assert np.allclose(ndcg_v[order_v], ndcg[order]) and np.allclose(entropy_v[order_v], entropy[order], atol=1e-5)


def test_the_floor_split_as_the_shards_scores_each_part_s_own_events(cache, monkeypatch, tmp_path):
    """benchmarks/floor.py --processes=2: two one-thread processes, device g in part g % 2 as a
    run deals devices to its shards, score between them exactly the events one process scores,
    each part its own devices' events, with the same NDCG@10."""
    import sys

    import numpy as np

    from helpers import ROOT

    monkeypatch.setenv("FL_SIM_CACHE", str(cache))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from floor import deployed, floor, measure, run_files

    out = measure(SMALL, processes=2)
    parts = out["parallel"]["parts"]
    fx, st = deployed(str(run_files(SMALL, tmp_path / "run")))
    _, events, ndcg, _ = floor(fx, st)
    device = np.searchsorted(fx.s.indptr, events, side="right") - 1
    assert [p["shard"] for p in parts] == [0, 1] and out["events_ranked"] == len(events) > 500
    for i, p in enumerate(parts):
        mine = device % 2 == i
        assert p["events_ranked"] == mine.sum() > 0
        assert np.isclose(p["ndcg10_sum"], ndcg[mine].sum())
    assert out["parallel"]["floor_s"] == max(p["floor_s"] for p in parts)


def test_windows_read_from_the_context_cache_score_as_one_pass(cache, monkeypatch, tmp_path):
    """Scoring a device's stream window by window with the context cache (later windows of a
    chunk read the states an earlier pass computed) gives what one call over the whole stream
    gives, with fewer sequences passed through the model than without the cache."""
    import sys

    import numpy as np

    import clients.scoring as scoring
    from helpers import ROOT

    monkeypatch.setenv("FL_SIM_CACHE", str(cache))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from floor import deployed, run_files

    fx, st = deployed(str(run_files(SMALL, tmp_path / "run")))
    rows = np.arange(len(fx.devices))
    start, stop = fx.s.split[fx.devices].copy(), fx.s.indptr[fx.devices + 1].copy()
    whole = scoring.score(fx, st, rows, start, stop)
    passed = []
    real_pass = scoring._pass
    monkeypatch.setattr(scoring, "_pass", lambda fx, jobs: passed.append(len(jobs)) or real_pass(fx, jobs))

    def windowed(contexts):
        passed.clear()
        parts = {k: [] for k in ("ndcg", "scored", "user", "entropy")}
        cuts = np.linspace(0.0, 1.0, 7)  # six windows a device
        for w0, w1 in zip(cuts[:-1], cuts[1:]):
            lo = start + np.floor(w0 * (stop - start)).astype(np.int64)
            hi = start + np.floor(w1 * (stop - start)).astype(np.int64)
            sc = scoring.score(fx, st, rows, lo, hi, contexts)
            for k in parts:
                parts[k].append([getattr(sc, k)[sc.offset[a]:sc.offset[a + 1]] for a in rows])
        # back in device order: device a's events of every window
        return {k: np.concatenate([v[w][a] for a in rows for w in range(len(v))]) for k, v in parts.items()}, \
            sum(passed)

    plain, n_plain = windowed(None)
    with_cache, n_cached = windowed({})
    for got in (plain, with_cache):
        assert (got["scored"] == whole.scored).all()
        assert np.allclose(got["ndcg"], whole.ndcg) and np.allclose(got["user"], whole.user, atol=1e-5)
        assert np.allclose(got["entropy"], whole.entropy, atol=1e-5)
    assert whole.scored.sum() > 500 and n_cached < 0.6 * n_plain, (n_cached, n_plain)


def test_events_ranked_when_asked_equal_those_ranked_at_once(cache, monkeypatch, tmp_path):
    """A shard ranks a window's events as its replay reaches them (a device that asks the cloud
    stops there): ranking them piece by piece, in any order, gives the numbers one ranking of
    them all gives, and an event not asked for is left unranked. The scorer's batches keep
    their padding within a tenth of their items plus 256 positions."""
    import sys

    import numpy as np

    import clients.scoring as scoring
    from helpers import ROOT

    monkeypatch.setenv("FL_SIM_CACHE", str(cache))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from floor import deployed, run_files

    fx, st = deployed(str(run_files(SMALL, tmp_path / "run")))
    rows = np.arange(len(fx.devices))
    lo, hi = fx.s.split[fx.devices].copy(), fx.s.indptr[fx.devices + 1].copy()
    batches = []
    real_batches = scoring._batches
    monkeypatch.setattr(scoring, "_batches",
                        lambda fx, jobs, b: batches.append(real_batches(fx, jobs, b)) or batches[-1])
    at_once = scoring.score(fx, st, rows, lo, hi)
    parts = [part for group in batches for part in group]  # this call's batches
    asked = scoring.score(fx, st, rows, lo, hi, rank=False)
    assert not asked.ranked.any() and not asked.ndcg.any() and asked.scored.sum() > 500
    order = np.random.default_rng(0).permutation(len(asked.scored))
    half = order[:len(order) // 2]
    asked.rank(fx, half, chunk=37)  # a few events at a time: the candidates' embeddings are gathered per chunk
    assert (asked.ranked == np.isin(np.arange(len(order)), half) & asked.scored).all()
    assert not asked.ndcg[~asked.ranked].any() and not asked.entropy[~asked.ranked].any()
    for piece in np.array_split(order[len(order) // 2:], 7):
        asked.rank(fx, piece)
    assert (asked.ranked == at_once.scored).all() and (asked.hit == at_once.hit).all()
    assert np.allclose(asked.ndcg, at_once.ndcg) and np.allclose(asked.entropy, at_once.entropy, atol=1e-5)
    jobs = [job for part in parts for job in part]  # every chunk passed once
    assert len(jobs) == len({(j, c0) for j, _, c0, _, _ in jobs}) > 50
    for size in (fx.cfg.sim.batch, 8):
        parts = real_batches(fx, jobs, size)
        assert sorted(id(job) for part in parts for job in part) == sorted(map(id, jobs))
        assert len(parts) >= len(jobs) / size
        for part in parts:
            widths = [(lambda c: c[1] - c[0])(scoring._context(fx, j, c0)) for j, _, c0, _, _ in part]
            assert 0 < len(part) <= size
            assert len(part) * max(widths) - sum(widths) <= 0.1 * sum(widths) + 256


def test_history_users_are_each_devices_own_pass_cached_with_the_model(tmp_path):
    """The user vectors the cloud computes from the histories before deployment: each device's
    row equals one pass of the shared model over its own history alone (no batch, no padding);
    a second run reads them from the cache; a different model file computes them again."""
    import numpy as np
    import torch

    from fl_sim.data import build_streams, load_dataset, select_devices
    from fl_sim.models import checkpoint
    from fl_sim.pretrain import deployment_users, pretrained, pretrained_path

    cfg = make_cfg(*SMALL, f"cache_dir={tmp_path / 'cache'}", "sim.batch=7")
    inter, _ = load_dataset(cfg.dataset, num_clients=cfg.num_clients, seed=cfg.seed, cache_dir=cfg.cache_dir)
    streams = build_streams(select_devices(inter, cfg.num_clients, cfg.seed), cfg.streams, cfg.seed)
    model, fp, _ = pretrained(cfg, streams)
    users, cached = deployment_users(cfg, streams, model)
    assert not cached and users.shape == (cfg.num_clients, model.backbone.d)
    ids, ptr, split, T = streams.inter.item.astype(np.int64) + 1, streams.inter.indptr, streams.split, model.backbone.maxlen
    with_history = 0
    for g in range(cfg.num_clients):
        if split[g] == ptr[g]:
            assert not users[g].any()
            continue
        with torch.no_grad():
            alone = model.backbone(torch.from_numpy(ids[max(ptr[g], split[g] - T):split[g]])[None])[0, -1].numpy()
        assert np.allclose(users[g], alone, atol=1e-5), g
        with_history += 1
    assert with_history > cfg.num_clients // 2
    again, cached = deployment_users(cfg, streams, model)
    assert cached and np.array_equal(again, users)
    with torch.no_grad():
        model.backbone.item_emb.weight.mul_(2.0)
    checkpoint.save(pretrained_path(cfg, streams), model, fp)  # another model under the same name
    other, cached = deployment_users(cfg, streams, model)
    assert not cached and not np.allclose(other, users)
