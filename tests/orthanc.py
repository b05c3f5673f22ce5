"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin on a free local port,
a temporary storage folder and a throw-away configuration (basic auth on), and synthetic
ultrasound DICOM files to put in it. Tests that use `orthanc` skip when Orthanc is missing
(`apt-get install orthanc orthanc-dicomweb`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from bus_core.integrations.pacs.endpoints import Endpoint
from tests.conftest import free_port, stop_process, synthetic_image

PLUGIN_PLACES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                 "/usr/lib/orthanc/libOrthancDicomWeb.so")
USER, PASSWORD = "pacs-user", "pacs-password"
PATIENT_ID, PATIENT_NAME = "BUS-TEST-1", "Doe^Jane"
US_IMAGE, US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
MPEG4 = UID("1.2.840.10008.1.2.4.102")
"""MPEG-4 AVC/H.264: a compression no installed decoder reads."""


def _executable() -> str | None:
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).exists()), None)


def _plugin() -> str | None:
    return next((p for p in PLUGIN_PLACES if Path(p).exists()), None)


@dataclass(frozen=True)
class Orthanc:
    """A running test Orthanc: its DICOMweb endpoint (with the right password) and its port."""

    endpoint: Endpoint
    port: int

    def with_password(self, password: str) -> Endpoint:
        """The same endpoint with another password."""
        return Endpoint(self.endpoint.name, self.endpoint.url, USER, password)


@pytest.fixture(scope="session", name="orthanc")
def orthanc_fixture() -> Iterator[Orthanc]:
    """Orthanc with DICOMweb on a free port for the test session; skips without it."""
    executable, plugin = _executable(), _plugin()
    if executable is None or plugin is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed "
                    "(apt-get install orthanc orthanc-dicomweb)")
    folder = Path(tempfile.mkdtemp(prefix="bus-orthanc-"))
    port = free_port()
    config = {"Name": "bus-test", "StorageDirectory": str(folder / "db"),
              "IndexDirectory": str(folder / "db"), "HttpPort": port,
              "RemoteAccessAllowed": False, "DicomServerEnabled": False,
              "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
              "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
              "StableAge": 1}
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "w")
    process = subprocess.Popen([executable, str(folder / "orthanc.json")], stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, process)
        yield Orthanc(Endpoint("test", f"{url}/dicom-web", USER, PASSWORD), port)
    finally:
        stop_process(process, timeout=20)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _wait(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    """Until Orthanc answers (401 without credentials counts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with code {process.returncode}")
        try:
            urllib.request.urlopen(f"{url}/system", timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"Orthanc did not answer at {url} within {timeout} s")


# --- synthetic ultrasound studies ----------------------------------------------------------

def _base(study_uid: str, series_uid: str, sop_class: str, number: int,
          series_number: int, modality: str = "US", syntax: UID = ExplicitVRLittleEndian,
          accession: str = "ACC-1") -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20250314", "101500", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = accession, ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, series_number, number
    ds.StudyDescription = "US breast"
    ds.Manufacturer = "test"
    return ds


def _pixels(ds: Dataset, rgb: np.ndarray, photometric: str) -> None:
    frames = rgb if rgb.ndim == 4 else rgb[None]
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, photometric
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    if photometric == "YBR_FULL":
        from pydicom.pixels import convert_color_space

        frames = np.stack([convert_color_space(f, "RGB", "YBR_FULL") for f in frames])
    ds.PixelData = frames.astype(np.uint8).tobytes()


def us_study(accession: str = "ACC-1") -> list[Dataset]:
    """A breast-ultrasound study: a single-frame RGB image with an ultrasound region, a
    3-frame multi-frame image, and a YBR_FULL image (three series)."""
    rng = np.random.default_rng(7)
    study = generate_uid()
    single = _base(study, generate_uid(), US_IMAGE, 1, 1, accession=accession)
    image, _ = synthetic_image("malignant", rng, size=(120, 160))
    _pixels(single, image, "RGB")
    region = Dataset()
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 8, 6
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 151, 113
    single.SequenceOfUltrasoundRegions = [region]
    multi = _base(study, generate_uid(), US_MULTIFRAME, 1, 2, accession=accession)
    _pixels(multi, np.stack([synthetic_image("benign", rng, size=(96, 128))[0]
                             for _ in range(3)]), "RGB")
    ybr = _base(study, generate_uid(), US_IMAGE, 1, 3, accession=accession)
    _pixels(ybr, synthetic_image("benign", rng, size=(100, 100))[0], "YBR_FULL")
    return [single, multi, ybr]


def undecodable_study() -> list[Dataset]:
    """A study with one ultrasound image compressed as MPEG-4 (which nothing here decodes)."""
    from pydicom.encaps import encapsulate

    ds = _base(generate_uid(), generate_uid(), US_IMAGE, 1, 1, syntax=MPEG4,
               accession="ACC-MPEG")
    _pixels(ds, synthetic_image("benign", np.random.default_rng(1), size=(64, 64))[0], "RGB")
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01" + bytes(64)])
    ds["PixelData"].VR = "OB"
    return [ds]


def no_ultrasound_study() -> list[Dataset]:
    """A study whose only image is a secondary capture (modality OT), no ultrasound."""
    ds = _base(generate_uid(), generate_uid(), SC_STORAGE, 1, 1, modality="OT",
               accession="ACC-EMPTY")
    _pixels(ds, synthetic_image("normal", np.random.default_rng(2), size=(64, 64))[0], "RGB")
    return [ds]
