"""perception_rewards.py: each reward against a naive re-derivation written from its equation
(pixel counting for IoU/GIoU, brute-force assignments over all permutations for counting and
detection, a dynamic-programming edit distance for OCR), the released code's documented values,
every answer syntax, and robustness to arbitrary model output."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest

import perception_rewards as R

GRID_DIAG = 1000 * math.sqrt(2)  # the released counting normaliser (Qwen2-VL's 0-1000 grid)


# ---------------------------------------------------------------------------------------------
# Naive re-derivations
# ---------------------------------------------------------------------------------------------
def pixel_mask(box, size=16):
    """Unit cells [x, x+1) x [y, y+1) covered by an integer box; an inverted box covers none."""
    m = np.zeros((size, size), dtype=bool)
    x1, y1, x2, y2 = box
    if x2 > x1 and y2 > y1:
        m[y1:y2, x1:x2] = True
    return m


def naive_iou_pixels(a, b):
    ma, mb = pixel_mask(a), pixel_mask(b)
    union = (ma | mb).sum()
    return (ma & mb).sum() / union if union else 0.0


def naive_giou_pixels(a, b):
    """GIoU = IoU - (|C| - |A u B|) / |C|, every area by counting cells (valid boxes only)."""
    ma, mb = pixel_mask(a), pixel_mask(b)
    hull = pixel_mask([min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])])
    union = (ma | mb).sum()
    return (ma & mb).sum() / union - (hull.sum() - union) / hull.sum()


def naive_iou_formula(a, b):
    """Float boxes (valid): overlap rectangle / (area a + area b - overlap)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = w * h if w > 0 and h > 0 else 0.0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def naive_giou_formula(a, b):
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    inter_iou = naive_iou_formula(a, b)
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = w * h if w > 0 and h > 0 else 0.0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter_iou - (hull - union) / hull


def all_assignments(n_rows, n_cols):
    """Every one-to-one assignment of min(n_rows, n_cols) pairs, as lists of (row, col)."""
    if n_rows <= n_cols:
        for cols in itertools.permutations(range(n_cols), n_rows):
            yield list(zip(range(n_rows), cols))
    else:
        for rows in itertools.permutations(range(n_rows), n_cols):
            yield list(zip(rows, range(n_cols)))


