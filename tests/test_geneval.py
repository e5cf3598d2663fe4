"""GenEval for dcar (dcar.eval.geneval, dcar.eval.geneval_detector, scripts/eval_geneval.py): every rule of the
official evaluate_images.py on crafted detections (thresholds, exactly-N counting, colour on masked crops, position
margins), the summary, the metadata format and output layout, and an interrupted + resumed run on a tiny pipeline."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcar.config import ConfigError
from dcar.eval import runner as R
from dcar.eval.geneval import (
    TASKS,
    GenEvalRules,
    compute_iou,
    evaluate_clauses,
    filter_detections,
    list_samples,
    load_metadata,
    masked_crop,
    official_command,
    relative_position,
    run_geneval,
    sample_path,
    score_image,
    summarize,
    write_layout,
)
from dcar.eval.geneval_detector import COCO_CLASSES, GENEVAL_COLORS, ColorClassifier, Detection, Detector

ROOT = Path(__file__).resolve().parents[1]
RULES = GenEvalRules()
# One line per task in the exact format of GenEval's prompts/evaluation_metadata.jsonl.
EXCERPT = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}],
     "prompt": "a photo of a bench and a sports ball"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}],
     "prompt": "a photo of a blue fire hydrant"},
    {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                    {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a teddy bear"},
    {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                      {"class": "apple", "count": 1, "color": "black"}],
     "prompt": "a photo of a purple wine glass and a black apple"},
]


def det(cls, score=0.95, box=(10, 10, 30, 30), mask=None):
    return Detection(cls, score, tuple(float(v) for v in box), mask)


def check(dets, meta, colors=None, rules=RULES, image=None):
    threshold = rules.counting_threshold if meta["tag"] == "counting" else rules.threshold
    objects = filter_detections(dets, threshold, rules.max_objects, rules.max_overlap)
    return evaluate_clauses(image or Image.new("RGB", (64, 64)), objects, meta, colors, rules)


class FixedColors:
    """Fake ColorClassifier: a fixed colour sequence, recording what it was asked."""

    def __init__(self, colors):
        self.colors, self.calls = list(colors), []

    def classify(self, crops, class_name):
        self.calls.append((len(crops), class_name, [c.size for c in crops]))
        return self.colors[: len(crops)]


class MeanColors:
    """Fake ColorClassifier: nearest of a few RGB anchors to the mean non-grey (#999) pixel of each crop."""

    ANCHORS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 160, 0), "black": (0, 0, 0),
               "white": (255, 255, 255), "purple": (128, 0, 128)}

    def classify(self, crops, class_name):
        out = []
        for c in crops:
            px = np.asarray(c, dtype=np.float32).reshape(-1, 3)
            px = px[np.abs(px - 153).sum(1) > 0]
            mean = px.mean(0) if len(px) else np.full(3, 153.0)
            out.append(min(self.ANCHORS, key=lambda k: float(((mean - self.ANCHORS[k]) ** 2).sum())))
        return out


# --------------------------------------------------------------------------------------------- detection filtering
def test_threshold_is_strict_sorted_top16_and_nms_off_by_default():
    dets = [det("cup", 0.3), det("cup", 0.31, (0, 0, 5, 5)), det("cup", 0.8, (1, 1, 6, 6)), det("bowl", 0.2)]
    kept = filter_detections(dets, 0.3)
    assert list(kept) == ["cup"] and [d.score for d in kept["cup"]] == [0.8, 0.31]
    many = [det("cup", 0.4 + i / 100) for i in range(20)]  # identical boxes: NMS off keeps all, capped at 16
    kept = filter_detections(many, 0.3)["cup"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.59) and kept[-1].score == pytest.approx(0.44)
    assert len(filter_detections(many, 0.3, max_overlap=0.5)["cup"]) == 1
    # IoU with GenEval's +1 pixel sizes
    assert compute_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert compute_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert compute_iou((0, 0, 4, 4), (10, 10, 14, 14)) == 0.0


