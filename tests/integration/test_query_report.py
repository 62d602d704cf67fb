"""melanoma.query and melanoma.report on a dataset written by the real scorer (Ray cluster, SeaweedFS), and the
HTML reports opened in a real browser (Debian's chromium, headless).

The models are real model files, untrained: a from-scratch architecture with a random output layer scaled up, so
that images get different risks. Two nights are scored, each by another model version, over the same archive of
40 HAM10000 images (four of them inside a tar shard) plus one corrupt file with a hostile name.
"""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import subprocess
import tarfile
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
from PIL import Image

from melanoma import images, layout, metrics, query, registry, report, score, storage
from melanoma import model as architectures
from melanoma.config import CLASS_NAMES, MELANOMA, settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NIGHTS = ("2026-11-26", "2026-11-27")
EVIL = "<img src=x onerror=alert(1)>"  # a file name an archive may hold: it must never become markup
TEMPERATURE = 0.5
IMAGE_SIZE = 180
# Untrained ImageNet features (the default architecture) drive such a head's melanoma risk to 1.0 for every image,
# and ties would hide which lesions are the riskiest; a from-scratch network spreads the risks.
ARCH = "residual-sep-v2"
WINDOW = (1200, 3000)
# Written into a copy of a report: what the browser made of each <img>, read back with --dump-dom.
PROBE = """<pre id="render-check" style="display:none"></pre><script>
window.addEventListener("load", () => {
  const found = [...document.images].map(i => { const r = i.getBoundingClientRect();
    return {id: i.id, cls: i.className, w: i.naturalWidth, h: i.naturalHeight, complete: i.complete,
            x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; });
  document.getElementById("render-check").textContent = JSON.stringify(found);
});
</script>"""


@dataclass
class Scored:
    scores: str  # s3://.../scores
    local: str  # a local copy of it
    models: list[str]  # version dirs, one per night
    cards: list[dict]
    summaries: dict[str, dict]  # run date -> what score() returned


def _untrained(seed: int, path: Path, kernel_scale: float, melanoma_positive: bool):
    """ARCH, untrained, with a random output layer of the given scale, so that images get
    different risks; with all melanoma weights positive, Grad-CAM has regions to show."""
    import keras

    keras.utils.set_random_seed(seed)
    net = architectures.build(ARCH, len(CLASS_NAMES), IMAGE_SIZE)
    dense = net.get_layer("probabilities")
    kernel = np.random.default_rng(seed).normal(0, kernel_scale, dense.kernel.shape).astype("float32")
    if melanoma_positive:
        kernel[:, CLASS_NAMES.index(MELANOMA)] = np.abs(kernel[:, CLASS_NAMES.index(MELANOMA)]) / 2
    dense.kernel.assign(kernel)
    net.save(path)
    return net


