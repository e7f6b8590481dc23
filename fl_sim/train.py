"""`python -m fl_sim.train dataset=... model=... method=... output_dir=DIR`

Central training with early stopping on each user's validation item, then full-ranking
evaluation on the test item. Writes DIR/metrics.json and DIR/checkpoint.pt.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fl_sim.cli import CONF_DIR, friendly_errors, output_dir, write_json
from fl_sim.config_check import check_ranges
from fl_sim.data import load_dataset
from fl_sim.errors import ConfigError
from fl_sim.models import checkpoint, cost
from fl_sim.models.diet import Masker
from fl_sim.models.factory import build_model
from fl_sim.models.payload import PRECISIONS
from fl_sim.training import (EvalResult, FitResult, OfflineData, evaluate, finetune_evaluate, fit, update_bytes,
                             set_reference)


def block_report(res: EvalResult, n_blocks: int) -> dict:
    return {
        "kept_blocks_mean": float(res.kept_blocks.mean()),
        "kept_blocks_hist": np.bincount(res.kept_blocks, minlength=n_blocks + 1).tolist(),
        "block_usage": [round(float(x), 4) for x in res.block_usage],
        "distinct_structures": int(len(np.unique(res.gates, axis=0))),
    }


def user_groups(dcfg: DictConfig, info: dict, data: OfflineData) -> dict[str, np.ndarray] | None:
    """The evaluated users as {"all", "complete", "gap"} masks from the data set's `gap_users`
    list (users whose item before the test item is missing from the data), or None without one."""
    name = dcfg.get("gap_users")
    if not name:
        return None
    if not info.get("path"):
        raise ConfigError(f"dataset.gap_users={name} needs the data set's file (dataset.path)")
    source = Path(info["path"])
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = (source if source.is_dir() else source.parent) / path
    if not path.is_file():
        raise ConfigError(f"dataset.gap_users: {path} not found (null: evaluate without the list)")
    listed = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    ids = np.asarray(data.inter.user_ids)[data.split.users].astype(str)
    gap = np.isin(ids, np.array(sorted(listed)))
    unmatched = len(listed) - int(gap.sum())
    if unmatched:
        raise ConfigError(f"dataset.gap_users: {unmatched} of the {len(listed)} users in {path} are not evaluated "
                          "users of this data set (another file's list?)")
    return {"all": np.ones(len(ids), bool), "complete": ~gap, "gap": gap}


def by_users(res: EvalResult, groups: dict[str, np.ndarray] | None) -> dict:
    """Test NDCG@10 and Hit@10 per user group (a hit: the target in the top 10, NDCG > 0)."""
    if groups is None:
        return {"all": {"ndcg10": res.ndcg10, "hit10": res.hit10, "users": res.users}}
    return {name: {"ndcg10": float(res.per_user_ndcg[m].mean()), "hit10": float((res.per_user_ndcg[m] > 0).mean()),
                   "users": int(m.sum())} for name, m in groups.items()}


def train_and_evaluate(cfg: DictConfig) -> dict:
    check_ranges(cfg)
    if cfg.eval.payload not in PRECISIONS:
        raise ConfigError(f"eval.payload must be one of {list(PRECISIONS)}, got {cfg.eval.payload!r}")
    if cfg.eval.users not in ("all", "complete"):
        raise ConfigError(f"eval.users must be all or complete, got {cfg.eval.users!r}")
    torch.manual_seed(cfg.seed)
    inter, info = load_dataset(cfg.dataset, num_clients=cfg.num_clients, seed=cfg.seed, cache_dir=cfg.cache_dir)
    data = OfflineData(inter)
    groups = user_groups(cfg.dataset, info, data)
    if cfg.eval.users == "complete" and groups is None:
        raise ConfigError(f"eval.users=complete needs a list of users with a gap (dataset.gap_users); "
                          f"dataset={cfg.dataset.name} has none: every user is complete")
    model = build_model(cfg.model, cfg.method, data.n_items)
    fp = checkpoint.fingerprint(cfg, data.n_items)
    out = output_dir()
    bar = tqdm(desc=f"train {cfg.method.name}", unit="epoch", mininterval=0)

    def progress(row: dict) -> None:
        bar.update(1)
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k in ("loss", "valid_ndcg10", "kept_blocks")})

    t = cfg.train
    if t.checkpoint:  # evaluate a trained model again (another protocol or payload), no training
        extra = checkpoint.load(Path(t.checkpoint).expanduser(), model, fp)
        result = FitResult(**extra["fit"]) if "fit" in extra else FitResult(0, 0, float("nan"), 0.0, [], "unknown")
        if model.reveals_items and not model.mapper.has_reference:  # DIET, trained before the reference existed
            set_reference(model, data)
    else:
        result = fit(model, data, lr=t.lr, batch=t.batch, max_epochs=t.max_epochs, patience=t.patience,
                     max_minutes=t.max_minutes, eval_every=t.eval_every, seed=cfg.seed,
                     weight_decay=t.weight_decay, ce_positions=t.ce_positions, lr_decay=t.lr_decay,
                     decay_patience=t.decay_patience, progress=progress)
        checkpoint.save(out / "checkpoint.pt", model, fp, {"fit": dataclasses.asdict(result)})
    bar.close()
    device_train_flops = 0.0
    if cfg.method.name == "finetune":
        test, device_train_flops = finetune_evaluate(
            model, data, "test", steps=cfg.method.steps, lr=cfg.method.lr, protocol=cfg.eval.protocol,
            exclude_seen=cfg.eval.exclude_seen, seed=cfg.seed)
    else:
        test = evaluate(model, data, "test", protocol=cfg.eval.protocol, exclude_seen=cfg.eval.exclude_seen,
                        seed=cfg.seed, payload=cfg.eval.payload)
    bb = model.backbone
    full = list(range(bb.n_blocks))
    groups_out = by_users(test, groups)
    headline = groups_out[cfg.eval.users]
    metrics = {
        "dataset": cfg.dataset.name, "model": cfg.model.kind, "method": cfg.method.name,
        "protocol": cfg.eval.protocol, "payload": cfg.eval.payload, "eval_users": cfg.eval.users,
        "ndcg10": headline["ndcg10"], "hit10": headline["hit10"], "users": headline["users"],
        "by_users": groups_out,  # test NDCG@10 / Hit@10 over all users, and the complete and gap ones apart
        "flops": test.flops, "params": test.params, "device_train_flops": device_train_flops, "shipped_params": test.shipped_params,
        "flops_ratio_full": test.flops / cost.inference_flops(bb, full),
        "params_ratio_full": test.params / cost.model_params(bb, full),
        # per update: the kept blocks' weights at the payload's precision; DIET: its masks as coded
        # (method.code; mean over the test users), beside them at 1 bit a weight
        "shipped_bytes": (float(update_bytes(model, data, "test").mean()) if isinstance(model.mapper, Masker)
                          else test.shipped_params * {"fp32": 4, "fp16": 2, "int8": 1}[cfg.eval.payload]),
        **({"mask_code": model.mapper.code, "shipped_bytes_bits": sum(model.mapper.mask_bytes(k) for k in full),
            "once_bytes_reference": sum(model.mapper.mask_bytes(k) for k in full) if model.mapper.code == "reference"
            else 0} if isinstance(model.mapper, Masker) else {}),
        "cloud_head_params": model.mapper.head_params() if model.mapper is not None else 0,
        "backbone_params": sum(p.numel() for p in bb.parameters()),
        **block_report(test, bb.n_blocks),
        "valid_ndcg10": result.best_valid, "epochs": result.epochs, "best_epoch": result.best_epoch,
        "stopped": result.stopped, "train_s": result.train_s, "seed": cfg.seed,
        "history": result.history,
    }
    return metrics


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
@friendly_errors
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    metrics = train_and_evaluate(cfg)
    metrics["wall_s"] = time.perf_counter() - start
    out = output_dir()
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_json(out / "metrics.json", metrics)
    print(json.dumps({k: metrics[k] for k in ("method", "ndcg10", "hit10", "flops_ratio_full", "kept_blocks_mean",
                                              "epochs", "train_s")}))


if __name__ == "__main__":
    main()
