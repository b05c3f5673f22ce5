"""The probability chart."""

from __future__ import annotations

from ui.charts import probability_chart

PROBS = {"normal": 0.1, "benign": 0.6, "malignant": 0.3}


def test_the_malignant_flag_threshold_is_drawn_on_the_malignant_bar():
    figure = probability_chart(PROBS, "benign", threshold=0.5, malignant_threshold=0.25)
    marks = [s for s in figure.layout.shapes if s.type == "line" and s.x0 == 0.25]
    assert len(marks) == 1 and marks[0].line.color == "#c0392b"
    assert any(a.text == "malignant flag" for a in figure.layout.annotations)
    assert any(a.text == "certainty threshold" for a in figure.layout.annotations)


def test_class_names_get_the_room_they_need():
    assert probability_chart(PROBS, "benign").layout.yaxis.automargin is True
