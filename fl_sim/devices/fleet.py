"""A fleet of heterogeneous phones: compute, memory, links, availability, and their budgets.

`devices=tiers` (default) is parametric, with figures derived from the real tables in
shared/traces (see conf/devices/tiers.yaml). `devices=traces devices.path=DIR` samples real
phones from the AI-Benchmark table for compute and memory, and gives each device a real
throughput trace as its time-varying link.

Every per-device quantity is drawn from a counter-based generator keyed by (seed, device),
and every time-varying one by (seed, device, time slot): the fleet is the same whichever
shard or backend simulates a device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fl_sim.devices import counter_rng
from fl_sim.devices.links import TraceBank, bank_from_arrays, read_trace, synthetic_trace
from fl_sim.errors import ConfigError, DataError

# counter_rng streams
_TIER, _LINK, _TRACE, _OFFSET, _SCALE, _ONLINE_P, _ONLINE, _FREE_CPU, _FREE_MEM, _PHONE = range(10)


@dataclass
class Fleet:
    """Per-device arrays (index = device id) plus the link trace bank."""

    compute: np.ndarray  # peak FLOP/s available to apps
    memory: np.ndarray  # RAM bytes
    tier: np.ndarray  # label per device
    link_class: np.ndarray  # label per device
    trace: np.ndarray  # index into bank
    offset: np.ndarray  # seconds into the trace at simulated time 0
    down_scale: np.ndarray  # rate multiplier on the trace, downlink
    up_scale: np.ndarray  # rate multiplier on the trace, uplink
    online_p: np.ndarray  # long-run share of time slots online
    bank: TraceBank
    seed: int
    slot_s: float
    free_min: float

    def __len__(self) -> int:
        return len(self.compute)

    # ---- time-varying state, a pure function of (seed, device, time) ----------------------
    def _slot(self, t) -> np.ndarray:
        return np.floor(np.asarray(t, dtype=np.float64) / self.slot_s).astype(np.int64)

    def online(self, dev: np.ndarray, t) -> np.ndarray:
        return counter_rng.uniform(self.seed, _ONLINE, dev, self._slot(t)) < self.online_p[dev]

    def free_compute(self, dev: np.ndarray, t) -> np.ndarray:
        """Share of compute not taken by other apps in this time slot."""
        u = counter_rng.uniform(self.seed, _FREE_CPU, dev, self._slot(t))
        return self.free_min + (1 - self.free_min) * np.sqrt(u)

    def free_memory(self, dev: np.ndarray, t) -> np.ndarray:
        u = counter_rng.uniform(self.seed, _FREE_MEM, dev, self._slot(t))
        return self.free_min + (1 - self.free_min) * np.sqrt(u)

    def down_bps(self, dev: np.ndarray, t) -> np.ndarray:
        return self.bank.rate_at(self.trace[dev], self.offset[dev] + t) * self.down_scale[dev]

    def up_bps(self, dev: np.ndarray, t) -> np.ndarray:
        return self.bank.rate_at(self.trace[dev], self.offset[dev] + t) * self.up_scale[dev]

    def transfer_time(self, dev: np.ndarray, t, nbytes, uplink: bool) -> np.ndarray:
        """Seconds to move `nbytes` starting at time t over each device's link as it varies."""
        dev = np.asarray(dev)
        scale = (self.up_scale if uplink else self.down_scale)[dev]
        trace = self.trace[dev]
        t0 = self.offset[dev] + np.asarray(t, dtype=np.float64)
        b0 = self.bank.bytes_until(trace, t0)
        t1 = self.bank.time_until(trace, b0 + np.asarray(nbytes, dtype=np.float64) / scale)
        return t1 - t0


def _pick(u: np.ndarray, shares: np.ndarray) -> np.ndarray:
    cum = np.cumsum(shares / shares.sum())
    return np.minimum(np.searchsorted(cum, u, side="right"), len(shares) - 1)


def _section(dcfg: DictConfig, key: str) -> dict:
    section = dcfg.get(key)
    if not section:
        raise ConfigError(f"devices.{key} must list at least one entry")
    for name, spec in section.items():
        for field, value in spec.items():
            if field == "traces":
                continue
            if not isinstance(value, (int, float)) or value < 0 or (field == "share" and value == 0):
                raise ConfigError(f"devices.{key}.{name}.{field} must be a positive number, got {value!r}")
    return dict(section)