def _validation_metrics(seed: int) -> tuple[dict, dict]:
    """(metrics with ROC points, calibration) as train.py would store them, from synthetic validation predictions."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASS_NAMES), 400)
    probs = rng.dirichlet(np.ones(len(CLASS_NAMES)), 400)
    probs[np.arange(400), labels] += rng.uniform(0, 1.5, 400)
    probs /= probs.sum(axis=1, keepdims=True)
    mel = CLASS_NAMES.index(MELANOMA)
    calibration = metrics.calibrate(probs, labels, mel, 0.9, seed)
    calibrated = metrics.temperature_scale(probs, calibration["temperature"])
    fpr, tpr = metrics.roc_curve(calibrated[:, mel], labels == mel)
    evaluation = metrics.classification_report(calibrated, labels, list(CLASS_NAMES), MELANOMA)
    return evaluation | {"roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}, calibration


def _archive(root: Path, files: list[Path], riskiest: set[int]) -> Path:
    """Model A's riskiest images inside a tar shard (so the report must read tar members), the others loose,
    plus a truncated JPEG whose name is markup."""
    (root / "clinic-a").mkdir(parents=True)
    (root / "shards").mkdir()
    with tarfile.open(root / "shards" / "night-0000.tar", "w") as tar:
        for i, f in enumerate(files):
            if i in riskiest:
                tar.add(f, arcname=f"lesions/{f.name}")
            else:
                shutil.copy(f, root / "clinic-a" / f.name)
    (root / "clinic-a" / f"{EVIL}.jpg").write_bytes(files[0].read_bytes()[:300])
    return root


@pytest.fixture(scope="module")
def scored(s3, ray_cluster, shared_data, tmp_path_factory) -> Scored:
    import ray

    work = tmp_path_factory.mktemp("query-report")
    files = sorted((shared_data / "ham10000" / "images").glob("*.jpg"))[:40]
    pixels = np.stack([images.resize(images.decode(f.read_bytes(), 10**8, 1024), IMAGE_SIZE) for f in files]).astype(np.float32)
    mel = CLASS_NAMES.index(MELANOMA)
    bucket = s3.make_bucket(f"reports-{uuid.uuid4().hex[:8]}")

    models, cards, risks = [], [], []
    for seed in (0, 1):
        model_file = work / f"untrained-{seed}.keras"
        net = _untrained(seed, model_file, kernel_scale=(0.3, 2.0)[seed], melanoma_positive=seed == 0)
        risk = metrics.temperature_scale(np.asarray(net.predict_on_batch(pixels), dtype=np.float64), TEMPERATURE)[:, mel]
        validation, calibration = _validation_metrics(seed)
        if seed == 1:  # model A's card has everything train.py can store; model B's has no ROC points and no history
            del validation["roc"]
        card = {
            "version": f"20261125-00000{seed}-untrained",
            "arch": ARCH,
            "class_names": list(CLASS_NAMES),
            "positive_class": MELANOMA,
            "input_size": [IMAGE_SIZE, IMAGE_SIZE, 3],
            "data_uri": f"s3://training/<b>{seed}</b>",
            "train_images": 1600,
            "val_images": 400,
            "temperature": TEMPERATURE,
            "alert_threshold": float(np.quantile(risk, 0.7)),  # about a third of the images are flagged
            "metrics": validation,
            "calibration": calibration,
            **({"history": [{"epoch": e, "train_loss": 2 / e, "val_loss": 2 / e + 0.1} for e in (1, 2, 3)]} if seed == 0 else {}),
        }
        models.append(registry.publish(f"{bucket}/models", str(model_file), card))
        cards.append(registry.read_card(models[-1]))
        risks.append(risk)

    archive = _archive(work / "archive", files, riskiest=set(np.argsort(risks[0])[-4:]))
    s3.upload_dir(archive, f"{bucket}/archive")

    scores_uri = f"{bucket}/scores"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=ray_cluster.address)
    try:
        summaries = {
            night: score.score(settings(actors=1, score_batch_size=16), model_uri, f"{bucket}/archive", scores_uri, night)
            for night, model_uri in zip(NIGHTS, models)
        }
    finally:
        ray.shutdown()
    for summary in summaries.values():
        assert (summary["scored"], summary["errors"]) == (40, 1)
        assert 0 < summary["flagged"] < 40

    fs, path = storage.pyarrow_fs(scores_uri)
    local = work / "scores-copy"
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Scored(scores_uri, str(local), models, cards, summaries)


@pytest.fixture(params=["s3", "local"])
def scores_uri(request, scored) -> str:
    return scored.scores if request.param == "s3" else scored.local


def rows_of(scores_uri: str, night: str) -> list[dict]:
    """The oracle: one night's rows read by pyarrow alone."""
    fs, path = storage.pyarrow_fs(layout.partition(scores_uri, night))
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()


def scored_rows(scores_uri: str, night: str) -> list[dict]:
    return [r for r in rows_of(scores_uri, night) if r["error"] is None]


# ---------------------------------------------------------------- query


def test_riskiest_images_of_a_night(scores_uri):
    top = query.query(scores_uri, date=NIGHTS[0], top=5).to_pylist()
    recipe = query.sql(scores_uri, query.RECIPES["riskiest"].format(date=NIGHTS[0], n=5)).to_pylist()

    expected = sorted(scored_rows(scores_uri, NIGHTS[0]), key=lambda r: -r["melanoma_risk"])[:5]
    assert [r["image_uri"] for r in top] == [r["image_uri"] for r in expected]
    assert [r["image_uri"] for r in recipe] == [r["image_uri"] for r in expected]
    assert [r["melanoma_risk"] for r in top] == [r["melanoma_risk"] for r in expected]
    assert {str(r["run_date"]) for r in top} == {NIGHTS[0]}


