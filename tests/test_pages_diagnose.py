"""The Diagnose page, run through the whole app with Streamlit's AppTest and a tiny model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from tests.conftest import blob_probabilities, copy_model, signed_in_app, synthetic_image
from ui.common import md_escape

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def ultrasound_png(seed: int = 0, size: tuple[int, int] = (200, 240)) -> tuple[bytes, np.ndarray]:
    image, mask = synthetic_image("benign", np.random.default_rng(seed), size=size)
    return png_bytes(image), mask


def start(monkeypatch, tmp_path, model_dir: Path | None,
          segmenter_dir: Path | None = None) -> AppTest:
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.setenv("BUS_SEGMENTER", str(segmenter_dir or tmp_path / "no-segmenter"))
    if model_dir is None:
        monkeypatch.delenv("BUS_MODEL", raising=False)
    else:
        monkeypatch.setenv("BUS_MODEL", str(model_dir))
    at = signed_in_app(timeout=60)
    at.run()
    assert not at.exception
    return at


def upload(at: AppTest, *files: tuple[str, bytes, str]) -> AppTest:
    at.file_uploader(key="diagnose_files").set_value(list(files))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def segmented(at: AppTest, label: str):
    return next(w for w in at.segmented_control if w.label == label)


def messages(elements) -> str:
    """The elements' text as the reader sees it (Markdown escapes removed)."""
    return " ".join(e.value for e in elements).replace("\\", "")


@pytest.fixture
def app(monkeypatch, tmp_path, tiny_model_dir) -> AppTest:
    return start(monkeypatch, tmp_path, tiny_model_dir)


@pytest.fixture
def count_cams(monkeypatch) -> list[tuple[str, str]]:
    from bus_core.inference.predict import Predictor

    calls: list[tuple[str, str]] = []
    original = Predictor.explain

    def counting(self, prediction, target=None, method="gradcam"):
        calls.append((target, method))
        return original(self, prediction, target, method)

    monkeypatch.setattr(Predictor, "explain", counting)
    return calls


def test_upload_gives_a_prediction_chart_overlay_and_report(app, count_cams):
    data, _ = ultrasound_png()
    upload(app, ("scan.png", data, "image/png"))
    reading = app.metric[0]
    assert reading.label == "Model's reading"
    assert reading.value in {"Normal", "Benign", "Malignant", "Uncertain"}
    assert len(app.get("plotly_chart")) == 1
    images = app.get("image")
    assert len(images) >= 3  # the input, what the model saw, the overlay
    assert any("Grad-CAM" in c for img in images for c in img.captions)
    assert [b.proto.label for b in app.get("download_button")] == ["Report (PNG)",
                                                                    "Report (PDF)"]
    assert not app.error
    assert count_cams == [(app.selectbox[0].value, "gradcam")]  # the predicted class
    if reading.value != "Uncertain":
        assert app.selectbox[0].value == reading.value.lower()


def test_opacity_reuses_the_cam_and_a_new_class_computes_one(app, count_cams):
    upload(app, ("scan.png", ultrasound_png()[0], "image/png"))
    assert len(count_cams) == 1
    app.slider[0].set_value(0.8).run()
    assert len(count_cams) == 1
    target = app.selectbox[0]
    other = next(c for c in ("normal", "benign", "malignant") if c != target.value)
    target.set_value(other).run()
    segmented(app, "Method").set_value("gradcam++").run()
    assert not app.exception
    assert count_cams[1:] == [(other, "gradcam"), (other, "gradcam++")]


def test_file_names_are_shown_as_text_not_markdown(app):
    data, _ = ultrasound_png()
    hostile = "**bold** <script>alert(1)</script> ![x](http://evil/p.png) _x_"
    name, copy = f"{hostile}.png", f"copy {hostile}.png"
    upload(app, (name, data, "image/png"), (copy, data, "image/png"))
    shown = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "success")
             for e in app.get(kind)]
    assert any(text.startswith(f"{md_escape(name)} · ") for text in shown)
    assert any(md_escape(copy) in text for text in shown)  # the note on the second copy
    assert not any("**bold**" in text or "<script>" in text or "](" in text for text in shown)


