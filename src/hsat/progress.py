"""Where a person looks while a run trains: dvclive curves for `dvc plots`, and progress lines.

`TrainingLive` writes each logged step of `hsat pretrain` with dvclive (one TSV per series, x =
optimiser step): the loss per level, clean and adversarial, the attack's loss gain (adversarial
minus clean loss of a level), eps, learning rate, augmentation strength and clean-loss weight;
throughput depends on the machine, so only the progress line shows it. A resumed run first
drops the rows past its checkpoint, so a curve never holds two values for one step. `progress_line` is the one-line status a rule's log file gets per logged step.
"""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

SERIES_NAMES = {"loss_total": "loss/total", "eps": "eps", "lr": "lr", "strength": "augment_strength",
                "clean_weight": "clean_weight"}


def series(record: Mapping[str, Any]) -> dict[str, float]:
    """The dvclive series of one `log.jsonl` record."""
    out = {SERIES_NAMES[k]: float(v) for k, v in record.items() if k in SERIES_NAMES}
    for key, value in record.items():
        for kind in ("clean", "adv"):
            if key.startswith(f"loss_{kind}_"):
                out[f"loss/{kind}/{key.removeprefix(f'loss_{kind}_')}"] = float(value)
    for key in list(out):
        if key.startswith("loss/adv/"):
            level = key.removeprefix("loss/adv/")
            if f"loss/clean/{level}" in out:
                out[f"attack_gain/{level}"] = out[key] - out[f"loss/clean/{level}"]
    return out


def truncate_series(live_dir: Path, step: int) -> None:
    """Keep only rows with step <= `step` in every dvclive TSV under `live_dir`."""
    for path in live_dir.rglob("*.tsv"):
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        col = rows[0].index("step")
        kept = [rows[0]] + [r for r in rows[1:] if len(r) > col and float(r[col]) <= step]
        with open(path, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh, delimiter="\t", lineterminator="\n").writerows(kept)


class TrainingLive:
    """dvclive for one run; `dvc plots show` finds it through the study's dvc.yaml."""

    def __init__(self, live_dir: Path, start_step: int):
        from dvclive import Live  # local: dvclive imports much of DVC; only runs that log pay for it

        live_dir = Path(live_dir)
        if start_step == 0:
            shutil.rmtree(live_dir, ignore_errors=True)
        else:
            truncate_series(live_dir, start_step)
        try:
            # No experiment, no dvc.yaml edits, no report: the study's dvc.yaml lists the folder.
            self.live = Live(str(live_dir), resume=start_step > 0, save_dvc_exp=False, dvcyaml=False, report=None)
        except Exception as exc:  # dvclive inspects the git repo it runs in; never let that stop training
            log.warning("training curves off: dvclive could not start in %s (%s)", live_dir, exc)
            self.live = None

    def log(self, record: Mapping[str, Any]) -> None:
        if self.live is None:
            return
        self.live.step = int(record["step"])
        for name, value in series(record).items():
            self.live.log_metric(name, value)
        self.live.make_summary()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


def progress_line(record: Mapping[str, Any], total: int, start: int, elapsed_s: float,
                  images_per_s: float | None = None) -> str:
    """`step 40/300 (13%) loss 19.41 lr 2.9e-03 eps 6.4/255 ETA 3m05s 412 img/s`."""
    step = int(record["step"])
    done = max(step - start, 1)
    eta = elapsed_s / done * (total - step)
    parts = [f"step {step}/{total} ({100 * step / total:.0f}%)", f"loss {record['loss_total']:.4f}",
             f"lr {record['lr']:.1e}"]
    if record.get("eps"):
        parts.append(f"eps {record['eps']:.2f}/255")
    parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
    if images_per_s is not None:
        parts.append(f"{images_per_s:.0f} img/s")
    return " ".join(parts)
