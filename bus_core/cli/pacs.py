"""`python -m bus_core pacs find | predict | send`: the hospital archive from the command line
(bus_core.integrations.pacs.client), each a thin call into the library."""

from __future__ import annotations

import argparse
import datetime as dt
import json

from bus_core.cli.common import add_backend, write_output
from bus_core.data.images import load_image
from bus_core.errors import BusError
from bus_core.inference.cam import overlay
from bus_core.inference.predict import Predictor
from bus_core.inference.report import ReportContent, render_report
from bus_core.integrations.pacs.client import Pacs, send_result
from bus_core.integrations.pacs.dicom import prediction_finding
from bus_core.integrations.pacs.endpoints import PacsError, endpoint
from bus_core.roles import operator
from bus_core.runtime.device import DEVICE_CHOICES


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text}") from exc


def _pacs(args: argparse.Namespace):
    return Pacs(endpoint(args.endpoint))


def _predictor(args: argparse.Namespace):
    predictor = Predictor.from_path(args.model, device=args.device, backend=args.backend)
    if predictor.spec.uses_masks and not predictor.two_stage:
        raise BusError(f"{predictor.card.name} reads only an outlined lesion; images from the "
                       "PACS are read whole: choose a whole-image model with --model.")
    return predictor


def cmd_find(args: argparse.Namespace) -> int:
    """List the studies that match (no patient names)."""
    studies = _pacs(args).find_studies(patient_id=args.patient_id or "",
                                       accession=args.accession or "", date_from=args.date_from,
                                       date_to=args.date_to, modality=args.modality)
    if args.json:
        print(json.dumps([vars(s) for s in studies], indent=2))
        return 0
    if not studies:
        print("No study matches.")
    for s in studies:
        print(f"{s.date or '-':<9} patient {s.patient_id or '-':<14} accession "
              f"{s.accession or '-':<12} {'/'.join(s.modalities) or '-':<6} "
              f"{s.series_count} series, {s.instance_count} images  {s.study_uid}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict every ultrasound image of a study; print the results (and save them as JSON)."""
    pacs, predictor = _pacs(args), _predictor(args)
    rows = []
    for ref in pacs.ultrasound_instances(args.study):
        row = {"series_uid": ref.series_uid, "sop_uid": ref.sop_uid, "image": ref.label}
        try:
            image = load_image(pacs.fetch(ref).data, name=ref.label, frame=args.frame)
            prediction = predictor.predict(image)
            row.update(prediction.to_dict())
            print(f"{ref.label:<16} {prediction.label:<10}"
                  f"{' (uncertain)' if prediction.uncertain else '':<13}" + "  ".join(
                      f"{c} {p:5.1%}" for c, p in prediction.probabilities.items()))
        except BusError as exc:  # one unreadable image does not stop the study
            row["error"] = str(exc)
            print(f"{ref.label:<16} not read: {exc}")
        rows.append(row)
    if args.json:

        write_output(args.json, json.dumps({"study_uid": args.study, "model":
                                             predictor.card.name, "images": rows}, indent=2))
        print(f"Results written to {args.json}")
    return 0 if any("error" not in row for row in rows) else 2


def cmd_send(args: argparse.Namespace) -> int:
    """Predict one image of a study and store the report (Secondary Capture) and the result
    (structured report) in that study."""
    pacs, predictor = _pacs(args), _predictor(args)
    matches = [ref for ref in pacs.ultrasound_instances(args.study)
               if ref.sop_uid == args.instance]
    if not matches:
        raise PacsError("This study has no ultrasound image with that SOP instance UID.")
    fetched = pacs.fetch(matches[0])
    image = load_image(fetched.data, name=fetched.ref.label, frame=args.frame)
    prediction = predictor.predict(image)
    heat = predictor.explain(prediction)
    report = render_report(ReportContent(
        image=image, overlay=overlay(prediction.model_view, heat),
        probabilities=prediction.probabilities, label=prediction.label,
        model=f"{prediction.model} ({predictor.card.weights_sha256[:12]})",
        filename=fetched.ref.label, uncertain=prediction.uncertain,
        warnings=prediction.warnings, flag=prediction.flag_sentence()))
    sent = send_result(pacs, fetched.header,
                       prediction_finding(prediction, predictor.card.weights_sha256),
                       None if args.no_report else report, who=operator())
    print(f"{prediction.label}{' (uncertain)' if prediction.uncertain else ''} sent to the PACS:")
    for sop, series in zip(sent.sop_uids, sent.series_uids):
        print(f"  series {series}  instance {sop}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `pacs` command and its actions."""
    p = sub.add_parser("pacs", help="the hospital archive over DICOMweb: find, predict, send")
    p.add_argument("--endpoint", help="name of the PACS (default: the first configured)")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("find", help="list studies (QIDO-RS)")
    q.add_argument("--patient-id")
    q.add_argument("--accession")
    q.add_argument("--from", dest="date_from", type=_date, help="study date from (YYYY-MM-DD)")
    q.add_argument("--to", dest="date_to", type=_date, help="study date to (YYYY-MM-DD)")
    q.add_argument("--modality", default="US", help="modality in the study ('' for any)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_find)
    for name, func, helptext in (
            ("predict", cmd_predict, "predict every ultrasound image of a study"),
            ("send", cmd_send, "predict one image and store the report and result (STOW-RS)")):
        q = actions.add_parser(name, help=helptext)
        q.add_argument("--study", required=True, help="Study Instance UID")
        q.add_argument("--model", help="model folder (default: the active model)")
        q.add_argument("--frame", type=int, default=0, help="frame of multi-frame images")
        q.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
        add_backend(q)
        q.set_defaults(func=func)
        if name == "predict":
            q.add_argument("--json", help="also write the results to this JSON file")
        else:
            q.add_argument("--instance", required=True, help="SOP Instance UID of the image")
            q.add_argument("--no-report", action="store_true",
                           help="send only the structured report, not the report image")
