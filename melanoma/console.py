"""What a person reads in the terminal: the project's own log lines and progress bars.

`quiet()` sends everything else to a log file: the process's stderr at the file-descriptor level (so the C++
logs of Ray and TensorFlow too, and whatever Python writes to sys.stderr) and Python's root logger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import TextIO

from tqdm import tqdm

FULL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_terminal: TextIO | None = None  # the terminal while quiet() redirects stderr; sys.stderr otherwise


def terminal() -> TextIO:
    return _terminal or sys.stderr


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on the terminal (also while stderr goes to the log file)."""
    return tqdm(iterable, file=terminal(), dynamic_ncols=True, **kwargs)


class TerminalHandler(logging.Handler):
    """Log records as plain lines written above any progress bar; warnings and errors say so."""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        tqdm.write(text, file=terminal())


def plain() -> None:
    """The project's log lines on the terminal (unless the host process configured logging already)."""
    logging.basicConfig(level=logging.INFO, handlers=[TerminalHandler()])


def verbose() -> None:
    """Every log record of every library on stderr, with time, level and logger."""
    logging.basicConfig(level=logging.INFO, format=FULL_FORMAT)


@contextlib.contextmanager
def quiet(command: str) -> Iterator[str]:
    """Within: the project's log records and bars on the terminal, everything else in a new log file (yielded)."""
    global _terminal
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    fd, log_path = tempfile.mkstemp(prefix=f"melanoma-{command}-{stamp}-", suffix=".log")
    os.close(fd)
    root, project = logging.getLogger(), logging.getLogger("melanoma")
    file_handler = logging.FileHandler(log_path)
    file_handler.setFormatter(logging.Formatter(FULL_FORMAT))
    terminal_handler = TerminalHandler()
    saved_level = root.level
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    _terminal = os.fdopen(os.dup(2), "w", buffering=1)
    appending = os.open(log_path, os.O_WRONLY | os.O_APPEND)  # shared with the FileHandler: both append
    os.dup2(appending, 2)
    os.close(appending)
    root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    project.addHandler(terminal_handler)
    logging.captureWarnings(True)
    try:
        yield log_path
    finally:
        logging.captureWarnings(False)
        project.removeHandler(terminal_handler)
        root.removeHandler(file_handler)
        root.setLevel(saved_level)
        file_handler.close()
        sys.stderr.flush()
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        _terminal.close()
        _terminal = None


# ---------------------------------------------------------------- one-line results of the commands


def audit_lines(report: dict) -> str:
    lines = [
        f"{report['files']} files, {report['unique_images']} unique images, {report['duplicate_groups']} duplicate "
        f"groups, {report['conflicting_groups']} with conflicting labels",
        *(f"  {name:28s} {n}" for name, n in report["files_per_class"].items()),
    ]
    if "ground_truth" in report:
        gt = report["ground_truth"]
        lines.append(f"ground truth covers {gt['files_with_ground_truth']} files; the folder disagrees for {gt['folder_disagrees']}")
    return "\n".join(lines)


def split_line(manifest, out: str) -> str:
    counts = manifest.groupby("split").size().to_dict()
    return f"manifest: {len(manifest)} images ({counts.get('train', 0)} train, {counts.get('val', 0)} val) -> {out}"


def source_line(name: str, report: dict, work: str) -> str:
    if report.get("skipped"):
        return f"{name}: already in {work}, skipped"
    per_split = {split: sum(counts.values()) for split, counts in report["per_split"].items()}
    melanomas = report["melanomas_per_split"]
    return (
        f"{name}: " + ", ".join(f"{per_split.get(k, 0)} {k} ({melanomas.get(k, 0)} melanomas)" for k in ("train", "val", "test"))
        + f"; {report['duplicate_contents_dropped']} duplicate contents and {report['images_dropped_with_them']} images of "
        f"{report['groups_touching_work_dir_dropped']} groups already in the work dir dropped -> {work}"
    )


def card_line(card: dict, model_dir: str) -> str:
    """The published model's figures, and whether it is `latest` or waits for `melanoma promote`."""
    from melanoma import registry

    m, c = card["metrics"], card["calibration"]
    held_out = c["held_out"]
    latest = registry.read_card(model_dir)["version"]
    status = "latest" if latest == card["version"] else (
        f"latest stays {latest} until `melanoma promote {card['version']} --model-dir {model_dir} ...` compares them")
    return (
        f"model {card['version']}: balanced accuracy {m['balanced_accuracy']:.3f}, melanoma AUC {m['melanoma_auc']:.3f}, "
        f"alert threshold {c['alert_threshold']:.3f} (held-out sensitivity {held_out['sensitivity']:.2f}, "
        f"specificity {held_out['specificity']:.2f}, ECE {held_out['ece']:.3f}) -> {model_dir} ({status})"
    )


def summary_line(summary: dict) -> str:
    line = (
        f"scored {summary['scored']} images, {summary['errors']} errors, {summary['flagged']} flagged "
        f"({summary['scored_this_run']} new, {summary['images_per_second']} img/s) with model {summary['model_version']} "
        f"-> {summary['output_uri']}"
    )
    drift = summary.get("drift") or {}
    return line + ("; DRIFT ALERT: " + "; ".join(drift["reasons"]) if drift.get("alert") else "")


def report_line(r: dict) -> str:
    return (
        f"report of {r['run_date']}: {r['flagged']} flagged ({r['shown']} shown, {r['heatmaps']} heatmaps), "
        f"{r['errors']} errors -> {r['path']}"
    )


def model_card_line(r: dict) -> str:
    return f"model card of {r['version']} -> {r['path']}"
