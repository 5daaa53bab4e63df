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


def _config(run_dir: Path, mode: str, target: float | None, tags: list[str], seed: int = 0, mechanism: str | None = None,
            sampling: str | None = None, num_clients: int = 20, lr: float | None = None) -> dict:
    cfg = {
        "seed": seed,
        "num_clients": num_clients,
        "num_rounds": 4,
        "run_dir": str(run_dir),
        "dataset": {"name": "digits"},
        "model": {"name": "auto", "hidden": [64]},
        "privacy": {"mode": mode, "target_epsilon": target, "delta": None, "local": {"delta": 1e-5}},
        "tracking": {"wandb": False, "tags": tags},
    }
    if mechanism is not None:  # runs older than privacy.mechanism have no such key
        cfg["privacy"]["mechanism"] = mechanism
    if sampling is not None:
        cfg["sampling"] = sampling
    if lr is not None:
        cfg["train"] = {"lr": lr}
    return cfg


def _write_run(run_dir: Path, mode: str, target: float | None, accs: list[float], epsilons: list | None, summary_eps=None,
               **config_kw) -> None:
    run_dir.mkdir(parents=True)
    cfg = _config(run_dir, mode, target, [run_dir.name], **config_kw)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
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

    for name in ("compare_accuracy.png", "compare_epsilon.png", "compare_frontier.png", "frontier_mechanisms.png"):
        _check_png(multirun / name)  # --out defaults to the given folder
    assert "seeds aggregated" not in out  # no two runs differ only by seed

    doc = report.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', doc)
    assert len(images) == 4
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


# ------------------------------------------------------------------ seeds aggregated, mechanisms

# (folder, mode, target, mechanism, sampling, seed, final accuracy, published epsilon)
SEEDED = [
    ("g2_s0", "central", 2.0, None, "poisson", 0, 0.60, 1.98),  # older run: no privacy.mechanism -> gaussian
    ("g2_s1", "central", 2.0, "gaussian", "poisson", 1, 0.64, 2.00),
    ("g2_s2", "central", 2.0, "gaussian", "poisson", 2, 0.65, 1.99),
    ("g8_s0", "central", 8.0, "gaussian", "poisson", 0, 0.70, 8.0),
    ("g8_s1", "central", 8.0, "gaussian", "poisson", 1, 0.72, 8.0),
    ("g8_s2", "central", 8.0, "gaussian", "poisson", 2, 0.75, 8.0),
    ("b2_s0", "central", 2.0, "bandmf", "cyclic", 0, 0.66, 2.0),
    ("b2_s1", "central", 2.0, "bandmf", "cyclic", 1, 0.70, 2.0),
    ("t2_s0", "central", 2.0, "tree", "cyclic", 0, 0.62, 2.0),
    ("t2_s1", "central", 2.0, "tree", "cyclic", 1, 0.63, 2.0),
    ("t2_s2", "central", 2.0, "tree", "cyclic", 2, 0.61, 2.0),
    ("np_s0", "none", None, None, "poisson", 0, 0.85, None),
    ("np_s1", "none", None, None, "poisson", 1, 0.86, None),
    ("np_s2", "none", None, None, "poisson", 2, 0.88, None),
]


def _write_seeded(root: Path, rows=SEEDED, **config_kw) -> None:
    for name, mode, target, mech, sampling, seed, acc, eps in rows:
        _write_run(root / name, mode, target, [0.3, acc], None if eps is None else [eps / 2, eps],
                   seed=seed, mechanism=mech, sampling=sampling, **config_kw)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _seed_rows(out: str) -> list[list[str]]:
    lines = out.split("seeds aggregated")[1].split("compare: wrote")[0].strip().splitlines()
    return [lines[1].split(), *(line.split() for line in lines[3:] if line.strip())]


@pytest.fixture
def seeded(tmp_path) -> Path:
    root = tmp_path / "seeded"
    _write_seeded(root)
    return root


def test_seed_table_groups_by_seed_and_gaps(seeded, capsys):
    assert main([str(seeded), "--no-plots"]) == 0
    out = capsys.readouterr().out
    header, *rows = _seed_rows(out)
    assert header == ["privacy.mechanism", "privacy.mode", "privacy.target_epsilon", "sampling", "seeds",
                      "acc_mean±std", "acc_min..max", "epsilon", "gap_vs_nonpriv"]
    by = {(r[0], r[2]): r for r in rows}
    assert len(rows) == 5  # 14 runs, 5 groups: the run without privacy.mechanism joined its gaussian seeds
    np_mean, _ = _mean_sd([0.85, 0.86, 0.88])
    for (mech, target), accs, eps in [(("gaussian", "2"), [0.60, 0.64, 0.65], "2"),
                                      (("gaussian", "8"), [0.70, 0.72, 0.75], "8"),
                                      (("bandmf", "2"), [0.66, 0.70], "2"),
                                      (("tree", "2"), [0.62, 0.63, 0.61], "2")]:
        m, sd = _mean_sd(accs)
        row = by[(mech, target)]
        assert row[4] == str(len(accs))
        assert row[5] == f"{m:.4f}±{sd:.4f}"
        assert row[6] == f"{min(accs):.4f}..{max(accs):.4f}"
        assert row[7] == eps  # the largest over seeds (1.98, 2.00, 1.99 -> 2)
        assert float(row[8]) == pytest.approx(m - np_mean, abs=1e-4)
    np_row = by[("-", "-")]
    assert np_row[1] == "none" and np_row[4] == "3" and np_row[7] == "none" and np_row[8] == "-"
    assert np_row[5].startswith(f"{np_mean:.4f}±")
    # the per-run table is still printed first, one row per run
    assert len(out.split("seeds aggregated")[0].strip().splitlines()) == 2 + len(SEEDED)