def naive_edit_distance(a, b):
    """Levenshtein by the textbook dynamic programme (unit insert/delete/substitute)."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[len(a)][len(b)]


# ---------------------------------------------------------------------------------------------
# IoU, GIoU, matching
# ---------------------------------------------------------------------------------------------
def test_iou_matches_pixel_counting_on_random_integer_boxes():
    rng = random.Random(0)
    for _ in range(400):
        a, b = ([rng.randint(0, 15) for _ in range(4)] for _ in range(2))  # inverted boxes included
        assert R.box_iou(a, b) == pytest.approx(naive_iou_pixels(a, b), abs=1e-12)
        assert R.box_iou(a, b) == pytest.approx(R.box_iou(b, a), abs=1e-15)


def test_giou_matches_pixel_counting_on_random_valid_boxes():
    rng = random.Random(1)
    for _ in range(400):
        boxes = []
        for _ in range(2):
            x1, y1 = rng.randint(0, 13), rng.randint(0, 13)
            boxes.append([x1, y1, rng.randint(x1 + 1, 15), rng.randint(y1 + 1, 15)])
        a, b = boxes
        g = R.generalized_box_iou(a, b)
        assert g == pytest.approx(naive_giou_pixels(a, b), abs=1e-12)
        assert -1.0 <= g <= R.box_iou(a, b) <= 1.0


@pytest.mark.parametrize("a, b, iou, giou", [
    ([0, 0, 2, 2], [0, 0, 2, 2], 1.0, 1.0),
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - (9 - 7) / 9),
    ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3),
    ([2, 2, 0, 0], [0, 0, 2, 2], 0.0, None),  # inverted: empty, overlaps nothing
    ([1, 1, 1, 1], [1, 1, 1, 1], 0.0, 0.0),  # zero union -> 0, no ZeroDivisionError
])
def test_iou_giou_hand_cases(a, b, iou, giou):
    assert R.box_iou(a, b) == pytest.approx(iou)
    if giou is not None:
        assert R.generalized_box_iou(a, b) == pytest.approx(giou)


def test_hungarian_match_is_the_cheapest_assignment():
    rng = np.random.default_rng(0)
    for n, m in [(1, 1), (2, 3), (3, 2), (4, 4), (5, 2)]:
        cost = rng.random((n, m))
        pairs = R.hungarian_match(cost)
        best = min(sum(cost[i, j] for i, j in a) for a in all_assignments(n, m))
        assert len(pairs) == min(n, m)
        assert sum(cost[i, j] for i, j in pairs) == pytest.approx(best)
    assert R.hungarian_match(np.zeros((0, 3))) == []


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, expected", [
    ('[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]', [([1, 2, 3, 4], "cat")]),
    ('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}, {"bbox_2d": [5, 6, 7, 8]}]\n```',
     [([1, 2, 3, 4], "cat"), ([5, 6, 7, 8], None)]),
    ('{"bbox_2d": [1.5, 2, 3, 4], "label": "cat"}', [([1.5, 2, 3, 4], "cat")]),
    ("[1, 2, 3, 4]", [([1, 2, 3, 4], None)]),
    ("[[1, 2, 3, 4], [5, 6, 7, 8]]", [([1, 2, 3, 4], None), ([5, 6, 7, 8], None)]),
    ("The box is [1, 2, 3, 4] and [5,6,7,8].", [([1, 2, 3, 4], None), ([5, 6, 7, 8], None)]),
    ("<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|><|im_end|>",
     [([1, 2, 3, 4], "the cat")]),
    (("<|object_ref_start|>a<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
      "<|box_start|>junk<|box_end|><|box_start|>( 5, 6),( 7, 8)<|box_end|>"),
     [([1, 2, 3, 4], "a"), ([5, 6, 7, 8], "a")]),  # junk block skipped, as released
    ("(1,2),(3,4)", [([1, 2, 3, 4], None)]),
    ("(1, 2, 3, 4)", [([1, 2, 3, 4], None)]),
    ('Sure: [{"bbox_2d": [1, 2, 3, 4], "label": "cat"}, {"bbox_2d": [5, 6', [([1, 2, 3, 4], None)]),  # cut off
    ("[0.1, 0.2, 0.3, 0.4]", [([0.1, 0.2, 0.3, 0.4], None)]),  # taken as given: no x1000
    ("no box here", None),
    ("[1, 2, 3]", None),
    ('[{"point_2d": [1, 2]}]', None),  # points are not boxes
    ("[NaN, 1, 2, 3]", None),
    ("[1e999, 1, 2, 3]", None),
    ("[2e9, 1, 2, 3]", None),  # beyond MAX_ABS_COORD
    ('[{"bbox_2d": [true, 1, 2, 3]}]', None),
])
def test_parse_boxes(response, expected):
    assert R.parse_boxes(response) == expected


@pytest.mark.parametrize("response, expected", [
    ('[{"point_2d": [1, 2], "label": "a"}, {"point_2d": [3, 4]}]', [(1, 2), (3, 4)]),
    ("[[1, 2], [3, 4], [5, 6]]", [(1, 2), (3, 4), (5, 6)]),
    ("[10, 20]", [(10, 20)]),
    ('[{"bbox_2d": [0, 0, 10, 20]}, {"point_2d": [5, 5]}]', [(5, 10), (5, 5)]),
    ('Points: {"point_2d": [1, 2]}, {"point_2d": [3, 4]}', [(1, 2), (3, 4)]),
    ("<|box_start|>(0,0),(10,10)<|box_end|><|box_start|>(10,10),(20,30)<|box_end|>", [(5, 5), (15, 20)]),
    ("nothing", None),
])
def test_parse_points(response, expected):
    assert R.parse_points(response) == expected


# ---------------------------------------------------------------------------------------------
# Grounding
# ---------------------------------------------------------------------------------------------
GOLD = [100, 100, 200, 200]


@pytest.mark.parametrize("response, power, expected", [
    # released examples (spec 2.1): IoU 0.25 -> 0.0625 with the released IoU^2
    ("<|object_ref_start|>x<|object_ref_end|><|box_start|>(100,100),(300,300)<|box_end|><|im_end|>", 2.0, 0.0625),
    ("<|box_start|>(100,100),(300,300)<|box_end|>", 1.0, 0.25),
    ("nothing", 2.0, 0.0),
    ('[{"bbox_2d": [100, 100, 200, 200], "label": "cat"}]', 2.0, 1.0),
    ('```json\n[{"bbox_2d": [100, 100, 300, 300], "label": "cat"}]\n```', 2.0, 0.0625),
    ("[100, 100, 300, 300]", 2.0, 0.0625),
    ("The cat is at [150, 100, 200, 200].", 1.0, 0.5),
    ('[{"bbox_2d": [100, 100, 200, 200]}, {"bbox_2d": [0, 0, 1, 1]}]', 2.0, 1.0),  # first box counts
    ('[{"bbox_2d": [0, 0, 1, 1]}, {"bbox_2d": [100, 100, 200, 200]}]', 2.0, 0.0),
    ("[200, 200, 100, 100]", 2.0, 0.0),  # inverted
    ("[0.1, 0.1, 0.3, 0.3]", 2.0, 0.0),  # no x1000 rescaling (deviation 1) ...
])
def test_grounding_reward(response, power, expected):
    assert R.grounding_reward(response, GOLD, power=power) == pytest.approx(expected)


def test_grounding_reward_takes_numbers_in_the_callers_frame():
    # ... the same 0-1 answer scores as the released code's example once gold is in its frame
    assert R.grounding_reward("[0.1, 0.1, 0.3, 0.3]", [0.1, 0.1, 0.2, 0.2]) == pytest.approx(0.0625)


def test_grounding_reward_rejects_bad_gold_and_power():
    with pytest.raises(ValueError):
        R.grounding_reward("[1, 2, 3, 4]", [1, 2, 3])
    with pytest.raises(ValueError):
        R.grounding_reward("[1, 2, 3, 4]", [1, 2, 3, float("nan")])
    with pytest.raises(ValueError):
        R.grounding_reward("[1, 2, 3, 4]", GOLD, power=0)


@pytest.mark.parametrize("response, expected", [
    ('[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]', 1.0),
    ('  [{"bbox_2d": [1, 2, 3, 4]}]\n', 1.0),  # label optional, whitespace ok
    ('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]\n```', 1.0),
    ("```\n[1, 2, 3, 4]\n```", 1.0),
    ("[1.5, 2, 3, 4]", 1.0),
    ("<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|><|im_end|>", 1.0),
    ("<|box_start|>(1,2),(3,4)<|box_end|><|im_end|><|endoftext|><|endoftext|>", 1.0),
    ("<|box_start|>(1,2),(3,4)<|box_end|>", 1.0),
    ("[4, 3, 2, 1]", 1.0),  # syntax only; the IoU reward scores it 0
    ("<think>x</think>", 0.0),  # the released regex gives 1 here (deviation 2)
    ("<anything", 0.0),
    ("", 0.0),
    ("The box is [1, 2, 3, 4]", 0.0),
    ('[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [1, 2, 3, 4]}]', 0.0),  # two boxes
    ("[[1, 2, 3, 4]]", 0.0),
    ('[{"bbox_2d": [1, 2, 3]}]', 0.0),
    ('[{"bbox_2d": [1, 2, 3, 4], "label": 7}]', 0.0),
    ('[{"bbox_2d": [1, 2, 3, 4], "score": 0.9}]', 0.0),
    ('{"bbox_2d": [1, 2, 3, 4]}', 0.0),  # not a list
    ("(1,2),(3,4)", 0.0),  # token form without its tokens
    ("<|box_start|>(1,2),(3,4)<|box_end|><|box_start|>(1,2),(3,4)<|box_end|>", 0.0),
    ("<|box_start|>(1,2),(3,4)<|box_end|> and more", 0.0),
    ("[NaN, 2, 3, 4]", 0.0),
    ("<|box_start|>(1e400,2),(3,4)<|box_end|>", 0.0),
])
def test_grounding_format_reward(response, expected):
    assert R.grounding_format_reward(response) == expected


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------
def qwen2vl_boxes(centres, half=5):
    """A Qwen2-VL counting answer with one box per centre."""
    body = "".join(f"<|box_start|>({x - half},{y - half}),({x + half},{y + half})<|box_end|>" for x, y in centres)
    return f"<|object_ref_start|>apples<|object_ref_end|>{body}<|im_end|>"


GOLD_POINTS = [[221, 343], [476, 173]]  # the released docstring's example


@pytest.mark.parametrize("centres, expected", [
    # values the spec verified by running the released code (gt = 2 points, diagonal 1000 sqrt 2)
    ([(221, 343), (476, 173)], 1.0),
    ([(221, 343)], 0.5),
    ([(221, 343), (476, 173), (900, 900)], 2 / 3),
])
def test_counting_reward_released_values(centres, expected):
    assert R.counting_reward(qwen2vl_boxes(centres), GOLD_POINTS, GRID_DIAG) == pytest.approx(expected)


def test_counting_reward_hand_cases():
    # one point 100 px off, on a 600 x 800 image (diagonal 1000): 1 - 100/1000
    assert R.counting_reward('[{"point_2d": [300, 400]}]', [[300, 500]], 1000.0) == pytest.approx(0.9)
    assert R.counting_reward('[{"bbox_2d": [290, 490, 310, 510], "label": "a"}]', [[300, 500]], 1000.0) == 1.0
    assert R.counting_reward("[[10, 10], [20, 20]]", [[20, 20], [10, 10]], 100.0) == 1.0  # order-free
    assert R.counting_reward("[[0, 0]]", [[900, 900]], 100.0) == 0.0  # farther than the diagonal: clamped
    assert R.counting_reward("no objects", GOLD_POINTS, GRID_DIAG) == 0.0
    assert R.counting_reward(qwen2vl_boxes([(1, 1)]), [], GRID_DIAG) == 0.0  # G = 0
    assert R.counting_reward("<|box_start|>junk<|box_end|>", GOLD_POINTS, GRID_DIAG) == 0.0
    with pytest.raises(ValueError):
        R.counting_reward("[[1, 2]]", [[1, 2]], 0.0)
    with pytest.raises(ValueError):
        R.counting_reward("[[1, 2]]", [[1]], 10.0)


def test_counting_reward_matches_brute_force_assignment():
    rng = random.Random(2)
    diag = math.hypot(640, 480)
    for _ in range(150):
        pred = [(rng.uniform(0, 640), rng.uniform(0, 480)) for _ in range(rng.randint(1, 5))]
        gold = [[rng.uniform(0, 640), rng.uniform(0, 480)] for _ in range(rng.randint(1, 5))]
        response = json.dumps([{"point_2d": list(p), "label": "x"} for p in pred])
        # the formula, with the best matching found by trying every assignment
        best = min(sum(math.dist(pred[i], gold[j]) for i, j in a) for a in all_assignments(len(pred), len(gold)))
        n, m = len(pred), len(gold)
        expected = max(0.0, min(n, m) / max(n, m) * (1 - best / min(n, m) / diag))
        assert R.counting_reward(response, gold, diag) == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# OCR
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, gold, expected", [
    ("Hello world", "Hello world", 1.0),
    ("  Hello \n\t world ", "Hello world", 1.0),  # whitespace collapsed on both sides
    ("hello world", "Hello world", 1 - 1 / 11),  # case kept
    ("", "abc", 0.0),
    ("abc", "", 0.0),
    ("", "", 0.0),  # both empty -> 0 (as MMR1)
    ("   ", "\n", 0.0),
    ("kitten", "sitting", 1 - 3 / 7),
    ("ab", "ba", 0.0),  # two substitutions (no transpositions) over length 2
])
def test_ocr_reward_hand_cases(response, gold, expected):
    assert R.ocr_reward(response, gold) == pytest.approx(expected)


def test_ocr_reward_matches_dynamic_programming():
    rng = random.Random(3)
    alphabet = "ab c\n漢é"
    for _ in range(300):
        pred = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        gold = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        p, g = " ".join(pred.split()), " ".join(gold.split())
        expected = 0.0 if not (p or g) else max(0.0, 1 - naive_edit_distance(p, g) / max(len(p), len(g)))
        assert R.ocr_reward(pred, gold) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------
PERSON, DOG = [100, 100, 200, 300], [300, 200, 400, 300]
DET_GOLD = ([PERSON, DOG], ["person", "dog"])


def det(*entries):
    return json.dumps([{"bbox_2d": b, "label": lab} for b, lab in entries])


@pytest.mark.parametrize("response, penalty, expected", [
    # the spec's values from running the released code (gt = person + dog); our 1/0 class cost
    # leaves them unchanged because the pixel L1 term decides every matching here
    (det((PERSON, "person"), (DOG, "dog")), False, 3.0),
    (det((PERSON, "person"), (DOG, "dog")), True, 3.0),
    (det((PERSON, "person"), (DOG, "cat")), False, 2.5),  # 0.25 + 0.75 + 0.5 + 1
    (det((PERSON, "person"), (DOG, "dog"), ([500, 50, 550, 100], "cat")), False, 0.25 + 0.75 * 0.8 + 2),
    (det((PERSON, "person"), (DOG, "dog"), ([500, 50, 550, 100], "cat")), True, 2.85 - 0.5 / 3),  # 2.683
    # unknown label: fmt 1/2, P = 1, F1 = 2/3, penalty 0.5 * (0 + 1/2) -> 2.375
    (det((PERSON, "person"), (DOG, "wolf")), True, 0.125 + 0.5 + 2 - 0.25),
    ("Here you go: " + det((PERSON, "person"), (DOG, "dog")), False, 0.0),  # prose -> not JSON
    ("```json\n" + det((PERSON, "person"), (DOG, "dog")) + "\n```", False, 3.0),  # fences ok
    ("<answer>" + det((PERSON, "person")) + "</answer>", False, 0.0),
    (det(([10, 10, 20, 20], "person")), False, 0.25),  # valid but no IoU > 0.5 match: 0.25 * fmt
    (det(([10, 10, 20, 20], "person")), True, 0.25),  # ... returned before the penalty (as released)
    (det(([200, 300, 100, 100], "person"), (DOG, "dog")), False, 0.125 + 0.75 * 2 / 3 + 2),  # inverted = wrong
    (det(([100, 100, 100, 300], "person"), (DOG, "dog")), False, 0.125 + 0.75 * 2 / 3 + 2),  # zero width = wrong
    (json.dumps([{"bbox_2d": PERSON}, {"bbox_2d": DOG, "label": "dog"}, [1, 2, 3, 4], "x"]), False,
     0.25 * 0.25 + 0.75 * 2 / 3 + 2),  # missing label, non-objects: wrong (as released)
    (json.dumps([{"bbox_2d": PERSON, "label": "person"}, {"bbox_2d": [1, 2, "3", 4], "label": "dog"}]), False,
     0.125 + 0.75 * 2 / 3 + 2),  # non-numeric box: wrong (released: the completion scores 0)
    (det((PERSON, "toothbrush"), (DOG, "dog")), False, 2.5),  # released: crashes to 0 (issue #17)
    (det((PERSON, "Person"), (DOG, "dog")), False, 0.125 + 0.75 * 2 / 3 + 2),  # case-sensitive
    ("[]", False, 0.0),
    ('{"bbox_2d": [100, 100, 200, 300], "label": "person"}', False, 0.0),  # not a list
    ("not json", False, 0.0),
])
def test_detection_reward_cases(response, penalty, expected):
    assert R.detection_reward(response, *DET_GOLD, R.COCO_CLASSES, penalty=penalty) == pytest.approx(expected)


def test_detection_reward_no_gold_and_weights():
    assert R.detection_reward(det((PERSON, "person")), [], [], R.COCO_CLASSES) == 0.25
    r = R.detection_reward(det((PERSON, "person"), (DOG, "cat")), *DET_GOLD, R.COCO_CLASSES,
                           f1_weight=0.5, cls_weight=2.0, iou_weight=0.0)
    assert r == pytest.approx(0.25 + 0.5 + 2 * 0.5)
    with pytest.raises(ValueError):
        R.detection_reward("[]", [PERSON], ["person", "dog"], R.COCO_CLASSES)
    with pytest.raises(ValueError):
        R.detection_reward("[]", [PERSON], [1], R.COCO_CLASSES)  # ids instead of names


def test_detection_matching_prefers_the_close_box():
    # two predictions near the same gold box: only one can be matched, the closer one
    gold = [[0, 0, 100, 100]]
    r = R.detection_reward(det(([0, 0, 100, 100], "cat"), ([2, 2, 100, 100], "dog")), gold, ["dog"], ["cat", "dog"])
    assert r == pytest.approx(0.25 + 0.75 * (2 * 0.5 / 1.5) + 0 + 1)  # exact box wins despite wrong label


CLASSES = ["a", "b", "c"]


def naive_detection_reward(entries, gold, penalty):
    """The reward re-derived from the spec (5.1), with matching by trying every assignment."""
    valid = []
    for e in entries:
        ok = (isinstance(e, dict) and "bbox_2d" in e and e.get("label") in CLASSES
              and isinstance(e["bbox_2d"], list) and len(e["bbox_2d"]) == 4
              and e["bbox_2d"][2] > e["bbox_2d"][0] and e["bbox_2d"][3] > e["bbox_2d"][1])
        if ok:
            valid.append((e["bbox_2d"], e["label"]))
    reward = 0.25 * len(valid) / len(entries)
    if not valid or not gold:
        return reward

    def cost(p, g):
        (pb, pl), (gb, gl) = p, g
        cxcywh = lambda b: [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]]
        l1 = sum(abs(u - v) for u, v in zip(cxcywh(pb), cxcywh(gb)))
        return 5 * l1 - (1.0 if pl == gl else 0.0) - 2 * naive_giou_formula(pb, gb)

    best = min(all_assignments(len(valid), len(gold)), key=lambda a: sum(cost(valid[i], gold[j]) for i, j in a))
    kept = [(i, j) for i, j in best if naive_iou_formula(valid[i][0], gold[j][0]) > 0.5]
    if not kept:
        return reward
    m = len(kept)
    prec, rec = m / len(valid), m / len(gold)
    reward += 0.75 * 2 * prec * rec / (prec + rec)
    reward += sum(valid[i][1] == gold[j][1] for i, j in kept) / m
    reward += sum(naive_iou_formula(valid[i][0], gold[j][0]) for i, j in kept) / m
    if penalty:
        reward -= 0.5 * ((len(valid) - m) / len(valid) + (len(gold) - m) / len(gold))
    return min(max(reward, 0.0), 3.0)


def test_detection_reward_matches_brute_force():
    rng = random.Random(4)

    def rand_box():
        x1, y1 = rng.uniform(0, 400), rng.uniform(0, 400)
        return [x1, y1, x1 + rng.uniform(10, 120), y1 + rng.uniform(10, 120)]

    checked_matches = 0
    for trial in range(200):
        gold = [(rand_box(), rng.choice(CLASSES)) for _ in range(rng.randint(0, 3))]
        entries = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.random()
            if kind < 0.55 and gold:  # a jittered copy of a gold box
                gb, gl = rng.choice(gold)
                jitter = [c + rng.uniform(-8, 8) for c in gb]
                entries.append({"bbox_2d": jitter, "label": gl if rng.random() < 0.7 else rng.choice(CLASSES)})
            elif kind < 0.75:
                entries.append({"bbox_2d": rand_box(), "label": rng.choice(CLASSES)})
            else:  # a wrong entry of some kind
                entries.append(rng.choice([{"bbox_2d": [5, 5, 1, 1], "label": "a"}, {"bbox_2d": rand_box()},
                                           {"bbox_2d": rand_box(), "label": "zzz"}, {"bbox_2d": [1, 2, 3], "label": "a"}]))
        for penalty in (False, True):
            got = R.detection_reward(json.dumps(entries), [b for b, _ in gold], [lab for _, lab in gold], CLASSES,
                                     penalty=penalty)
            assert got == pytest.approx(naive_detection_reward(entries, gold, penalty), abs=1e-9), (trial, entries, gold)
        checked_matches += naive_detection_reward(entries, gold, False) > 0.25 + 1e-9
    assert checked_matches > 50  # the random cases do exercise the matched branch


# ---------------------------------------------------------------------------------------------
# Robustness: no model output makes a reward raise, and every value is in its range
# ---------------------------------------------------------------------------------------------
def nasty_strings():
    rng = random.Random(5)
    codes = (rng.randint(0, 0x2FFFF) for _ in range(2000))
    unicode_soup = "".join(chr(c) for c in codes if not 0xD800 <= c <= 0xDFFF)  # no lone surrogates
    return [
        "", " ", "\n\t", "\x00", "None", "null", "true", "0", "[]", "{}", "[{}]", "[[]]", '""', "```", "```json```",
        "[NaN, 0, 1, 1]", "[Infinity, 0, 1, 1]", '[{"bbox_2d": [NaN, 1, 2, 3], "label": "person"}]',
        "[1e999, 0, 1, 1]", "[-1e308, -1e308, 1e308, 1e308]", "[" + "9" * 5000 + ", 1, 2, 3]",
        '[{"bbox_2d": [' + "9" * 5000 + ', 1, 2, 3], "label": "person"}]',
        '[{"bbox_2d": "abc", "label": 5}]', '[{"bbox_2d": {"x": 1}, "label": ["person"]}]',
        '[{"bbox_2d": [true, false, 1, 2], "label": "person"}]', '[{"point_2d": [1]}, {"point_2d": null}]',
        '{"a": {"b": {"c": [1, 2, 3, 4]}}}', '[[[[[[[[1, 2, 3, 4]]]]]]]]',
        "[" * 100_000, "[" * 50_000 + "]" * 50_000, "{" * 10_000, "1" * 100_000, "[" + "1" * 100_000,
        "(" + "1" * 100_000, "[1," * 30_000, "(1,1),(" * 20_000,
        "<|box_start|>" * 10_000, "<|object_ref_start|>" * 5000 + "x" * 50_000,
        "<|box_start|>(1e400,2),(3,4)<|box_end|>", "<|box_start|>((1,2),(3,4))<|box_end|>",
        '"point_2d": [' * 10_000, "<think>x</think><answer>[1,2,3,4]</answer>",
        "[" + '{"bbox_2d": [1, 2, 3, 4], "label": "person"},' * 1000 + "]",  # trailing comma: not JSON
        json.dumps([{"bbox_2d": [i, i, i + 10, i + 10], "label": "person"} for i in range(300)]),
        unicode_soup, "\ud7ff\ue000\U0010ffff", "😀" * 1000,
    ]


def test_no_response_makes_a_reward_raise():
    gold_box, gold_points = [10, 10, 50, 50], [[10, 10], [40, 40]]
    for s in nasty_strings():
        boxes, points = R.parse_boxes(s), R.parse_points(s)
        assert boxes is None or (isinstance(boxes, list) and all(len(b) == 4 for b, _ in boxes))
        assert points is None or (isinstance(points, list) and all(len(p) == 2 for p in points))
        values = {
            "grounding": (R.grounding_reward(s, gold_box), 0.0, 1.0),
            "grounding_iou": (R.grounding_reward(s, gold_box, power=1.0), 0.0, 1.0),
            "grounding_format": (R.grounding_format_reward(s), 0.0, 1.0),
            "counting": (R.counting_reward(s, gold_points, GRID_DIAG), 0.0, 1.0),
            "ocr": (R.ocr_reward(s, "Hello world"), 0.0, 1.0),
            "detection": (R.detection_reward(s, [gold_box], ["person"], R.COCO_CLASSES), 0.0, 3.0),
            "detection_penalty": (R.detection_reward(s, [gold_box], ["person"], R.COCO_CLASSES, penalty=True), 0.0, 3.0),
        }
        for name, (v, lo, hi) in values.items():
            assert isinstance(v, float) and lo <= v <= hi, (name, s[:80], v)
        assert R.grounding_format_reward(s) in (0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Prompts and docstring examples
# ---------------------------------------------------------------------------------------------
def test_docstring_examples_hold():
    import doctest

    assert doctest.testmod(R, verbose=False).failed == 0


def test_task_prompts_are_released_template_plus_our_syntax_line():
    assert set(R.TASK_PROMPTS) == {"grounding", "counting", "ocr", "detection"}
    filled = {t: p.format(question="red car", categories=", ".join(R.COCO_CLASSES)) for t, p in R.TASK_PROMPTS.items()}
    assert filled["grounding"].splitlines()[0] == "Output the bounding box of the red car in the image."
    assert filled["counting"].splitlines()[0] == "Output all the bounding boxes of the red car"
    assert filled["ocr"].splitlines()[0] == "OCR this image:"
    assert filled["detection"].splitlines()[0].endswith("The category set includes person, bicycle, car, "
                                                        + ", ".join(R.COCO_CLASSES[3:]) + ".")
    for task in ("grounding", "counting", "detection"):
        assert '[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}' in filled[task]
    assert len(R.COCO_CLASSES) == len(set(R.COCO_CLASSES)) == 80


def test_detection_cost_matches_the_formula():
    rng = random.Random(6)
    for _ in range(50):
        pred = [([x, y, x + rng.uniform(1, 50), y + rng.uniform(1, 50)], rng.choice(CLASSES))
                for x, y in [(rng.uniform(0, 100), rng.uniform(0, 100)) for _ in range(3)]]
        gold = [([x, y, x + rng.uniform(1, 50), y + rng.uniform(1, 50)], rng.choice(CLASSES))
                for x, y in [(rng.uniform(0, 100), rng.uniform(0, 100)) for _ in range(2)]]
        cost = R.detection_cost(pred, gold)
        assert cost.shape == (3, 2)
        for i, (pb, pl) in enumerate(pred):
            for j, (gb, gl) in enumerate(gold):
                l1 = (abs((pb[0] + pb[2]) / 2 - (gb[0] + gb[2]) / 2) + abs((pb[1] + pb[3]) / 2 - (gb[1] + gb[3]) / 2)
                      + abs((pb[2] - pb[0]) - (gb[2] - gb[0])) + abs((pb[3] - pb[1]) - (gb[3] - gb[1])))
                expected = 5 * l1 - 1 * (pl == gl) - 2 * naive_giou_formula(pb, gb)
                assert cost[i, j] == pytest.approx(expected, abs=1e-9)
