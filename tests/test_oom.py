"""Crafting batches halve on an out-of-memory error and go on, with the same examples at any size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_evaluate import ToyModel
from test_sanity import hard_setup

from hsat.evaluate.sweep import AttackSpec, run_attacks
from hsat.oom import HalvingBatches

torch.set_num_threads(1)


class OutOfMemoryAbove(ToyModel):
    """The toy model, but an input-gradient pass over more than `limit` images runs out of memory
    (raised as the CUDA allocator raises it), as a large batch does on a GPU."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.failures = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad and len(x) > self.limit:
            self.failures += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} images")
        return super().encode(x)


SPECS = [AttackSpec("pgd", 8.0, 3, "linear_ce", 2.0, 0), AttackSpec("bim_r", 8.0, 2, "feature", 2.0, 0),
         AttackSpec("mifgsm", 4.0, 2, "knn_soft", 1.0, 0), AttackSpec("noise", 8.0, 0, "none", 0.0, 0)]


@pytest.mark.parametrize("limit", [1, 7, 40])
def test_crafting_halves_on_out_of_memory_and_gives_the_same_examples(limit):
    model, probe, bank, val = hard_setup()
    kept = {}

    def run(m, into):
        return run_attacks(m, probe, bank, val, SPECS, ["knn", "linear"], 3, knn={"k": 10, "temperature": 0.07},
                           batch_size=64, progress=False, keep=lambda i, x: into.setdefault(i, []).append(x))

    plain = run(model, kept.setdefault("plain", {}))
    small = OutOfMemoryAbove(limit)
    small.load_state_dict(model.state_dict())
    halved = run(small, kept.setdefault("halved", {}))
    assert small.failures > 0  # it did run out of memory, and went on
    for i in range(len(SPECS)):
        assert torch.equal(torch.cat(kept["plain"][i]), torch.cat(kept["halved"][i])), SPECS[i]
        for c in ("knn", "linear"):
            assert np.array_equal(plain.adv[i][c], halved.adv[i][c])
    assert np.array_equal(plain.clean["linear"], halved.clean["linear"])


def test_halving_keeps_the_smaller_size_and_gives_up_at_one_row():
    seen = []

    def fn(sl):
        seen.append(sl.stop - sl.start)
        if sl.stop - sl.start > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return torch.arange(sl.start, sl.stop)

    halving = HalvingBatches("test")
    assert torch.equal(halving(fn, 10), torch.arange(10))
    assert seen == [10, 5, 2, 2, 2, 2, 2] and halving.limit == 2
    seen.clear()
    assert torch.equal(halving(fn, 5), torch.arange(5)) and seen == [2, 2, 1]  # later batches start small

    def always(sl):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        HalvingBatches("test")(always, 4)
    with pytest.raises(ValueError):  # other errors are not retried
        HalvingBatches("test")(lambda sl: (_ for _ in ()).throw(ValueError("bad")), 4)


def test_mil_bag_attack_halves_its_backbone_chunk_on_out_of_memory():
    """A slide whose bag attack runs out of memory goes on through the backbone in smaller chunks:
    the same slide-level results."""
    import pandas as pd
    from test_evaluate import ToyPatches

    from hsat.config import resolve_evaluation
    from hsat.evaluate.mil import GatedAttentionMIL, mil_whitebox_rows

    class Slides(ToyPatches):
        def __init__(self):
            super().__init__(n_patients=6, slides=2, patches=6, seed=3)
            self.rows = pd.DataFrame({"slide": [it[3] for it in self.items], "patient": [it[2] for it in self.items]})

    torch.manual_seed(0)
    mil = GatedAttentionMIL(3, 3)
    cfg = resolve_evaluation({"batch_size": 16, "attack_precision": "fp32",
                              "whitebox": {"eps": [8], "steps": 3, "alpha": 2},
                              "mil": {"attacks": ["pgd"], "objectives": ["abmil_ce", "feature"]}})
    info = {"model": "m", "method": "hsat", "group": "g", "seed": 0}
    plain = mil_whitebox_rows(ToyModel(), mil, Slides(), info, cfg)
    small = OutOfMemoryAbove(4)
    halved = mil_whitebox_rows(small, mil, Slides(), info, cfg)
    assert small.failures > 0
    pd.testing.assert_frame_equal(plain, halved)
