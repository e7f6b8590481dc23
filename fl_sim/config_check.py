"""Range checks on numeric config values, so that a value out of range stops a command before
it starts, with the key named (Hydra already refuses unknown keys and wrong types)."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from fl_sim.errors import ConfigError

# key: (low, high, low inclusive, integer). high None: unbounded.
RANGES: dict[str, tuple] = {
    "num_clients": (1, None, True, True),
    "seed": (0, None, True, True),
    "model.n_blocks": (1, None, True, True),
    "model.d": (1, None, True, True),
    "model.heads": (1, None, True, True),
    "model.maxlen": (2, None, True, True),
    "model.dropout": (0, 1, True, False),
    "model.hidden": (1, None, True, True),
    "model.lr": (0, None, False, False),
    "method.tau": (0, None, False, False),
    "method.lam": (0, None, True, False),
    "method.window": (1, None, True, True),
    "method.k": (1, None, True, True),
    "method.rank": (1, None, True, True),
    "method.keep": (0, 1, False, False),
    "method.steps": (0, None, True, True),
    "method.lr": (0, None, False, False),
    "train.batch": (1, None, True, True),
    "train.max_epochs": (1, None, True, True),
    "train.patience": (1, None, True, True),
    "train.max_minutes": (0, None, False, False),
    "train.ce_positions": (0, None, True, True),
    "train.weight_decay": (0, None, True, False),
    "train.lr_decay": (0, 1, False, False),
    "train.decay_patience": (1, None, True, True),
    "devices.latency_s": (0, 1, False, False),
    "devices.compute_share": (0, 1, False, False),
    "devices.memory_share": (0, 1, False, False),
    "sim.round_s": (0, None, False, False),
    "sim.cloud_latency_s": (0, None, True, False),
    "sim.ema": (0, 1, False, False),
    "sim.batch": (1, None, True, True),
    "sim.max_rounds": (1, None, True, True),
    "sim.nodes": (1, None, True, True),
    "sim.ray.threads": (1, None, True, True),
    "sim.pretrain.max_minutes": (0, None, False, False),
    "sim.pretrain.max_epochs": (1, None, True, True),
    "sim.pretrain.max_sequences": (1, None, True, True),
    "sim.pretrain.patience": (1, None, True, True),
    "sim.checkpoint_every": (0, None, True, True),
    "faults.shard_fail": (0, 1, True, False),
    "faults.max_shard_failures": (1, None, True, True),
    "faults.node_vanish": (0, 1, True, False),
    "faults.download_drop": (0, 1, True, False),
    "faults.payload_corrupt": (0, 1, True, False),
    "faults.payload_truncate": (0, 1, True, False),
    "faults.max_download_attempts": (1, None, True, True),
    "faults.cloud_capacity": (0, None, False, False),
    "faults.cloud_queue": (0, None, True, True),
    "privacy.h_noise": (0, None, True, False),
    "privacy.train_windows": (1, None, True, True),
    "privacy.max_uploads": (1, None, True, True),
    "privacy.epochs": (1, None, True, True),
    "privacy.hidden": (1, None, True, True),
    "privacy.lr": (0, None, False, False),
}


def check_ranges(cfg: DictConfig) -> None:
    for key, (low, high, low_inclusive, integer) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue  # not in this config, or optional and unset
        bound = f"{'[' if low_inclusive else '('}{low}, {'inf)' if high is None else str(high) + ']'}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise ConfigError(f"{key} must be {'an integer' if integer else 'a number'} in {bound}, got {value!r}")
        too_low = value < low or (value == low and not low_inclusive)
        if too_low or (high is not None and value > high) or (isinstance(value, float) and math.isnan(value)):
            raise ConfigError(f"{key} must be in {bound}, got {value!r}")
