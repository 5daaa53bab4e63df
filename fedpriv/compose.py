"""Compose ``conf/`` with Hydra's compose API (used where ``@hydra.main`` is not: ``flwr run``, tests)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from fedpriv.config import ConfigError, RunConfig, parse_config


def conf_dir() -> Path:
    """``$FEDPRIV_CONF``, the copy inside an installed wheel, or the project's ``conf/``."""
    here = Path(__file__).resolve().parent
    for candidate in (os.environ.get("FEDPRIV_CONF"), here / "conf", here.parent / "conf"):
        if candidate and (Path(candidate) / "config.yaml").exists():
            return Path(candidate)
    raise ConfigError("cannot find the configuration folder conf/ (set FEDPRIV_CONF)")


def compose_config(overrides: list[str] | str = ()) -> RunConfig:
    """The validated configuration for these Hydra overrides (e.g. ``["dataset=fashion_mnist"]``)."""
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except HydraException as exc:
        message = " ".join(str(exc).split("Config search path")[0].split())
        raise ConfigError(message) from None
    container = OmegaConf.to_container(cfg, resolve=False)
    return parse_config(container)  # type: ignore[arg-type]