def test_flagged_counts_per_night(scores_uri, scored):
    table = query.sql(scores_uri, query.RECIPES["flagged_per_night"]).to_pylist()

    assert [(str(r["run_date"]), r["flagged"], r["images"]) for r in table] == [
        (night, scored.summaries[night]["flagged"], scored.summaries[night]["rows"]) for night in NIGHTS
    ]


def test_error_rows(scores_uri):
    failed = query.query(scores_uri, errors=True).to_pylist()
    recipe = query.sql(scores_uri, query.RECIPES["errors"]).to_pylist()

    assert sorted(str(r["run_date"]) for r in failed) == list(NIGHTS)
    for row in failed + recipe:
        assert row["image_uri"].endswith(f"/clinic-a/{EVIL}.jpg")
        assert row["error"].startswith("truncated or corrupt image")
    assert [r["melanoma_risk"] for r in failed] == [None, None]
    assert len(recipe) == 2


def test_class_distribution(scores_uri):
    table = query.sql(scores_uri, query.RECIPES["class_distribution"]).to_pylist()

    expected = Counter(r["predicted_class"] for night in NIGHTS for r in scored_rows(scores_uri, night))
    assert {r["predicted_class"]: r["images"] for r in table} == dict(expected)
    assert len(expected) > 1


def test_two_model_versions_side_by_side(scores_uri, scored):
    a, b = (card["version"] for card in scored.cards)
    pairs = query.sql(scores_uri, query.RECIPES["two_models"].format(version_a=a, version_b=b)).to_pylist()

    by_sha = [{r["sha256"]: r for r in scored_rows(scores_uri, night)} for night in NIGHTS]
    assert len(pairs) == 40
    for pair in pairs:
        assert pair["risk_a"] == by_sha[0][pair["sha256"]]["melanoma_risk"]
        assert pair["risk_b"] == by_sha[1][pair["sha256"]]["melanoma_risk"]
        assert (str(pair["run_date_a"]), str(pair["run_date_b"])) == NIGHTS
    gaps = [abs(p["risk_a"] - p["risk_b"]) for p in pairs]
    assert gaps == sorted(gaps, reverse=True)


def test_filters_narrow_the_rows(scores_uri, scored):
    night = scored_rows(scores_uri, NIGHTS[1])
    cls = Counter(r["predicted_class"] for r in night).most_common(1)[0][0]
    median = float(np.median([r["melanoma_risk"] for r in night]))

    flagged = query.query(scores_uri, date=NIGHTS[1], flagged=True)
    assert flagged.num_rows == scored.summaries[NIGHTS[1]]["flagged"]
    assert all(r["flagged"] and r["model_version"] == scored.cards[1]["version"] for r in flagged.to_pylist())
    risky = query.query(scores_uri, date=NIGHTS[1], min_risk=median)
    assert risky.num_rows == sum(r["melanoma_risk"] >= median for r in night)
    of_class = query.query(scores_uri, date=NIGHTS[1], cls=cls)
    assert of_class.num_rows == sum(r["predicted_class"] == cls for r in night)
    assert query.query(scores_uri, since=NIGHTS[1]).num_rows == 41
    assert query.query(scores_uri, since=NIGHTS[0], until=NIGHTS[1]).num_rows == 82
    assert query.query(scores_uri, until=NIGHTS[0], flagged=True, top=3).num_rows == 3


def test_a_night_filter_never_opens_other_nights(scores_uri, tmp_path):
    """A broken file in another night's directory is never read when a night is asked for."""
    fs, path = storage.pyarrow_fs(scores_uri)
    copy = f"{scores_uri}-{uuid.uuid4().hex[:6]}" if storage.is_s3(scores_uri) else str(tmp_path / "scores")
    copy_fs, copy_path = storage.pyarrow_fs(copy)
    pafs.copy_files(path, copy_path, source_filesystem=fs, destination_filesystem=copy_fs)
    storage.write_bytes(storage.join(copy, "run_date=2026-11-30", "part-0.parquet"), b"not parquet")

    assert query.query(copy, date=NIGHTS[0]).num_rows == 41
    assert query.query(copy, since=NIGHTS[0], until=NIGHTS[1]).num_rows == 82
    assert query.sql(copy, f"SELECT count(*) AS n FROM scores WHERE run_date <= '{NIGHTS[1]}'").to_pylist() == [{"n": 82}]
    with pytest.raises(query.QueryError, match=r"run_date=2026-11-30/part-0\.parquet"):
        query.query(copy, date="2026-11-30")


