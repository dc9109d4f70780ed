"""Encoder = timm backbone + MLP projection head, with input normalisation inside the model.

Inputs stay in [0, 1] pixel space (attacks and their eps-balls live there); the per-channel
mean/std of the backbone's pretraining recipe is applied in `encode`. Any timm model
works, CNN or ViT, because only timm's uniform face is used (`create_model(num_classes=0)`
returns pooled pre-logits features of width `num_features`).
`HSATModel.encode` / `project` / `logits` are named apart from timm's `forward_features` (the
unpooled map) and `forward_head`, so a timm model and an hsat model can never be confused.

ImageNet initialisation never downloads: weights come from a local file (`pretrained_path`) or
from a file already in the Hugging Face / torch hub cache, else `HSATError` at once. A backbone
that is not a timm model comes from the user's own code (`model.factory`, `backbone_from_factory`).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import timm
import timm.models
import torch
import torch.hub
import torch.nn.functional as F
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.fx.experimental.optimization import fuse

from hsat.config import read_yaml
from hsat.errors import HSATError
from hsat.io import atomic_path
from hsat.methods import METHODS
from hsat.methods.dino import DINOHead
from hsat.methods.hlss import HLSSHead
from hsat.precision import effective_precision

_log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Prefixes that wrappers add to state_dict keys: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class HSATModel(nn.Module):
    """Backbone features (for kNN / linear evaluation) and an L2-normalised projection (for the loss)."""

    def __init__(
        self,
        backbone: nn.Module,
        head_hidden: Sequence[int] = (512,),
        embed_dim: int = 128,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_classes: int | None = None,
        dino_head: Mapping[str, int] | None = None,
        hlss_head: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features = int(backbone.num_features)
        if dino_head:
            # DINO's head: prototype scores, not a unit-norm embedding (hsat.methods.dino).
            self.head = DINOHead(self.num_features, int(dino_head["out_dim"]), int(dino_head["hidden_dim"]),
                                 int(dino_head["bottleneck_dim"]), int(dino_head["nlayers"]))
            self.embed_dim = int(dino_head["out_dim"])
            self.normalize_head = False
        elif hlss_head:
            # HLSS: a projection into the text space and per-level attribute scores (hsat.methods.hlss).
            self.head = HLSSHead(self.num_features, head_hidden, int(hlss_head["text_dim"]), hlss_head["attributes"],
                                 bool(hlss_head.get("trainable_heads", True)))
            self.embed_dim = int(hlss_head["text_dim"])
            self.normalize_head = False  # its forward is already unit-norm
        else:
            self.head = projection_head(self.num_features, head_hidden, embed_dim)
            self.embed_dim = int(embed_dim)
            self.normalize_head = True
        # The supervised methods' own classification head (a classifier of the evaluation, `head`).
        self.classifier = nn.Linear(self.num_features, int(num_classes)) if num_classes else None
        # Persistent buffers: a saved model carries the normalisation it was trained with.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, num_features) pooled backbone features."""
        return self.backbone((x - self.mean) / self.std)

    def project(self, f: torch.Tensor) -> torch.Tensor:
        """(N, num_features) -> (N, embed_dim): the L2-normalised contrastive embedding, or with a
        DINO head its prototype scores."""
        out = self.head(f)
        return F.normalize(out, dim=-1) if self.normalize_head else out

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        """(N, num_features) -> (N, num_classes) logits of the classification head."""
        if self.classifier is None:
            raise HSATError("this model has no classification head (model.num_classes is null)")
        return self.classifier(f)

    def forward(self, x: torch.Tensor, output: str = "embedding") -> torch.Tensor:
        """The contrastive embedding (`output="embedding"`), the classification logits ("logits"),
        or with an HLSS head its text-space representation and attribute scores ("hlss")."""
        f = self.encode(x)
        if output == "logits":
            return self.logits(f)
        if output == "hlss":
            if not hasattr(self.head, "forward_all"):
                raise HSATError("this model has no HLSS head (output='hlss')")
            return self.head.forward_all(f)
        return self.project(f)


def projection_head(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """MLP as in HiDisc/SimCLR: [Linear -> ReLU] per hidden width, then Linear to the embedding.

    No batch norm in the head, so it behaves the same at any batch size and needs no syncing.
    """
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True)]
        width = int(h)
    layers.append(nn.Linear(width, int(out_features)))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# building


