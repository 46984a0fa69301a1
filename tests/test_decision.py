"""The decision order (birder.inference.decision) and the taxonomic fallback on hand-made probabilities."""

from pathlib import Path

import numpy as np
import pytest

from birder.errors import BirderError
from birder.inference.decision import UNKNOWN, DecisionPolicy, UnknownTest, apply_prior, build_policy
from birder.inference.taxonomy import Taxonomy, TaxonomyError, coverage_table, fallback
from birder.io.calibration import Calibration

# Two genera of two species in one family, and a third genus in another family; one order
SPECIES = ["Turdus merula", "Turdus philomelos", "Parus major", "Cyanistes caeruleus", "Sylvia atricapilla"]
TAXONOMY_CSV = """species,genus,family,order
Turdus merula,Turdus,Turdidae,Passeriformes
Turdus philomelos,Turdus,Turdidae,Passeriformes
Parus major,Parus,Paridae,Passeriformes
Cyanistes caeruleus,Cyanistes,Paridae,Passeriformes
Sylvia atricapilla,Sylvia,Sylviidae,Passeriformes
"""


@pytest.fixture
def taxonomy(tmp_path: Path) -> Taxonomy:
    (tmp_path / "taxonomy.csv").write_text(TAXONOMY_CSV)
    return Taxonomy.from_csv(tmp_path / "taxonomy.csv")


class _Calibrated:
    """A stand-in network: only its ``calibration`` attribute matters to build_policy."""

    def __init__(self, calibration: Calibration | None) -> None:
        self.calibration = calibration


def test_fallback_arithmetic_on_hand_made_probabilities(taxonomy: Taxonomy) -> None:
    groups = taxonomy.groups(SPECIES)
    probabilities = np.array(
        [
            [0.70, 0.10, 0.10, 0.05, 0.05],  # the species itself: 0.70 >= 0.6
            [0.40, 0.35, 0.10, 0.10, 0.05],  # genus Turdus: 0.40 + 0.35 = 0.75
            [0.05, 0.05, 0.35, 0.30, 0.25],  # no genus (0.35, 0.30, 0.25); family Paridae: 0.35 + 0.30 = 0.65
            [0.20, 0.20, 0.20, 0.15, 0.25],  # genus 0.40, family 0.40 (Turdidae) / 0.35: order 1.0
            [0.30, 0.05, 0.05, 0.05, 0.55],  # under a threshold of 1.01 nothing is reached: uncertain
        ]
    )
    thresholds = np.array([0.6, 0.6, 0.6, 0.6, 1.01])
    answers = fallback(probabilities, thresholds, SPECIES, groups)
    assert answers.labels == ["Turdus merula", "Turdus", "Paridae", "Passeriformes", "uncertain"]
    assert answers.ranks == ["species", "genus", "family", "order", ""]
    np.testing.assert_allclose(answers.probabilities[:4], [0.70, 0.75, 0.65, 1.0])
    assert np.isnan(answers.probabilities[4])

    # The threshold is per photo: the same probabilities answer at the species level under a lower one
    lower = fallback(probabilities[1:2], np.array([0.4]), SPECIES, groups)
    assert (lower.labels, lower.ranks) == (["Turdus merula"], ["species"])
    # Without a taxonomy an unclear species is simply uncertain
    bare = fallback(probabilities, thresholds, SPECIES, None)
    assert bare.labels == ["Turdus merula", "uncertain", "uncertain", "uncertain", "uncertain"]


def test_coverage_table_scores_labels_against_every_rank(taxonomy: Taxonomy) -> None:
    probabilities = np.array([[0.40, 0.35, 0.10, 0.10, 0.05], [0.10, 0.70, 0.10, 0.05, 0.05]])
    targets = np.array([1, 0])  # the first photo is philomelos (genus right), the second merula (species wrong)
    (loose, strict) = coverage_table(probabilities, targets, SPECIES, taxonomy, [0.0, 0.75])
    assert loose.shares["species"] == 1.0 and loose.precision == 0.0  # both top species are wrong
    assert strict.shares == {"species": 0.0, "genus": 1.0, "family": 0.0, "order": 0.0}
    assert strict.precision == 1.0 and strict.answered == 1.0  # Turdus 0.75, Turdus 0.80: both right


def test_taxonomy_files_with_missing_repeated_or_malformed_species_are_one_line_errors(tmp_path: Path) -> None:
    repeated = TAXONOMY_CSV + "Turdus merula,Turdus,Turdidae,Passeriformes\n"
    cases = {
        "species listed more than once: Turdus merula": repeated,
        "first row must be the header": TAXONOMY_CSV.replace("species,genus,family,order", "name,genus,family"),
        ":3: expected species,genus,family,order": TAXONOMY_CSV.replace("Passeriformes\nParus", "\nParus", 1),
    }
    for expected, text in cases.items():
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(TaxonomyError, match=expected) as caught:
            Taxonomy.from_csv(tmp_path / "bad.csv")
        assert "\n" not in str(caught.value)

    (tmp_path / "short.csv").write_text("\n".join(TAXONOMY_CSV.splitlines()[:3]) + "\n")
    with pytest.raises(TaxonomyError, match="3 of the model's species are missing: Parus major, Cyanistes") as caught:
        Taxonomy.from_csv(tmp_path / "short.csv").groups(SPECIES)
    assert "\n" not in str(caught.value)
    with pytest.raises(TaxonomyError, match="does not exist"):
        Taxonomy.from_csv(tmp_path / "nowhere.csv")


