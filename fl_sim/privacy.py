"""`python -m fl_sim.privacy dataset=... method=... output_dir=DIR`: what an honest-but-curious
cloud learns about a device's items from what the device uploads.

Forward-OFA's privacy argument is that a request carries only the structure beta and the
interest h (here also the user vector the cloud retrieves candidates with), never item ids.
This command tests it:
1. the fleet runs as `python -m fl_sim.run` would, with `privacy.log_uploads=true` and the
   configured defence (`privacy.h_noise`): DIR/fleet/ holds its results and every upload the
   cloud received, row for row with requests.parquet (a finished fleet run of the same config
   there is attacked again rather than simulated again);
2. the cloud trains an inversion model on the history it holds legitimately (before T0): it
   computes, with its own copy of the device-side models, the upload a device would send for
   sampled history windows (the defence's noise included: the protocol is public), and learns
   to map it back to the window's items and to the next item;
3. it attacks every upload of the real-time stream (`privacy.max_uploads`, a sample if more)
   and scores what it recovers against the truth the simulator knows, beside two attacks
   without any upload: item popularity, and the cloud's shared model over the device's history.

Writes DIR/privacy.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fl_sim.cli import CONF_DIR, friendly_errors, output_dir, write_json
from fl_sim.config_check import check_ranges
from fl_sim.errors import ConfigError, FlSimError
from fl_sim.training import left_pad, right_pad

K = 10  # recall@K and NDCG@K
# The upload fields each attack reads, per method: every field the method's request carries
# that varies between devices (a fixed structure's beta does not), alone and together.
ATTACKS = {
    "forward_ofa": [("beta",), ("h",), ("beta", "h"), ("user",), ("beta", "h", "user")],
    "duet": [("h",), ("user",), ("h", "user")],
    "device_rec": [("user",)],
    "diet": [],  # its request is the items themselves: read from the log, not inverted
}


# ---- what the simulator knows: each upload's truth -------------------------------------------
def windows_at(item: np.ndarray, indptr: np.ndarray, device: np.ndarray, ends: np.ndarray,
               window: int) -> tuple[np.ndarray, np.ndarray]:
    """Each (device, ends): its last `window` items before global index `ends` ([n, window]
    dataset ids, -1 padding on the left) and the item at `ends` (-1 past the device's last)."""
    device, ends = np.asarray(device, np.int64), np.asarray(ends, np.int64)
    out = np.full((len(device), window), -1, np.int64)
    for r, (d, e) in enumerate(zip(device, ends)):
        w = item[max(indptr[d], e - window):e]
        if len(w):
            out[r, window - len(w):] = w
    nxt = np.where(ends < indptr[device + 1], item[np.minimum(ends, len(item) - 1)], -1).astype(np.int64)
    return out, nxt


def request_ends(split: np.ndarray, device: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Global index one past the last event a request saw (requests.parquet's `event` counts
    the device's stream events seen, the one that triggered the request included)."""
    return np.asarray(split, np.int64)[device] + np.asarray(event, np.int64)


def history_positions(indptr: np.ndarray, split: np.ndarray, n: int, rng: np.random.Generator):
    """Up to n (device, ends) drawn uniformly from every history position that has at least
    one item before it and its next item still in the history."""
    lo, hi = indptr[:-1] + 1, split  # ends in [lo, hi): a window before, its next item inside the history
    count = np.maximum(hi - lo, 0)
    total = int(count.sum())
    if total == 0:
        raise FlSimError("no device has two or more history events: nothing to train an inversion model on")
    pick = np.sort(rng.choice(total, size=min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(count)])
    device = np.searchsorted(starts, pick, side="right") - 1
    return device, lo[device] + (pick - starts[device])


# ---- what the cloud computes for its training uploads ----------------------------------------
@torch.no_grad()
def cloud_uploads(model, item: np.ndarray, indptr: np.ndarray, device: np.ndarray, ends: np.ndarray,
                  seed: int, h_noise: float, batch: int = 256) -> dict[str, np.ndarray]:
    """The uploads devices would send at (device, ends), computed by the cloud with its own
    copy of the device-side models (clients.outbox, the code devices run): beta and h from
    the last `window` items, h under the defence (the attacker's own noise draws), and the
    user vector of a model generated for that window over the last `maxlen` items."""
    from clients import outbox

    model.eval()
    W, T = model.spec.window, model.backbone.maxlen
    recent = [item[max(indptr[d], e - W):e].astype(np.int64) + 1 for d, e in zip(device, ends)]
    beta, h = outbox.upload_vectors(model, recent, device, ends, seed)
    h = outbox.defend(h, device, ends, h_noise, seed, stream=1)
    user = np.zeros((len(device), model.backbone.d), np.float32)
    for c0 in range(0, len(device), batch):  # windows read to their own lengths, as devices encode them
        part = slice(c0, c0 + batch)
        seqs = [item[max(indptr[d], e - T):e].astype(np.int64) + 1 for d, e in zip(device[part], ends[part])]
        ids, lengths = right_pad(recent[part], W)
        hidden, _, _ = model(left_pad(seqs, T), ids, lengths=lengths)
        user[part] = hidden[:, -1].numpy()
    return {"beta": beta.reshape(len(device), -1), "h": h, "user": user}


def features(uploads: dict[str, np.ndarray], fields: tuple) -> np.ndarray:
    return np.concatenate([uploads[f].reshape(len(uploads[f]), -1) for f in fields], axis=1).astype(np.float32)


# ---- the inversion model ---------------------------------------------------------------------
class Inversion(nn.Module):
    """An upload (standardised) to scores over the catalogue: one head for the items of the
    window behind it, one for the next item."""

    def __init__(self, n_in: int, n_items: int, hidden: int, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("std", torch.from_numpy(std))
        self.trunk = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(0.1),
                                   nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.1))
        self.window_head = nn.Linear(hidden, n_items)
        self.next_head = nn.Linear(hidden, n_items)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk((x - self.mean) / self.std)
        return self.window_head(z), self.next_head(z)


def fit_inversion(x: np.ndarray, windows: np.ndarray, nxt: np.ndarray, n_items: int, hidden: int = 256,
                  epochs: int = 10, lr: float = 1e-3, seed: int = 0, batch: int = 256) -> Inversion:
    """Trained on (upload, window items, next item): cross-entropy of the window head against
    the window's items (each distinct item an equal share), plus the next item's."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    std = x.std(0)
    inv = Inversion(x.shape[1], n_items, hidden, x.mean(0), np.where(std > 1e-6, std, 1.0).astype(np.float32))
    target = np.zeros((len(x), n_items), np.float32)
    rows, cols = np.nonzero(windows >= 0)
    target[rows, windows[rows, cols]] = 1.0
    target /= np.maximum(target.sum(1, keepdims=True), 1.0)
    X, Y, N = torch.from_numpy(x), torch.from_numpy(target), torch.from_numpy(nxt)
    opt = torch.optim.Adam(inv.parameters(), lr=lr)
    inv.train()
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(x)), max(1, len(x) // batch)):
            idx = torch.from_numpy(idx)
            w_logits, n_logits = inv(X[idx])
            loss = -(Y[idx] * torch.log_softmax(w_logits, -1)).sum(-1).mean()
            has_next = N[idx] >= 0
            if has_next.any():
                loss = loss + nn.functional.cross_entropy(n_logits[has_next], N[idx][has_next])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return inv.eval()


@torch.no_grad()
def invert(inv: Inversion, x: np.ndarray, batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    parts = [inv(torch.from_numpy(x[b:b + batch])) for b in range(0, len(x), batch)]
    return torch.cat([p[0] for p in parts]).numpy(), torch.cat([p[1] for p in parts]).numpy()


# ---- how much it recovers --------------------------------------------------------------------
def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def recovery(scores: np.ndarray, relevant: np.ndarray, k: int = K) -> dict[str, float]:
    """Mean recall@k and NDCG@k of ranking the catalogue by `scores` [n, items] against each
    row's relevant items (`relevant` [n, m], -1 padding; repeats count once). Recall@k is the
    share of the relevant items found in the top k, out of at most k; rows without a relevant
    item are left out. Ties in the scores rank the lower item id first."""
    rel = _relevance(scores.shape[1], relevant)
    n_rel = rel.sum(1)
    keep = n_rel > 0
    if not keep.any():
        return {"recall": float("nan"), "ndcg": float("nan"), "n": 0}
    scores, rel, n_rel = scores[keep], rel[keep], n_rel[keep]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(rel, top, axis=1)
    disc = _discounts(k)
    ideal = np.cumsum(disc)[np.minimum(n_rel, k) - 1]
    return {"recall": float((hits.sum(1) / np.minimum(n_rel, k)).mean()),
            "ndcg": float(((hits * disc).sum(1) / ideal).mean()), "n": int(keep.sum())}


def membership_auc(scores: np.ndarray, relevant: np.ndarray, chunk: int = 256) -> float:
    """Mean over rows of the AUC of telling a row's relevant items from every other item of the
    catalogue by `scores` (ties count one half): the probability that a random member scores
    above a random non-member."""
    rel = _relevance(scores.shape[1], relevant)
    aucs = []
    for b in range(0, len(scores), chunk):
        s, r = torch.from_numpy(scores[b:b + chunk]).double(), torch.from_numpy(rel[b:b + chunk])
        for i in range(len(s)):
            pos = s[i][r[i]]
            neg = s[i][~r[i]]
            if len(pos) == 0 or len(neg) == 0:
                continue
            neg_sorted = torch.sort(neg).values
            below = torch.searchsorted(neg_sorted, pos, right=False)
            tied = torch.searchsorted(neg_sorted, pos, right=True) - below
            aucs.append(float((below + 0.5 * tied).sum()) / (len(pos) * len(neg)))
    return float(np.mean(aucs)) if aucs else float("nan")


def _relevance(n_items: int, relevant: np.ndarray) -> np.ndarray:
    rel = np.zeros((len(relevant), n_items), bool)
    rows, cols = np.nonzero(relevant >= 0)
    rel[rows, relevant[rows, cols]] = True
    return rel


def evaluate(window_scores: np.ndarray, next_scores: np.ndarray, windows: np.ndarray, nxt: np.ndarray) -> dict:
    w, n = recovery(window_scores, windows), recovery(next_scores, nxt[:, None])
    return {"window_recall10": w["recall"], "window_ndcg10": w["ndcg"],
            "next_recall10": n["recall"], "next_ndcg10": n["ndcg"],
            "membership_auc": membership_auc(window_scores, windows)}


# ---- the command -----------------------------------------------------------------------------
def attack(cfg: DictConfig, out: Path) -> dict:
    from fl_sim.data import build_streams, load_dataset, select_devices
    from fl_sim.pretrain import pretrained
    from fl_sim.run import simulate

    method = cfg.method.name
    if method not in ATTACKS:
        raise ConfigError(f"fl_sim.privacy attacks the uploads of {', '.join(ATTACKS)}; method={method} has no attack "
                          "here")
    p = cfg.privacy
    start = time.perf_counter()
    fleet_cfg = OmegaConf.merge(cfg, {"privacy": {"log_uploads": True}})
    reused = _same_fleet(fleet_cfg, out / "fleet")
    fleet = json.loads((out / "fleet" / "summary.json").read_text()) if reused else simulate(fleet_cfg, out / "fleet")
    requests = pd.read_parquet(out / "fleet" / "requests.parquet")
    logged = dict(np.load(out / "fleet" / "uploads.npz"))
    if len(requests) == 0:
        raise FlSimError("the fleet made no request after deployment: there is no upload to attack")

    # The data and the cloud's model, as the run had them (the model from the pre-training cache).
    inter, _ = load_dataset(cfg.dataset, num_clients=cfg.num_clients, seed=cfg.seed, cache_dir=cfg.cache_dir)
    streams = build_streams(select_devices(inter, cfg.num_clients, cfg.seed), cfg.streams, cfg.seed)
    model, _, _ = pretrained(cfg, streams)
    item, indptr, split = streams.inter.item.astype(np.int64), streams.inter.indptr, streams.split
    n_items, W, seed = streams.inter.n_items, model.spec.window, int(cfg.seed)
    rng = np.random.default_rng(seed)

    # The real-time uploads and their truth.
    rows = np.sort(rng.choice(len(requests), size=min(int(p.max_uploads), len(requests)), replace=False))
    device = requests["device"].to_numpy()[rows]
    ends = request_ends(split, device, requests["event"].to_numpy()[rows])
    uploads = {k: v[rows].reshape(len(rows), -1) for k, v in logged.items()}
    windows, nxt = windows_at(item, indptr, device, ends, W)
    check = (_check_items(windows, uploads) if model.reveals_items
             else _check_alignment(model, windows, device, ends, uploads, seed, float(p.h_noise)))

    # The cloud's training uploads, from the history it holds.
    t = time.perf_counter()
    h_dev, h_ends = history_positions(indptr, split, int(p.train_windows), rng)
    if ATTACKS[method]:  # (DIET's uploads need no inversion)
        train = cloud_uploads(model, item, indptr, h_dev, h_ends, seed, float(p.h_noise))
        train_windows, train_next = windows_at(item, indptr, h_dev, h_ends, W)
    upload_s = time.perf_counter() - t

    rows_out = []
    for fields in ATTACKS[method]:
        t = time.perf_counter()
        inv = fit_inversion(features(train, fields), train_windows, train_next, n_items, int(p.hidden),
                            int(p.epochs), float(p.lr), seed)
        w_scores, n_scores = invert(inv, features(uploads, fields))
        rows_out.append({"attack": "upload", "uses": "+".join(fields), **evaluate(w_scores, n_scores, windows, nxt),
                         "train_s": time.perf_counter() - t})
    if model.reveals_items:  # DIET: the cloud reads the items each request carried
        revealed = np.where(uploads["items"] > 0, uploads["items"] - 1, -1)
        w_scores, n_scores = _items_upload(model, revealed, n_items)
        rows_out.append({"attack": "upload", "uses": "items", **evaluate(w_scores, n_scores, windows, nxt),
                         "train_s": 0.0})
    for name, scores in _baselines(model, item, indptr, split, device, n_items).items():
        rows_out.append({"attack": name, "uses": "no upload", **evaluate(scores, scores, windows, nxt)})
    # What an upload of the window's items reveals (DIET's request, which sends them): the window
    # outright, and the next item as the cloud's model predicts it from them.
    w_scores, n_scores = _items_upload(model, windows, n_items)
    rows_out.append({"attack": "items upload", "uses": "items", **evaluate(w_scores, n_scores, windows, nxt)})

    result = {"method": method, "dataset": cfg.dataset.name, "model": cfg.model.kind, "seed": seed,
              "h_noise": float(p.h_noise), "window": W,
              "fleet": {k: fleet.get(k) for k in ("ndcg10", "hit10", "requests", "num_devices", "bytes_up",
                                                  "requests_answered", "bytes_down_model", "bytes_first_model",
                                                  "mean_flops_per_inference", "items_revealed")},
              "uploads_attacked": int(len(rows)), "uploads_total": int(len(requests)),
              "train_windows": int(len(h_dev)), "alignment": check, "fleet_reused": reused, "rows": rows_out,
              "train_uploads_s": upload_s, "wall_s": time.perf_counter() - start}
    write_json(out / "privacy.json", result)
    return result


ATTACK_KEYS = ("train_windows", "max_uploads", "epochs", "hidden", "lr")  # change the attack, not the fleet


def _same_fleet(cfg: DictConfig, folder: Path) -> bool:
    """Whether `folder` holds a finished fleet run of this config (the attack's own settings and
    where outputs go aside): it is attacked again instead of simulated again."""
    if not ((folder / "uploads.npz").exists() and (folder / "summary.json").exists()):
        return False

    def fleet_part(c) -> dict:
        c = OmegaConf.to_container(c, resolve=True)
        c.pop("output_dir", None)
        for key in ATTACK_KEYS:
            c["privacy"].pop(key, None)
        return c

    return fleet_part(OmegaConf.load(folder / "config.yaml")) == fleet_part(cfg)


def _check_alignment(model, windows, device, ends, uploads, seed, h_noise) -> dict:
    """The logged uploads recomputed from the truth windows (the devices' own noise draws):
    they must match, or the truth is not what the devices read."""
    from clients import outbox

    n = min(len(device), 500)
    recent = [w[w >= 0] + 1 for w in windows[:n]]
    beta, h = outbox.upload_vectors(model, recent, device[:n], ends[:n], seed)
    h = outbox.defend(h, device[:n], ends[:n], h_noise, seed)
    diff = max(float(np.abs(beta.reshape(n, -1) - uploads["beta"][:n]).max(initial=0.0)),
               float(np.abs(h - uploads["h"][:n]).max(initial=0.0)))
    if diff > 1e-3:
        raise FlSimError(f"the logged uploads differ from those recomputed from the stream (max {diff:.3g}): "
                         "the attack's truth would be wrong")
    return {"checked": n, "max_abs_diff": diff}


def _check_items(windows: np.ndarray, uploads: dict) -> dict:
    """DIET: the items each logged request carried are the truth window (as sets, in order)."""
    logged = uploads["items"]  # model ids, 0 pads; the windows: dataset ids, -1 pads, the same width
    bad = int((np.where(logged > 0, logged - 1, -1) != windows).any(1).sum())
    if bad:
        raise FlSimError(f"{bad} logged requests carry other items than the stream holds before them: "
                         "the attack's truth would be wrong")
    return {"checked": int(len(windows)), "max_abs_diff": 0.0}


@torch.no_grad()
def _recommend(model, seqs: list, batch: int = 256) -> np.ndarray:
    """The cloud's model (the method's own: structure and weights derived from the sequence's
    last `window` items, as offline evaluation runs it) scoring the catalogue after each
    sequence (model ids)."""
    from clients import outbox

    W, T = model.spec.window, model.backbone.maxlen
    out = np.zeros((len(seqs), model.backbone.item_emb.num_embeddings - 1), np.float32)
    for c0 in range(0, len(seqs), batch):  # windows read to their own lengths, as devices encode them
        ids, lengths = right_pad(seqs[c0:c0 + batch], W)  # each sequence's last W items
        hidden, _, _ = model(left_pad(seqs[c0:c0 + batch], T), ids, lengths=lengths)
        out[c0:c0 + batch] = model.backbone.scores(hidden[:, -1]).numpy()
    return out


def _baselines(model, item, indptr, split, device, n_items) -> dict[str, np.ndarray]:
    """Attacks without any upload: item popularity in the history, and the cloud's model over
    the device's history (which it holds), scoring the catalogue."""
    hist = np.concatenate([item[indptr[d]:split[d]] for d in range(len(split))])
    popularity = np.bincount(hist, minlength=n_items).astype(np.float32)
    T = model.backbone.maxlen
    seqs = [item[max(indptr[d], split[d] - T):split[d]].astype(np.int64) + 1 for d in device]
    return {"popularity": np.broadcast_to(popularity, (len(device), n_items)), "history model": _recommend(model, seqs)}


def _items_upload(model, windows: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of an attacker holding each window's items: 1 for the items in it (the window
    recovered outright), and for the next item the cloud's model run over them."""
    return _relevance(n_items, windows).astype(np.float32), _recommend(model, [w[w >= 0] + 1 for w in windows])


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
@friendly_errors
def main(cfg: DictConfig) -> None:
    check_ranges(cfg)
    out = output_dir()
    res = attack(cfg, out)
    print(json.dumps({r["attack"] + " " + r["uses"]: round(r["window_recall10"], 4) for r in res["rows"]}))
    print(f"privacy.json -> {out}")


if __name__ == "__main__":
    main()
