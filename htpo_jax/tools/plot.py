"""`python -m htpo_jax.plot`: PNG figures of evaluations and training runs (needs matplotlib:
`pip install -e ".[plot]"`).

    python -m htpo_jax.plot passk [LABEL=]EVAL_DIR ... --out passk.png [--source S]
    python -m htpo_jax.plot curves [LABEL=]RUN_DIR ... --out curves.png

`passk`: pass@k against k (log2 axis) from the `summary.json` of `htpo_jax.evaluate` outputs,
one panel per data source. `curves`: from each run's `metrics.jsonl`, validation accuracy,
reward, entropy, response length and the 8 HTPO token-group fractions against the RL step.
Directories given the same LABEL (e.g. `htpo=runs/a htpo=runs/b`) are one curve: the mean, with
the min-max range over them shaded (the spread over seeds). Without a label, a directory is its
own curve, named after the directory. The directory of `--out` is created if missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

GROUPS = [
    f"group_frac/{d}_{c}_{e}"
    for d in ("hard", "easy")
    for c in ("correct", "wrong")
    for e in ("high", "low")
]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('htpo_jax.plot needs matplotlib: pip install -e ".[plot]"') from None
    return plt


def labelled(items: list[str]) -> dict[str, list[Path]]:
    """['htpo=a', 'htpo=b', 'c'] -> {'htpo': [a, b], 'c': [c]} (order kept)."""
    out: dict[str, list[Path]] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = Path(item).name or item, item
        out.setdefault(label, []).append(Path(path))
    return out


def fail(msg: str):
    """Bad input: one line on stderr, exit status 2."""
    print(f"htpo_jax.plot: {msg}", file=sys.stderr)
    raise SystemExit(2)


def load_summary(path: Path) -> dict:
    """An evaluate output's summary.json (`path`: the file or its dir); exits 2 when missing."""
    f = path if path.suffix == ".json" else path / "summary.json"
    if not f.is_file():
        fail(f"{f} not found (an htpo_jax.evaluate output directory?)")
    return json.loads(f.read_text())


def load_metrics(run: Path) -> list[dict]:
    """A run's metrics.jsonl records (`run`: the file or its directory); exits 2 when missing."""
    f = run if run.suffix == ".jsonl" else run / "metrics.jsonl"
    if not f.is_file():
        fail(f"{f} not found (a run's trainer.output_dir?)")
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _band(ax, x, ys: list[np.ndarray], label: str, color=None, **kw):
    """Mean line, and the min-max range shaded when there are several series."""
    ys = np.asarray(ys, dtype=float)  # [series, x]
    (line,) = ax.plot(x, np.nanmean(ys, 0), label=label, color=color, **kw)
    if len(ys) > 1:
        ax.fill_between(x, np.nanmin(ys, 0), np.nanmax(ys, 0), color=line.get_color(), alpha=0.2)
    return line


def passk_figure(groups: dict[str, list[dict]], out: str | Path, source: str | None = None):
    """pass@k vs k per data source; groups: label -> summaries (several = spread). Returns out."""
    plt = _pyplot()
    sources = [source] if source else sorted({s for ss in groups.values() for x in ss for s in x})
    fig, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 4.2), squeeze=False)
    for ax, src in zip(axes[0], sources, strict=True):
        for label, summaries in groups.items():
            have = [s[src] for s in summaries if src in s]
            if not have:
                continue
            ks = sorted(set.intersection(*(set(map(int, h["pass@k"])) for h in have)))
            ys = [[h["pass@k"][str(k)] for k in ks] for h in have]
            spread = f", {len(have)} runs" if len(have) > 1 else ""
            _band(ax, ks, ys, f"{label}{spread}", marker="o" if len(ks) <= 12 else None, ms=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (samples per problem)")
        ax.set_ylabel("pass@k")
        ax.set_title(f"pass@k on {src}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)


def _mean_curve(ax, runs: list[list[dict]], key: str, label: str, **kw):
    series = [_series(r, key) for r in runs]
    series = [s for s in series if len(s[0])]
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s[0].tolist()) for s in series)))
    ys = [[dict(zip(s[0].tolist(), s[1], strict=True))[t] for t in steps] for s in series]
    return _band(ax, steps, ys, label, **kw)


