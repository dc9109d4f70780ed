"""`make gpu-check`: the paper's rehearsal on a GPU, with the throughputs `hsat plan` needs.

On a fake OpenSRH (hsat.data.fake_opensrh, 300 px), with the paper's run settings
(config/opensrh.yaml + config/opensrh_rehearsal.yaml, then the paper's device settings back:
cuda, bf16, channels_last, torch.compile):

1. Training throughput per backbone: the paper's HSAT model of each backbone (ResNet-50,
   Wide-ResNet-50-2, ResNet-101 at 300 px; robust DINO's ViT-S/16 at 224 px with 65,536
   prototypes and multi-crop) takes `--steps` steps through `hsat.train.pretrain`; images/s over
   the steps after the first two (compilation, allocator warm-up).
2. Attack throughput per backbone: PGD on the feature objective in fp32 with TF32 off (the
   paper's `attack_precision: fp32`), patches x steps per second.
3. DDP: one pretraining under `torchrun --nproc_per_node 1` (NCCL on a GPU, gloo on the CPU).
4. The OOM back-off: an input-gradient pass through ResNet-50 at 300 px on a batch larger than
   the free GPU memory holds, in `hsat.oom.HalvingBatches` pieces: it must halve and give the
   same gradient as small pieces do.
5. The whole DAG (`snakemake all`) of a subset of the rehearsal (HiDisc and HSAT ResNet-50, DINO
   ViT-S/16) on the GPU, unless --skip-dag.

Writes the figures to --out (JSON; default results/gpu_check.json; its `entries` are what
`hsat plan --bench` reads). Exit 0: passed; 1: a check
failed; 77: no GPU (with the reason on a `SKIP:` line). `--device cpu` runs the same code on the
CPU at tiny sizes (64 px, fp32, no compile): what the test suite runs, since CI has no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
EXIT_SKIP = 77
BACKBONE_MODELS = {  # backbone -> the paper's model that trains it adversarially
    "resnet50": "hsat_resnet50",
    "wide_resnet50_2": "hsat_wresnet50",
    "resnet101": "hsat_resnet101",
    "vit_small_patch16_224": "robust_dino_vits16",
}
DAG_MODELS = ("hidisc_resnet50", "hsat_resnet50", "dino_vits16")
TINY_SIZE = 64  # --device cpu: every image at 64 px (ViT-S/16: 4 x 4 tokens; local crops 32 px)


def rehearsal_study(device: str, models: tuple[str, ...] | None = None, root: str | None = None) -> dict[str, Any]:
    """The rehearsal's study (as Snakemake merges opensrh.yaml and the overlay) on `device`: on
    cuda the paper's own device settings (bf16, channels_last, compile, its loader workers); on
    the CPU tiny images. `models`: keep these (and the lists naming them)."""
    from hsat.config import MODEL_LISTS, deep_merge, read_yaml

    paper = read_yaml(REPO / "config" / "opensrh.yaml")
    cfg = deep_merge(paper, read_yaml(REPO / "config" / "opensrh_rehearsal.yaml"))
    if root is not None:
        cfg["dataset"]["root"] = root
    if device == "cuda":
        cfg["pretrain"].update(device="cuda", precision=paper["pretrain"]["precision"], threads=None, compile=True,
                               channels_last=True)
        cfg["pretrain"]["data"]["num_workers"] = 4
    else:
        cfg["pretrain"].update(device="cpu", precision="fp32", compile=False)
        cfg["pretrain"]["data"]["image_size"] = TINY_SIZE
        for entry in cfg["models"].values():
            data = entry.get("data")
            if data:
                data["image_size"] = TINY_SIZE
                if data.get("resize"):
                    data["resize"] = {"size": TINY_SIZE}
                if data.get("local_crops"):
                    data["local_crops"] = {**data["local_crops"], "size": 32}
    if models is not None:
        cfg["models"] = {m: cfg["models"][m] for m in models}
        for path in MODEL_LISTS:
            *parents, key = path
            section = cfg
            for part in parents:
                section = section.get(part) or {}
            if isinstance(section.get(key), list):
                section[key] = [m for m in section[key] if m in models]
    return cfg


def _resolved(cfg: dict[str, Any]) -> dict[str, Any]:
    from hsat.config import resolve_study

    study, _ = resolve_study(REPO / "config" / "config.yaml", [(cfg, "gpu_check")])
    return study


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_throughput(study: dict[str, Any], name: str, manifest: Path, out: Path, steps: int) -> float:
    """Images per second of `steps` steps of `name`'s pretraining, after the first two."""
    from hsat.config import run_config_for_model
    from hsat.train import pretrain

    cfg = run_config_for_model(study, name, manifest=str(manifest))
    cfg["train"].update(steps=steps, checkpoint_every=steps, log_every=1)
    device = torch.device(cfg["device"])
    data = cfg["data"]
    # Patches x views a step at the model's resolution (DINO's local crops come on top, uncounted).
    images = data["patients_per_batch"] * data["num_slide_samples"] * data["num_patch_samples"] * data["num_transforms"]
    stamps: list[float] = []

    def tick(step: int, record: dict[str, Any]) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    pretrain(cfg, out / name, callback=tick)
    timed = stamps[2:] if len(stamps) > 3 else stamps
    return images * (len(timed) - 1) / max(timed[-1] - timed[0], 1e-9)