def test_bad_files_get_messages_and_good_ones_still_work(app):
    rng = np.random.default_rng(7)
    upload(app,
           ("x.png", rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(), "image/png"),
           ("good.png", ultrasound_png(1)[0], "image/png"),
           ("notes.dcm", b"Patient notes, not an image.\n" * 20, "application/dicom"),
           ("second.png", ultrasound_png(2)[0], "image/png"))
    errors = messages(app.error)
    assert "'x.png'" in errors and "'notes.dcm'" in errors
    assert "text file" in errors
    assert len(app.tabs) == 2
    assert len(app.metric) == 2
    table = app.dataframe[0].value
    assert list(table["Image"]) == ["good.png", "second.png"]
    assert table["Reading"].notna().all()


def test_several_images_are_also_read_as_one_study_with_its_pdf(app, monkeypatch):
    import pypdfium2 as pdfium

    import bus_core.inference.pdf_report

    made = []
    original = bus_core.inference.pdf_report.render_study_pdf
    monkeypatch.setattr(bus_core.inference.pdf_report, "render_study_pdf",
                        lambda report: made.append(report) or original(report))
    upload(app, ("Jane Doe left.png", ultrasound_png(1)[0], "image/png"),
           ("Jane Doe right.png", ultrasound_png(2)[0], "image/png"))
    assert "As one study" in [h.value for h in app.subheader]
    assert "from 2 images of one lesion or breast" in messages(app.markdown)
    assert "least likely normal" in messages(app.caption)
    study = next(b for b in app.get("download_button") if b.proto.label == "Study report (PDF)")
    assert "Jane" not in str(study.proto)
    report = next(r for r in made if len(r.images) == 2)
    assert report.combined is not None and report.rule
    assert all("Jane" not in c.filename for c in report.images)
    doc = pdfium.PdfDocument(original(report))
    try:
        text = " ".join(page.get_textpage().get_text_range() for page in doc)
    finally:
        doc.close()
    assert "Study reading:" in text and "Jane" not in text


def test_wrong_aspect_mask_file_gives_the_mask_message(app):
    data, mask = ultrasound_png(size=(200, 240))
    upload(app, ("scan.png", data, "image/png"))
    segmented(app, "Lesion mask").set_value("Upload").run()
    masks = app.file_uploader[1]
    square = np.zeros((100, 100), np.uint8)
    masks.set_value(("mask.png", png_bytes(square), "image/png")).run()
    assert not app.exception
    assert "'mask.png' is 100 x 100 pixels but the image is 240 x 200" in messages(app.error)
    assert len(app.metric) == 1  # a whole-image model still predicts


def test_good_mask_file_shows_the_crop_preview(app):
    data, mask = ultrasound_png(size=(200, 240))
    upload(app, ("scan.png", data, "image/png"))
    segmented(app, "Lesion mask").set_value("Upload").run()
    small = np.asarray(Image.fromarray(mask).resize((120, 100), Image.NEAREST))
    app.file_uploader[1].set_value(("mask.png", png_bytes(small), "image/png")).run()
    assert not app.exception and not app.error
    notes = messages(app.caption)
    assert "preview only" in notes and "mask is for reference only" in notes


@pytest.fixture
def mask_model_dir(tiny_model_dir, tmp_path) -> Path:
    return copy_model(tiny_model_dir, tmp_path / "mask-model", name="tiny-mask",
                      input_mode="mask")


def test_mask_model_needs_a_mask(monkeypatch, tmp_path, mask_model_dir):
    at = start(monkeypatch, tmp_path, mask_model_dir)
    data, mask = ultrasound_png(size=(200, 240))
    upload(at, ("scan.png", data, "image/png"))
    assert "lesion mask" in messages(at.error)
    assert not at.metric
    segmented(at, "Lesion mask").set_value("Upload").run()
    at.file_uploader[1].set_value(("mask.png", png_bytes(mask.astype(np.uint8) * 255),
                                   "image/png")).run()
    assert not at.exception and not at.error
    assert at.metric[0].label == "Model's reading"
    assert "what the model looks at" in messages(at.caption)


