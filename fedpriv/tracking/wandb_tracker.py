"""Weights & Biases tracking: the same rounds and summary as the local files, never at the run's expense.

Mode (``tracking.mode``), decided without any network call:

- ``auto``: online when this machine holds W&B credentials (``WANDB_API_KEY``,
  ``WANDB_IDENTITY_TOKEN_FILE``, or a ``.netrc`` entry for the W&B host), else offline;
- ``online`` / ``offline`` / ``disabled``: as named;
- the environment wins when it is more restrictive: ``WANDB_MODE=offline|dryrun|disabled`` or
  ``WANDB_DISABLED=true`` (what CI and ``make`` set) turn an online run offline / off.

Offline runs land in ``<run_dir>/wandb/offline-run-*`` (upload later with ``wandb sync``); they are
quiet, capture no console, collect no system stats or machine info, and make no network call.

Every wandb error is a warning: a run never fails or waits because of tracking. ``wandb.init`` is
bounded by wandb's ``init_timeout`` setting (an unreachable server costs about that plus wandb's own
request retries: ~20 s with an 8 s timeout); an online run that cannot start falls back to offline.
The wandb run id is kept in ``<run_dir>/wandb_run_id.txt`` so that ``resume=true`` continues the
same wandb run (``resume="allow"``; offline, that is a second ``offline-run-*`` folder with the same
id). Rounds logged after the last checkpoint of a crashed run are re-run on resume; wandb keeps
its first copy of such a step and warns about the second.

Environment knobs (seconds): ``FEDPRIV_WANDB_INIT_TIMEOUT`` (default 60 online, 30 offline),
``FEDPRIV_WANDB_FINISH_TIMEOUT`` (default 300: online upload limit at the end; what is not
uploaded by then stays on disk for ``wandb sync``).
"""

from __future__ import annotations

import configparser
import logging
import math
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedpriv import run_folder
from fedpriv.config import to_dict
from fedpriv.tracking.base import flatten_config
from fedpriv.tracking.wandb_offline import wait_until_complete

log = logging.getLogger("fedpriv.tracking")

RUN_ID_FILE = "wandb_run_id.txt"
MAX_TAG_LEN = 64  # W&B refuses longer tags
_FALLBACK_BASE_URL = "https://api.wandb.ai"


# --- mode -------------------------------------------------------------------------------------


def _default_base_url() -> str:
    try:
        from wandb.sdk.lib.urls import DEFAULT_BASE_URL  # noqa: PLC0415

        return str(DEFAULT_BASE_URL)
    except Exception:  # noqa: BLE001
        return _FALLBACK_BASE_URL


def wandb_base_url() -> str:
    """``WANDB_BASE_URL``, else ``base_url`` in wandb's global settings file, else wandb's default."""
    url = os.environ.get("WANDB_BASE_URL")
    if url:
        return url.rstrip("/")
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or str(Path.home() / ".config" / "wandb")
    parser = configparser.ConfigParser()
    try:
        parser.read(Path(config_dir) / "settings")
        if parser.has_option("default", "base_url"):
            return parser.get("default", "base_url").rstrip("/")
    except (configparser.Error, OSError):
        pass
    return _default_base_url()


def _netrc_path() -> Path:
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    home = Path.home()
    for name in (".netrc", "_netrc"):
        if (home / name).exists():
            return home / name
    return home / ".netrc"


def _netrc_hosts(base_url: str) -> list[str]:
    hosts = [urlsplit(base_url).netloc]
    try:
        from wandb.sdk.lib import urls  # noqa: PLC0415

        upstream = urls.forge_upstream_url(base_url)
        if upstream and upstream != base_url:
            hosts.append(urlsplit(upstream).netloc)
    except Exception:  # noqa: BLE001
        pass
    return [h for h in hosts if h]


def has_wandb_credentials(base_url: str | None = None) -> bool:
    """Whether wandb would find credentials for the host, by looking at env and .netrc only."""
    if os.environ.get("WANDB_API_KEY", "").strip() or os.environ.get("WANDB_IDENTITY_TOKEN_FILE", "").strip():
        return True
    base_url = base_url or wandb_base_url()
    try:
        entries = netrc.netrc(str(_netrc_path()))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    for host in _netrc_hosts(base_url):
        creds = entries.authenticators(host)
        if creds and creds[2]:
            return True
    return False


