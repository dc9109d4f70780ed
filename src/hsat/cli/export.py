"""`hsat export`: a trained encoder's backbone as a plain timm safetensors checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

LOADING = """\
load it with timm alone (no network; the file's metadata says how to rebuild and feed it):
  import json, timm
  from safetensors import safe_open
  with safe_open(path, "pt") as f:
      meta = f.metadata()
  cfg = json.loads(meta["pretrained_cfg"])
  model = timm.create_model(meta["timm_model"], pretrained=True, num_classes=0,
                            pretrained_cfg_overlay=dict(cfg, file=path),
                            **json.loads(meta["model_kwargs"])).eval()
  data_cfg = timm.data.resolve_data_config({}, model=model)

preprocessing: the hsat model normalised inside itself; the timm model does not. Feed it
(x - mean) / std with x in [0, 1] and mean/std from cfg (also in data_cfg); then model(...)
equals the hsat model's encode(x). Crop patches to input_size at native resolution
(hsat resizes only smaller images). Without the cfg in the overlay, timm keeps the registry's
ImageNet mean/std and 224 px input size, which are not this encoder's.

example: hsat export --run runs/hsat --out exports/hsat-resnet50.safetensors"""


def _export(args: argparse.Namespace) -> int:
    from hsat.export import encoder_metadata, export_encoder

    out = export_encoder(args.run, args.out)
    meta = encoder_metadata(out)
    print(f"hsat export: {meta['method']} encoder ({meta['timm_model']}, "
          f"{meta['pretrained_cfg']['input_size'][-1]} px) -> {out}")
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a trained backbone as a timm-loadable .safetensors file",
        description="Write RUN_DIR's backbone alone (no projection head) as a timm state dict in "
        "safetensors, keys as timm.create_model(NAME, num_classes=0) expects them, with metadata: "
        "timm_model, model_kwargs (e.g. img_size for ViTs), pretrained_cfg (mean, std, input_size, "
        "crop and interpolation, num_classes 0), hsat_version and method.",
        epilog=LOADING,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, help="a finished `hsat pretrain` run directory")
    p.add_argument("--out", type=Path, required=True,
                   help="output file, ending in .safetensors (missing folders are created; an existing file is replaced)")
    p.set_defaults(func=_export)
