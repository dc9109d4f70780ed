"""The reference classifiers: supervised cross-entropy and its PGD adversarial training (Madry),
trained by the same loop, saved with their classification head, scored and attacked through it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hsat.evaluate import whitebox_sweep
from hsat.evaluate.sweep import HEAD_OBJECTIVE, whitebox_specs
from hsat.methods import METHODS, Robust, Supervised, build_objective, methods_with_role, resolve_method
from hsat.models import build_model, load_trained_model
from hsat.train import embed_views, hsat_step, make_optimizer, pretrain

from test_evaluate import ToyModel, toy_cfg, toy_setup
from test_train import tiny_cfg

torch.set_num_threads(1)
ATTACK = {"eps": 8, "alpha": 2, "steps": 3, "random_start": True, "bn_mode": "eval", "only_adversarial": True,
          "forward": "separate"}


def test_references_are_registry_entries():
    assert methods_with_role("reference") == ("supervised", "supervised_at")
    assert type(build_objective(resolve_method({"name": "supervised"}))) is Supervised
    robust = build_objective(resolve_method({"name": "supervised_at"}))
    assert isinstance(robust, Robust) and isinstance(robust.inner, Supervised)
    assert robust.output == "logits" and robust.needs_classifier
    assert METHODS["supervised_at"].label == "Supervised AT"


def test_supervised_loss_is_cross_entropy_of_every_view_with_its_patients_label():
    torch.manual_seed(0)
    z = torch.randn(3, 2, 2, 2, 5)  # (P, S, K, V, classes)
    labels = torch.tensor([4, 0, 2])
    loss = Supervised(resolve_method({"name": "supervised"})).loss(z, labels)["total"]
    expected = F.cross_entropy(z.reshape(-1, 5), labels.repeat_interleave(8))
    assert torch.allclose(loss, expected)


def test_supervised_at_attack_raises_the_cross_entropy_within_eps():
    torch.manual_seed(0)
    model = build_model("test_resnet", head_hidden=(16,), embed_dim=8, num_classes=3).eval()
    shape = (3, 1, 2, 2)
    x = torch.rand(12, 3, 16, 16)
    labels = torch.tensor([0, 1, 2])
    robust = build_objective(resolve_method({"name": "supervised_at"}))
    x_adv = robust.adversarial_views(model, x, shape, attack=ATTACK, eps=8, embed=embed_views,
                                     generator=torch.Generator().manual_seed(1), labels=labels)
    with torch.no_grad():
        before = robust.attack_loss(embed_views(model, x, shape, output="logits")[0], labels)
        after = robust.attack_loss(embed_views(model, x_adv, shape, output="logits")[0], labels)
    assert after > before
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6


def test_supervised_step_moves_only_toward_the_labels():
    """One step of `supervised` lowers the cross-entropy of the batch it trained on; the labels
    matter (other labels give another step)."""
    torch.manual_seed(0)
    images = torch.rand(2, 2, 2, 2, 3, 16, 16)
    method = resolve_method({"name": "supervised"})
    cfg = {"optim": {"lr": 1e-2, "weight_decay": 0.0}}
    results = {}
    for name, labels in {"a": torch.tensor([0, 1]), "b": torch.tensor([1, 0])}.items():
        torch.manual_seed(0)
        model = build_model("test_resnet", head_hidden=(16,), embed_dim=8, num_classes=2)
        opt = make_optimizer(model, cfg)
        first = hsat_step(model, opt, images, method=method, attack=ATTACK, eps=8, labels=labels).loss
        second = hsat_step(model, opt, images, method=method, attack=ATTACK, eps=8, labels=labels).loss
        results[name] = (first, second, model.classifier.weight.detach().clone())
    assert results["a"][1] < results["a"][0] and results["b"][1] < results["b"][0]
    assert not torch.equal(results["a"][2], results["b"][2])


def test_pretrained_reference_keeps_its_head_and_is_scored_and_attacked_through_it(tiny_manifest, tmp_path):
    run = pretrain(tiny_cfg(tiny_manifest, method={"name": "supervised_at"}, train={"steps": 2}), tmp_path / "run")
    model = load_trained_model(run)
    assert model.classifier is not None and model.classifier.out_features == 7  # the manifest's classes
    # The sweep adds the head as a classifier and head_ce as an objective of every attack.
    cfg = toy_cfg()
    specs = whitebox_specs(_validated(cfg), head_classifier=True)
    assert {s.objective for s in specs} >= {HEAD_OBJECTIVE, "feature", "linear_ce"}
    assert HEAD_OBJECTIVE not in {s.objective for s in whitebox_specs(_validated(cfg))}


def _validated(cfg):
    from hsat.config import resolve_evaluation

    return resolve_evaluation(cfg)


class ToyClassifierModel(ToyModel):
    """ToyModel with a classification head on its features (as the supervised references)."""

    def __init__(self):
        super().__init__()
        self.classifier = torch.nn.Linear(3, 3)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.eye(3) * 50)
            self.classifier.bias.zero_()

    def logits(self, f):
        return self.classifier(f)


def test_sweep_scores_the_head_and_head_ce_defeats_it():
    _, probe, bank, val = toy_setup()
    model = ToyClassifierModel()
    df = whitebox_sweep(model, probe, bank, val, toy_cfg(eps=[16]), model_name="toy", progress=False)
    head = df[(df["classifier"] == "head") & (df["level"] == "patch")]
    clean = head[head["attack"] == "none"]["acc"].item()
    attacked = head[(head["attack"] == "pgd") & (head["objective"] == HEAD_OBJECTIVE)]["acc"].item()
    worst = head[head["attack"] == "worst_case"]["acc"].item()
    assert clean > 90 and attacked < clean - 50 and worst <= attacked
