"""Run fedpriv on Flower's simulation engine. Hydra overrides and sweeps (-m) work as usual:

    python scripts/simulate.py dataset=fashion_mnist partition=dirichlet partition.alpha=0.3 num_clients=100
    python scripts/simulate.py experiment=quickstart
    python scripts/simulate.py -m partition=dirichlet partition.alpha=0.1,0.5,1000

Before Hydra starts anything, the command line's overrides are composed and validated (every job
of a -m sweep): a wrong key, value or group option stops here with one line
``fedpriv: error: ...`` and exit code 2, and no job runs.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fedpriv.compose import Job, compose_jobs  # noqa: E402  (importing it registers the schemas with Hydra)
from fedpriv.errors import UserError  # noqa: E402
from fedpriv.launch import fail, launch, preflight  # noqa: E402

CONFIG_DIR = ROOT / "conf"  # as config_path below


def validate_command_line(argv: list[str]) -> None:
    """Compose and check every job the command line asks for, as @hydra.main will; one line and
    exit 2 on the first error. Help, info and shell completion, and other config folders, are
    left to Hydra."""
    from hydra._internal.utils import get_args_parser

    args, unknown = get_args_parser().parse_known_args(argv)
    if unknown or args.help or args.hydra_help or args.shell_completion or args.info or args.experimental_rerun:
        return
    if args.config_path or args.config_dir:
        return
    try:
        jobs = compose_jobs(args.overrides, multirun=args.multirun, config_name=args.config_name or "config",
                            config_dir=CONFIG_DIR)
    except UserError as exc:
        fail(str(exc))
    if args.multirun and not args.cfg and len(jobs) > 1:
        preflight_sweep(jobs)


def preflight_sweep(jobs: list[Job]) -> None:
    """A sweep's jobs run one after the other: check each one's data, model and privacy plan now,
    so that job 4 cannot fail after jobs 1-3 ran (a single run's preflight is launch's, before Ray).
    Run folders are Hydra's to create; each job's own is checked again when it starts."""
    with tempfile.TemporaryDirectory(prefix="fedpriv-preflight-") as tmp:
        for number, job in enumerate(jobs):
            if job.config.resume or job.config.run_dir is not None:
                continue  # a folder named by the user: checked when the job starts
            try:
                preflight(dataclasses.replace(job.config, run_dir=str(Path(tmp) / str(number))))
            except (UserError, ValueError) as exc:
                fail(f"{exc} ({job.describe(number, len(jobs))})")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    container = OmegaConf.to_container(cfg, resolve=True)
    hc = HydraConfig.get()
    if container.get("run_dir") is None:  # type: ignore[union-attr]
        container["run_dir"] = hc.runtime.output_dir  # type: ignore[index]
    return launch(container, hydra_config=hc)  # type: ignore[arg-type]


if __name__ == "__main__":
    validate_command_line(sys.argv[1:])
    main()
