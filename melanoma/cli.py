"""`melanoma <command>`: parses the arguments, calls one function per command and prints its result.

Adding a command is one function that declares its flags and names the function it calls (COMMANDS below).
Exit codes: 0 done, 1 failed (one line on stderr says what and where), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date, datetime, timedelta, timezone

from melanoma import console, runtime
from melanoma.config import ARCHS, ENGINES, settings
from melanoma.errors import MelanomaError

DEFAULTS = settings()
RAY_ADDRESS_HELP = "Ray cluster address (default: RAY_ADDRESS, else a local Ray)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to each flag that has a default value; a flag whose default is worked out at run
    time (None) says so in its own help."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def iso_date(text: str) -> str:
    """YYYY-MM-DD, 'today' or 'yesterday' (UTC) -> YYYY-MM-DD."""
    today = datetime.now(timezone.utc).date()
    if text in ("today", "yesterday"):
        return (today - timedelta(days=text == "yesterday")).isoformat()
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a date YYYY-MM-DD, 'today' or 'yesterday'") from None


def _command(sub, name: str, run, help: str, logs: bool = False, check=None) -> argparse.ArgumentParser:
    """A subcommand calling run(args). logs: it runs Ray or TensorFlow, whose logs go to a log file unless -v.
    check(args) returns what is wrong with a combination of flags, or None."""
    c = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    c.add_argument("-v", "--verbose", action="store_true", help="show every log line of Ray, TensorFlow and absl here")
    c.set_defaults(run=run, logs=logs, check=check, command_parser=c)
    return c


# ---------------------------------------------------------------- data


def audit(sub) -> None:
    c = _command(sub, "audit", _audit, "Hash a class-folder dataset and report duplicates and conflicting labels.")
    c.add_argument("data", help="dataset root <root>/<class>/<image>: a local path or s3://bucket/prefix")
    c.add_argument("--ground-truth", help="CSV image,label with ISIC 2019 codes (MEL, NV, ...)")
    c.add_argument("--json", action="store_true", help="print one JSON object")


def _audit(args) -> None:
    from melanoma import dataset

    report = dataset.audit_uri(args.data, args.ground_truth)
    print(json.dumps(report) if args.json else console.audit_lines(report))


def split(sub) -> None:
    c = _command(sub, "split", _split, "Build the manifest (one row per unique image) and a seeded, stratified train/val split.")
    c.add_argument("data", help="dataset root, local or s3://")
    c.add_argument("--out", required=True, help="work directory for manifest.parquet and audit.json, local or s3://")
    c.add_argument("--ground-truth", help="resolve conflicting labels from this CSV (without it they are dropped)")
    c.add_argument("--lesions", help="CSV with image_id and lesion_id (e.g. HAM10000_metadata.csv): split those images by lesion")
    c.add_argument("--val-fraction", type=float, default=DEFAULTS.val_fraction, help="share of images in the validation split")
    c.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the split")


def _split(args) -> None:
    from melanoma import dataset

    manifest = dataset.make_split(args.data, args.out, args.val_fraction, args.seed, args.ground_truth, args.lesions)
    print(console.split_line(manifest, args.out))


def augment(sub) -> None:
    c = _command(sub, "augment", _augment, "Rebalance the training split with Augmentor samples (validation is never touched).")
    c.add_argument("work", help="work directory holding manifest.parquet; samples go to <work>/augmented/")
    group = c.add_mutually_exclusive_group()
    group.add_argument("--target-per-class", type=int, help="grow every class to this many images (default: the largest class)")
    group.add_argument("--add-per-class", type=int, help="add this many samples to every class")
    c.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the sampling and the transformations")


def _augment(args) -> None:
    from melanoma import augment

    samples = augment.augment_work_dir(args.work, args.seed, args.target_per_class, args.add_per_class)
    print(f"augmented: {len(samples)} samples from the training split -> {args.work}/{augment.AUGMENTED_DIR}")


def add_source(sub) -> None:
    c = _command(sub, "add-source", _add_source,
                 "Add a labelled source to a work dir: deduplicated by content, split by patient or lesion into train/val/test.",
                 check=lambda a: "--labels needs --images" if a.labels and not a.images else None)
    c.add_argument("work", help="work directory from `split`, local or s3://")
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("--labels", help="CSV with image_id, label (may be empty), melanoma (0/1), lesion_id, patient_id"
                                        " [, source]; needs --images")  # fmt: skip
    where.add_argument("--ham10000", metavar="ROOT", help="HAM10000 root: HAM10000_metadata.csv and images/<image_id>.jpg")
    where.add_argument("--outcomes", metavar="STORE", help="outcome store (melanoma outcomes add): the confirmed images, "
                                                           "fetched from where --scores scored them, split by night")  # fmt: skip
    c.add_argument("--images", help="folder or prefix holding <image_id>.jpg for --labels, local or s3://")
    c.add_argument("--scores", default=DEFAULTS.scores_uri, help="scores dataset the --outcomes confirm, local or s3://")
    c.add_argument("--name", help="the source's name in the manifest (default: 'ham10000', or the CSV's folder name)")
    c.add_argument("--val-fraction", type=float, default=0.1, help="share of groups (patients, lesions) for validation")
    c.add_argument("--test-fraction", type=float, default=0.1, help="share of groups held out as a test set")
    c.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the split")


def _add_source(args) -> None:
    from melanoma import ham10000, sources, storage

    if args.outcomes:
        report = sources.add_outcomes(args.work, args.outcomes, args.scores, args.val_fraction, args.test_fraction, args.seed)
        print(console.source_line(sources.OUTCOMES, report, args.work))
        return
    if args.ham10000:
        name, read = args.name or ham10000.NAME, lambda: ham10000.read_source(args.ham10000)
    else:
        name = args.name or storage.join(args.labels).rstrip("/").split("/")[-2]
        read = lambda: sources.read_labels(args.labels, args.images, name)  # noqa: E731
    report = sources.add_source(args.work, name, read, args.val_fraction, args.test_fraction, args.seed)
    print(console.source_line(name, report, args.work))


def pipeline(sub) -> None:
    c = _command(sub, "pipeline", _pipeline,
                 "From the labelled data to the published default model: split, augment, add the sources, train.", logs=True)
    c.add_argument("--data-root", required=True,
                   help="holds isic-9class/Train/, labels/, ham10000/ and isic-extra/ (as ../shared/data), local or s3://")
    c.add_argument("--work", required=True, help="work directory, local or s3://; steps whose output is there are skipped")
    c.add_argument("--model-dir", required=True, help="registry root to publish to, local or s3://")
    c.add_argument("--outcomes", metavar="STORE", help="outcome store: its confirmed images new to the work dir are added, split by night")
    c.add_argument("--scores", default=DEFAULTS.scores_uri, help="scores dataset the --outcomes confirm, local or s3://")
    c.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="at most this many epochs (early stopping may end sooner)")
    c.add_argument("--workers", type=int, default=DEFAULTS.workers, help="Ray Train workers")
    c.add_argument("--gpus-per-worker", type=float, default=DEFAULTS.gpus_per_worker, help="GPUs each worker asks for")
    c.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the splits, the sampling and the weights")
    c.add_argument("--address", help=RAY_ADDRESS_HELP)


def _pipeline(args) -> None:
    from melanoma import pipeline

    s = settings(epochs=args.epochs, workers=args.workers, gpus_per_worker=args.gpus_per_worker, seed=args.seed)
    pipeline.check_root(args.data_root)  # before starting Ray: a wrong path is one line at once
    runtime.connect(args.address, args.verbose)
    print(console.card_line(pipeline.run(s, args.data_root, args.work, args.model_dir, args.outcomes, args.scores), args.model_dir))


# ---------------------------------------------------------------- models


def train(sub) -> None:
    c = _command(sub, "train", _train, "Train on Ray Train, evaluate and calibrate on validation, publish to the model registry.", logs=True)
    c.add_argument("--data", required=True, help="work directory from `split` (and `augment`)")
    c.add_argument("--model-dir", required=True, help="registry root: <model-dir>/<version>/, local or s3://")
    c.add_argument("--arch", default=DEFAULTS.arch, choices=ARCHS, help="'default' is the best measured recipe (docs/quality.md)")
    c.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="at most this many epochs (early stopping may end sooner)")
    c.add_argument("--workers", type=int, default=DEFAULTS.workers, help="Ray Train workers")
    c.add_argument("--gpus-per-worker", type=float, default=DEFAULTS.gpus_per_worker, help="GPUs each worker asks for")
    c.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="global batch size, split over the workers")
    c.add_argument("--learning-rate", type=float, default=DEFAULTS.learning_rate, help="peak learning rate of Adam")
    c.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of weights, shuffling and calibration")
    c.add_argument("--storage", help="Ray Train storage for checkpoints (default: <model-dir>/_runs)")
    c.add_argument("--run-name", help="rerunning with the same name resumes from its last checkpoint (default: from the flags)")
    c.add_argument("--address", help=RAY_ADDRESS_HELP)


def _train(args) -> None:
    from melanoma import train

    s = settings(
        arch=args.arch, epochs=args.epochs, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        batch_size=args.batch_size, seed=args.seed, learning_rate=args.learning_rate,
    )  # fmt: skip
    runtime.connect(args.address, args.verbose)
    print(console.card_line(train.train(s, args.data, args.model_dir, args.storage, args.run_name), args.model_dir))


def ensemble(sub) -> None:
    c = _command(sub, "ensemble", _ensemble, "Publish the average of several published models, calibrated on a validation split.", logs=True)
    c.add_argument("models", nargs="+", metavar="MODEL", help="version dirs (or model dirs: their 'latest'), local or s3://")
    c.add_argument("--data", required=True,
                   help="work directory whose validation split calibrates the ensemble; no member may have trained on it")
    c.add_argument("--model-dir", required=True, help="registry root to publish to: <model-dir>/<version>/")


def _ensemble(args) -> None:
    from melanoma import ensemble

    print(console.card_line(ensemble.combine(settings(), args.models, args.data, args.model_dir), args.model_dir))


def promote(sub) -> None:
    c = _command(sub, "promote", _promote, "Point 'latest' at a candidate version only if it is not worse than latest on the same "
                 "labelled images (docs/promotion.md); every decision is logged in the registry.", logs=True)  # fmt: skip
    c.add_argument("candidate", metavar="CANDIDATE", help="a version published in --model-dir (its name or <model-dir>/<version>)")
    c.add_argument("--model-dir", required=True, help="registry root holding the candidate and 'latest', local or s3://")
    c.add_argument("--labels", required=True, help="CSV image_id,label (one of the 9 classes), local or s3://")
    c.add_argument("--images", required=True, help="folder or prefix holding <image_id>.jpg, local or s3://")
    c.add_argument("--force", action="store_true", help="move 'latest' even if the rule refuses the candidate (logged as forced)")


def _promote(args) -> None:
    from melanoma import promote

    entry = promote.promote(settings(), args.candidate, args.model_dir, args.labels, args.images, args.force)
    table = promote.comparison_lines(entry)
    if table:
        print(table)
    if entry["decision"] == "refused":
        raise promote.Refused(promote.decision_line(entry))
    print(promote.decision_line(entry))


# ---------------------------------------------------------------- scoring


def _scoring_flags(c) -> None:
    c.add_argument("--batch-size", type=int, default=DEFAULTS.score_batch_size, help="images per model call")
    c.add_argument("--actors", type=int, default=DEFAULTS.actors, help="inference actors (each loads the model once)")
    c.add_argument("--gpus-per-actor", type=float, default=DEFAULTS.gpus_per_actor, help="GPUs each actor asks for")
    c.add_argument("--engine", choices=ENGINES, default=DEFAULTS.engine,
                   help="inference engine: auto runs the model's TF-Lite export on CPU actors and Keras on GPU actors")  # fmt: skip
    c.add_argument("--stall-seconds", type=int, default=DEFAULTS.score_stall_seconds,
                   help="abort a run in which nothing is scored for this long (a frozen endpoint, missing CPUs)")  # fmt: skip
    c.add_argument("--address", help=RAY_ADDRESS_HELP)
    c.add_argument("--shadow", metavar="CANDIDATE",
                   help="then score the same images with this version dir into <output>_shadow/<version>/ (docs/promotion.md)")


def _score_settings(args):
    return settings(
        score_batch_size=args.batch_size, actors=args.actors, gpus_per_actor=args.gpus_per_actor, engine=args.engine,
        score_stall_seconds=args.stall_seconds, model_uri=args.model, scores_uri=args.output,
        archive_uri=getattr(args, "archive", None),
    )  # fmt: skip


def score(sub) -> None:
    c = _command(sub, "score", _score, "Score every image under an archive prefix into a Hive-partitioned Parquet dataset.", logs=True)
    c.add_argument("--model", required=True, help="model dir (follows 'latest') or version dir, local or s3://")
    c.add_argument("--input", required=True, help="prefix of images (jpg/png, any nesting) or tar shards, local or s3://")
    c.add_argument("--output", required=True, help="scores dataset root; rows go to <output>/run_date=D/")
    c.add_argument("--run-date", type=iso_date, help="partition date YYYY-MM-DD, 'today' or 'yesterday' (default: today, UTC)")
    _scoring_flags(c)


def _score(args) -> None:
    from melanoma import score

    runtime.connect(args.address, args.verbose)
    s = _score_settings(args)
    summary = score.score(s, args.model, args.input, args.output, args.run_date)
    print(console.summary_line(summary))
    if args.shadow:  # the same night, after the main run: a failing candidate never delays or spoils it
        shadow = _shadow_settings(s, args.shadow, args.output)
        print(console.summary_line(score.score(shadow, shadow.model_uri, args.input, shadow.scores_uri, summary["run_date"])))


def nightly(sub) -> None:
    c = _command(sub, "nightly", _nightly, "Score one night's archive prefix <archive>/<date>/ into <scores>/run_date=<date>/.", logs=True)
    c.add_argument("--date", required=True, type=iso_date, help="YYYY-MM-DD, 'today' or 'yesterday' (UTC)")
    c.add_argument("--model", default=DEFAULTS.model_uri, help="model dir (follows 'latest') or version dir")
    c.add_argument("--archive", default=DEFAULTS.archive_uri, help="archive root; the night's images are under <archive>/<date>/")
    c.add_argument("--output", default=DEFAULTS.scores_uri, help="scores dataset root")
    _scoring_flags(c)


def _nightly(args) -> None:
    from melanoma import score

    runtime.connect(args.address, args.verbose)
    s = _score_settings(args)
    print(console.summary_line(score.nightly(s, args.date)))
    if args.shadow:
        print(console.summary_line(score.nightly(_shadow_settings(s, args.shadow, args.output), args.date)))


def _shadow_settings(s, candidate: str, scores_uri: str):
    from melanoma import promote

    return promote.shadow_settings(s, candidate, scores_uri)


# ---------------------------------------------------------------- confirmed diagnoses


def outcomes(sub) -> None:
    c = _command(sub, "outcomes", _outcomes, "Record confirmed diagnoses in an outcome store (melanoma query/report/pipeline --outcomes read it).")
    actions = c.add_subparsers(dest="action", required=True, metavar="{add}")
    what = "Add a CSV of confirmed diagnoses, checked row by row: one bad row and nothing is written."
    a = actions.add_parser("add", help=what, description=what, formatter_class=HelpFormatter)
    a.add_argument("csv", metavar="CSV", help="columns image_id and/or sha256, diagnosis (one of the 9 classes) and/or melanoma "
                                              "(yes/no/1/0), confirmed_on (YYYY-MM-DD) [, note, lesion_id, patient_id]; local or s3://")  # fmt: skip
    a.add_argument("--store", required=True, help="outcome store root, local or s3://: one new Parquet file per add")


def _outcomes(args) -> None:
    from melanoma import outcomes

    r = outcomes.add(args.csv, args.store)
    print(f"outcomes: {r.added} added, {r.already_known} already known, of {r.rows} rows -> {r.file or r.store + ' (nothing new)'}")


# ---------------------------------------------------------------- reading the outputs

QUERY_FILTERS = ("date", "since", "until", "flagged", "min_risk", "cls", "top", "errors")


def query(sub) -> None:
    c = _command(sub, "query", _query, "Ask the scores dataset: riskiest images, flagged, errors, or any SQL over the view `scores`.",
                 check=_query_check)  # fmt: skip
    c.add_argument("scores", metavar="SCORES_URI", help="scores dataset root (<scores>/run_date=D/), local or s3://")
    c.add_argument("--date", type=iso_date, help="one night, YYYY-MM-DD, 'today' or 'yesterday'")
    c.add_argument("--since", type=iso_date, help="first night of a range")
    c.add_argument("--until", type=iso_date, help="last night of a range")
    c.add_argument("--flagged", action="store_true", help="only images at or above the alert threshold")
    c.add_argument("--min-risk", type=float, help="only images with at least this melanoma risk")
    c.add_argument("--class", dest="cls", help="only images of this predicted class, e.g. 'melanoma'")
    c.add_argument("--errors", action="store_true", help="only images that could not be scored, with the reason")
    c.add_argument("--top", type=int, help="at most N rows, riskiest first")
    c.add_argument("--sql", help="one SQL statement over the view `scores` (recipes: melanoma.query.RECIPES)")
    c.add_argument("--outcomes", metavar="STORE",
                   help="outcome store: the missed melanomas and realised sensitivity, specificity, AUC per night and model "
                        "version (--date/--since/--until narrow the nights); with --sql also the views `outcomes` and `confirmed`")  # fmt: skip
    c.add_argument("--runs", action="store_true",
                   help="one row per finished night from its run summary: counts, flagged share, drift alert and reasons, "
                        "PSI of each drift figure (--date/--since/--until narrow the nights)")  # fmt: skip
    c.add_argument("--format", default="table", choices=["table", "csv", "json"], help="how to print the rows")


def _query_check(args) -> str | None:
    if args.runs and (args.sql or args.outcomes or any(getattr(args, f) not in (None, False) for f in QUERY_FILTERS[3:])):
        return "--runs takes only --date, --since and --until"
    if args.sql and any(getattr(args, f) not in (None, False) for f in QUERY_FILTERS):
        return "--sql takes no filter flags: put the conditions into the SQL"
    if args.outcomes and not args.sql:
        if any(getattr(args, f) not in (None, False) for f in QUERY_FILTERS if f not in ("date", "since", "until")):
            return "--outcomes takes only --date, --since and --until (or --sql over the view `confirmed`)"
        if args.format == "csv":
            return "--outcomes prints two tables: --format table or json (one table as CSV: --sql over the view `confirmed`)"
    return None


def _query(args) -> None:
    from melanoma import query

    if args.runs:
        table = query.runs(args.scores, *((args.date, args.date) if args.date else (args.since, args.until)))
    elif args.sql:
        table = query.sql(args.scores, args.sql, args.outcomes)
    elif args.outcomes:
        since, until = (args.date, args.date) if args.date else (args.since, args.until)
        print(query.format_realised(*query.realised(args.scores, args.outcomes, since, until), args.format))
        return
    else:
        table = query.query(args.scores, **{f: getattr(args, f) for f in QUERY_FILTERS})
    print(query.format_table(table, args.format))


def report(sub) -> None:
    c = _command(sub, "report", _report, "Write one self-contained HTML file: a night's report for the dermatologist, or a model card.",
                 logs=True, check=_report_check)  # fmt: skip
    c.add_argument("scores", metavar="SCORES_URI", nargs="?", help="scores dataset root (omit for a model card)")
    c.add_argument("--date", type=iso_date, help="the night, YYYY-MM-DD, 'today' or 'yesterday'")
    c.add_argument("--out", required=True, help="the HTML file to write, local or s3://")
    c.add_argument("--model", help="model dir or version dir: heatmaps and threshold in a night's report; alone, its model card")
    c.add_argument("--top", type=int, default=100, help="at most N flagged lesions, riskiest first")
    c.add_argument("--heatmaps", type=int, default=5, help="Grad-CAM heatmaps for the N riskiest (needs --model)")
    c.add_argument("--outcomes", metavar="STORE", help="outcome store: the missed melanomas and realised figures of the nights up to --date")


def _report_check(args) -> str | None:
    if bool(args.scores) != bool(args.date) or not (args.scores or args.model):
        return "give SCORES_URI --date D for a night's report, or only --model URI for a model card"
    if args.outcomes and not args.scores:
        return "--outcomes goes into a night's report: give SCORES_URI --date D"
    return None


def _report(args) -> None:
    from melanoma import report

    if args.scores:
        r = report.morning_report(args.scores, args.date, args.out, args.model, top=args.top, heatmaps=args.heatmaps,
                                  outcomes_uri=args.outcomes)
        print(console.report_line(r))
    else:
        print(console.model_card_line(report.model_card_report(args.model, args.out)))


# ---------------------------------------------------------------- cluster and demo


def submit(sub) -> None:
    c = _command(sub, "submit", _submit, "Run jobs/train.py or jobs/nightly_score.py on a Ray cluster (Jobs API); one run per job and date at a time.")
    jobs = c.add_subparsers(dest="job", required=True, metavar="{train,nightly}")
    for job, what, date_help in (
        ("train", "jobs/train.py: train, evaluate, calibrate, publish", "names the submission melanoma-train-<date> (default: today, UTC)"),
        ("nightly", "jobs/nightly_score.py: score one night", "YYYY-MM-DD or 'yesterday' (UTC): the night, passed to the job as --date"),
    ):  # fmt: skip
        j = jobs.add_parser(job, help=what, description=what, formatter_class=HelpFormatter)
        j.add_argument("--address", help="job API URL http://HOST:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else http://127.0.0.1:8265)")
        j.add_argument("--date", help=date_help)
        j.add_argument("--no-wait", action="store_true", help="exit 0 once submitted instead of following the job to its end")
        j.add_argument("--timeout", type=float, help="stop waiting after this many seconds (exit 1; the job keeps running)")
        j.add_argument("--working-dir", default=".", help="checkout uploaded as the job's working_dir (holds jobs/)")
        j.add_argument("job_args", nargs="*", help="the job's own flags, after --: melanoma submit nightly --date D -- --model s3://...")


def _submit(args) -> int:
    from melanoma import submit

    return submit.submit(
        args.job, args.job_args, args.address, args.date, args.working_dir, wait=not args.no_wait, timeout=args.timeout
    )


def demo(sub) -> None:
    c = _command(sub, "demo", _demo, "Run the whole flow locally: SeaweedFS + Ray, audit, split, augment, train, nightly score.", logs=True)
    c.add_argument("--data", help="class-folder training set, local or s3:// (default: ../shared/data/isic-9class/Train)")
    c.add_argument("--archive-source", help="local folder of images to take tonight's archive from (default: ../shared/data/ham10000/images)")
    c.add_argument("--archive-images", type=int, default=200, help="how many archive images to score")
    c.add_argument("--epochs", type=int, default=3, help="training epochs (the demo trains briefly)")


def _demo(args) -> None:
    from melanoma import demo

    print(demo.closing_lines(demo.run(args.data, args.archive_source, args.epochs, args.archive_images, verbose=args.verbose)))


COMMANDS = (audit, split, augment, add_source, pipeline, train, ensemble, promote, score, nightly, outcomes, query, report, submit, demo)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="melanoma", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    problem = args.check(args) if args.check else None
    if problem:
        args.command_parser.error(problem)  # exits 2
    try:
        with runtime.session(args.command, args.verbose, args.logs):
            code = args.run(args)
    except MelanomaError as exc:
        print(f"melanoma {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
