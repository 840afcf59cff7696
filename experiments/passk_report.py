"""Figure and table of the seeds experiment (experiments/passk_seeds.sh) for docs/RESULTS.md.

    python experiments/passk_report.py --runs /work/runs_eval --png docs/passk_htpo_vs_dapo.png

Reads `<runs>/{htpo,dapo}_seed<S>/eval_n64/summary.json` (whatever exists), writes the pass@k
figure (mean over seeds, min-max shaded) and prints a markdown table: per run mean@64, pass@k,
maj@k, plus the mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from htpo_jax.tools.plot import passk_figure

KS = ("1", "2", "4", "8", "16", "32", "64")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--png", required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--source", default="arith")
    args = ap.parse_args()
    runs, groups, rows = Path(args.runs), {}, []
    for loss in ("htpo", "dapo"):
        for d in sorted(runs.glob(f"{loss}_seed*")):
            f = d / f"eval_n{args.n}" / "summary.json"
            if not f.is_file():
                continue
            s = json.loads(f.read_text())
            groups.setdefault(loss.upper(), []).append(s)
            rows.append((loss.upper(), d.name.split("seed")[-1], s[args.source]))
    if not rows:
        raise SystemExit(f"no {runs}/*_seed*/eval_n{args.n}/summary.json yet")
    passk_figure(groups, args.png, args.source)
    mean_key = f"mean@{args.n}"
    head = ["run", "seed", mean_key] + [f"pass@{k}" for k in KS] + [f"maj@{args.n}"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(head) - 2))

    def cells(s):
        return [s[mean_key], *(s["pass@k"][k] for k in KS), s["maj@k"][str(args.n)]]

    for loss, seed, s in rows:
        print(f"| {loss} | {seed} | " + " | ".join(f"{v:.3f}" for v in cells(s)) + " |")
    for loss in groups:
        vals = np.array([cells(s) for l_, _, s in rows if l_ == loss])  # [seeds, columns]
        sd = vals.std(0, ddof=1) if len(vals) > 1 else np.full(vals.shape[1], np.nan)
        body = " | ".join(f"**{m:.3f}** ± {e:.3f}" for m, e in zip(vals.mean(0), sd, strict=True))
        print(f"| {loss} mean ± sd | {len(vals)} seeds | {body} |")
    print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
