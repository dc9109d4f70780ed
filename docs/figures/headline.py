"""Draw the README's figure: patch accuracy in the worst case against eps, per method.

    python docs/figures/headline.py [ROBUST_ACCURACY_CSV] [OUT_PNG]

The input has the columns of a study's `results/plots/robust_accuracy.csv` (written by
`hsat report dvc`); the default, `docs/figures/headline.csv`, holds the three-seed rows of Table 1
of the default study run on an AMD EPYC with AVX512-BF16 (docs/results.md). Methods trained
adversarially are drawn solid, the others dashed. Give your own run's file to redraw it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
ADVERSARIAL = {"hsat", "supervised_at", "robust_hlss", "robust_dino"}


def main(src: Path = HERE / "headline.csv", out: Path = HERE / "headline.png") -> None:
    df = pd.read_csv(src)
    df = df[(df["level"] == "patch") & (df["n"] > 1)]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    for (label, method), g in df.groupby(["label", "method"], sort=False):
        g = g.sort_values("eps")
        ax.errorbar(g["eps"], g["acc"], yerr=g["std"].fillna(0), marker="o", ms=4, capsize=2, lw=1.6,
                    ls="-" if method in ADVERSARIAL else "--", label=label)
    ax.set_xticks(sorted(df["eps"].unique()), [f"{e:g}/255" if e else "clean" for e in sorted(df["eps"].unique())])
    ax.set_xlabel("eps (L-inf)")
    ax.set_ylabel("patch accuracy (%), kNN")
    ax.set_ylim(0, 100)
    ax.set_title("Worst case over every attack (mean ± sd, 3 seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:3]))