def test_prior_hook_multiplies_renormalises_and_never_divides_by_zero() -> None:
    probabilities = np.array([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]])
    prior = np.array([[1.0, 4.0, 1.0], [0.0, 0.0, 1.0]])
    posterior = apply_prior(probabilities, prior, strength=0.5)  # prior ** 0.5: [1, 2, 1]
    np.testing.assert_allclose(posterior[0], np.array([0.5, 0.6, 0.2]) / 1.3)
    np.testing.assert_allclose(posterior[1], probabilities[1])  # the prior rules out every species the image sees
    np.testing.assert_array_equal(apply_prior(probabilities, prior, strength=0.0), probabilities)
    np.testing.assert_array_equal(apply_prior(probabilities, None), probabilities)
    one_prior_for_all = apply_prior(probabilities[:1], np.array([2.0, 1.0, 1.0]))
    np.testing.assert_allclose(one_prior_for_all, np.array([[1.0, 0.3, 0.2]]) / 1.5)
    with pytest.raises(BirderError, match="negative"):
        apply_prior(probabilities, -prior)

    # The hook is step 4 of decide(): the prior can turn the answer
    policy = DecisionPolicy(["a", "b", "c"], global_threshold=0.5)
    assert policy.decide(probabilities[:1]).label == ["a"]
    assert policy.decide(probabilities[:1], prior=np.array([0.1, 1.0, 1.0])).label == ["b"]


def test_the_order_unknown_then_species_threshold_then_fallback(taxonomy: Taxonomy) -> None:
    calibration = Calibration(
        temperature=2.0,
        species_thresholds={"Turdus merula": 0.9},  # a species that needs more than the global 0.5
        unknown_method="msp",
        unknown_thresholds={"msp": 0.6},
    )
    net = _Calibrated(calibration)
    probabilities = np.array(
        [
            [0.80, 0.10, 0.05, 0.03, 0.02],  # merula under its own 0.9: genus Turdus 0.90
            [0.02, 0.03, 0.80, 0.10, 0.05],  # Parus major over the global 0.5
            [0.30, 0.20, 0.20, 0.15, 0.15],  # msp score 0.7 > 0.6: unknown
        ]
    )
    policy = build_policy(net, SPECIES, min_prob=0.5, taxonomy=taxonomy)
    assert policy.active and policy.temperature == 2.0
    decisions = policy.decide(probabilities)
    assert decisions.label == ["Turdus", "Parus major", UNKNOWN]
    assert decisions.rank == ["genus", "species", ""]
    np.testing.assert_allclose(decisions.unknown_score, [0.2, 0.2, 0.7])
    assert decisions.row(2) == {"label": "unknown", "rank": "", "label_probability": None, "unknown_score": 0.7}
    assert decisions.row(0)["label_probability"] == pytest.approx(0.9)

    # Global thresholds only, none at all, no unknown test, or uncalibrated: each step can be turned off
    assert build_policy(net, SPECIES, thresholds="global", min_prob=0.5, taxonomy=taxonomy).decide(
        probabilities[:1]
    ).label == ["Turdus merula"]
    assert build_policy(net, SPECIES, thresholds="none", min_prob=0.95, unknown_method="none").decide(
        probabilities
    ).label == ["Turdus merula", "Parus major", "Turdus merula"]
    uncalibrated = build_policy(net, SPECIES, calibrated=False, min_prob=0.5)
    assert uncalibrated.species_thresholds is None and uncalibrated.unknown is None and uncalibrated.temperature == 1
    assert not build_policy(_Calibrated(None), SPECIES).active


def test_policy_errors_name_what_is_missing() -> None:
    calibrated = _Calibrated(Calibration(unknown_method="msp", unknown_thresholds={"msp": 0.5}))
    with pytest.raises(BirderError, match="no threshold for the 'energy' unknown test: pass --unknown-threshold"):
        build_policy(calibrated, SPECIES, unknown_method="energy")
    with pytest.raises(BirderError, match="'knn' unknown test needs class statistics: run birder-calibrate"):
        build_policy(calibrated, SPECIES, unknown_method="knn", unknown_threshold=0.3)
    with pytest.raises(BirderError, match="--unknown-threshold needs --unknown-method"):
        build_policy(_Calibrated(None), SPECIES, unknown_threshold=0.3)
    with pytest.raises(BirderError, match="--thresholds must be one of"):
        build_policy(calibrated, SPECIES, thresholds="some")

    energy = build_policy(_Calibrated(None), SPECIES, unknown_method="energy", unknown_threshold=-3.0)
    assert energy.needs_logits and not energy.needs_embeddings
    logits = np.array([[10.0, 0.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0]])
    decisions = energy.decide(np.full((2, 5), 0.2), logits=logits)
    assert decisions.label == ["Turdus merula", UNKNOWN]  # energy -10.0 is known, -1.7 is not
    assert UnknownTest("msp", 0.5).scores(np.array([[0.9, 0.1]]), None, None) == pytest.approx([0.1])