def test_errors_are_one_line(scored, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        (lambda: query.query(str(tmp_path / "missing")), "no scores dataset there"),
        (lambda: query.query(f"{scored.scores}-missing"), "no scores dataset there"),
        (lambda: query.query(str(tmp_path / "empty")), "no partitions"),
        (lambda: query.sql(scored.scores, "SELEC * FROM scores"), "Parser Error: syntax error"),
        (lambda: query.sql(scored.scores, "SELECT nope FROM scores"), "Binder Error"),
        (lambda: query.query(scored.scores, date="2026-12-24"), rf"no partition run_date=2026-12-24 \(nights present: {NIGHTS[0]} "),
        (lambda: query.query(scored.local, date="2026-02-30"), "'2026-02-30' is not a date YYYY-MM-DD"),
        (lambda: query.query(scored.local, since="2027-01-01"), "no night between 2027-01-01 and the last"),
        (lambda: query.query(scored.local, date=NIGHTS[0], since=NIGHTS[0]), "either a date or a since/until range"),
        (lambda: query.query(scored.local, cls="mole"), "unknown class 'mole'"),
        (lambda: query.format_table(query.query(scored.local, top=1), "xml"), "unknown format 'xml'"),
    ]
    for call, message in cases:
        with pytest.raises(query.QueryError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_output_formats(scored):
    table = query.query(scored.local, date=NIGHTS[0], top=3)
    uris = table.column("image_uri").to_pylist()

    text = query.format_table(table, "table").splitlines()
    assert text[0].split()[:4] == ["image_id", "image_uri", "sha256", "melanoma_risk"]
    assert text[-1] == "(3 rows)" and len(text) == 6
    assert pacsv.read_csv(io.BytesIO(query.format_table(table, "csv").encode())).column("image_uri").to_pylist() == uris
    rows = json.loads(query.format_table(table, "json"))
    assert [r["image_uri"] for r in rows] == uris
    assert rows[0]["run_date"] == NIGHTS[0] and rows[0]["scored_at"].endswith("+00:00")


# ---------------------------------------------------------------- reports in a browser


def chromium(url: str, profile: Path, *args: str) -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("the report tests need Debian's chromium: apt-get install -y chromium", pytrace=False)
    command = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
        "--hide-scrollbars", "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args, url,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def render(page: Path) -> tuple[list[dict], Image.Image]:
    """(each <img> as the browser decoded and laid it out, a screenshot of the first 1200x3000 pixels).

    The screenshot is of the page as written. The layout comes from a copy with a probe script: the page's
    Content-Security-Policy allows no script, so the copy's policy also allows inline scripts, and images from
    data: URIs only, as before. The probe adds only a hidden element, so both lay out the same."""
    shot = page.with_suffix(".png")
    chromium(page.as_uri(), page.parent / "profile-shot", f"--screenshot={shot}")
    source = page.read_text()
    assert "img-src data:;" in source
    probe = page.with_name(f"{page.stem}-probe.html")
    probed = source.replace("img-src data:;", "img-src data:; script-src 'unsafe-inline';").replace("</body>", PROBE + "</body>")
    probe.write_text(probed)
    dom = chromium(probe.as_uri(), page.parent / "profile-probe", "--dump-dom")
    found = re.search(r'<pre id="render-check"[^>]*>(.*?)</pre>', dom, re.S)
    assert found and found.group(1), "the probe script did not run"
    return json.loads(html.unescape(found.group(1))), Image.open(shot).convert("RGB")


def box(img: dict) -> tuple[int, int, int, int]:
    return round(img["x"]), round(img["y"]), round(img["x"] + img["width"]), round(img["y"] + img["height"])


def spread(shot: Image.Image, img: dict) -> float:
    """Standard deviation of the screenshot's pixels where the image was laid out (0 for a blank box)."""
    return float(np.asarray(shot.crop(box(img)), dtype=np.float32).std())


def visible(img: dict) -> bool:
    return img["y"] + img["height"] <= WINDOW[1]


def test_morning_report_renders_for_a_doctor(scored, tmp_path):
    out = tmp_path / "morning.html"
    summary = scored.summaries[NIGHTS[0]]

    result = report.morning_report(scored.scores, NIGHTS[0], str(out), model_uri=scored.models[0], top=10, heatmaps=3)

    assert result == {
        "path": str(out), "run_date": NIGHTS[0], "shown": min(10, summary["flagged"]), "heatmaps": 3,
        "images": 41, "scored": 40, "errors": 1, "flagged": summary["flagged"],
    }
    page = out.read_text()
    assert EVIL not in page and html.escape(EVIL) in page
    assert "<script" not in page.lower() and "http:" not in page and "https:" not in page  # base64 has no ':'
    assert all(src.startswith("data:image/") for src in re.findall(r'src="([^"]*)"', page))
    first = page[page.index('id="lesion-1"') :]
    assert "shards/night-0000.tar#lesions/" in first[: first.index("</article>")], "the riskiest lesions are tar members"

    imgs, shot = render(out)
    thumbs = [i for i in imgs if i["cls"] == "thumb"]
    heatmaps = [i for i in imgs if i["cls"] == "heatmap"]
    histogram = [i for i in imgs if i["id"] == "risk-histogram"]
    assert (len(thumbs), len(heatmaps), len(histogram)) == (result["shown"], 3, 1)
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in imgs), imgs
    assert histogram[0]["w"] >= 800
    for img in [thumbs[0], heatmaps[0], thumbs[-1], *histogram]:
        if visible(img):
            assert spread(shot, img) > 10, f"blank where {img} should be"
    assert visible(thumbs[0]) and visible(heatmaps[0])
    photo, heat = (np.asarray(shot.crop(box(i)), dtype=np.float32) for i in (thumbs[0], heatmaps[0]))
    assert np.abs(photo - heat).mean() > 10, "the heatmap is the bare photo"


