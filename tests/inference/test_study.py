"""One reading per study: the combination rules, the study's true class and the grouping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bus_core.evaluation.studies import score_studies
from bus_core.inference.predict import Prediction
from bus_core.inference.study import (
    LEAST_NORMAL,
    MEAN,
    MOST_SUSPICIOUS,
    RULES,
    by_study,
    combine,
    combine_predictions,
    most_severe,
    study_keys,
)

# three images of one lesion: normal-looking frame, a benign-looking and a suspicious view
IMAGES = np.array([[0.80, 0.15, 0.05],
                   [0.10, 0.70, 0.20],
                   [0.30, 0.20, 0.50]])


def test_mean_rule_averages_the_images() -> None:
    np.testing.assert_allclose(combine(IMAGES, MEAN), [0.4, 1.05 / 3, 0.25])


def test_most_suspicious_rule_takes_the_image_most_likely_malignant() -> None:
    np.testing.assert_allclose(combine(IMAGES, MOST_SUSPICIOUS), IMAGES[2])


def test_least_normal_rule_takes_the_image_least_likely_normal() -> None:
    np.testing.assert_allclose(combine(IMAGES, LEAST_NORMAL), IMAGES[1])


@pytest.mark.parametrize("rule", list(RULES))
def test_one_image_is_its_own_study_reading(rule: str) -> None:
    np.testing.assert_allclose(combine(IMAGES[1:2], rule), IMAGES[1])


def test_unknown_rule_and_empty_study_are_refused_with_a_sentence() -> None:
    with pytest.raises(ValueError, match="Unknown study rule 'vote'"):
        combine(IMAGES, "vote")
    with pytest.raises(ValueError, match="at least one image"):
        combine(np.zeros((0, 3)), MEAN)


def test_the_most_severe_image_gives_the_study_its_class() -> None:
    assert most_severe([0, 0, 1]) == 1
    assert most_severe([2, 0, 1]) == 2
    assert most_severe([0]) == 0
    # with another class order, severity follows the names, not the indices
    assert most_severe([0, 1], classes=("malignant", "normal", "benign")) == 0


def test_keys_keep_patients_of_two_sources_apart_and_lone_images_alone() -> None:
    keys = study_keys(["a", "b", "c", "d"], ["7", "7", None, "7"],
                      ["BUSBRA", "BUSBRA", "X", "UCLM"])
    assert keys[0] == keys[1]
    assert len(set(keys)) == 3
    assert keys[2] != keys[0] and "c" in keys[2]


def test_by_study_groups_in_order_of_first_appearance() -> None:
    keys = ["p2", "p1", "p2", "p2"]
    y = [0, 1, 2, 1]
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], IMAGES[2], [0.5, 0.4, 0.1]])
    studies = by_study(keys, y, probs, MOST_SUSPICIOUS)
    assert studies.keys == ["p2", "p1"]
    assert studies.y_true.tolist() == [2, 1]
    assert studies.sizes.tolist() == [3, 1]
    assert [m.tolist() for m in studies.members] == [[0, 2, 3], [1]]
    np.testing.assert_allclose(studies.probs[0], probs[2])
    np.testing.assert_allclose(studies.probs[1], probs[1])


def test_by_study_refuses_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="one entry per image"):
        by_study(["a"], [0, 1], IMAGES[:2])


def test_study_scores_count_studies_and_flag_a_study_when_any_image_is_flagged() -> None:
    # two lesion studies whose suspicious view is malignant-looking, one normal study
    keys = ["a", "a", "b", "b", "c", "c"]
    y = [2, 2, 1, 1, 0, 0]
    probs = np.array([[0.70, 0.20, 0.10], [0.10, 0.20, 0.70],
                      [0.10, 0.80, 0.10], [0.60, 0.30, 0.10],
                      [0.90, 0.05, 0.05], [0.80, 0.10, 0.10]])
    scored = score_studies(keys, y, probs, (MEAN, MOST_SUSPICIOUS), threshold=0.5)
    assert scored[MEAN]["n_studies"] == scored[MOST_SUSPICIOUS]["n_studies"] == 3
    assert scored[MEAN]["n_images"] == 6
    # the mean dilutes the malignant view (P(malignant) 0.40) and misreads study a as normal;
    # the flag still finds it, since one of its images is flagged
    assert scored[MEAN]["accuracy"] == pytest.approx(2 / 3)
    assert scored[MOST_SUSPICIOUS]["accuracy"] == 1.0
    for rule in (MEAN, MOST_SUSPICIOUS):
        assert scored[rule]["at_threshold"]["sensitivity"] == 1.0
        assert scored[rule]["at_threshold"]["specificity"] == 1.0
    assert "at_threshold" not in score_studies(keys, y, probs, (MEAN,))[MEAN]


def _prediction(normal: float, benign: float, malignant: float) -> Prediction:
    probs = {"normal": normal, "benign": benign, "malignant": malignant}
    return Prediction(label=max(probs, key=probs.__getitem__), probabilities=probs,
                      uncertain=False, model="m", model_view=np.zeros((2, 2, 3), np.uint8),
                      tensor=torch.zeros(1), malignant_threshold=0.3)


def test_a_study_reading_combines_the_images_and_raises_the_flag_in_words() -> None:
    views = [_prediction(0.70, 0.20, 0.10), _prediction(0.20, 0.45, 0.35)]
    reading = combine_predictions(views, MOST_SUSPICIOUS, uncertain_below=0.6)
    assert reading.label == "benign" and reading.uncertain
    assert reading.probabilities == views[1].probabilities
    assert reading.flag.startswith("Image 2: Malignant probability 35%")
    assert reading.flag_image == 1
    # the mean reads normal, but the study is flagged because its second image is
    mean = combine_predictions(views, MEAN, uncertain_below=0.4)
    assert mean.label == "normal" and not mean.uncertain
    assert mean.flag_image == 1 and mean.flag.startswith("Image 2:")
    calm = combine_predictions([_prediction(0.70, 0.20, 0.10)] * 2, MEAN)
    assert calm.flag == "" and calm.flag_image is None
    with pytest.raises(ValueError, match="at least one image"):
        combine_predictions([])
