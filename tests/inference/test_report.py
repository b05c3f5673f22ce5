import datetime as dt
import io

import numpy as np
from PIL import Image

from bus_core.inference.report import ReportContent, headline, render_report, report_filename

PROBS = {"normal": 0.1, "benign": 0.2, "malignant": 0.7}
WHEN = dt.datetime(2025, 3, 4, 9, 30, tzinfo=dt.timezone.utc)


def _content(**changes) -> ReportContent:
    image = np.zeros((120, 200, 3), np.uint8)
    image[:, :100] = 200
    overlay = np.full((32, 32, 3), (255, 0, 0), np.uint8)
    fields = dict(image=image, overlay=overlay, probabilities=PROBS, label="malignant",
                  model="tiny", filename="scan.png", created=WHEN)
    return ReportContent(**{**fields, **changes})


def _open(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_report_is_a_png_holding_both_images():
    data = render_report(_content())
    assert data.startswith(b"\x89PNG")
    page = _open(data)
    assert page.shape[1] == 1000
    reds = (page[..., 0] > 240) & (page[..., 1] < 20) & (page[..., 2] < 20)
    assert reds.sum() > 300 * 300  # the overlay panel, scaled up
    greys = (page == 200).all(axis=-1)
    assert greys.sum() > 10_000  # the bright half of the input image


def test_probability_bars_grow_with_probability():
    def malignant_bar_pixels(p: float) -> int:
        probs = {"normal": 1 - p, "benign": 0.0, "malignant": p}
        page = _open(render_report(_content(probabilities=probs)))
        return int(((page[..., 0] == 192) & (page[..., 1] == 57) & (page[..., 2] == 43)).sum())

    assert malignant_bar_pixels(0.9) > 2 * malignant_bar_pixels(0.3) > 0


def test_warnings_make_the_report_longer():
    short = _open(render_report(_content()))
    long = _open(render_report(_content(warnings=["Colour overlay detected."] * 3)))
    assert long.shape[0] > short.shape[0]


def test_headline_and_filename():
    assert headline("benign", {"benign": 0.72}, uncertain=False) == "Benign (72%)"
    assert headline("benign", {"benign": 0.41}, uncertain=True) == "Uncertain: leans benign (41%)"
    assert report_filename("my scan (1).dcm", WHEN) == "my-scan-1-report-20250304-0930.png"
    assert report_filename("", WHEN) == "case-report-20250304-0930.png"


def test_report_shows_the_colour_scale_and_grows_with_a_flag():
    from bus_core.inference.cam import colour_scale

    page = _open(render_report(_content()))
    scale = colour_scale(440, 12)
    # the scale's blue end and red end both appear on the page, side by side
    blue, red = scale[0, 0], scale[0, -1]
    rows = [y for y in range(page.shape[0])
            if (page[y] == blue).all(axis=-1).any() and (page[y] == red).all(axis=-1).any()]
    assert len(rows) >= 10
    flagged = _open(render_report(_content(flag="Malignant probability 70%: above the "
                                                "sensitivity-first threshold.",
                                           mask_note="painted (the model read the masked lesion)")))
    assert flagged.shape[0] > page.shape[0]
