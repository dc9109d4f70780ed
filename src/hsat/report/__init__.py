"""Tables and figures of the study: views of the tidy result CSVs, never recomputation.

`collect` concatenates the per-model CSVs the evaluation stages write; `tables.write_tables`,
`tables.headline` and `figures.write_figures` only reshape and draw what those CSVs hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

from hsat.methods import METHODS, method_label  # noqa: F401 (method_label: public here too)
from hsat.io import read_tidy, write_csv  # noqa: F401 (read_tidy: public here too)

METHOD_LABELS: dict[str, str] = {name: entry.label for name, entry in METHODS.items()}
"""Display names of the registered methods (hsat.methods.METHODS); other names show as they are."""


def collect(inputs: Iterable[str | Path], out: str | Path) -> pd.DataFrame:
    """Concatenate per-model tidy CSVs (same columns) into one tidy CSV at `out`."""
    frames = [read_tidy(p) for p in inputs]
    frames = [f for f in frames if not f.empty]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_csv(out, df)
    return df