def resolve_mode(requested: str) -> tuple[str, str]:
    """The wandb mode to use (online | offline | disabled) and why, without touching the network."""
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled", "WANDB_DISABLED is set"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env == "disabled" or requested == "disabled":
        return "disabled", "WANDB_MODE=disabled" if env == "disabled" else "tracking.mode=disabled"
    if env in ("offline", "dryrun"):
        return "offline", f"WANDB_MODE={env}"
    if requested in ("online", "offline"):
        return requested, f"tracking.mode={requested}"
    if env == "online":
        return "online", "WANDB_MODE=online"
    if has_wandb_credentials():
        return "online", "W&B credentials found"
    return "offline", "no W&B credentials (WANDB_API_KEY or .netrc); `wandb sync` the run later"


# --- helpers ----------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain Python values (numpy/torch scalars unwrapped); keeps inf/nan, which wandb encodes."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, str) and value in ("inf", "-inf"):
        return math.inf if value == "inf" else -math.inf
    return value


def _strict_json(value: Any) -> Any:
    """inf/nan as strings (artifact metadata must be strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _clean_tags(tags: Any) -> list[str]:
    out: list[str] = []
    for tag in tags or []:
        t = str(tag).strip()[:MAX_TAG_LEN]
        if t and t not in out:
            out.append(t)
    return out


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _timeout(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _settings(wandb: Any, mode: str, capture_console: bool = True) -> Any:
    """wandb's settings. ``capture_console=False``: no stdout/stderr upload, since the console (the
    operator's) shows operator-only counts and names failed clients."""
    wanted: dict[str, Any] = {
        "init_timeout": _timeout("FEDPRIV_WANDB_INIT_TIMEOUT", 60.0 if mode == "online" else 30.0),
    }
    if mode == "online":
        wanted["finish_timeout"] = _timeout("FEDPRIV_WANDB_FINISH_TIMEOUT", 300.0)
        if not capture_console:
            wanted["console"] = "off"
    else:
        wanted.update(
            console="off",  # no stdout/stderr capture (the progress bar and Ray logs stay as they are)
            quiet=True,
            x_disable_stats=True,  # no system-metrics sampler (it probes cloud metadata endpoints)
            x_disable_machine_info=True,
        )
    # Settings refuses unknown names; keep those this wandb knows (pydantic settings, wandb >= 0.19).
    fields = getattr(wandb.Settings, "model_fields", None)
    if fields is not None:
        wanted = {k: v for k, v in wanted.items() if k in fields}
    try:
        return wandb.Settings(**wanted)
    except Exception:  # noqa: BLE001  (an older wandb without some of these)
        return wandb.Settings(init_timeout=wanted["init_timeout"])


# --- tracker ----------------------------------------------------------------------------------


