"""The fleet's prequential NDCG@10 recomputed by hand for a few devices, outside the shard's
code: the first request rebuilt from the history, the sub-model assembled and run with
`assemble` + `run_submodel`, candidates retrieved by a plain top-N, every event ranked among
them. A bug shared by every backend and shard count would fail here."""

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import SMALL, make_cfg, simulate


def test_fleet_ndcg_matches_an_independent_recomputation(tmp_path, cache):
    extra = ["sim.backend=inprocess", "sim.nodes=2", "trigger=never", "sim.candidates=200"]
    summary, out = simulate(tmp_path, "golden", *extra, cache=cache)
    devices = pd.read_parquet(out / "devices.parquet").set_index("device")

    from fl_sim.data import build_streams, load_dataset, select_devices
    from fl_sim.devices import build_fleet
    from fl_sim.devices.budget import device_budgets
    from fl_sim.models.assemble import Budget, assemble, run_submodel
    from fl_sim.pretrain import pretrained, stream_times

    cfg = make_cfg(*SMALL, *extra, f"cache_dir={cache}")
    inter, _ = load_dataset(cfg.dataset, num_clients=cfg.num_clients, seed=cfg.seed, cache_dir=cfg.cache_dir)
    inter = select_devices(inter, cfg.num_clients, cfg.seed)
    streams = build_streams(inter, cfg.streams, cfg.seed)
    model, _, training = pretrained(cfg, streams)
    assert training["cached"]  # the model the run used
    model.eval()
    bb, W, T, N = model.backbone, model.spec.window, model.backbone.maxlen, 200
    fleet = build_fleet(cfg.devices, inter.n_users, cfg.seed)
    t0 = float(stream_times(streams).min())
    ids, ptr, split = inter.item.astype(np.int64) + 1, inter.indptr, streams.split
    checked = scored = 0
    for g in range(inter.n_users):
        hist = ids[max(ptr[g], split[g] - W):split[g]]
        with torch.no_grad():
            beta, gate, h = model.encode(torch.from_numpy(hist)[None])
            f, p = device_budgets(fleet, cfg.devices, np.array([g]), t0)
            sub = assemble(model, beta, gate, h, [Budget(float(f[0]), float(p[0]))], catalogue=N)[0]
            # retrieval: the cloud's shared model over the history; history items left out
            user = bb(torch.from_numpy(ids[max(ptr[g], split[g] - T):split[g]])[None])[0, -1]
            scores = bb.item_emb.weight[1:] @ user
            scores[torch.from_numpy(inter.item[ptr[g]:split[g]].astype(np.int64))] = -torch.inf
            cand = torch.topk(scores, N).indices.numpy()
        total = 0.0
        for e in range(split[g], ptr[g + 1]):
            base = ptr[g]
            chunk_end = min(ptr[g + 1], base + ((e - base) // (T // 2) + 1) * (T // 2))
            first = max(base, chunk_end - T)
            with torch.no_grad():
                hidden = run_submodel(model, sub, torch.from_numpy(ids[first:chunk_end])[None])[0, e - 1 - first]
            target = int(inter.item[e])
            if target not in cand:
                continue  # a miss
            seen_before = set(inter.item[ptr[g]:e].tolist()) - {target}
            with torch.no_grad():
                s = {int(c): float(hidden @ bb.item_emb.weight[c + 1]) for c in cand if int(c) not in seen_before}
            rank = sum(v > s[target] for v in s.values())
            total += 1.0 / np.log2(rank + 2) if rank < 10 else 0.0
        assert devices.loc[g, "ndcg"] == pytest.approx(total, abs=1e-6), g
        checked += 1
        scored += total > 0
    assert checked == inter.n_users and scored >= 3  # devices with hits, so ranks and cut-offs were compared