def attack_throughput(study: dict[str, Any], run_dir: Path, manifest: Path, patches: int, steps: int) -> float:
    """Patches x PGD steps per second on the feature objective, fp32 with TF32 off."""
    from hsat import attacks
    from hsat.evaluate.runs import datasets, eval_image_size
    from hsat.models import load_trained_model
    from hsat.precision import exact_fp32

    device = torch.device(study["pretrain"]["device"])
    model = load_trained_model(run_dir, device=device)
    (val,), _ = datasets(manifest, eval_image_size(study, run_dir), ["val"], run_dir)
    x = torch.stack([val[i % len(val)]["image"] for i in range(patches)]).to(device)
    with torch.no_grad():
        clean = model.encode(x)

    def objective(adv: torch.Tensor) -> torch.Tensor:
        return (1 - torch.nn.functional.cosine_similarity(model.encode(adv), clean)).sum()

    with exact_fp32():
        attacks.pgd(x, objective, eps=8 / 255, alpha=2 / 255, steps=1)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        attacks.pgd(x, objective, eps=8 / 255, alpha=2 / 255, steps=steps)
        _sync(device)
    return patches * steps / (time.perf_counter() - t0)


def ddp_run(study_path: Path, name: str, manifest: Path, out: Path) -> dict[str, Any]:
    """One pretraining under torchrun with one process (NCCL on cuda, gloo on the CPU)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "hsat",
           "pretrain", "--study", str(study_path), "--model", name, "--manifest", str(manifest), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    ok = proc.returncode == 0 and (out / "model.safetensors").is_file()
    if not ok:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
    return {"ok": ok, "seconds": round(time.perf_counter() - t0, 1)}


def oom_backoff(device: torch.device) -> dict[str, Any]:
    """Input gradients of a batch larger than memory holds, in halving pieces, equal to small pieces."""
    import timm

    from hsat.oom import HalvingBatches

    size = 300 if device.type == "cuda" else TINY_SIZE
    model = timm.create_model("resnet50", num_classes=0).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        n = int(2 * free / (160 * 2**20)) + 1  # ~160 MiB of activations an image at 300 px: twice what fits
    else:
        n = 8
    gen = torch.Generator().manual_seed(0)
    small = torch.rand(4, 3, size, size, generator=gen).to(device)
    x = small.repeat((n + 3) // 4, 1, 1, 1)[:n]

    def grad(rows: slice) -> torch.Tensor:
        xi = x[rows].clone().requires_grad_(True)
        if device.type == "cpu" and xi.shape[0] > 2:  # the dry path: a CPU "runs out" above 2 rows
            raise torch.OutOfMemoryError("simulated: more than 2 rows")
        model(xi).sum().backward()
        return xi.grad.detach().float().cpu()

    halving = HalvingBatches("gpu_check oom")
    full = halving(grad, n)
    reference = HalvingBatches("reference", limit=2)(grad, min(n, 4))
    same = torch.allclose(full[:4], reference, rtol=1e-3, atol=1e-5)
    return {"ok": bool(halving.limit is not None and halving.limit < n and same), "batch": n,
            "pieces_of": halving.limit}


def run_dag(workdir: Path, study: dict[str, Any], cores: int) -> dict[str, Any]:
    """`snakemake all` of the subset's study in a copy of the workflow."""
    import yaml

    for name in ("Snakefile", "rules", "workflow", "config", "envs"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, workdir / name)
    (workdir / "config" / "gpu_check.yaml").write_text(yaml.safe_dump(study))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "all", "--cores", str(cores), "--resources", "gpu=1",
                           "--configfile", "config/gpu_check.yaml"], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
    return {"ok": proc.returncode == 0, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "gpu_check.json")
    parser.add_argument("--steps", type=int, default=None, help="training steps per backbone (cuda: 12, cpu: 3)")
    parser.add_argument("--skip-dag", action="store_true", help="leave out the whole DAG of the subset")
    parser.add_argument("--workdir", type=Path, default=None, help="where to work (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: no CUDA device here (torch.cuda.is_available() is False); `--device cpu` runs the dry path",
              file=sys.stderr)
        return EXIT_SKIP
    import yaml

    from hsat.config import run_config_for_model
    from hsat.data.fake_opensrh import write_fake_opensrh
    from hsat.data.manifest import write_manifest
    from hsat.data.opensrh import build_manifest
    from hsat.io import write_json

    device = torch.device(args.device)
    steps = args.steps or (12 if device.type == "cuda" else 3)
    started = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hsat-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    size = 300 if device.type == "cuda" else TINY_SIZE
    root = work / "opensrh"
    write_fake_opensrh(root, patients_per_class=4, slides=2, patches=2, size=size, empty_slides=1, missing_patches=1)
    manifest = work / "manifest.csv"
    write_manifest(build_manifest(root), manifest)

    study = _resolved(rehearsal_study(args.device))
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "precision": study["pretrain"]["precision"],
                              "compile": study["pretrain"]["compile"], "image_size": size,
                              "train_images_per_s": {}, "attack_images_per_s": {}, "entries": []}
    failures = []
    for backbone, name in BACKBONE_MODELS.items():
        try:
            report["train_images_per_s"][backbone] = round(train_throughput(study, name, manifest, work / "runs", steps), 2)
            rate = attack_throughput(study, work / "runs" / name, manifest, patches=32 if device.type == "cuda" else 2,
                                     steps=10 if device.type == "cuda" else 2)
            report["attack_images_per_s"][backbone] = round(rate, 2)
            # `hsat plan --bench` reads these (hsat.plan.throughputs_from_bench): fp32 crafting passes.
            report["entries"].append({"backbone": backbone, "effective_precision": "fp32", "eval_patches_per_s": rate,
                                      "image_size": run_config_for_model(study, name)["data"]["image_size"]})
        except Exception as exc:  # one backbone's failure is reported; the others still run
            failures.append(f"{backbone}: {type(exc).__name__}: {exc}")
        print(f"gpu_check: {backbone} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    ddp_study = dict(study, pretrain={**study["pretrain"], "compile": False})
    study_path = work / "study.yaml"
    study_path.write_text(yaml.safe_dump(ddp_study))
    report["ddp"] = ddp_run(study_path, "hsat_resnet50", manifest, work / "ddp")
    report["oom_backoff"] = oom_backoff(device)
    if not args.skip_dag:
        dag = _resolved(rehearsal_study(args.device, DAG_MODELS, root=str(root)))
        report["dag"] = run_dag(work / "workflow", dag, cores=os.cpu_count() or 2)
    failures += [k for k in ("ddp", "oom_backoff", "dag") if k in report and not report[k]["ok"]]
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["failures"] = failures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    print(json.dumps(report, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
