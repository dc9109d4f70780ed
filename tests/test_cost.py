"""`hsat report cost`: the study's time, summed from its jobs' Snakemake benchmark files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from hsat.config import validate
from hsat.errors import HSATError
from hsat.report.cost import STUDY_WIDE, cost_tables, job_costs

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(root: Path, rel: str, *seconds: float, rss: float = 500.0) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "".join(f"{s}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t90\t{s}\n" for s in seconds))


def _study() -> dict:
    return validate({
        "models": {
            "hidisc_s0": {"method": {"name": "hidisc"}, "seed": 0},
            "hsat_s0": {"method": {"name": "hsat"}, "seed": 0},
            "dino_vit_s0": {"method": {"name": "dino"}, "seed": 0,
                            "model": {"backbone": "vit_tiny_patch16_224", "backbone_args": {"patch_size": 8, "depth": 1}}},
        },
        "pretrain": {"model": {"backbone": "test_resnet"}},
    }, "study")


@pytest.fixture
def benchmarks(tmp_path: Path) -> Path:
    root = tmp_path / "benchmarks"
    _bench(root, "pretrain/hidisc_s0.tsv", 10)
    _bench(root, "evaluate/hidisc_s0.tsv", 20, rss=900)
    _bench(root, "pretrain/hsat_s0.tsv", 20, 10)  # a repeat() benchmark: one row per run, the job is their sum
    _bench(root, "pretrain/dino_vit_s0.tsv", 40)
    _bench(root, "transfer/craft_hidisc_s0.tsv", 3)
    _bench(root, "transfer/hsat_s0.tsv", 4)
    _bench(root, "sanity/hsat_s0.tsv", 5)
    _bench(root, "report/tables.tsv", 1)
    _bench(root, "synth.tsv", 2)
    _bench(root, "pretrain/hsat_s9.tsv", 1000)  # a model of another config: left out
    _bench(root, "mil/hsat_s9.tsv", 500)  # ... whatever its rule
    return root


def test_jobs_are_attributed_to_their_model_method_and_backbone(benchmarks: Path) -> None:
    jobs, dropped = job_costs(benchmarks, _study())
    assert dropped == 2 and len(jobs) == 9
    row = jobs.set_index("job").loc
    assert row["hsat_s0"].shape[0] == 3  # pretrain, transfer score and sanity jobs share the name
    craft = jobs[jobs["rule"] == "transfer craft"].iloc[0]
    assert (craft["model"], craft["method"], craft["seconds"]) == ("hidisc_s0", "HiDisc", 3.0)
    assert set(jobs.loc[jobs["rule"] == "transfer score", "model"]) == {"hsat_s0"}
    assert jobs.loc[(jobs["rule"] == "pretrain") & (jobs["model"] == "hsat_s0"), "seconds"].item() == 30.0
    assert jobs.loc[jobs["model"] == "dino_vit_s0", "backbone"].item() == "vit_tiny_patch16_224"
    assert jobs.loc[jobs["model"] == "hidisc_s0", "backbone"].unique().tolist() == ["test_resnet"]
    assert set(jobs.loc[jobs["model"] == "", "method"]) == {STUDY_WIDE}
    assert set(jobs.loc[jobs["model"] == "", "rule"]) == {"report", "synth"}


def test_cost_tables_sum_by_rule_and_method_and_bound_the_wall_time(benchmarks: Path) -> None:
    jobs, _ = job_costs(benchmarks, _study())
    total_seconds = 10 + 20 + 30 + 40 + 3 + 4 + 5 + 1 + 2
    t = cost_tables(jobs, cores=2)
    by_rule = t["by_rule"].set_index("rule")
    assert by_rule.loc["pretrain", "jobs"] == 3 and by_rule.loc["pretrain", "job_seconds"] == 80.0
    assert by_rule.loc["evaluate", "peak_rss_mb"] == 900.0
    assert t["by_rule"]["job_seconds"].sum() == total_seconds
    by_method = t["by_method"].set_index("method")
    assert by_method.loc["HiDisc", ["pretrain_s", "evaluate_s", "other_s", "total_s"]].tolist() == [10.0, 20.0, 3.0, 33.0]
    assert by_method.loc["HSAT", ["pretrain_s", "evaluate_s", "other_s", "total_s"]].tolist() == [30.0, 0.0, 9.0, 39.0]
    assert by_method.loc[STUDY_WIDE, "total_s"] == 3.0
    assert t["by_method"]["total_s"].sum() == total_seconds
    total = t["total"].iloc[0]
    assert total["models"] == 3 and total["job_seconds"] == total_seconds
    assert math.isclose(total["wall_lower_bound_min"], total_seconds / 2 / 60)
    # The longest job bounds the wall time when there are more cores than work to share.
    assert math.isclose(cost_tables(jobs, cores=16)["total"].iloc[0]["wall_lower_bound_min"], 40 / 60)


def test_report_cost_cli_writes_both_files_and_bad_benchmarks_name_the_file(benchmarks: Path, tmp_path: Path) -> None:
    from hsat.cli import main

    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(_study()))
    out = tmp_path / "out"
    assert main(["report", "cost", "--study", str(study), "--benchmarks", str(benchmarks), "--out-dir", str(out)]) == 0
    md = (out / "cost.md").read_text()
    assert "9 jobs of 3 models" in md and "2 benchmark files of models outside this study" in md
    assert (out / "cost.csv").read_text().startswith("rule,job,model,method,backbone,seconds,max_rss_mb")

    bad = benchmarks / "evaluate" / "hsat_s0.tsv"
    bad.write_text("wall\n12\n")
    out2 = tmp_path / "out2"
    assert main(["report", "cost", "--study", str(study), "--benchmarks", str(benchmarks), "--out-dir", str(out2)]) == 2
    assert not out2.exists()
    with pytest.raises(HSATError, match=str(bad)):
        job_costs(benchmarks, _study())
    with pytest.raises(HSATError, match="no such directory"):
        job_costs(tmp_path / "missing", _study())
    bad.write_text(HEADER + "12\t0\t1\t1\t1\t1\t0\t0\t0\t0\n")
    with pytest.raises(HSATError, match="cores"):
        cost_tables(job_costs(benchmarks, _study())[0], cores=0)
