"""Where a run's figures go: local files always, wandb when asked, a progress display unless quiet."""

from fedpriv.tracking.base import Tracker, Trackers, flatten_config
from fedpriv.tracking.local import LocalFiles, read_metrics, read_summary
from fedpriv.tracking.progress import RoundProgress
from fedpriv.tracking.wandb_tracker import WandbTracker  # imports wandb itself only when a run starts


def make_trackers(cfg, run_dir) -> Trackers:
    """The trackers a run writes to; local files are always among them (and first)."""
    trackers: list[Tracker] = [LocalFiles(run_dir)]
    if cfg.tracking.wandb:
        trackers.append(WandbTracker(cfg, run_dir))
    if cfg.tracking.progress:
        trackers.append(RoundProgress.for_config(cfg))
    return Trackers(trackers)


__all__ = ["Tracker", "Trackers", "LocalFiles", "flatten_config", "make_trackers", "read_metrics", "read_summary"]