class WandbTracker:
    """Mirrors the run to W&B: flat config, one history step per round, the summary, the model."""

    def __init__(self, cfg: Any, run_dir: str | Path):
        self.cfg = cfg
        self.tc = cfg.tracking
        self.run_dir = Path(run_dir)
        self.run: Any = None
        self.mode: str | None = None
        self._wandb: Any = None
        self._warned: set[str] = set()
        self._summary: dict[str, Any] = {}

    @property
    def run_id_path(self) -> Path:
        return self.run_dir / RUN_ID_FILE

    def _warn(self, what: str, exc: BaseException | str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("wandb %s failed, continuing without it: %s", what, exc)

    def _run_id(self, resumed: bool) -> tuple[str, bool]:
        """(id, resuming): the stored id when the fedpriv run resumes, else a fresh one (stored)."""
        if resumed and self.run_id_path.exists():
            stored = self.run_id_path.read_text().strip()
            if stored:
                return stored, True
        run_id = _new_run_id()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id_path.write_text(run_id + "\n")
        return run_id, False

    def init_kwargs(self, config: dict[str, Any], resumed: bool, mode: str) -> dict[str, Any]:
        if not config:
            config = to_dict(self.cfg)
        run_id, resuming = self._run_id(resumed)
        return {
            "project": self.tc.project or "fedpriv",
            "entity": self.tc.entity or None,
            "name": self.tc.name or None,
            "group": self.tc.group or None,
            "job_type": self.tc.job_type or None,
            "tags": _clean_tags(self.tc.tags),
            "dir": str(self.run_dir),
            "config": _jsonable(flatten_config(config)),
            "mode": mode,
            "id": run_id,
            "resume": "allow" if resuming else None,
            "reinit": "finish_previous",  # a sweep job that crashed must not leave its run attached
        }

    def start(self, config: dict[str, Any], resumed: bool) -> None:
        mode, why = resolve_mode(self.tc.mode)
        self.mode = mode
        if mode == "disabled":
            log.info("wandb: disabled (%s)", why)
            return
        try:
            import wandb  # noqa: PLC0415
        except Exception as exc:  # noqa: BLE001
            self._warn("import", exc)
            return
        self._wandb = wandb
        try:
            kwargs = self.init_kwargs(config, resumed, mode)
        except Exception as exc:  # noqa: BLE001
            self._warn("set-up", exc)
            return
        self.run = self._init(wandb, kwargs, mode)
        if self.run is None and mode == "online":
            log.warning("wandb: online start failed; logging this run offline instead (`wandb sync` it later)")
            self.mode = "offline"
            self._warned.discard("init")
            # a fresh id: the failed online attempt still holds the first one in this process
            kwargs = {**kwargs, "mode": "offline", "id": self._run_id(False)[0], "resume": None}
            self.run = self._init(wandb, kwargs, "offline")
        if self.run is not None:
            where = getattr(self.run, "dir", None)
            if self.mode == "offline":
                folder = Path(where).parent if where else self.run_dir / "wandb"
                log.info("wandb: offline run %s in %s (%s); upload with `wandb sync %s`", kwargs["id"], folder, why, folder)
            else:
                log.info("wandb: online run %s (%s)", getattr(self.run, "url", kwargs["id"]), why)

    def _init(self, wandb: Any, kwargs: dict[str, Any], mode: str) -> Any:
        try:
            private = self.cfg.privacy.mode != "none" and not self.tc.operator_diagnostics
            return wandb.init(**kwargs, settings=_settings(wandb, mode, capture_console=not private))
        except TypeError as exc:  # an older wandb without some keyword (reinit strings, ...)
            if "reinit" not in kwargs:
                self._warn("init", exc)
                return None
            kwargs = {k: v for k, v in kwargs.items() if k != "reinit"}
            return self._init(wandb, kwargs, mode)
        except Exception as exc:  # noqa: BLE001  (CommError, UsageError, timeouts, ...)
            self._warn("init", exc)
            return None

    def log_round(self, record: dict[str, Any], operator: dict[str, Any] | None = None) -> None:
        """Published figures; operator-only diagnostics only with tracking.operator_diagnostics=true
        (under ``operator/``), since a wandb project is usually shared."""
        if self.run is None:
            return
        data = dict(record)
        if operator and self.tc.operator_diagnostics:
            data.update({f"operator/{k}": v for k, v in operator.items() if k != "round"})
        try:
            self.run.log(_jsonable(data), step=int(record["round"]))
        except Exception as exc:  # noqa: BLE001
            self._warn("log", exc)

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(_jsonable(dict(summary)))
        except Exception as exc:  # noqa: BLE001
            self._warn("summary", exc)
        self._summary = summary

    def _log_model(self) -> None:
        model = self.run_dir / "model.pt"
        if not model.exists():
            return
        try:
            meta = {k: _strict_json(v) for k, v in _jsonable(self._summary).items() if not isinstance(v, (dict, list))}
            artifact = self._wandb.Artifact(name=f"model-{self.run.id}", type="model", metadata=meta)
            artifact.add_file(str(model), name="model.pt")
            config_file = self.run_dir / run_folder.CONFIG
            if config_file.exists():
                artifact.add_file(str(config_file), name="config.yaml")
            self.run.log_artifact(artifact)
        except Exception as exc:  # noqa: BLE001
            self._warn("log_model", exc)

    def finish(self) -> None:
        if self.run is None:
            return
        if self.tc.log_model:
            self._log_model()
        folder = Path(self.run.dir).parent if self.mode == "offline" and getattr(self.run, "dir", None) else None
        try:
            self.run.finish()
        except Exception as exc:  # noqa: BLE001
            self._warn("finish", exc)
        finally:
            self.run = None
        if folder is not None:
            # wandb-core writes the log's tail just after finish() returns; wait a moment (bounded)
            # so that whoever reads the offline run next (compare.py, a test) sees all of it.
            try:
                wait_until_complete(folder, timeout=5.0)
            except Exception:  # noqa: BLE001
                pass