def test_no_model_installed_shows_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setattr("bus_core.models.registry.bundled_default", lambda *args, **kwargs: None)
    at = start(monkeypatch, tmp_path, None)
    assert "No model is installed" in messages(at.warning)
    assert "python -m" not in messages(at.warning)  # plain words, no commands
    assert not at.get("file_uploader")


def test_model_folder_without_a_model_is_explained(monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    at = start(monkeypatch, tmp_path, empty)
    assert "The active model cannot be used" in messages(at.error)
    assert "card.json" in messages(at.error)
    assert not at.get("file_uploader")


def test_save_as_case_stores_the_prediction_once(app, tmp_path):
    from bus_core.clinic.cases import open_store

    data, _ = ultrasound_png(seed=5)
    upload(app, ("case.png", data, "image/png"))
    save = next(b for b in app.button if b.label == "Save as case")
    save.click()
    app.run()
    assert not app.exception
    assert "Saved as case" in messages(app.success)
    assert not [b for b in app.button if b.label == "Save as case"]  # replaced by the message
    app.run()
    assert not [b for b in app.button if b.label == "Save as case"]
    with open_store(tmp_path / "userdata") as store:
        cases = store.list_cases()
    assert len(cases) == 1 and cases[0].image_name.startswith("image-")  # a pseudonym
    assert cases[0].predicted_label in ("normal", "benign", "malignant")


def test_several_images_are_saved_as_one_study(app, tmp_path):
    from bus_core.clinic.cases import open_store

    upload(app, ("left.png", ultrasound_png(1)[0], "image/png"),
           ("right.png", ultrasound_png(2)[0], "image/png"),
           ("third.png", ultrasound_png(3)[0], "image/png"))
    save = next(b for b in app.button if b.label == "Save as one study (3 cases)")
    save.click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert "Saved as study 1 (cases 1, 2, 3)" in messages(app.success)
    app.run()
    assert not [b for b in app.button if b.label.startswith("Save as one study")]
    with open_store(tmp_path / "userdata") as store:
        study = store.get_study(1)
        members = [store.get_case(i) for i in study.case_ids]
    assert study.rule == "least-normal" and study.owner == "Dr Test"
    assert [c.study_id for c in members] == [1, 1, 1]
    # the study's reading is its images' combined by the rule the page states
    from bus_core.inference.study import combine_readings

    again = combine_readings([c.probabilities for c in members], study.rule)
    assert study.predicted_label == again.label
    assert study.probabilities == pytest.approx(again.probabilities)


def test_case_opened_from_evaluate_page_uses_its_dataset_masks(monkeypatch, tmp_path,
                                                              tiny_model_dir, busi_dir):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.setenv("BUS_MODEL", str(tiny_model_dir))
    at = signed_in_app(timeout=60)
    at.session_state["diagnose_path"] = str(busi_dir / "benign" / "benign (2).png")
    at.session_state["diagnose_masks"] = [str(busi_dir / "benign" / "benign (2)_mask.png")]
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(md_escape("benign (2).png") in h.value for h in at.subheader)
    assert segmented(at, "Lesion mask").value == "Dataset masks"
    assert at.get("plotly_chart")
    next(b for b in at.button if b.label == "Close case").click()
    at.run()
    assert not any(md_escape("benign (2).png") in h.value for h in at.subheader)


@pytest.fixture
def blob_segmenter(monkeypatch, tiny_segmenter_dir) -> Path:
    from bus_core.inference.outline import Segmenter

    monkeypatch.setattr(Segmenter, "probabilities", blob_probabilities)
    return tiny_segmenter_dir


def test_suggested_outline_is_accepted_and_saved_as_suggested(monkeypatch, tmp_path,
                                                              tiny_model_dir, blob_segmenter):
    from bus_core.clinic.cases import open_store

    at = start(monkeypatch, tmp_path, tiny_model_dir, blob_segmenter)
    upload(at, ("scan.png", ultrasound_png(size=(200, 240))[0], "image/png"))
    assert segmented(at, "Lesion mask").value == "No mask"  # a whole-image model: optional
    segmented(at, "Lesion mask").set_value("Suggest outline").run()
    assert not at.exception and not at.error
    assert segmented(at, "Suggested outline (automatic)").value == "Accept"
    assert any("Suggested outline (automatic)" in c for img in at.get("image")
               for c in img.captions)
    assert "Automatic outline by tiny-seg" in messages(at.caption)
    assert "preview only" in messages(at.caption)  # the crop of the suggested outline
    next(b for b in at.button if b.label == "Save as case").click()
    at.run()
    with open_store(tmp_path / "userdata") as store:
        (case,) = store.list_cases()
        assert case.mask_source == "suggested" and len(store.load_masks(case)) == 1


def test_suggested_outline_can_be_discarded_or_edited(monkeypatch, tmp_path, tiny_model_dir,
                                                      blob_segmenter):
    at = start(monkeypatch, tmp_path, tiny_model_dir, blob_segmenter)
    upload(at, ("scan.png", ultrasound_png(size=(200, 240))[0], "image/png"))
    segmented(at, "Lesion mask").set_value("Suggest outline").run()
    segmented(at, "Suggested outline (automatic)").set_value("Discard").run()
    assert not at.exception
    assert "preview only" not in messages(at.caption)
    segmented(at, "Suggested outline (automatic)").set_value("Edit").run()
    assert not at.exception, [e.value for e in at.exception]
    assert segmented(at, "Tool").value == "Brush"  # the canvas tools, over the outline
    assert "preview only" in messages(at.caption)  # unedited: the suggestion itself is used


def test_no_lesion_found_is_said_plainly(monkeypatch, tmp_path, tiny_model_dir, blob_segmenter):
    at = start(monkeypatch, tmp_path, tiny_model_dir, blob_segmenter)
    image, _ = synthetic_image("normal", np.random.default_rng(3), size=(200, 240))
    image[0, 0] = 255  # blob_probabilities finds nothing in such an image
    upload(at, ("normal.png", png_bytes(image), "image/png"))
    segmented(at, "Lesion mask").set_value("Suggest outline").run()
    assert not at.exception
    assert "No lesion found" in messages(at.info)
    assert at.metric  # the whole-image model still reads it


def test_lesion_model_uses_the_suggested_outline_by_default(monkeypatch, tmp_path,
                                                            mask_model_dir, blob_segmenter):
    at = start(monkeypatch, tmp_path, mask_model_dir, blob_segmenter)
    upload(at, ("scan.png", ultrasound_png(size=(200, 240))[0], "image/png"))
    assert segmented(at, "Lesion mask").value == "Suggest outline"
    assert not at.error and at.metric[0].label == "Model's reading"
    assert "masked lesion crop (outlined automatically)" in messages(at.caption)


def test_a_dicom_without_an_extension_is_accepted(app, tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "IM0001"), {}, file_meta=meta, preamble=b"\0" * 128)
    image, _ = synthetic_image("benign", np.random.default_rng(2), size=(200, 240))
    ds.Rows, ds.Columns = image.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = image[..., 0].tobytes()
    ds.save_as(tmp_path / "IM0001", enforce_file_format=True)
    upload(app, ("IM0001", (tmp_path / "IM0001").read_bytes(), "application/octet-stream"))
    assert not app.error
    assert app.metric[0].label == "Model's reading"