CURVES = [
    ("val/accuracy", "validation accuracy"),
    ("train/reward_mean", "mean reward (train rollouts)"),
    ("train/entropy", "mean token entropy"),
    ("response_length/mean", "mean response length (tokens)"),
]


def curves_figure(groups: dict[str, list[list[dict]]], out: str | Path):
    """Training curves; groups: label -> list of runs' metrics records. Returns out."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    flat = axes.reshape(-1)
    for ax, (key, title) in zip(flat, CURVES, strict=False):
        for label, runs in groups.items():
            _mean_curve(ax, runs, key, label, marker="o" if key.startswith("val/") else None)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {key} in metrics.jsonl", ha="center", transform=ax.transAxes)
    # The 8 token groups: colour = group, line style = label.
    styles = ["-", "--", ":", "-."]
    colors = plt.get_cmap("tab10").colors
    for gi, group in enumerate(GROUPS):
        name = group.split("/", 1)[1]
        for li, (label, runs) in enumerate(groups.items()):
            tag = f"{name} ({label})" if len(groups) > 1 else name
            _mean_curve(flat[4], runs, group, tag, color=colors[gi], ls=styles[li % 4], lw=1)
    flat[4].set_title("HTPO token-group fractions")
    flat[4].set_xlabel("RL step")
    flat[4].set_ylabel("fraction of response tokens")
    flat[4].grid(alpha=0.3)
    if flat[4].lines:
        flat[4].legend(fontsize=6, ncol=2)
    _mean_curve_table(flat[5], groups)
    fig.suptitle("training curves: " + ", ".join(f"{k} ({len(v)} runs)" for k, v in groups.items()))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def _mean_curve_table(ax, groups):
    """Last panel: train accuracy (the filter's input), the cheapest signal of learning."""
    for label, runs in groups.items():
        _mean_curve(ax, runs, "train/accuracy", label)
    ax.set_title("accuracy of train rollouts")
    ax.set_xlabel("RL step")
    ax.set_ylabel("train/accuracy")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()


def _out_dir(out: Path) -> None:
    """The directory of `--out`, created when missing; one line if it cannot be."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {out}: cannot create its directory {out.parent} ({e.strerror or e})")
    if out.is_dir():
        fail(f"--out {out} is a directory; give a file name such as {out / 'figure.png'}")


def main(argv=None) -> Path:
    """Draws the `passk` or `curves` figure and returns its path; bad input exits 2."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("passk", help="pass@k vs k from htpo_jax.tools.evaluate outputs")
    p.add_argument("dirs", nargs="+", help="[LABEL=]EVAL_DIR (holding summary.json)")
    p.add_argument("--out", default="passk.png")
    p.add_argument("--source", default=None, help="one data source (default: every one)")
    c = sub.add_parser("curves", help="training curves from runs' metrics.jsonl")
    c.add_argument("dirs", nargs="+", help="[LABEL=]RUN_DIR (holding metrics.jsonl)")
    c.add_argument("--out", default="curves.png")
    args = ap.parse_args(argv)
    _out_dir(Path(args.out))  # before the figures: a bad --out is known at once
    groups = labelled(args.dirs)
    if args.what == "passk":
        data = {k: [load_summary(d) for d in v] for k, v in groups.items()}
        if args.source and not any(args.source in s for ss in data.values() for s in ss):
            fail(f"no data source '{args.source}' in these summaries")
        out = passk_figure(data, args.out, args.source)
    else:
        out = curves_figure({k: [load_metrics(d) for d in v] for k, v in groups.items()}, args.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
