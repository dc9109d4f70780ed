"""Natural-shift robustness: stain, blur, compression, intensity and noise shifts at named
severities, an adversarial stain, and the sweep that scores them like the white-box sweep.

What keeps the numbers honest and cheap:
- A shift family is a plain function of an image batch in [0, 1] (B, 3, H, W) and one strength;
  `SHIFTS` names each family's five strengths (severities 1-5). Severity 0 is the identity, so
  its accuracy must equal the clean accuracy exactly (a check that fails when a shift leaks).
- Random parameters are drawn per example from a generator seeded by (family, severity, dataset
  position, seed): a patch gets the same shift whatever its batch or the other families.
- The adversarial stain is PGD on the bounded parameters of a stain shift (HED scales and
  offsets for RGB, the two raw channels' gains and offsets for SRH), maximising the linear
  probe's cross-entropy. It starts at the random stain of the same patch and keeps, per patch,
  the worst iterate it saw, so it never finds less than that random stain does.
- Shifts run on the attacked subset of the white-box sweep: one forward pass per (family,
  severity), `shift.adversarial_steps` more for the adversarial stain.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from hsat.config import resolve_evaluation
from hsat.errors import HSATError
from hsat.evaluate.classifiers import classify
from hsat.evaluate.embeddings import loader
from hsat.evaluate.metrics import LEVELS_EVAL, binomial_se
from hsat.evaluate.sweep import metric_rows
from hsat.evaluate.worst_case import WORST_CASE, WORST_CASE_OBJECTIVE, mean_class_accuracy, worst_case_correct

SHIFT_COLUMNS: tuple[str, ...] = (
    "model", "method", "group", "seed", "attack", "severity", "steps", "objective",
    "classifier", "level", "acc", "mca", "top2", "top3", "map",
)
"""`whitebox.csv`'s columns with `severity` (0-5) for `eps`; `attack` is the shift family."""

IMAGE_KINDS: tuple[str, ...] = ("rgb", "srh")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
ADVERSARIAL_OBJECTIVE = "linear_ce"

# ----------------------------------------------------------------------------- HED colour space

RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
"""Ruifrok & Johnston's haematoxylin, eosin and DAB optical densities (rows), as skimage.color."""
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_LOG_ADJUST = math.log(1e-6)  # skimage's floor: optical density in units of -log(1e-6)


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> stain concentrations (skimage.color.rgb2hed, without its
    clamp at zero, so `hed_to_rgb` inverts it exactly); differentiable."""
    od = torch.log(x.clamp_min(1e-6)) / _LOG_ADJUST
    return torch.einsum("bchw,cd->bdhw", od, HED_FROM_RGB.to(x.device, x.dtype))


def hed_to_rgb(stains: torch.Tensor) -> torch.Tensor:
    """Stain concentrations -> RGB in [0, 1] (skimage.color.hed2rgb); differentiable."""
    log_rgb = torch.einsum("bdhw,dc->bchw", stains * _LOG_ADJUST, RGB_FROM_HED.to(stains.device, stains.dtype))
    return torch.exp(log_rgb).clamp(0.0, 1.0)


def hed_stain_transform(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Each image's H, E and D concentrations times `scale` plus `offset` (each (B, 3)): the stain
    augmentation of Tellez et al. (2018), here also the adversarial stain's parametrisation."""
    stains = rgb_to_hed(x) * scale[:, :, None, None] + offset[:, :, None, None]
    return hed_to_rgb(stains)


def srh_channel_transform(x: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """SRH images as `hsat.data.srh.srh_to_rgb` builds them, (CH3 - CH2 + base, CH2, CH3), with
    each raw channel (CH2, CH3) times `gain` plus `offset` (each (B, 2)); the difference channel
    follows, so the image stays one the conversion could have produced (up to clamping)."""
    raw = x[:, 1:3]
    new = raw * gain[:, :, None, None] + offset[:, :, None, None]
    delta = new - raw
    diff = x[:, :1] + delta[:, 1:2] - delta[:, :1]
    return torch.cat([diff, new], 1).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- the families


def example_generators(family: str, severity: int, positions: Sequence[int], seed: int = 0) -> list[torch.Generator]:
    """One CPU generator per example, seeded by (family, severity, dataset position, seed)."""
    gens = []
    for p in positions:
        g = torch.Generator()
        g.manual_seed(zlib.crc32(repr((family, int(severity), int(p), int(seed))).encode()))
        gens.append(g)
    return gens


def _uniform(gens: Sequence[torch.Generator], n: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
    u = torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in gens])
    return (low + (high - low) * u).to(like.device, like.dtype)