def build_model(
    backbone: str,
    pretrained: bool = False,
    pretrained_path: str | os.PathLike | None = None,
    head_hidden: Sequence[int] = (512,),
    embed_dim: int = 128,
    image_size: int | None = None,
    num_classes: int | None = None,
    backbone_args: Mapping[str, Any] | None = None,
    dino_head: Mapping[str, int] | None = None,
    hlss_head: Mapping[str, Any] | None = None,
    factory: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> HSATModel:
    """Build the encoder around any timm backbone name (CNN or ViT), or around the module that
    the user's own `factory` ("package.module:function", `backbone_args` its keywords) returns.

    `backbone_args` go to `timm.create_model` (e.g. `{patch_size: 4}` for a ViT on 32 px crops);
    `dino_head` (out_dim, hidden_dim, bottleneck_dim, nlayers) replaces the projection head by
    DINO's; `hlss_head` (text_dim, attributes per level, trainable_heads) by HLSS's.

    `pretrained_path` (a .safetensors or .pth state dict) implies ImageNet-style initialisation
    from that file; `pretrained=True` alone looks for the timm weights in the local Hugging Face
    and torch hub caches. `image_size` is passed to backbones that take `img_size` (ViTs) so
    their patch grid and position embeddings match the training crops. `mean` / `std` replace
    the architecture's input normalisation (an encoder's own preprocessing).
    """
    if mean is not None and std is not None and len(mean) != len(std):
        raise HSATError(f"model.mean {list(mean)} and model.std {list(std)}: one value per input channel each")
    if factory:
        net = backbone_from_factory(factory, backbone_args or {}, image_size)
        if pretrained_path is not None:
            load_backbone_weights(net, _weights_file(pretrained_path))
        return HSATModel(net, head_hidden=head_hidden, embed_dim=embed_dim, mean=tuple(mean or IMAGENET_MEAN),
                         std=tuple(std or IMAGENET_STD), num_classes=num_classes, dino_head=dino_head,
                         hlss_head=hlss_head)
    if backbone.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise HSATError(
            f"model.backbone {backbone!r}: hub/local-dir model names are not supported (they may "
            "download); use a timm architecture name and model.pretrained_path for the weights"
        )
    if not timm.is_model(backbone):
        close = difflib.get_close_matches(backbone, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; close timm names: {', '.join(close)}" if close else ""
        raise HSATError(f"model.backbone {backbone!r} is not a timm model name{hint}")

    weights: Path | None = None
    if pretrained_path is not None:
        weights = _weights_file(pretrained_path)
    elif pretrained:
        weights = _find_cached_weights(backbone)

    with _hub_offline():
        net = _create_backbone(backbone, image_size, {**(backbone_args or {}), "num_classes": 0, "pretrained": False})
    if weights is not None:
        load_backbone_weights(net, weights)

    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean = tuple(mean or cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(std or cfg.get("std") or IMAGENET_STD)
    return HSATModel(net, head_hidden=head_hidden, embed_dim=embed_dim, mean=mean, std=std, num_classes=num_classes,
                     dino_head=dino_head, hlss_head=hlss_head)


def _weights_file(pretrained_path: str | os.PathLike) -> Path:
    """The local weights file model.pretrained_path names, checked before anything is built."""
    weights = Path(pretrained_path)
    if not weights.is_file():
        raise HSATError(f"model.pretrained_path: weights file not found: {weights}")
    if weights.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise HSATError(f"model.pretrained_path {weights}: expected a .safetensors or .pth state dict")
    return weights


def backbone_from_factory(spec: str, kwargs: Mapping[str, Any], image_size: int | None = None) -> nn.Module:
    """The backbone that the user's own code builds: `spec` "package.module:function" is imported
    as any Python import (it runs that code, which the user installed and trusts; nothing is
    downloaded here) and called with `kwargs`. It must return an nn.Module whose forward maps
    (N, C, H, W) to (N, D) features; D is its `num_features`, else measured on one zero image
    (3 channels, `image_size` px)."""
    module_name, _, attr = str(spec).partition(":")
    if not module_name or not attr:
        raise HSATError(f"model.factory {spec!r}: expected \"package.module:function\"")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception as exc:  # ImportError, AttributeError, or any error the module raises on import
        raise HSATError(f"model.factory {spec!r}: cannot import it: {type(exc).__name__}: {exc}") from exc
    if not callable(target):
        raise HSATError(f"model.factory {spec!r}: {attr} is not callable")
    try:
        net = target(**dict(kwargs))
    except Exception as exc:  # the user's code failed, or was given keywords it does not take
        raise HSATError(f"model.factory {spec!r}: calling it with model.backbone_args {dict(kwargs)} failed: "
                        f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(net, nn.Module):
        raise HSATError(f"model.factory {spec!r} returned a {type(net).__name__}, not a torch nn.Module")
    if not isinstance(getattr(net, "num_features", None), int):
        side = int(image_size or 224)
        was_training = net.training
        try:
            with torch.no_grad():
                out = net.eval()(torch.zeros(1, 3, side, side))
        except Exception as exc:
            raise HSATError(f"model.factory {spec!r}: its module has no integer num_features and a forward of one "
                            f"3 x {side} x {side} image failed: {type(exc).__name__}: {exc}") from exc
        finally:
            net.train(was_training)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise HSATError(f"model.factory {spec!r}: its forward must give (N, D) features, gave {shape}")
        net.num_features = int(out.shape[1])
    return net


def load_backbone_weights(net: nn.Module, path: Path) -> None:
    """Load a timm-style state dict (classifier keys dropped) into a headless backbone, strictly.

    Reads with timm (safetensors, or torch.load(weights_only=True): no pickled code runs) and
    applies the architecture's own `checkpoint_filter_fn` when it has one (e.g. ViT position
    embeddings resampled to a new image size). Every backbone parameter must be present.
    """
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
        filter_fn = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, net)
        classifiers = (getattr(net, "pretrained_cfg", None) or {}).get("classifier") or ()
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifiers)}
        result = net.load_state_dict(state, strict=False)
    except HSATError:
        raise
    except Exception as exc:  # unpickling refusals, bad files, shape mismatches
        raise HSATError(f"could not load backbone weights from {path}: {type(exc).__name__}: {exc}") from exc
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:5])
        raise HSATError(
            f"{path} does not hold weights for this backbone: {len(result.missing_keys)} missing keys "
            f"(e.g. {shown})"
        )
    if result.unexpected_keys:
        _log.warning("%s: ignored %d unexpected keys (e.g. %s)", path, len(result.unexpected_keys),
                     ", ".join(result.unexpected_keys[:5]))


