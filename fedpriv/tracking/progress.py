"""Progress over rounds: one updating bar on a terminal, one plain line per round in logs.

- stderr is a terminal: a single bar on stderr (round n/N, accuracy, epsilon, time left);
  tqdm when it is installed (it comes with flwr-datasets), else a small built-in bar.
- stdout is not a terminal (CI, ``> run.log``, Ray/Hydra log capture) or there is no bar:
  one plain line per round on stdout, the same line fedpriv always printed.
- ``tracking.progress=false``: nothing at all (the tracker is not even created).

It is a :class:`~fedpriv.tracking.base.Tracker`, so the round loop drives it through
``trackers.log_round`` like the other backends.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, TextIO


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            return float(value)  # "inf" as LocalFiles writes it
        except ValueError:
            return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt(value: Any, spec: str) -> str:
    x = _num(value)
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def round_line(num_rounds: int, r: dict[str, Any]) -> str:
    """The plain one-line report of a round."""
    width = len(str(num_rounds))
    parts = [
        f"round {r['round']:>{width}}/{num_rounds}",
        f"acc {_fmt(r.get('test_accuracy'), '.4f')}",
        f"loss {_fmt(r.get('test_loss'), '.4f')}",
        f"clients {r.get('num_clients', '-')}/{r.get('num_sampled', '-')}",
    ]
    if r.get("num_failed") or r.get("num_dropped"):
        parts.append(f"failed {r.get('num_failed', 0)} dropped {r.get('num_dropped', 0)}")
    if "epsilon" in r:
        parts.append(f"eps {_fmt(r['epsilon'], '.3f')}")
    if "local_epsilon_max" in r:
        parts.append(f"local eps max {_fmt(r['local_epsilon_max'], '.3f')}")
    parts.append(f"{_fmt(r.get('round_seconds'), '.1f')}s")
    return " | ".join(parts)


def _round_line(rc: Any, r: dict[str, Any]) -> str:
    """Former ``fedpriv.federation._round_line(rc, record)``, kept for callers of the old name."""
    return round_line(rc.num_rounds, r)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _can_draw(stream: Any) -> bool:
    """A terminal with a known, non-zero size (tqdm hides its bar on a 0-row pty, e.g. under
    ``script`` or ``docker -t`` without a size)."""
    if not _is_tty(stream):
        return False
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return True  # a stream that says it is a terminal but has no descriptor (tests, wrappers)
    return size.columns >= 20 and size.lines >= 1


class _TinyBar:
    """A minimal stand-in for tqdm: ``fedpriv  7/20 |#####-----| acc 0.91 eps 1.2 | 12s<18s``."""

    def __init__(self, total: int, initial: int, file: TextIO, width: int = 24):
        self.total, self.n, self.file, self.width = total, initial, file, width
        self.start_n, self.t0 = initial, time.monotonic()
        self.postfix = ""
        self._last_len = 0

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def update(self, k: int = 1) -> None:
        self.n += k
        self._draw()

    def _draw(self) -> None:
        frac = min(self.n / self.total, 1.0) if self.total else 1.0
        filled = int(round(frac * self.width))
        elapsed = time.monotonic() - self.t0
        done = self.n - self.start_n
        left = elapsed / done * (self.total - self.n) if done > 0 else float("nan")
        eta = f"{elapsed:.0f}s<{left:.0f}s" if math.isfinite(left) else f"{elapsed:.0f}s"
        text = f"fedpriv {self.n:>{len(str(self.total))}}/{self.total} |{'#' * filled}{'-' * (self.width - filled)}| {self.postfix} | {eta}"
        pad = max(self._last_len - len(text), 0)
        self._last_len = len(text)
        self.file.write("\r" + text + " " * pad)
        self.file.flush()

    def refresh(self) -> None:
        self._draw()

    def close(self) -> None:
        self.file.write("\n")
        self.file.flush()