def test_the_sensitivity_first_flag_is_shown(monkeypatch, tmp_path, tiny_model_dir):
    folder = copy_model(tiny_model_dir, tmp_path / "flagging", name="tiny-flag",
                        malignant_threshold=0.0)  # every image is flagged
    at = start(monkeypatch, tmp_path, folder)
    upload(at, ("scan.png", ultrasound_png()[0], "image/png"))
    assert "sensitivity-first threshold" in messages(at.error)


def test_a_two_stage_model_reads_the_outline_and_the_whole_image(monkeypatch, tmp_path,
                                                                  tiny_model_dir,
                                                                  tiny_segmenter_dir,
                                                                  blob_segmenter):
    weights = tmp_path / "weights"
    copy_model(tiny_model_dir, weights / "whole", name="tiny-whole")
    copy_model(tiny_segmenter_dir, weights / "outline", name="tiny-outline")
    two = copy_model(tiny_model_dir, weights / "two", name="tiny-two",
                     input_mode="lesion-context", crop_margin=0.5,
                     two_stage={"whole_image_model": "whole", "outline_model": "outline"})
    at = start(monkeypatch, tmp_path, two)  # no app-wide outline model: the pair's is used
    upload(at, ("scan.png", ultrasound_png(size=(200, 240))[0], "image/png"))
    assert segmented(at, "Lesion mask").value == "Suggest outline"
    assert "Automatic outline by tiny-outline" in messages(at.caption)
    assert "Two-stage reading: the whole image tells normal from lesion" in messages(at.caption)
    assert not at.error and at.metric[0].label == "Model's reading"
    details = next(e for e in at.expander if e.label == "Model details")
    assert "tiny-two with tiny-whole" in messages(details.caption)  # names folded away
    assert "Read in" in messages(details.caption)
    outside = [c.value for c in at.caption if c not in details.caption]
    assert not any("tiny-whole" in c or "Read in" in c for c in outside)
    segmented(at, "Lesion mask").set_value("No mask").run()
    assert not at.exception and not at.error
    assert "the whole-image model reads the whole image" in messages(at.caption)