# ----------------------------------------------------------------------------------------------- single / two object
def test_single_object_present_absent_below_threshold():
    meta = EXCERPT[0]
    assert check([det("bench", 0.5)], meta) == (True, "")
    assert check([], meta) == (False, "expected bench>=1, found 0")
    assert check([det("bench", 0.29), det("chair", 0.99)], meta)[0] is False
    assert check([det("bench", 0.31), det("bench", 0.9, (40, 40, 50, 50))], meta)[0] is True  # extra copies are fine


def test_two_objects():
    meta = EXCERPT[1]
    assert check([det("bench"), det("sports ball", 0.4)], meta)[0] is True
    ok, reason = check([det("bench")], meta)
    assert not ok and reason == "expected sports ball>=1, found 0"
    ok, reason = check([], meta)
    assert not ok and reason.splitlines() == ["expected bench>=1, found 0", "expected sports ball>=1, found 0"]


# --------------------------------------------------------------------------------------------------------- counting
@pytest.mark.parametrize("n", [2, 3, 4])
def test_counting_exactly_n(n):
    meta = {"tag": "counting", "include": [{"class": "clock", "count": n}], "exclude": [{"class": "clock", "count": n + 1}],
            "prompt": f"a photo of {n} clocks"}
    clocks = [det("clock", 0.95, (10 * i, 0, 10 * i + 8, 8)) for i in range(n + 1)]
    assert check(clocks[: n - 1], meta) == (False, f"expected clock>={n}, found {n - 1}")
    assert check(clocks[:n], meta) == (True, "")
    assert check(clocks, meta) == (False, f"expected clock<{n + 1}, found {n + 1}")
    # the 0.9 counting threshold: an extra 0.85 clock does not count, a 0.85 clock cannot make up the N
    assert check(clocks[:n] + [det("clock", 0.85)], meta)[0] is True
    assert check(clocks[: n - 1] + [det("clock", 0.85)], meta)[0] is False
    assert check(clocks[: n - 1] + [det("clock", 0.9)], meta)[0] is False  # strictly greater than 0.9


def test_counting_threshold_only_for_counting_prompts():
    assert check([det("bench", 0.85)], EXCERPT[0])[0] is True
    two = {"tag": "two_object", "include": [{"class": "clock", "count": 2}], "prompt": "x"}
    assert check([det("clock", 0.5), det("clock", 0.5)], two)[0] is True
    assert check([det("clock", 0.5), det("clock", 0.5)], {**two, "tag": "counting"})[0] is False


# ----------------------------------------------------------------------------------------------------------- colours
def test_color_pass_fail_and_only_most_confident_objects_are_classified():
    meta = EXCERPT[3]
    clf = FixedColors(["blue"])
    assert check([det("fire hydrant")], meta, clf)[0] is True and clf.calls == [(1, "fire hydrant", [(20, 20)])]
    ok, reason = check([det("fire hydrant")], meta, FixedColors(["red"]))
    assert not ok and reason == "expected blue fire hydrant>=1, found 0 blue; and 1 red"
    assert check([], meta, FixedColors(["blue"]))[1] == "expected fire hydrant>=1, found 0"  # no classification
    two = {"tag": "colors", "include": [{"class": "cup", "count": 2, "color": "red"}], "prompt": "two red cups"}
    ok, reason = check([det("cup", 0.9), det("cup", 0.8), det("cup", 0.7)], two, FixedColors(["red", "blue", "red"]))
    assert not ok and reason.endswith("found 1 red; and 1 red, 1 blue")
    with pytest.raises(ValueError, match="ColorClassifier"):
        check([det("fire hydrant")], meta, None)


