"""scripts/compare.py on synthetic run folders: the table of differing keys, the PNGs, the HTML."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedpriv.compare import differing_keys, find_runs, main, pareto_front, plot_epsilon, plot_frontier

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(run_dir: Path, mode: str, target: float | None, tags: list[str]) -> dict:
    return {
        "seed": 0,
        "num_clients": 20,
        "num_rounds": 4,
        "run_dir": str(run_dir),
        "dataset": {"name": "digits"},
        "model": {"name": "auto", "hidden": [64]},
        "privacy": {"mode": mode, "target_epsilon": target, "delta": None, "local": {"delta": 1e-5}},
        "tracking": {"wandb": False, "tags": tags},
    }


def _write_run(run_dir: Path, mode: str, target: float | None, accs: list[float], epsilons: list | None, summary_eps=None) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(_config(run_dir, mode, target, [run_dir.name]), sort_keys=False))
    lines = []
    for i, acc in enumerate(accs, start=1):
        rec = {"round": i, "test_accuracy": acc, "test_loss": 1.0 - acc, "num_clients": 5, "num_sampled": 5,
               "num_failed": 0, "num_dropped": 0, "clients_declined": 0, "round_seconds": 0.5, "client_updates_per_second": 10.0}
        if epsilons is not None:
            rec.update(epsilon=epsilons[i - 1], planned_epsilon=epsilons[i - 1], noise_multiplier=1.0, clip_norm=1.0)
        lines.append(json.dumps(rec))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = {"final_accuracy": accs[-1], "final_loss": 1.0 - accs[-1], "rounds_completed": len(accs), "wall_seconds": 12.5,
               "dataset": "digits", "num_clients": 20, "privacy": mode}
    if epsilons is not None:
        summary.update(epsilon=summary_eps if summary_eps is not None else epsilons[-1], delta=1e-5, accountant="pld", sampling="poisson")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


@pytest.fixture
def multirun(tmp_path) -> Path:
    root = tmp_path / "multirun" / "2024-05-01" / "12-00-00"
    _write_run(root / "0_privacy=central", "central", 2.0, [0.40, 0.55, 0.61, 0.66], [0.5, 1.0, 1.5, 2.0])
    _write_run(root / "1_privacy=none", "none", None, [0.50, 0.70, 0.80, 0.85], None)
    return root


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert len(data) > 5_000, f"{path.name} is only {len(data)} bytes"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.01, f"{path.name} is blank"


def test_table_plots_and_html(multirun, tmp_path, capsys):
    report = tmp_path / "report.html"
    assert main([str(multirun), "--html", str(report)]) == 0
    out = capsys.readouterr().out
    table = out.split("compare: wrote")[0].strip().splitlines()
    header = table[0].split()
    # only the keys that differ, plus the outcome columns; run_dir and tracking.* never count
    assert header == ["run", "privacy.mode", "privacy.target_epsilon", "rounds", "final_acc", "epsilon", "wall_s"]
    rows = {line.split()[0]: line.split() for line in table[2:]}
    # each run is named by the values that set it apart, not by its Hydra folder
    assert rows["privacy.mode=central,privacy.target_epsilon=2"][1:] == ["central", "2", "4", "0.6600", "2", "12.5"]
    assert rows["privacy.mode=none,privacy.target_epsilon=-"][1:] == ["none", "-", "4", "0.8500", "none", "12.5"]

    for name in ("compare_accuracy.png", "compare_epsilon.png", "compare_frontier.png"):
        _check_png(multirun / name)  # --out defaults to the given folder

    doc = report.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', doc)
    assert len(images) == 3
    assert all(base64.b64decode(i)[:8] == PNG_MAGIC for i in images)
    assert "<th>privacy.target_epsilon</th>" in doc and "<td>0.6600</td>" in doc
    assert "src=\"http" not in doc and "<script" not in doc  # self-contained


def test_runs_found_recursively_and_inf_epsilon(multirun, tmp_path, capsys):
    # a private run that ends without a finite bound ("inf" as LocalFiles writes it), and an unrelated folder
    _write_run(multirun / "2_privacy=central,noise=0", "central", None, [0.5, 0.7, 0.8, 0.84], [1.0, 2.0, "inf", "inf"], summary_eps="inf")
    (multirun / ".hydra").mkdir()
    (multirun / "notes").mkdir()
    runs, notes = find_runs([multirun.parent.parent])
    assert sorted(r.path.name for r in runs) == ["0_privacy=central", "1_privacy=none", "2_privacy=central,noise=0"]
    inf_run = next(r for r in runs if r.path.name.startswith("2_"))
    assert inf_run.epsilon == float("inf") and inf_run.is_private
    assert "privacy.target_epsilon" in differing_keys(runs)

    out_dir = tmp_path / "plots"
    assert main([str(multirun), "--out", str(out_dir), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"privacy\.mode=central,privacy\.target_epsilon=-\s+central\s+-\s+4\s+0\.8400\s+inf", out)
    assert not out_dir.exists() and not (multirun / "compare_accuracy.png").exists()
    # the epsilon = inf run is a reference line, like the non-private one; one finite point remains
    assert plot_frontier(runs, out_dir / "frontier.png") == out_dir / "frontier.png"
    _check_png(out_dir / "frontier.png")
    assert plot_frontier([r for r in runs if not r.is_private], out_dir / "none.png") is not None
    assert plot_epsilon([r for r in runs if not r.is_private], out_dir / "eps.png") is None


def test_nothing_to_compare(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no runs found" in capsys.readouterr().err


def test_pareto_front():
    pts = [(1.0, 0.6), (2.0, 0.55), (4.0, 0.7), (8.0, 0.7), (0.5, 0.3)]
    assert pareto_front(pts) == [(0.5, 0.3), (1.0, 0.6), (4.0, 0.7)]


def test_script_runs_from_anywhere(multirun, tmp_path):
    """The script puts the repository on sys.path itself, like scripts/simulate.py."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare.py"), str(multirun), "--no-plots"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "privacy.target_epsilon" in proc.stdout and "0.8500" in proc.stdout
    assert not (multirun / "compare_accuracy.png").exists()


def test_unfinished_run_is_marked_and_left_off_the_frontier(multirun, tmp_path, monkeypatch):
    """A run killed (or still running) has metrics but no summary: the table says so, the frontier skips it."""
    cut = multirun / "2_privacy=central"
    _write_run(cut, "central", 8.0, [0.30, 0.45], [1.0, 2.0])
    (cut / "summary.json").unlink()
    runs, _ = find_runs([multirun])
    labels = {r.path.name: r.label for r in runs}
    assert labels["2_privacy=central"].endswith("(unfinished)")
    assert not labels["0_privacy=central"].endswith("(unfinished)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes

    drawn: list[str] = []
    original = matplotlib.axes.Axes.scatter

    def spy(self, *args, **kwargs):
        drawn.append(kwargs.get("label", ""))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", spy)
    plot_frontier(runs, tmp_path / "frontier.png")
    assert drawn == [labels["0_privacy=central"]]  # the finished private run only


def test_runs_sorted_naturally(tmp_path, capsys):
    root = tmp_path / "multirun"
    for n, eps in enumerate([10.0, 2.0, float("inf")]):
        _write_run(root / f"{n}_eps={eps}", "central", eps, [0.5, 0.6], [0.1, 0.2])
    assert main([str(root), "--no-plots"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in table[2:]] == [
        "privacy.target_epsilon=2", "privacy.target_epsilon=10", "privacy.target_epsilon=inf"]
