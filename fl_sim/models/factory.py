"""Build a Recommender from the `model` and `method` config groups."""

from __future__ import annotations

from omegaconf import DictConfig

from fl_sim.errors import ConfigError
from fl_sim.models.backbone import Backbone
from fl_sim.models.recommender import MethodSpec, Recommender


def build_model(mcfg: DictConfig, methcfg: DictConfig, n_items: int) -> Recommender:
    for key in ("d", "n_blocks", "maxlen", "hidden"):
        if int(mcfg[key]) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {mcfg[key]}")
    if mcfg.kind == "sasrec" and mcfg.d % mcfg.heads:
        raise ConfigError(f"model.d={mcfg.d} must be a multiple of model.heads={mcfg.heads}")
    try:
        backbone = Backbone(mcfg.kind, n_items, d=mcfg.d, n_blocks=mcfg.n_blocks, maxlen=mcfg.maxlen,
                            heads=mcfg.get("heads", 1), dropout=mcfg.dropout, kernel=mcfg.get("kernel", 3),
                            dilations=tuple(mcfg.get("dilations", (1, 2, 4, 8))))
        return Recommender(backbone, MethodSpec.from_cfg(methcfg), hidden=mcfg.hidden)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
