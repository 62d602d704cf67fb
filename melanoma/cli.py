"""`melanoma <command>`: argument parsing only; each command calls one function.

Exit codes: 0 done, 1 failed (one line on stderr says what and where), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import date, datetime, timedelta, timezone

from melanoma.config import ARCHS, settings
from melanoma.errors import MelanomaError


def _audit(args) -> None:
    from melanoma import dataset

    report = dataset.audit_uri(args.data, args.ground_truth)
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"{report['files']} files, {report['unique_images']} unique images, {report['duplicate_groups']} duplicate groups, "
        f"{report['conflicting_groups']} with conflicting labels"
    )
    for name, n in report["files_per_class"].items():
        print(f"  {name:28s} {n}")
    if "ground_truth" in report:
        gt = report["ground_truth"]
        print(f"ground truth covers {gt['files_with_ground_truth']} files; the folder disagrees for {gt['folder_disagrees']}")


def _split(args) -> None:
    from melanoma import dataset

    manifest = dataset.make_split(args.data, args.out, args.val_fraction, args.seed, args.ground_truth, args.lesions)
    counts = manifest.groupby("split").size().to_dict()
    print(f"manifest: {len(manifest)} images ({counts.get('train', 0)} train, {counts.get('val', 0)} val) -> {args.out}")


def _augment(args) -> None:
    from melanoma import augment

    samples = augment.augment_work_dir(args.work, args.seed, args.target_per_class, args.add_per_class)
    print(f"augmented: {len(samples)} samples from the training split -> {args.work}/{augment.AUGMENTED_DIR}")


def _ham10000(args) -> None:
    from melanoma import ham10000

    caps = {"nevus": args.max_train_nevus} if args.max_train_nevus else None
    report = ham10000.build_work(args.work, args.ham, args.out, args.val_fraction, args.seed, caps,
                                 val_to_manifest=args.val_to_manifest)
    train_n = sum(report["per_split"]["train"].values())
    moved = sum(report["val_to_manifest"]["per_class"].values())
    test_n = sum(report["per_split"]["val"].values()) - moved
    print(f"HAM10000: {train_n} training images, {moved} validation images joined the manifest, {test_n} held out in "
          f"{args.out}/{ham10000.HAM_VAL}; {report['dropped_lesions_touching_9class']} lesions dropped (already in "
          f"{args.work}) -> {args.out}")


def _train(args) -> None:
    from melanoma import runtime, train

    s = settings(
        arch=args.arch, epochs=args.epochs, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        batch_size=args.batch_size, seed=args.seed, learning_rate=args.learning_rate,
    )
    runtime.connect(args.address)
    _print_card(train.train(s, args.data, args.model_dir, args.storage, args.run_name), args.model_dir)


def _ensemble(args) -> None:
    from melanoma import ensemble

    _print_card(ensemble.combine(settings(), args.models, args.data, args.model_dir), args.model_dir)


def _print_card(card: dict, model_dir: str) -> None:
    m, c = card["metrics"], card["calibration"]
    held_out = c["held_out"]
    print(
        f"model {card['version']}: balanced accuracy {m['balanced_accuracy']:.3f}, melanoma AUC {m['melanoma_auc']:.3f}, "
        f"alert threshold {c['alert_threshold']:.3f} (held-out sensitivity {held_out['sensitivity']:.2f}, "
        f"specificity {held_out['specificity']:.2f}, ECE {held_out['ece']:.3f}) -> {model_dir}"
    )


def _print_summary(summary: dict) -> None:
    print(
        f"scored {summary['scored']} images, {summary['errors']} errors, {summary['flagged']} flagged "
        f"({summary['scored_this_run']} new, {summary['images_per_second']} img/s) with model {summary['model_version']} "
        f"-> {summary['output_uri']}"
    )


def _score_settings(args):
    return settings(
        score_batch_size=args.batch_size, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
        score_stall_seconds=args.stall_seconds, model_uri=getattr(args, "model", None), archive_uri=getattr(args, "archive", None),
        scores_uri=getattr(args, "output", None),
    )


def _iso_date(text: str) -> str:
    if text == "yesterday":
        return (datetime.now(timezone.utc).date() - timedelta(days=1)).isoformat()
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a date YYYY-MM-DD") from None


def _score(args) -> None:
    from melanoma import runtime, score

    runtime.connect(args.address)
    _print_summary(score.score(_score_settings(args), args.model, args.input, args.output, args.run_date))


def _nightly(args) -> None:
    from melanoma import runtime, score

    runtime.connect(args.address)
    _print_summary(score.nightly(_score_settings(args), args.date))


def _demo(args) -> None:
    from melanoma import demo, query

    summary = demo.run(args.data, args.archive_source, args.epochs, args.archive_images)
    local = summary["local_scores"]
    riskiest = query.query(local, date=summary["run_date"], top=10).select(
        ["image_id", "melanoma_risk", "flagged", "predicted_class"]
    )
    print("\nThe ten riskiest images of the night:")
    print(query.format_table(riskiest, "table"))
    print(f"\nScores: {summary['output_uri']} (S3 data in .demo/seaweedfs) and a local copy in {local}")
    print(f"Query them: melanoma query {local} --top 10   or   melanoma query {local} --sql \"SELECT ... FROM scores\"")
    _print_summary(summary)


def _query(args) -> None:
    from melanoma import query

    filters = (args.date, args.since, args.until, args.flagged, args.min_risk, args.cls, args.top, args.errors)
    if args.sql and any(f not in (None, False) for f in filters):
        raise query.QueryError("--sql takes no filter flags: put the conditions into the SQL")
    if args.sql:
        table = query.sql(args.scores, args.sql)
    else:
        table = query.query(
            args.scores, date=args.date, since=args.since, until=args.until, flagged=args.flagged,
            min_risk=args.min_risk, cls=args.cls, top=args.top, errors=args.errors,
        )
    print(query.format_table(table, args.format))


def _report(args) -> None:
    from melanoma import query, report

    if args.scores and args.date:
        r = report.morning_report(args.scores, args.date, args.out, args.model, top=args.top, heatmaps=args.heatmaps)
        print(f"report of {r['run_date']}: {r['flagged']} flagged ({r['shown']} shown, {r['heatmaps']} heatmaps), "
              f"{r['errors']} errors -> {r['path']}")
    elif not args.scores and not args.date and args.model:
        r = report.model_card_report(args.model, args.out)
        print(f"model card of {r['version']} -> {r['path']}")
    else:
        raise query.QueryError("give SCORES_URI --date D for a night's report, or only --model URI for a model card")


def _submit(args) -> int:
    from melanoma import submit

    return submit.submit(
        args.job, args.job_args, args.address, args.date, args.working_dir, wait=not args.no_wait, timeout=args.timeout
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="melanoma", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = settings()

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        c.set_defaults(func=func)
        return c

    c = command("audit", _audit, "Hash a class-folder dataset and report duplicates and conflicting labels.")
    c.add_argument("data", help="dataset root <root>/<class>/<image>: a local path or s3://bucket/prefix")
    c.add_argument("--ground-truth", help="CSV image,label with ISIC 2019 codes (MEL, NV, ...)")
    c.add_argument("--json", action="store_true", help="print one JSON object")

    c = command("split", _split, "Build the manifest (one row per unique image) and a seeded, stratified train/val split.")
    c.add_argument("data", help="dataset root, local or s3://")
    c.add_argument("--out", required=True, help="work directory for manifest.parquet and audit.json, local or s3://")
    c.add_argument("--ground-truth", help="resolve conflicting labels from this CSV (without it they are dropped)")
    c.add_argument("--lesions", help="CSV with image_id and lesion_id (e.g. HAM10000_metadata.csv): split those images by lesion")
    c.add_argument("--val-fraction", type=float, default=d.val_fraction)
    c.add_argument("--seed", type=int, default=d.seed)

    c = command("augment", _augment, "Rebalance the training split with Augmentor samples (validation is never touched).")
    c.add_argument("work", help="work directory holding manifest.parquet; samples go to <work>/augmented/")
    group = c.add_mutually_exclusive_group()
    group.add_argument("--target-per-class", type=int, help="grow every class to this many images (default: the largest class)")
    group.add_argument("--add-per-class", type=int, help="add this many samples to every class (the seed notebook added 500)")
    c.add_argument("--seed", type=int, default=d.seed)

    c = command("ham10000", _ham10000, "Add HAM10000 images to a split's training (and validation) data, split by lesion.")
    c.add_argument("work", help="work directory from `split`")
    c.add_argument("--ham", required=True, help="HAM10000 root: HAM10000_metadata.csv and images/<image_id>.jpg")
    c.add_argument("--out", required=True, help="new work directory for `melanoma train --data`, local or s3://")
    c.add_argument("--val-fraction", type=float, default=d.val_fraction, help="of HAM lesions, held out from training")
    c.add_argument("--val-to-manifest", type=float, default=0.5,
                   help="of those held-out lesions, joining the validation split (early stopping, calibration); "
                        "the rest stay untouched in ham_val.parquet as a test set")
    c.add_argument("--max-train-nevus", type=int, default=2000, help="cap on HAM nevus training images (0: all)")
    c.add_argument("--seed", type=int, default=d.seed)

    c = command("train", _train, "Train on Ray Train, evaluate and calibrate on validation, publish to the model registry.")
    c.add_argument("--data", required=True, help="work directory from `split` (and `augment`)")
    c.add_argument("--model-dir", required=True, help="registry root: <model-dir>/<version>/, local or s3://")
    c.add_argument("--arch", default=d.arch, choices=ARCHS, help="'default' is the best measured recipe (docs/quality.md)")
    c.add_argument("--epochs", type=int, default=d.epochs)
    c.add_argument("--workers", type=int, default=d.workers)
    c.add_argument("--gpus-per-worker", type=float, default=d.gpus_per_worker)
    c.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size, split over the workers")
    c.add_argument("--learning-rate", type=float, default=d.learning_rate)
    c.add_argument("--seed", type=int, default=d.seed)
    c.add_argument("--storage", help="Ray Train storage for checkpoints (default <model-dir>/_runs)")
    c.add_argument("--run-name", help="rerunning with the same name resumes from its last checkpoint")
    c.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")

    c = command("ensemble", _ensemble, "Publish the average of several published models, calibrated on a validation split.")
    c.add_argument("models", nargs="+", metavar="MODEL", help="version dirs (or model dirs: their 'latest'), local or s3://")
    c.add_argument("--data", required=True,
                   help="work directory whose validation split calibrates the ensemble; no member may have trained on it")
    c.add_argument("--model-dir", required=True, help="registry root to publish to: <model-dir>/<version>/")

    def scoring_flags(c):
        c.add_argument("--batch-size", type=int, default=d.score_batch_size)
        c.add_argument("--actors", type=int, default=d.actors, help="inference actors (each loads the model once)")
        c.add_argument("--gpus-per-actor", type=float, default=d.gpus_per_actor)
        c.add_argument("--stall-seconds", type=int, default=d.score_stall_seconds,
                       help="abort a run in which nothing is scored for this long (a frozen endpoint, missing CPUs)")
        c.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")

    c = command("score", _score, "Score every image under an archive prefix into a Hive-partitioned Parquet dataset.")
    c.add_argument("--model", required=True, help="model dir (follows 'latest') or version dir, local or s3://")
    c.add_argument("--input", required=True, help="prefix of images (jpg/png, any nesting) or tar shards, local or s3://")
    c.add_argument("--output", required=True, help="scores dataset root; rows go to <output>/run_date=D/")
    c.add_argument("--run-date", type=_iso_date, help="partition date YYYY-MM-DD (default: today)")
    scoring_flags(c)

    c = command("nightly", _nightly, "Score one night's archive prefix <archive>/<date>/ into <scores>/run_date=<date>/.")
    c.add_argument("--date", required=True, type=_iso_date, help="YYYY-MM-DD or 'yesterday' (UTC)")
    c.add_argument("--model", default=d.model_uri, help="model dir (follows 'latest') or version dir")
    c.add_argument("--archive", default=d.archive_uri, help="archive root; the night's images are under <archive>/<date>/")
    c.add_argument("--output", default=d.scores_uri, help="scores dataset root")
    scoring_flags(c)

    c = command("query", _query, "Ask the scores dataset: riskiest images, flagged, errors, or any SQL over the view `scores`.")
    c.add_argument("scores", metavar="SCORES_URI", help="scores dataset root (<scores>/run_date=D/), local or s3://")
    c.add_argument("--date", type=_iso_date, help="one night, YYYY-MM-DD or 'yesterday'")
    c.add_argument("--since", type=_iso_date, help="first night of a range")
    c.add_argument("--until", type=_iso_date, help="last night of a range")
    c.add_argument("--flagged", action="store_true", help="only images at or above the alert threshold")
    c.add_argument("--min-risk", type=float, help="only images with at least this melanoma risk")
    c.add_argument("--class", dest="cls", help="only images of this predicted class, e.g. 'melanoma'")
    c.add_argument("--errors", action="store_true", help="only images that could not be scored, with the reason")
    c.add_argument("--top", type=int, help="at most N rows, riskiest first")
    c.add_argument("--sql", help="one SQL statement over the view `scores` (recipes: melanoma.query.RECIPES)")
    c.add_argument("--format", default="table", choices=["table", "csv", "json"])

    c = command("report", _report, "Write one self-contained HTML file: a night's report for the dermatologist, or a model card.")
    c.add_argument("scores", metavar="SCORES_URI", nargs="?", help="scores dataset root (omit for a model card)")
    c.add_argument("--date", type=_iso_date, help="the night, YYYY-MM-DD or 'yesterday'")
    c.add_argument("--out", required=True, help="the HTML file to write, local or s3://")
    c.add_argument("--model", help="model version dir: heatmaps and threshold in a night's report; alone, its model card")
    c.add_argument("--top", type=int, default=100, help="at most N flagged lesions, riskiest first")
    c.add_argument("--heatmaps", type=int, default=5, help="Grad-CAM heatmaps for the N riskiest (needs --model)")

    c = command("submit", _submit, "Run jobs/train.py or jobs/nightly_score.py on a Ray cluster (Jobs API); one run per job and date at a time.")
    jobs = c.add_subparsers(dest="job", required=True, metavar="{train,nightly}")
    for job, what, date_help in (
        ("train", "jobs/train.py: train, evaluate, calibrate, publish", "names the submission melanoma-train-<date> (default: today, UTC)"),
        ("nightly", "jobs/nightly_score.py: score one night", "YYYY-MM-DD or 'yesterday' (UTC): the night, passed to the job as --date"),
    ):
        j = jobs.add_parser(job, help=what, description=what, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        j.add_argument("--address", help="job API URL http://HOST:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else http://127.0.0.1:8265)")
        j.add_argument("--date", help=date_help)
        j.add_argument("--no-wait", action="store_true", help="exit 0 once submitted instead of following the job to its end")
        j.add_argument("--timeout", type=float, help="stop waiting after this many seconds (exit 1; the job keeps running)")
        j.add_argument("--working-dir", default=".", help="checkout uploaded as the job's working_dir (holds jobs/)")
        j.add_argument("job_args", nargs="*", help="the job's own flags, after --: melanoma submit nightly --date D -- --model s3://...")

    c = command("demo", _demo, "Run the whole flow locally: SeaweedFS + Ray, audit, split, augment, train, nightly score.")
    c.add_argument("--data", help="class-folder training set, local or s3:// (default: ../shared/data/isic-9class/Train)")
    c.add_argument("--archive-source", help="local folder of images to upload as tonight's archive (default: HAM10000)")
    c.add_argument("--archive-images", type=int, default=200, help="how many archive images to upload")
    c.add_argument("--epochs", type=int, default=3, help="training epochs (the demo trains briefly)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
    except MelanomaError as exc:
        _stop_worker_logs()
        print(f"melanoma {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return code or 0


def _stop_worker_logs() -> None:
    """Ray forwards worker output to this terminal from a background thread; a worker's message about the same
    failure can arrive after ours. Disconnecting first keeps the one-line error the last line."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
