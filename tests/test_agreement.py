"""The rank agreement of a world's tables with the published averages (``benchmark.agreement``)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from benchmark.agreement import rank_agreement, spearman
from benchmark.tables import accuracy_table, base2novel_table, load_paper
from datasets.catalog import BASE2NOVEL_DATASETS, DG_DATASETS


def test_spearman_against_hand_computed_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0, abs=1e-12)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0, abs=1e-12)
    # ranks (1, 2, 3) against (1, 3, 2): 1 - 6 * 2 / (3 * 8) = 0.5
    assert spearman([0.1, 0.5, 0.9], [5, 9, 7]) == pytest.approx(0.5, abs=1e-12)
    # a tie takes the mean rank: (1.5, 1.5, 3) against (1, 2, 3) gives sqrt(3) / 2
    assert spearman([2, 2, 7], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2, abs=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError, match="one length"):
        spearman([1, 2], [1, 2, 3])


def _b2n_frame(hm_of: dict[str, float], datasets=BASE2NOVEL_DATASETS) -> pd.DataFrame:
    """Records' rows whose base and novel accuracies both equal the wanted HM."""
    rows = [{"world": "toy", "method": m, "protocol": "base2novel", "dataset": d, "shots": 16, "seed": 1,
             "backbone": "toy-clip", "split": split, "accuracy": hm}
            for m, hm in hm_of.items() for d in datasets for split in ("base", "novel")]
    return pd.DataFrame(rows)


def test_base_to_novel_agreement_uses_the_published_average_hm():
    paper = load_paper("base2novel")
    average = paper[paper["dataset"] == "average"]
    published = dict(zip(average["method"].str.lower(), average["hm"]))
    # our order: mma > maple > coop > zsclip, against the papers' MMA 79.87 > MaPLe 78.55 > CLIP 71.70 > CoOp 71.66
    table = base2novel_table(_b2n_frame({"mma": 70.0, "maple": 60.0, "coop": 50.0, "zsclip": 40.0}))
    agreed = rank_agreement(table, paper, "base2novel")
    assert agreed.published == {"mma": published["mma"], "maple": published["maple"], "coop": published["coop"],
                                "zsclip": published["clip"]}
    assert agreed.ours["mma"] == pytest.approx(70.0, abs=1e-9)
    assert agreed.rho == pytest.approx(spearman([70, 60, 50, 40], [published[m] for m in ("mma", "maple", "coop",
                                                                                        "clip")]), abs=1e-12)
    assert agreed.rho == pytest.approx(0.8, abs=1e-12)  # one swap of neighbours among four: 1 - 6*2/60
    assert "Spearman rho = +0.80 over 4 methods" in agreed.line


def test_methods_without_every_dataset_or_too_few_methods_give_no_agreement():
    paper = load_paper("base2novel")
    part = _b2n_frame({"mma": 70.0, "coop": 50.0, "zsclip": 40.0}, datasets=BASE2NOVEL_DATASETS[:5])
    assert rank_agreement(base2novel_table(part), paper, "base2novel") is None  # a subset is another average
    two = base2novel_table(_b2n_frame({"mma": 70.0, "coop": 50.0}))
    assert rank_agreement(two, paper, "base2novel") is None
    assert rank_agreement(two, paper, "few_shot") is None


def test_domain_generalisation_agreement_uses_the_four_variant_average():
    rows = [{"world": "toy", "method": m, "protocol": "transfer", "dataset": "imagenet", "shots": 16, "seed": 1,
             "backbone": "toy-clip", "split": target, "accuracy": acc}
            for m, acc in {"mma": 30.0, "coop": 20.0, "zsclip": 10.0}.items() for target in ["imagenet", *DG_DATASETS]]
    paper = load_paper("domain_generalization")
    agreed = rank_agreement(accuracy_table(pd.DataFrame(rows), "domain_generalization"), paper,
                            "domain_generalization")
    average = paper[paper["dataset"] == "average"]
    pub = dict(zip(average["method"].str.lower(), average["accuracy"]))
    assert agreed.published == {"mma": pub["mma"], "coop": pub["coop"], "zsclip": pub["clip"]}
    assert agreed.rho == pytest.approx(spearman([30, 20, 10], [pub["mma"], pub["coop"], pub["clip"]]), abs=1e-12)