def _create_backbone(name: str, image_size: int | None, kwargs: dict[str, Any]) -> nn.Module:
    if kwargs.get("dynamic_img_size") == "if_supported":
        # Local crops of another size (DINO): ViTs then interpolate their position embeddings;
        # CNNs take any size anyway and do not know the argument.
        kwargs = {k: v for k, v in kwargs.items() if k != "dynamic_img_size"}
        try:
            return _create_backbone(name, image_size, {**kwargs, "dynamic_img_size": True})
        except TypeError as exc:
            if "dynamic_img_size" not in str(exc):
                raise
    if image_size is not None:
        try:
            return timm.create_model(name, img_size=int(image_size), **kwargs)
        except TypeError as exc:  # CNNs take any input size and have no img_size argument
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, **kwargs)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Belt and braces: Hugging Face libraries read HF_HUB_OFFLINE; nothing may download."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "huggingface" / "hub"


def _find_cached_weights(backbone: str) -> Path:
    """Locate timm's ImageNet weights for `backbone` on disk, or explain how to provide them."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise HSATError(f"timm has no pretrained weights for {backbone!r}; set model.pretrained=false")
    looked: list[str] = []
    cache = hf_cache_dir()
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=cache, revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
            looked.append(f"{cache}/models--{repo.replace('/', '--')}/snapshots/*/{name}")
    if cfg.url and cfg.url.endswith((".pth", ".safetensors")):
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if candidate.is_file():
            return candidate
        looked.append(str(candidate))
    hint = f"`hf download {cfg.hf_hub_id.partition('@')[0]}`" if cfg.hf_hub_id else f"download {cfg.url}"
    raise HSATError(
        f"ImageNet weights for {backbone!r} are not available locally (nothing is downloaded at run "
        f"time); looked for: {'; '.join(looked)}. Provide them by setting model.pretrained_path to a "
        f".safetensors/.pth state dict, or fill the Hugging Face cache (HF_HOME / HF_HUB_CACHE) on a "
        f"machine with network, e.g. {hint}; or set model.pretrained=false"
    )


DINO_HEAD_DEFAULTS: dict[str, int] = {"out_dim": 1024, "hidden_dim": 256, "bottleneck_dim": 64, "nlayers": 3}
"""The default study's DINO head (the paper's scale: 65,536 prototypes, 2048 hidden, 256 bottleneck),
as the schema's `method.dino` defaults; read here for configs validated before those keys."""


def method_family(name: str) -> str:
    """The family of a registered method name ("" for an unknown one)."""
    entry = METHODS.get(str(name))
    return str(entry.defaults.get("family", "")) if entry else ""


