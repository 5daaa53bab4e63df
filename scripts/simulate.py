"""Run fedpriv on Flower's simulation engine. Hydra overrides and sweeps (-m) work as usual:

    python scripts/simulate.py dataset=fashion_mnist partition=dirichlet partition.alpha=0.3 num_clients=100
    python scripts/simulate.py -m partition.alpha=0.1,0.5,1000
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fedpriv.launch import launch  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    container = OmegaConf.to_container(cfg, resolve=True)
    hc = HydraConfig.get()
    if container.get("run_dir") is None:  # type: ignore[union-attr]
        container["run_dir"] = hc.runtime.output_dir  # type: ignore[index]
    return launch(container, hydra_config=hc)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