def test_masked_crop_and_color_on_real_pixels():
    image = Image.new("RGB", (40, 30), "white")
    px = np.asarray(image).copy()
    px[5:15, 5:15] = (255, 0, 0)  # red object
    px[5:15, 20:30] = (0, 0, 255)  # blue object
    image = Image.fromarray(px)
    mask = np.zeros((30, 40), bool)
    mask[5:15, 5:15] = True
    crop = np.asarray(masked_crop(image, (2.4, 3.6, 16.5, 15.2), mask))
    assert crop.shape == (11, 14, 3)  # PIL rounds the box (half to even): (2, 4, 16, 15)
    assert (crop[1:11, 3:13] == (255, 0, 0)).all() and (crop[0] == 153).all() and (crop[:, 0] == 153).all()
    assert np.asarray(masked_crop(image, (0, 0, 40, 30), None)).shape == (30, 40, 3)
    full = masked_crop(image, (5, 5, 15, 15), mask, crop=False)
    assert full.size == (40, 30) and np.asarray(full)[20, 20].tolist() == [153, 153, 153]
    with pytest.raises(ValueError, match="mask shape"):
        masked_crop(image, (0, 0, 5, 5), np.zeros((5, 5), bool))
    blue_mask = np.zeros((30, 40), bool)
    blue_mask[5:15, 20:30] = True
    meta = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a red cup"}
    red_det, blue_det = det("cup", 0.9, (5, 5, 15, 15), mask), det("cup", 0.95, (20, 5, 30, 15), blue_mask)
    assert check([red_det], meta, MeanColors(), image=image)[0] is True
    assert check([red_det, blue_det], meta, MeanColors(), image=image)[0] is False  # the blue one is more confident
    assert isinstance(MeanColors(), ColorClassifier) and not isinstance(object(), ColorClassifier)


# ---------------------------------------------------------------------------------------------------------- position
def box_at(cx, cy, w=10.0, h=10.0):
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


SHIFT = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}


@pytest.mark.parametrize("rel", list(SHIFT))
def test_position_margin_edges(rel):
    # Two 10x10 boxes: margin 0.1 * (10 + 10) = 2 px per axis; with a pure axis offset d the relation needs
    # (d - 2) / d > 0.5, i.e. d > 4.
    sx, sy = SHIFT[rel]
    meta = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": [rel, 0]}], "prompt": "p"}
    target = det("teddy bear", 0.9, box_at(50, 50))
    for d, expect in [(4.05, True), (3.95, False), (1.9, False), (30.0, True)]:
        dog = det("dog", 0.9, box_at(50 + sx * d, 50 + sy * d))
        assert (rel in relative_position(dog.box, target.box)) is expect, (rel, d)
        assert check([target, dog], meta)[0] is expect, (rel, d)
    inside = det("dog", 0.9, box_at(50 + sx * 1.9, 50 + sy * 1.9))
    assert relative_position(inside.box, target.box) == set()  # within the margin: no relation at all
    assert check([target, inside], meta)[1] == f"expected dog {rel} target, found  target"
    wrong = det("dog", 0.9, box_at(50 - sx * 20, 50 - sy * 20))  # the opposite side
    assert check([target, wrong], meta)[0] is False
    # margin scales with the boxes: 30x30 boxes need d > 12
    big_t = det("teddy bear", 0.9, box_at(100, 100, 30, 30))
    for d, expect in [(12.1, True), (11.9, False)]:
        big_dog = det("dog", 0.9, box_at(100 + sx * d, 100 + sy * d, 30, 30))
        assert check([big_t, big_dog], meta)[0] is expect


def test_position_diagonal_group_and_missing_target():
    assert relative_position(box_at(70, 70), box_at(50, 50)) == {"right of", "below"}
    assert relative_position(box_at(30, 50), box_at(50, 50), position_threshold=0.0) == {"left of"}
    meta = EXCERPT[4]
    ok, reason = check([det("dog", 0.9, box_at(80, 50))], meta)
    assert not ok and reason.splitlines() == ["expected teddy bear>=1, found 0", "no target for dog to be right of"]
    group = {"tag": "position", "include": [{"class": "cup", "count": 2},
                                            {"class": "dog", "count": 1, "position": ["below", 0]}], "prompt": "p"}
    cups = [det("cup", 0.9, box_at(20, 20)), det("cup", 0.8, box_at(80, 20))]
    assert check(cups + [det("dog", 0.9, box_at(50, 80))], group)[0] is True
    assert check(cups + [det("dog", 0.9, box_at(20, 30))], group)[0] is False  # below the first cup only