def test_morning_report_without_a_model(scored, tmp_path):
    """Without --model the report takes the model from the run summary; with neither it says so."""
    from_summary = report.morning_report(scored.local, NIGHTS[1], str(tmp_path / "from-summary.html"))
    assert from_summary["flagged"] == scored.summaries[NIGHTS[1]]["flagged"]
    assert "No model given (--model)" not in (tmp_path / "from-summary.html").read_text()

    copy = tmp_path / "scores"
    shutil.copytree(scored.local, copy)
    summary_path = copy / f"run_date={NIGHTS[1]}" / "_summary.json"
    summary = json.loads(summary_path.read_text())
    summary.pop("model_uri", None)
    summary_path.write_text(json.dumps(summary))
    out = tmp_path / "no-model.html"

    result = report.morning_report(str(copy), NIGHTS[1], str(out))

    page = out.read_text()
    assert result["heatmaps"] == 0 and result["flagged"] == scored.summaries[NIGHTS[1]]["flagged"]
    assert "No model given (--model)" in page and 'class="heatmap"' not in page
    assert page.count('class="thumb"') == result["shown"]
    with pytest.raises(query.QueryError, match="no partition run_date=2026-12-24"):
        report.morning_report(scored.local, "2026-12-24", str(tmp_path / "x.html"))


def test_model_card_report(scored, tmp_path):
    full, no_roc = tmp_path / "card-a.html", tmp_path / "card-b.html"

    report.model_card_report(scored.models[0], str(full))
    report.model_card_report(scored.models[1], str(no_roc))

    page = full.read_text()
    assert "s3://training/&lt;b&gt;0&lt;/b&gt;" in page and "<b>0</b>" not in page
    assert "<script" not in page.lower() and all(src.startswith("data:image/") for src in re.findall(r'src="([^"]*)"', page))
    assert f"{scored.cards[0]['metrics']['melanoma_auc']:.3f}" in page
    assert "has no ROC points" not in page and "has no ROC points" in no_roc.read_text()
    assert 'id="history"' not in no_roc.read_text()

    imgs, shot = render(full)
    assert {i["id"] for i in imgs} == {"confusion-matrix", "roc-curve", "history"}
    for img in imgs:
        assert img["complete"] and img["w"] > 300, img
        if visible(img):
            assert spread(shot, img) > 10, f"blank where {img} should be"