def test_a_storage_failure_is_told_in_plain_words_without_the_path(app, tmp_path):
    images = tmp_path / "userdata" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for prefix in range(256):  # a file where each image folder should be
        (images / f"{prefix:02x}").write_bytes(b"")
    upload(app, ("case.png", ultrasound_png(seed=5)[0], "image/png"))
    next(b for b in app.button if b.label == "Save as case").click().run()
    assert not app.exception, [e.value for e in app.exception]
    shown = messages(app.error)
    assert "could not store or read its files" in shown and str(images) not in shown
    assert str(images) in " ".join(c.value for c in app.code)  # folded away, for the admin


def test_an_edited_outline_is_kept_when_accepted_and_edited_again(monkeypatch, tmp_path,
                                                                  tiny_model_dir, blob_segmenter):
    """The canvas is replaced by a stand-in that adds a square to the outline it is given."""
    import ui.canvas
    from bus_core.clinic.cases import open_store

    bases: list[np.ndarray] = []

    def paint_square(image, key, base=None, background_image=None):
        bases.append(base.copy())
        edited = base.copy()
        edited[:20, :20] = True
        return edited

    monkeypatch.setattr(ui.canvas, "paint_mask", paint_square)
    at = start(monkeypatch, tmp_path, tiny_model_dir, blob_segmenter)
    upload(at, ("scan.png", ultrasound_png(size=(200, 240))[0], "image/png"))
    segmented(at, "Lesion mask").set_value("Suggest outline").run()
    segmented(at, "Suggested outline (automatic)").set_value("Edit").run()
    suggested = bases[-1]
    segmented(at, "Suggested outline (automatic)").set_value("Accept").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "with your edits" in messages(at.caption)
    segmented(at, "Suggested outline (automatic)").set_value("Edit").run()
    assert bases[-1][:20, :20].all() and not suggested[:20, :20].all()  # starts from the edit
    segmented(at, "Suggested outline (automatic)").set_value("Accept").run()
    next(b for b in at.button if b.label == "Save as case").click().run()
    with open_store(tmp_path / "userdata") as store:
        (case,) = store.list_cases()
        assert case.mask_source == "suggested, edited"
        (mask,) = store.load_masks(case)
        assert mask[:20, :20].all()


def test_the_report_names_the_image_by_its_pseudonym_not_the_uploaded_file_name(app,
                                                                                 monkeypatch):
    import bus_core.inference.report

    contents = []
    original = bus_core.inference.report.render_report
    monkeypatch.setattr(bus_core.inference.report, "render_report", lambda content: contents.append(
        content) or original(content))
    upload(app, ("Jane Doe 1961.png", ultrasound_png(seed=2)[0], "image/png"))
    (content,) = contents
    assert content.filename.startswith("image-") and "Jane" not in content.filename
    download = app.get("download_button")[0]
    assert "Jane" not in str(download.proto)
    assert download.proto.label == "Report (PNG)"  # short enough for a narrow column