def test_gap_needs_exactly_one_matching_non_private_group(tmp_path, capsys):
    root = tmp_path / "pop"
    _write_seeded(root / "n20", [r for r in SEEDED if r[0][0] in "gn"])
    # another population: its private group matches its own non-private group, not the one of 20 clients
    _write_seeded(root / "n50", [r for r in SEEDED if r[0].startswith(("g2", "np"))], num_clients=50)
    assert main([str(root), "--no-plots"]) == 0
    header, *rows = _seed_rows(capsys.readouterr().out)
    col = {h: i for i, h in enumerate(header)}
    gaps = {(r[col["num_clients"]], r[col["privacy.target_epsilon"]]): r[col["gap_vs_nonpriv"]] for r in rows}
    np20 = _mean_sd([0.85, 0.86, 0.88])[0]
    assert float(gaps[("20", "8")]) == pytest.approx(_mean_sd([0.70, 0.72, 0.75])[0] - np20, abs=1e-4)
    assert float(gaps[("50", "2")]) == pytest.approx(_mean_sd([0.60, 0.64, 0.65])[0] - np20, abs=1e-4)

    # two non-private groups of the same population (another learning rate): no gap, rather than a guess
    _write_seeded(root / "lr", [r for r in SEEDED if r[0].startswith("np")], num_clients=50, lr=0.5)
    assert main([str(root), "--no-plots"]) == 0
    header, *rows = _seed_rows(capsys.readouterr().out)
    col = {h: i for i, h in enumerate(header)}
    gaps = {(r[col["num_clients"]], r[col["privacy.target_epsilon"]]): r[col["gap_vs_nonpriv"]] for r in rows}
    assert gaps[("50", "2")] == "-" and gaps[("20", "8")] != "-"


def test_frontier_mechanisms_one_curve_per_mechanism(seeded, tmp_path, monkeypatch):
    from fedpriv.compare import mechanism, mechanism_curves, plot_frontier_mechanisms

    runs, _ = find_runs([seeded])
    assert mechanism(next(r for r in runs if r.path.name == "g2_s0")) == "gaussian"  # no privacy.mechanism key
    assert "privacy.mechanism" not in next(r for r in runs if r.path.name == "g2_s0").config
    data = mechanism_curves(runs)
    assert set(data.curves) == {"DP-FedAvg (gaussian, poisson)", "BandMF (cyclic)", "DP-FTRL tree (cyclic)"}
    gauss = data.curves["DP-FedAvg (gaussian, poisson)"]
    assert [(p[0], p[4]) for p in gauss] == [(2.0, 3), (8.0, 3)]
    assert gauss[0][1:4] == pytest.approx((_mean_sd([0.60, 0.64, 0.65])[0], 0.60, 0.65))
    assert data.curves["BandMF (cyclic)"] == [pytest.approx((2.0, 0.68, 0.66, 0.70, 2))]
    assert list(data.references) == ["non-private (3 seeds)"]
    assert data.references["non-private (3 seeds)"] == pytest.approx((_mean_sd([0.85, 0.86, 0.88])[0], 0.85, 0.88, 3))
    assert not data.infinite

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes

    drawn: list[str] = []
    lines: list[str] = []
    original_errorbar, original_axhline = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, *a, **kw: drawn.append(kw.get("label")) or original_errorbar(self, *a, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda self, *a, **kw: lines.append(kw.get("label")) or original_axhline(self, *a, **kw))
    path = plot_frontier_mechanisms(runs, tmp_path / "frontier_mechanisms.png")
    assert path == tmp_path / "frontier_mechanisms.png"
    assert sorted(drawn) == sorted(data.curves)  # one error-bar series per mechanism
    assert lines == ["non-private (3 seeds)"]
    _check_png(path)


def test_non_private_groups_of_different_populations_are_separate_lines(tmp_path):
    from fedpriv.compare import mechanism_curves

    root = tmp_path / "pops"
    _write_seeded(root / "n20", [r for r in SEEDED if r[0].startswith(("g2", "np"))])
    _write_seeded(root / "n50", [r for r in SEEDED if r[0].startswith("np")][:2], num_clients=50)
    runs, _ = find_runs([root])
    refs = mechanism_curves(runs).references
    assert sorted(refs) == ["non-private (2 seeds) num_clients=50", "non-private (3 seeds) num_clients=20"]


def test_every_frontier_point_composes_and_an_unknown_point_is_refused(tmp_path, capsys):
    """scripts/frontier.py checks every run of a study before the first starts (the presets included)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("frontier", ROOT / "scripts" / "frontier.py")
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)
    for study, (_, points) in frontier.STUDIES.items():
        assert frontier.main([study, "--dry-run", "--seeds", "1", "--out", str(tmp_path)]) == 0
        printed = capsys.readouterr().out
        assert printed.count("frontier: experiment=") == len(points)
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    assert frontier.main(["fmnist", "--only", "gaussian_eps3", "--dry-run", "--out", str(tmp_path)]) == 2
    assert "unknown point(s) gaussian_eps3" in capsys.readouterr().err