def model_from_config(cfg: Mapping[str, Any]) -> HSATModel:
    """Build the encoder of a resolved run config (`model` section and `data.image_size`)."""
    m = dict(cfg.get("model") or {})
    data = cfg.get("data") or {}
    method = cfg.get("method") or {}
    backbone_args = dict(m.get("backbone_args") or {})
    local = data.get("local_crops") or {}
    if local.get("number") and int(local.get("size", 0)) != int(data.get("image_size") or 0) and not m.get("factory"):
        backbone_args.setdefault("dynamic_img_size", "if_supported")
    dino = None
    if method_family(method.get("name", "")) == "dino":
        d = {**DINO_HEAD_DEFAULTS, **(method.get("dino") or {})}
        dino = {k: d[k] for k in DINO_HEAD_DEFAULTS}
    hlss = None
    if method_family(method.get("name", "")) == "hlss":
        h = method.get("hlss") or {}
        if not h.get("text_dim") or not h.get("attributes"):
            raise HSATError("method.hlss: text_dim and attributes are not set (hsat pretrain sets them "
                            "from method.hlss.text_embeddings)")
        hlss = {"text_dim": h["text_dim"], "attributes": h["attributes"], "trainable_heads": h.get("trainable_heads", True)}
    return build_model(
        backbone=m.get("backbone", "resnet10t"),
        pretrained=bool(m.get("pretrained", False)),
        pretrained_path=m.get("pretrained_path"),
        head_hidden=tuple(m.get("head_hidden", (512,))),
        embed_dim=int(m.get("embed_dim", 128)),
        image_size=data.get("image_size"),
        num_classes=m.get("num_classes"),
        backbone_args=backbone_args,
        dino_head=dino,
        hlss_head=hlss,
        factory=m.get("factory"),
        mean=m.get("mean"),
        std=m.get("std"),
    )


# ---------------------------------------------------------------------------------------------
# saving and loading


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip `module.` / `_orig_mod.` prefixes (any order, any depth at the front)."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the unwrapped model's state dict as safetensors, atomically (loading runs no code)."""
    state = clean_state_dict(unwrap(model).state_dict())
    # Clone so that tied/shared tensors become independent (safetensors refuses shared storage).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def fold_batch_norm(model: HSATModel) -> HSATModel:
    """The model for evaluation only: each batch norm that follows a convolution folded into the
    convolution's weights (torch.fx), the same function up to float rounding and ~15 % faster
    per attack step on a CPU. A backbone that cannot be traced, or has no batch norm, is kept."""
    if model.training or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.backbone.modules()):
        return model
    try:
        model.backbone = fuse(model.backbone)
    except Exception as exc:  # noqa: BLE001 - any tracing failure keeps the unfused, equivalent backbone
        _log.debug("batch norm not folded (%s): %s", type(model.backbone).__name__, exc)
    return model


def choose_attention_kernel(model: nn.Module, device: str | torch.device, precision: str) -> int:
    """Set every timm attention module's kernel for where and how the model will run.

    On the CPU under bf16 autocast the explicit softmax(QK^T)V is 1.3-2x faster forward+backward
    than PyTorch's fused CPU flash kernel (ViT-Tiny/Small, 17-197 tokens; docs/performance.md);
    in fp32 and on GPUs the fused kernel is kept. Both compute the same function. Returns how many
    modules were set (0 for CNNs)."""
    device = torch.device(device)
    fused = not (device.type == "cpu" and effective_precision(precision, device) == "bf16")
    n = 0
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = fused
            n += 1
    return n


def load_trained_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
                       fold_bn: bool = False, precision: str = "fp32") -> HSATModel:
    """Rebuild a trained encoder from RUN_DIR/config.yaml and RUN_DIR/model.safetensors (eval mode).

    `fold_bn`: fold batch norms into the convolutions (`fold_batch_norm`), for evaluation only;
    `precision`: the precision its attacks run in (picks the attention kernel)."""
    run_dir = Path(run_dir)
    cfg_path, weights_path = run_dir / "config.yaml", run_dir / "model.safetensors"
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise HSATError(f"run directory {run_dir}: missing {p.name} (is this a finished `hsat pretrain` run?)")
    cfg = read_yaml(cfg_path)
    # Architecture only: the trained weights replace any initialisation, so nothing is fetched.
    model_cfg = dict(cfg.get("model") or {})
    model_cfg.update(pretrained=False, pretrained_path=None)
    model = model_from_config({**cfg, "model": model_cfg})
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise HSATError(f"{weights_path}: not a readable safetensors file: {exc}") from exc
    try:
        model.load_state_dict(clean_state_dict(state), strict=True)
    except RuntimeError as exc:
        raise HSATError(
            f"{weights_path} does not match the model described by {cfg_path} "
            f"(backbone {model_cfg.get('backbone')!r}): {exc}"
        ) from exc
    model = model.to(device).eval()
    if fold_bn:
        model = fold_batch_norm(model)
    choose_attention_kernel(model, device, precision)
    # Evaluation runs the model in the memory format it was trained in (faster convolutions).
    return model.to(memory_format=torch.channels_last) if cfg.get("channels_last") else model