def _make_bar(total: int, initial: int, file: TextIO) -> Any:
    try:
        from tqdm.auto import tqdm as _tqdm  # noqa: PLC0415  (optional dependency)
    except Exception:  # noqa: BLE001
        return _TinyBar(total, initial, file)
    bar = _tqdm(
        total=total,
        initial=initial,
        file=file,
        desc="",
        unit="round",
        dynamic_ncols=True,
        leave=True,
        mininterval=0,  # rounds are seconds apart: draw every one
        bar_format="fedpriv {n_fmt}/{total_fmt} |{bar}| {desc} [{elapsed}<{remaining}]",
    )
    # tqdm prefixes a postfix with ", "; the round's figures go in the description slot instead
    bar.set_postfix_str = lambda text, refresh=True: bar.set_description_str(text, refresh=refresh)
    return bar


class RoundProgress:
    """The progress tracker; ``bar``/``lines`` default to what the streams are (see the module doc)."""

    def __init__(
        self,
        num_rounds: int,
        *,
        bar: bool | None = None,
        lines: bool | None = None,
        bar_stream: TextIO | None = None,
        line_stream: TextIO | None = None,
    ):
        self.num_rounds = int(num_rounds)
        self._bar_stream = bar_stream
        self._line_stream = line_stream
        want_bar = _can_draw(self.bar_stream) if bar is None else bar
        self.use_bar = bool(want_bar)
        # Plain lines whenever there is no bar, or stdout goes somewhere else than the terminal.
        self.use_lines = (not self.use_bar or not _is_tty(self.line_stream)) if lines is None else bool(lines)
        self._bar: Any = None

    @classmethod
    def for_config(cls, rc: Any) -> "RoundProgress":
        return cls(rc.num_rounds)

    @property
    def bar_stream(self) -> TextIO:
        return self._bar_stream if self._bar_stream is not None else sys.stderr

    @property
    def line_stream(self) -> TextIO:
        return self._line_stream if self._line_stream is not None else sys.stdout

    # Tracker interface ------------------------------------------------------------------------
    def start(self, config: dict[str, Any], resumed: bool) -> None:
        # A new run shows 0/N during its first round; a resumed one waits for its first round,
        # which tells where it starts.
        if self.use_bar and not resumed:
            try:
                self._bar = _make_bar(self.num_rounds, 0, self.bar_stream)
            except Exception:  # noqa: BLE001
                self.use_bar, self.use_lines = False, True

    def log_round(self, record: dict[str, Any], operator: dict[str, Any] | None = None) -> None:
        """The console is the operator's: it shows the operator-only counts too."""
        record = {**record, **(operator or {})}
        rnd = int(record.get("round", 0))
        if self.use_bar:
            try:
                self._update_bar(rnd, record)
            except Exception:  # noqa: BLE001  (a display problem must never stop a run)
                self.use_bar, self.use_lines = False, True
        if self.use_lines:
            print(round_line(self.num_rounds, record), file=self.line_stream, flush=True)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.finish()  # close the bar before other trackers' finish() print anything

    def finish(self) -> None:
        if self._bar is not None:
            try:
                self._bar.close()
            except Exception:  # noqa: BLE001
                pass
            self._bar = None

    # ------------------------------------------------------------------------------------------
    def _update_bar(self, rnd: int, record: dict[str, Any]) -> None:
        if self._bar is None:
            self._bar = _make_bar(self.num_rounds, max(rnd - 1, 0), self.bar_stream)
        parts = [f"acc {_fmt(record.get('test_accuracy'), '.4f')}"]
        if "epsilon" in record:
            parts.append(f"eps {_fmt(record['epsilon'], '.3f')}")
        elif "local_epsilon_max" in record:
            parts.append(f"local eps {_fmt(record['local_epsilon_max'], '.3f')}")
        if record.get("num_failed") or record.get("num_dropped"):
            parts.append(f"lost {int(record.get('num_failed', 0)) + int(record.get('num_dropped', 0))}")
        self._bar.set_postfix_str(" ".join(parts), refresh=False)
        step = rnd - int(self._bar.n)
        self._bar.update(step if step > 0 else 0)
        if step <= 0 and hasattr(self._bar, "refresh"):
            self._bar.refresh()