# ---------------------------------------------------------------------------------------------- summary and layout
def test_summary_per_task_and_overall_mean():
    rows = []
    for tag, n_ok in zip(TASKS, [100, 75, 52, 90, 45, 51], strict=True):  # DC-AR's reported per-task scores
        for i in range(100):
            rows.append({"tag": tag, "correct": i < n_ok, "metadata": json.dumps({"tag": tag, "p": i // 4})})
    s = summarize(rows)
    assert s["overall"] == pytest.approx(np.mean([1.0, 0.75, 0.52, 0.90, 0.45, 0.51])) and round(s["overall"], 2) == 0.69
    assert s["tasks"]["counting"] == {"accuracy": 0.52, "correct": 52, "images": 100}
    assert list(s["tasks"]) == list(TASKS) and s["missing_tasks"] == []
    assert s["num_images"] == 600 and s["num_prompts"] == 150
    assert s["correct_images"] == pytest.approx(413 / 600)
    assert s["correct_prompts"] == pytest.approx((25 + 19 + 13 + 23 + 12 + 13) / 150)  # any of a prompt's 4
    part = summarize(rows[:200])  # task mean, not image mean, and missing tasks listed
    assert part["overall"] == pytest.approx(0.875) and part["missing_tasks"] == list(TASKS[2:])
    with pytest.raises(ValueError):
        summarize([])


def test_metadata_loader_and_layout(tmp_path):
    meta_file = tmp_path / "evaluation_metadata.jsonl"
    meta_file.write_text("".join(json.dumps(m) + "\n" for m in EXCERPT))
    metadata = load_metadata(meta_file)
    assert metadata == EXCERPT and {m["tag"] for m in metadata} == set(TASKS)
    out = tmp_path / "images"
    folders = write_layout(out, metadata)
    assert [f.name for f in folders] == [f"{i:05d}" for i in range(6)]
    for i, m in enumerate(EXCERPT):
        with open(out / f"{i:05d}" / "metadata.jsonl") as fp:
            assert json.load(fp) == m
    write_layout(out, metadata)  # idempotent
    with pytest.raises(ConfigError, match="other metadata"):
        write_layout(out, EXCERPT[1:])
    for name in ("0000.png", "00001.png", "0002.jpg", ".0003.png.tmp", "grid.png"):
        Image.new("RGB", (4, 4)).save(out / "00002" / "samples" / name, format="PNG")
    (out / "notes").mkdir()
    assert sample_path(out, 2, 0) == out / "00002" / "samples" / "0000.png"
    found = list_samples(out)
    assert [p.name for p, _ in found] == ["0000.png", "00001.png"] and found[0][1] == EXCERPT[2]
    for bad, match in [({"tag": "x", "prompt": "p", "include": []}, "non-empty"),
                       ({**EXCERPT[3], "include": [{"class": "cup", "count": 1, "color": "teal"}]}, "teal"),
                       ({**EXCERPT[4], "include": [{"class": "cup", "count": 1, "position": ["left of", 0]}]}, "position")]:
        meta_file.write_text(json.dumps(EXCERPT[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=match):
            load_metadata(meta_file)


def test_run_geneval_refuses_a_folder_laid_out_for_other_prompts_on_every_process(tmp_path):
    meta_file = tmp_path / "meta.jsonl"
    meta_file.write_text("".join(json.dumps(m) + "\n" for m in EXCERPT[:2]))
    write_layout(tmp_path / "out", EXCERPT[1:3])  # an earlier run with other prompts
    one = R.DistContext(rank=0, world=1, device="cpu")
    with pytest.raises(ConfigError, match=r"00000[/\\]metadata.jsonl holds other metadata; use a fresh output folder"):
        run_geneval(None, meta_file, tmp_path / "out", ctx=one, progress=False)

    class Rank1(R.DistContext):
        """A non-main process: it does not read the layout, it gets the main process's verdict from ``gather``."""

        def gather(self, items):
            return ["main: holds other metadata", *items]

    with pytest.raises(ConfigError, match="^main: holds other metadata$"):
        run_geneval(None, meta_file, tmp_path / "fresh", ctx=Rank1(rank=1, world=2, device="cpu"), progress=False)
    assert not (tmp_path / "fresh").exists()  # only the main process writes the layout


def test_official_command_and_class_list(tmp_path):
    cmd = official_command(tmp_path / "g", "/src/geneval", "/models")
    assert cmd.startswith("cd /src/geneval && python evaluation/evaluate_images.py ")
    assert f"{(tmp_path / 'g').resolve()} --outfile {(tmp_path / 'g').resolve()}/results.jsonl --model-path /models" in cmd
    assert cmd.endswith("cd evaluation && python summary_scores.py " + f"{(tmp_path / 'g').resolve()}/results.jsonl")
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80 and len(GENEVAL_COLORS) == 10


# -------------------------------------------------------------------------------------------- end to end, resumable
class PixelDetector:
    """Fake Detector: a bench whose score is the mean red value, a cup at the mean blue value (whole-image box)."""

    def detect(self, image):
        px = np.asarray(Image.open(image).convert("RGB") if isinstance(image, str) else image, dtype=np.float32)
        h, w = px.shape[:2]
        box, mask = (0.0, 0.0, float(w), float(h)), np.ones((h, w), bool)
        return [("bench", float(px[..., 0].mean() / 255), box, mask), ("cup", float(px[..., 2].mean() / 255), box, mask)]


def test_score_image_row_format(tmp_path):
    path = tmp_path / "0000.png"
    Image.new("RGB", (16, 16), (200, 0, 100)).save(path)
    assert isinstance(PixelDetector(), Detector)
    row = score_image(path, EXCERPT[0], PixelDetector())
    assert set(row) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert row["correct"] is True and json.loads(row["metadata"]) == EXCERPT[0]
    assert json.loads(row["details"]) == {"bench": [[0.0, 0.0, 16.0, 16.0, pytest.approx(200 / 255)]],
                                          "cup": [[0.0, 0.0, 16.0, 16.0, pytest.approx(100 / 255)]]}


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from dcar.models.generator import DCAR, DCARConfig, HeadConfig, TextEncoder, TextEncoderConfig, build_word_tokenizer
    from dcar.models.tokenizer import build_tokenizer
    from dcar.pipeline import DCARPipeline

    torch.manual_seed(0)
    tokenizer = build_tokenizer(ROOT / "configs" / "tokenizer" / "shapes.yaml").eval()
    words = tmp_path_factory.mktemp("words")
    build_word_tokenizer([m["prompt"] for m in EXCERPT], words)
    text = TextEncoder(TextEncoderConfig(kind="t5-random", tokenizer_path=str(words), max_length=8,
                                         t5_config={"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4}))
    head = HeadConfig(token_dim=32, width=48, depth=2, num_sampling_steps=2)
    generator = DCAR(DCARConfig(codebook_size=1024, num_layers=2, width=64, num_heads=4, caption_dim=32, max_text_len=8,
                                image_size=64, pos_base_size=2, head=head)).eval()
    with torch.no_grad():
        for p in generator.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return DCARPipeline(tokenizer, generator, text)


class Interrupting:
    """Wraps a pipeline; raises on call number ``stop`` (a crash mid-run). Counts calls."""

    def __init__(self, pipe, stop=None):
        self.pipe, self.stop, self.calls = pipe, stop, 0

    def __call__(self, prompts, **kw):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.pipe(prompts, **kw)


def test_interrupted_run_resumes_to_the_same_json(tiny_pipe, tmp_path):
    meta_file = tmp_path / "meta.jsonl"
    meta_file.write_text("".join(json.dumps(m) + "\n" for m in EXCERPT[:4]))
    kw = dict(n_per_prompt=2, seed=7, pipe_kwargs={"num_steps": 2, "guidance_scale": 2.0}, detector=PixelDetector(),
              color_classifier=MeanColors(), backend="test", pipeline_path="tiny", progress=False)
    fresh = run_geneval(Interrupting(tiny_pipe), meta_file, tmp_path / "fresh", **kw)
    assert fresh["scores"]["num_images"] == 8 and set(fresh["scores"]["tasks"]) == set(TASKS[:4])
    crash = Interrupting(tiny_pipe, stop=3)
    with pytest.raises(KeyboardInterrupt):
        run_geneval(crash, meta_file, tmp_path / "resumed", **kw)
    assert len(list((tmp_path / "resumed").glob("*/samples/*.png"))) == 4
    resume = Interrupting(tiny_pipe)
    resumed = run_geneval(resume, meta_file, tmp_path / "resumed", **kw)
    assert resume.calls == 2  # only the two prompts without images
    on_disk = json.loads((tmp_path / "resumed" / "geneval_results.json").read_text())
    assert on_disk == resumed and resumed["pipeline_fingerprint"] is None  # "tiny" names no folder
    for r in (fresh, resumed):
        r.pop("image_dir"), r.pop("official_command"), r.pop("message")
    assert resumed == fresh
    for i in range(4):
        for k in range(2):
            a, b = (sample_path(tmp_path / d, i, k).read_bytes() for d in ("fresh", "resumed"))
            assert a == b
    rows = [json.loads(line) for line in (tmp_path / "fresh" / "results_dcar.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and (tmp_path / "fresh" / "00000" / "grid.png").is_file()
    with pytest.raises(ConfigError, match="seed"):  # resuming with other settings is refused
        run_geneval(tiny_pipe, meta_file, tmp_path / "fresh", **{**kw, "seed": 8})


def test_script_without_detector_writes_null_scores(tiny_pipe, tmp_path, capsys):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    meta_file = tmp_path / "meta.jsonl"
    meta_file.write_text(json.dumps(EXCERPT[0]) + "\n")
    mod = runpy.run_path(str(ROOT / "scripts" / "eval_geneval.py"))
    argv = [f"pipeline={tmp_path / 'pipe'}", f"metadata={meta_file}", f"out={tmp_path / 'out'}", "n_per_prompt=2",
            "num_steps=2", "grid=false"]
    result = mod["main"](argv)
    printed = capsys.readouterr().out
    assert "evaluation/evaluate_images.py" in printed and "summary_scores.py" in printed
    saved = json.loads((tmp_path / "out" / "geneval_results.json").read_text())
    assert saved == result and saved["scores"] is None and "official evaluator" in saved["message"]
    assert saved["sampler"]["num_steps"] == 2 and saved["n_per_prompt"] == 2 and saved["dcar_version"]
    assert saved["pipeline_fingerprint"] == R.fingerprint(tmp_path / "pipe")
    assert saved["environment"] == R.environment() and saved["dcar_version"] == saved["environment"]["dcar"]
    assert sorted(p.name for p in (tmp_path / "out" / "00000" / "samples").iterdir()) == ["0000.png", "0001.png"]
    with pytest.raises(ConfigError, match="not found|mmdet"):
        mod["main"]([*argv, "detector=no_such_module_xyz:factory"])
    with pytest.raises(ConfigError, match="metadata"):
        mod["main"]([f"pipeline={tmp_path / 'pipe'}", f"out={tmp_path / 'o2'}"])