def _signs(gens: Sequence[torch.Generator]) -> list[float]:
    return [1.0 if torch.rand(1, generator=g).item() < 0.5 else -1.0 for g in gens]


def hed_stain(x: torch.Tensor, sigma: float, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Random HED stain: scales in [1 - sigma, 1 + sigma], offsets in [-sigma, sigma] per stain."""
    return hed_stain_transform(x, _uniform(gens, 3, 1 - sigma, 1 + sigma, x), _uniform(gens, 3, -sigma, sigma, x))


def channel_gain(x: torch.Tensor, sigma: float, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """SRH: each raw channel's gain in [1 - sigma, 1 + sigma] (laser power, detector gain)."""
    return srh_channel_transform(x, _uniform(gens, 2, 1 - sigma, 1 + sigma, x), torch.zeros(len(gens), 2, dtype=x.dtype, device=x.device))


def channel_offset(x: torch.Tensor, sigma: float, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """SRH: each raw channel's offset in [-sigma, sigma] (background, dark level)."""
    return srh_channel_transform(x, torch.ones(len(gens), 2, dtype=x.dtype, device=x.device), _uniform(gens, 2, -sigma, sigma, x))


def _odd_kernel(radius: int, x: torch.Tensor) -> int:
    """2 * radius + 1, capped so reflect padding fits the image."""
    return 2 * min(int(radius), min(x.shape[-2:]) - 1) + 1


def gaussian_blur(x: torch.Tensor, sigma: float, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Gaussian blur of standard deviation `sigma` pixels (out of focus, a soft scanner)."""
    k = _odd_kernel(math.ceil(3 * sigma), x)
    return TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])


def defocus_blur(x: torch.Tensor, radius: float, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Disc (defocus) blur of `radius` pixels, as ImageNet-C's defocus blur, reflect-padded."""
    k = _odd_kernel(math.ceil(radius), x)
    r = k // 2
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    disc = ((yy**2 + xx**2) <= radius**2).to(x.dtype)
    disc = (disc / disc.sum()).to(x.device).expand(x.shape[1], 1, k, k)
    return F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), disc, groups=x.shape[1]).clamp(0.0, 1.0)


def jpeg(x: torch.Tensor, quality: float, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """JPEG compression at `quality` (torchvision's libjpeg), after 8-bit quantisation."""
    u8 = (x.detach().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
    decoded = decode_jpeg(encode_jpeg(list(u8), quality=int(quality)))
    return torch.stack(decoded).to(x.device, x.dtype) / 255.0


def brightness(x: torch.Tensor, delta: float, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Brightness factor 1 + delta or 1 - delta (the sign drawn per example)."""
    return torch.stack([TF.adjust_brightness(xi, 1 + s * delta) for xi, s in zip(x, _signs(gens))])


def contrast(x: torch.Tensor, delta: float, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Contrast factor 1 + delta or 1 - delta (the sign drawn per example)."""
    return torch.stack([TF.adjust_contrast(xi, 1 + s * delta) for xi, s in zip(x, _signs(gens))])


def gamma(x: torch.Tensor, delta: float, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Gamma exp(delta) or exp(-delta) (the sign drawn per example)."""
    return torch.stack([TF.adjust_gamma(xi, math.exp(s * delta)) for xi, s in zip(x, _signs(gens))])


def gaussian_noise(x: torch.Tensor, std: float, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Additive Gaussian noise of standard deviation `std` (detector and shot noise), clamped."""
    noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device, x.dtype)
    return (x + std * noise).clamp(0.0, 1.0)


@dataclass(frozen=True)
class ShiftFamily:
    """A shift: fn(x, strength, per-example generators) and the strengths of severities 1-5."""

    fn: Callable[[torch.Tensor, float, Sequence[torch.Generator]], torch.Tensor]
    strengths: tuple[float, ...]
    unit: str


SHIFTS: dict[str, ShiftFamily] = {
    "hed_stain": ShiftFamily(hed_stain, (0.01, 0.02, 0.04, 0.07, 0.1), "HED scale and offset bound"),
    "channel_gain": ShiftFamily(channel_gain, (0.05, 0.1, 0.2, 0.3, 0.4), "relative gain bound per raw channel"),
    "channel_offset": ShiftFamily(channel_offset, (0.01, 0.02, 0.04, 0.06, 0.08), "offset bound per raw channel"),
    "gaussian_blur": ShiftFamily(gaussian_blur, (0.5, 1.0, 1.5, 2.0, 3.0), "sigma, pixels"),
    "defocus_blur": ShiftFamily(defocus_blur, (1.0, 1.5, 2.0, 3.0, 4.0), "disc radius, pixels"),
    "jpeg": ShiftFamily(jpeg, (80, 60, 40, 20, 10), "JPEG quality"),
    "brightness": ShiftFamily(brightness, (0.1, 0.2, 0.3, 0.4, 0.5), "factor 1 +- delta"),
    "contrast": ShiftFamily(contrast, (0.1, 0.2, 0.3, 0.4, 0.5), "factor 1 +- delta"),
    "gamma": ShiftFamily(gamma, (0.1, 0.2, 0.3, 0.5, 0.7), "gamma exp(+-delta)"),
    "gaussian_noise": ShiftFamily(gaussian_noise, (0.02, 0.04, 0.06, 0.08, 0.1), "standard deviation"),
}
"""Every shift family by name; severity s uses strengths[s - 1]."""

ADVERSARIAL_STAIN = "adversarial_stain"
DEFAULT_FAMILIES: dict[str, tuple[str, ...]] = {
    "rgb": ("hed_stain", "gaussian_blur", "defocus_blur", "jpeg", "brightness", "contrast", "gamma", "gaussian_noise",
            ADVERSARIAL_STAIN),
    "srh": ("channel_gain", "channel_offset", "gaussian_blur", "defocus_blur", "jpeg", "gaussian_noise", ADVERSARIAL_STAIN),
}
"""The families of each image kind; the stain families of one kind make no sense on the other."""
STAIN_FAMILY = {"rgb": ("hed_stain",), "srh": ("channel_gain", "channel_offset")}
"""The random stain families whose bounds the adversarial stain of each kind shares."""


def apply_shift(family: str, x: torch.Tensor, severity: int, positions: Sequence[int], seed: int = 0) -> torch.Tensor:
    """`x` under a random shift `family` at `severity` (0: `x` itself), each example's parameters
    drawn from its own seeded generator (`positions`: the examples' dataset positions)."""
    if family not in SHIFTS:
        raise HSATError(f"unknown shift family {family!r} ({', '.join(SHIFTS)})")
    if severity == 0:
        return x
    if severity not in SEVERITIES:
        raise HSATError(f"shift severity {severity!r} is not one of 0, {', '.join(map(str, SEVERITIES))}")
    if len(positions) != x.shape[0]:
        raise HSATError(f"shift {family}: {len(positions)} positions for a batch of {x.shape[0]}")
    fam = SHIFTS[family]
    return fam.fn(x, fam.strengths[severity - 1], example_generators(family, severity, positions, seed))


# ----------------------------------------------------------------------------- adversarial stain


def stain_bounds(kind: str, severity: int) -> tuple[float, float]:
    """(scale or gain bound, offset bound) of the adversarial stain at `severity`: those of the
    kind's random stain families, so the two are compared at the same bound."""
    if kind == "rgb":
        s = SHIFTS["hed_stain"].strengths[severity - 1]
        return s, s
    return SHIFTS["channel_gain"].strengths[severity - 1], SHIFTS["channel_offset"].strengths[severity - 1]


def stain_start(kind: str, x: torch.Tensor, severity: int, positions: Sequence[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The random stain parameters `apply_shift` draws for these examples: PGD's start."""
    if kind == "rgb":
        s = SHIFTS["hed_stain"].strengths[severity - 1]
        gens = example_generators("hed_stain", severity, positions, seed)
        return _uniform(gens, 3, 1 - s, 1 + s, x), _uniform(gens, 3, -s, s, x)
    g_bound, o_bound = stain_bounds(kind, severity)
    gain = _uniform(example_generators("channel_gain", severity, positions, seed), 2, 1 - g_bound, 1 + g_bound, x)
    offset = _uniform(example_generators("channel_offset", severity, positions, seed), 2, -o_bound, o_bound, x)
    return gain, offset


def adversarial_stain(
    x: torch.Tensor,
    y: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    kind: str,
    severity: int,
    positions: Sequence[int],
    steps: int,
    seed: int = 0,
) -> torch.Tensor:
    """The stain within the bounds of `severity` that maximises the cross-entropy of
    `logits_fn` (image -> logits; the model frozen): signed-gradient ascent on the scale/gain and
    offset from the random stain of each example, step 2.5 x bound / steps, keeping per example
    the worst iterate (misclassified first, then the highest loss)."""
    if severity == 0:
        return x
    transform = hed_stain_transform if kind == "rgb" else srh_channel_transform
    s_bound, o_bound = stain_bounds(kind, severity)
    scale, offset = stain_start(kind, x, severity, positions, seed)
    best = x.detach().clone()
    best_key = torch.full((x.shape[0],), -math.inf, device=x.device)
    for step in range(steps + 1):
        scale = scale.detach().requires_grad_(True)
        offset = offset.detach().requires_grad_(True)
        with torch.enable_grad():
            xs = transform(x, scale, offset)
            logits = logits_fn(xs)
            loss = F.cross_entropy(logits, y, reduction="none")
            if step < steps:
                g_scale, g_offset = torch.autograd.grad(loss.sum(), [scale, offset])
        with torch.no_grad():
            wrong = (logits.argmax(1) != y).float()
            key = wrong * 1e6 + loss.detach().clamp(max=1e5)  # misclassified first, then the loss
            better = key > best_key
            best[better] = xs.detach()[better]
            best_key = torch.where(better, key, best_key)
            if step < steps:
                scale = (scale + 2.5 * s_bound / steps * g_scale.sign()).clamp(1 - s_bound, 1 + s_bound)
                offset = (offset + 2.5 * o_bound / steps * g_offset.sign()).clamp(-o_bound, o_bound)
    return best


# ----------------------------------------------------------------------------- the sweep


@dataclass
class ShiftResults:
    """Patch-level class scores, clean and under each (family, severity), of the same patches."""

    labels: np.ndarray
    patients: list[str]
    slides: list[str]
    clean: dict[str, np.ndarray]
    shifted: dict[tuple[str, int], dict[str, np.ndarray]]


def shift_families(kind: str, families: Sequence[str] = ()) -> list[str]:
    """The families to run: `families`, or (empty) the defaults of the image `kind`."""
    if kind not in IMAGE_KINDS:
        raise HSATError(f"evaluation.shift.image_kind: {kind!r} is not one of {', '.join(IMAGE_KINDS)}")
    chosen = list(families) or list(DEFAULT_FAMILIES[kind])
    for f in chosen:
        if f != ADVERSARIAL_STAIN and f not in SHIFTS:
            raise HSATError(f"evaluation.shift.families: unknown family {f!r} ({', '.join([*SHIFTS, ADVERSARIAL_STAIN])})")
    return chosen


def run_shifts(
    model: nn.Module,
    probe: nn.Module,
    bank: tuple[torch.Tensor, torch.Tensor] | None,
    dataset: Dataset,
    families: Sequence[str],
    severities: Sequence[int],
    kind: str,
    classifiers: Sequence[str],
    knn: Mapping[str, Any],
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 128,
    adversarial_steps: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ShiftResults:
    """Score every (family, severity) of every batch with every classifier; each batch is read
    and its clean features computed once."""
    device = torch.device(device)
    num_classes = probe.num_classes
    head = getattr(model, "classifier", None) if "head" in classifiers else None
    probe = probe.to(device)
    if bank is not None:
        bank = (bank[0].to(device), bank[1].to(device))
    conditions = [(f, int(s)) for f in families for s in severities]
    clean: dict[str, list] = {c: [] for c in classifiers}
    shifted: dict[tuple[str, int], dict[str, list]] = {cond: {c: [] for c in classifiers} for cond in conditions}
    labels, patients, slides = [], [], []
    positions_all = list(indices) if indices is not None else list(range(len(dataset)))
    seen = 0
    modes = [m.training for m in (model, probe)]
    model.eval()
    probe.eval()
    try:
        for batch in tqdm(loader(dataset, batch_size, indices), desc="shift", disable=not progress, leave=False):
            x = batch["image"].to(device)
            y = torch.as_tensor(batch["label"]).long().to(device)
            pos = positions_all[seen : seen + x.shape[0]]
            seen += x.shape[0]
            labels.append(y.cpu())
            patients.extend(str(p) for p in batch["patient"])
            slides.extend(str(s) for s in batch["slide"])
            with torch.no_grad():
                f_clean = model.encode(x)
            for c, s in classify(f_clean, probe, bank, classifiers, num_classes, knn, head).items():
                clean[c].append(s)
            for family, severity in conditions:
                if family == ADVERSARIAL_STAIN:
                    xs = adversarial_stain(x, y, lambda xa: probe(model.encode(xa)), kind, severity, pos,
                                           adversarial_steps, seed)
                else:
                    xs = apply_shift(family, x, severity, pos, seed)
                with torch.no_grad():
                    f = model.encode(xs)
                for c, s in classify(f, probe, bank, classifiers, num_classes, knn, head).items():
                    shifted[(family, severity)][c].append(s)
    finally:
        for m, mode in zip((model, probe), modes):
            m.train(mode)
    if not labels:
        raise HSATError("shift: no validation patches to shift")
    return ShiftResults(
        labels=torch.cat(labels).numpy(), patients=patients, slides=slides,
        clean={c: torch.cat(v).numpy() for c, v in clean.items()},
        shifted={k: {c: torch.cat(v).numpy() for c, v in d.items()} for k, d in shifted.items()},
    )


def shift_worst_case_rows(res: ShiftResults, steps: int) -> list[dict[str, Any]]:
    """Per severity s: correct on the clean patch and under every family at every severity up to
    s (per patch; per slide/patient, each patch may take its own worst shift)."""
    rows = []
    for sev in sorted({s for _, s in res.shifted if s > 0}):
        conds = [k for k in res.shifted if 0 < k[1] <= sev]
        for clf, clean in res.clean.items():
            score_list = [clean] + [res.shifted[k][clf] for k in conds]
            for level in LEVELS_EVAL:
                groups = None if level == "patch" else (res.slides if level == "slide" else res.patients)
                correct, labels = worst_case_correct(score_list, res.labels, groups, k=1)
                top = {k: worst_case_correct(score_list, res.labels, groups, k=k)[0] for k in (2, 3)}
                rows.append({"attack": WORST_CASE, "severity": sev, "steps": steps, "objective": WORST_CASE_OBJECTIVE,
                             "classifier": clf, "level": level, "acc": 100.0 * float(correct.mean()),
                             "mca": mean_class_accuracy(correct, labels), "top2": 100.0 * float(top[2].mean()),
                             "top3": 100.0 * float(top[3].mean()), "map": float("nan")})
    return rows


def shift_sweep(
    model: nn.Module,
    probe: nn.Module,
    bank: tuple[torch.Tensor, torch.Tensor],
    val_dataset: Dataset,
    cfg_eval: Mapping[str, Any],
    *,
    kind: str,
    model_name: str = "",
    method: str = "",
    group: str = "",
    seed: int = 0,
    device: str | torch.device = "cpu",
    indices: Sequence[int] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Natural-shift table of one model: clean rows (attack `none`, severity 0), one row per
    (family, severity, classifier, level), and the per-example worst case over every family up to
    each severity; columns `SHIFT_COLUMNS`, percentages. `cfg_eval` is an `evaluation` section
    (its `shift`, `knn`, `batch_size` and `whitebox.classifiers` are used)."""
    cfg_eval = resolve_evaluation(cfg_eval)
    scfg = cfg_eval["shift"]
    families = shift_families(kind, scfg["families"])
    has_head = getattr(model, "classifier", None) is not None
    classifiers = list(cfg_eval["whitebox"]["classifiers"]) + (["head"] if has_head else [])
    steps = int(scfg["adversarial_steps"])
    res = run_shifts(model, probe, bank, val_dataset, families, scfg["severities"], kind, classifiers, cfg_eval["knn"],
                     indices=indices, batch_size=cfg_eval["batch_size"], adversarial_steps=steps, seed=int(scfg["seed"]),
                     device=device, progress=progress)
    base = {"model": model_name, "method": method, "group": group, "seed": seed}
    n = probe.num_classes
    rows = metric_rows(base, {"attack": "none", "severity": 0, "steps": 0, "objective": "none"}, res.clean, res, n)
    for (family, severity), scores in res.shifted.items():
        adv = family == ADVERSARIAL_STAIN
        rows += metric_rows(base, {"attack": family, "severity": severity, "steps": steps if adv else 0,
                                   "objective": ADVERSARIAL_OBJECTIVE if adv else "none"}, scores, res, n)
    rows += [{**base, **r} for r in shift_worst_case_rows(res, steps if ADVERSARIAL_STAIN in families else 0)]
    return pd.DataFrame(rows, columns=list(SHIFT_COLUMNS))


# ----------------------------------------------------------------------------- sanity checks


def shift_checks(df: pd.DataFrame, n_by_level: Mapping[str, int], z: float = 2.0) -> pd.DataFrame:
    """Checks of a `shift_sweep` table that fail when something is wrong (SANITY_COLUMNS):

    - `shift_identity`: every family at severity 0 scores exactly the clean accuracy;
    - `shift_monotone`: a family's accuracy does not rise from one severity to the next by more
      than z binomial standard errors (`binomial_se` of the lower severity's accuracy on the
      level's n; a rise means a shift that is not harder at higher severity, or a leak).
    """
    from hsat.evaluate.sanity import SANITY_COLUMNS  # local: sanity imports the sweep, which is heavier

    rows = []
    clean = df[df["attack"] == "none"].set_index(["classifier", "level"])["acc"]
    fam = df[~df["attack"].isin(["none", WORST_CASE])]
    for (family, clf, level), g in fam.groupby(["attack", "classifier", "level"], sort=True):
        g = g.sort_values("severity")
        base = {"model": g["model"].iloc[0], "attack": family, "eps": float("nan"), "steps": int(g["steps"].max()),
                "objective": g["objective"].iloc[0], "classifier": clf}
        c = float(clean.loc[(clf, level)])
        for r in g[g["severity"] == 0].itertuples():
            rows.append({**base, "check": "shift_identity", "param": f"{level}:severity", "value": 0, "acc": r.acc,
                         "passed": bool(r.acc == c), "criterion": f"acc == clean acc {c:.2f}"})
        accs = list(zip(g["severity"], g["acc"]))
        for (s0, a0), (s1, a1) in zip(accs, accs[1:]):
            tol = z * binomial_se(a0, int(n_by_level[level]))
            rows.append({**base, "check": "shift_monotone", "param": f"{level}:severity", "value": int(s1), "acc": a1,
                         "passed": bool(a1 <= a0 + tol), "criterion": f"acc <= acc at severity {s0} ({a0:.2f}) + {tol:.2f}"})
    return pd.DataFrame(rows, columns=list(SANITY_COLUMNS))