def build_fleet(dcfg: DictConfig, n: int, seed: int) -> Fleet:
    if n < 1:
        raise ConfigError(f"num_clients must be >= 1, got {n}")
    dev = np.arange(n)
    avail = dcfg.availability
    if not 0 < avail.online_mean <= 1:
        raise ConfigError(f"devices.availability.online_mean must be in (0, 1], got {avail.online_mean}")
    if not 0 <= avail.free_min <= 1:
        raise ConfigError(f"devices.availability.free_min must be in [0, 1], got {avail.free_min}")
    u = counter_rng.uniform(seed, _ONLINE_P, dev, 0)
    # Beta-like spread of online shares around the mean, kept inside (0, 1].
    online_p = np.clip(avail.online_mean + (u - 0.5) * 2 * avail.spread, 0.02, 1.0)
    links = _section(dcfg, "links")
    link_names = list(links)
    link_idx = _pick(counter_rng.uniform(seed, _LINK, dev, 0), np.array([links[k]["share"] for k in link_names]))
    link_class = np.array(link_names)[link_idx]
    if dcfg.name == "tiers":
        tiers = _section(dcfg, "tiers")
        names = list(tiers)
        idx = _pick(counter_rng.uniform(seed, _TIER, dev, 0), np.array([tiers[k]["share"] for k in names]))
        spread = np.exp((counter_rng.uniform(seed, _SCALE, dev, 1) - 0.5) * 0.5)  # +-25% within a tier
        compute = np.array([tiers[k]["gflops"] for k in names])[idx] * 1e9 * spread
        memory = np.array([tiers[k]["ram_gb"] for k in names])[idx] * 2**30
        tier = np.array(names)[idx]
        rng = np.random.default_rng([seed, 11])
        traces = [synthetic_trace(rng, links[k]["down_mbps"], links[k]["sigma"]) for k in link_names]
        bank = bank_from_arrays(traces, link_names)
        trace = link_idx
    elif dcfg.name == "traces":
        compute, memory, tier = _real_phones(dcfg, dev, seed)
        bank, trace = _real_links(dcfg, link_names, link_idx, dev, seed)
    else:
        raise ConfigError(f"devices.name must be tiers or traces, got {dcfg.name!r}")
    offset = counter_rng.uniform(seed, _OFFSET, dev, 0) * bank.period[trace]
    up_ratio = np.array([links[k]["up_ratio"] for k in link_names])[link_idx]
    return Fleet(compute=compute, memory=memory.astype(np.float64), tier=tier, link_class=link_class, trace=trace,
                 offset=offset, down_scale=np.ones(n), up_scale=up_ratio, online_p=online_p, bank=bank,
                 seed=seed, slot_s=float(avail.slot_s), free_min=float(avail.free_min))


def _real_phones(dcfg: DictConfig, dev: np.ndarray, seed: int):
    path = Path(dcfg.path).expanduser() / "devices" / "raw_ai_benchmark_list.json"
    try:
        phones = json.loads(path.read_text())
        score = np.array([float(p["CPU_F_AI_Score"]) for p in phones])
        ram = np.array([float(str(p["RAM"]).upper().removesuffix("GB")) for p in phones])
    except FileNotFoundError:
        raise DataError(f"devices=traces: expected the phone table at {path} (set devices.path=)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not the AI-Benchmark phone table ({exc})") from None
    bad = np.flatnonzero(~np.isfinite(score) | (score <= 0) | ~np.isfinite(ram) | (ram <= 0))
    if len(phones) == 0 or len(bad):
        where = f"entry {bad[0]}: CPU_F_AI_Score and RAM must be positive" if len(bad) else "no phones"
        raise DataError(f"{path}: not the AI-Benchmark phone table ({where})")
    pick = (counter_rng.uniform(seed, _PHONE, dev, 0) * len(phones)).astype(np.int64)
    compute = score[pick] * dcfg.flops_per_cpu_score
    cuts = np.quantile(score, [1 / 3, 2 / 3])
    tier = np.array(["low", "mid", "high"])[np.searchsorted(cuts, score[pick], side="right")]
    return compute, ram[pick] * 2**30, tier


def _real_links(dcfg: DictConfig, link_names: list[str], link_idx: np.ndarray, dev: np.ndarray, seed: int):
    """Each link class names globs of trace files under devices.path/bandwidth."""
    root = Path(dcfg.path).expanduser() / "bandwidth"
    traces, names, members = [], [], []
    for k in link_names:
        patterns = dcfg.links[k].get("traces") or []
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        files = sorted({f for p in patterns for f in root.glob(p)})
        if not files:
            raise DataError(f"devices.links.{k}.traces={patterns} matches no file under {root}")
        members.append(np.arange(len(traces), len(traces) + len(files)))
        traces.extend(read_trace(f) for f in files)
        names.extend(f.name for f in files)
    bank = bank_from_arrays(traces, names)
    u = counter_rng.uniform(seed, _TRACE, dev, 0)
    sizes = np.array([len(m) for m in members])
    within = (u * sizes[link_idx]).astype(np.int64)
    trace = np.array([members[c][w] for c, w in zip(link_idx, within)], dtype=np.int64)
    return bank, trace
