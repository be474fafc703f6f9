"""Rule-based perception rewards for GRPO: grounding, counting, OCR and detection.

What this file does
    Scores one model response against the gold annotation of one visual-perception task, as the
    sister paper "Perception-R1: Pioneering Perception Policy with Reinforcement Learning" does:

        grounding   r = IoU(first predicted box, gold box) ** p                     in [0, 1]
                    r_fmt = 1 iff the response is exactly one box                   in {0, 1}
        counting    r = min(P, G) / max(P, G) * (1 - mean matched distance / diag)  in [0, 1]
        OCR         r = max(0, 1 - Levenshtein(pred, gold) / max(|pred|, |gold|))   in [0, 1]
        detection   r = 0.25 fmt + 0.75 F1 + class accuracy + mean IoU (- penalty)  in [0, 3]

    Every reward is a pure function (response: str, gold...) -> float. A response that cannot
    be parsed scores 0.0; no response string makes a reward raise. Gold annotations come from
    the caller's dataset, so a malformed gold box raises ValueError (a data bug must not
    quietly become reward 0).

Papers
    Perception-R1: Pioneering Perception Policy with Reinforcement Learning, arXiv:2504.07954
        (the rewards; the released code is github.com/linkangheng/PR1, whose behaviour we follow
        where noted below; its OCR reward was never released, see ocr_reward)
    DETR, End-to-End Object Detection with Transformers, arXiv:2005.12872 (the matching cost
        5 * L1 + 1 * class + 2 * GIoU used by the detection reward)
    Generalized Intersection over Union, arXiv:1902.09630 (GIoU)
    Kuhn's Hungarian method for the assignment problem (scipy.optimize.linear_sum_assignment)

Code map (section -> equation -> function)
    1. Parsing         Qwen2.5-VL JSON / bare list / Qwen2-VL tokens -> boxes   parse_boxes, parse_points
    2. Box geometry    IoU = |A n B| / |A u B|;  GIoU = IoU - |C \\ (A u B)| / |C|  box_iou, generalized_box_iou
    3. Matching        argmin_sigma sum_i cost[i, sigma(i)]  (Hungarian)         hungarian_match
    4. Grounding       r = IoU ** p;  r_fmt = [exactly one box]                  grounding_reward,
                                                                                 grounding_format_reward
    5. Counting        r = min(P,G)/max(P,G) * (1 - mean_d / diag), clamp >= 0   counting_reward
    6. OCR             r = max(0, 1 - ED(pred, gold) / max(|pred|, |gold|))     ocr_reward
    7. Detection       cost = 5 L1(cxcywh) - 1 [same label] - 2 GIoU; keep IoU > 0.5;
                       r = 0.25 fmt + 0.75 F1 + cls + mIoU [- penalty], clamp [0, 3]
                                                                                 detection_cost, detection_reward
    8. Prompts         the released per-task templates + our answer-syntax line  TASK_PROMPTS

Deviations from the released code (linkangheng/PR1)
    1. One coordinate frame, numbers taken as given. The released grounding reward multiplies
       every number by 1000 unless the response contains <|box_start|> (it assumes 0-1 floats)
       and has no branch for Qwen2.5-VL, whose boxes are absolute pixels. We never rescale: the
       caller passes gold boxes/points in the frame the model answers in (pixels of the resized
       input image for Qwen2.5-VL; the 0-1000 grid for Qwen2-VL token answers). train_grpo.py's
       caller, task_gold, builds the Qwen2.5-VL pixel frame only.
    2. The released grounding format regex leaves its '|' unescaped, so it is an alternation of
       fragments and returns 1 for any response that starts with '<' (even "<think>x</think>").
       grounding_format_reward checks what the regex meant: the whole response is one box.
    3. All rewards read all three syntaxes (JSON bbox_2d, bare [x1, y1, x2, y2], Qwen2-VL
       tokens). The released counting reward is 0 unless the response is in the Qwen2-VL token
       format (a gate written for Qwen2-VL); Qwen2.5-VL answers in JSON, so we drop the gate.
       Counting also reads points ([[x, y], ...] or {"point_2d": [x, y]}), Qwen2.5-VL's pointing.
    4. Counting: the reward is clamped at 0 (released: unclamped, so points outside the grid
       could give a negative reward) and the normaliser `diagonal` is a parameter (released: 1000 * sqrt(2),
       the diagonal of Qwen2-VL's 0-1000 grid).
    5. IoU: areas of inverted boxes count as 0 and a zero union gives IoU 0; the released IoU
       divides by the union with no guard (ZeroDivisionError on two empty boxes).
    6. OCR: PR1 released no OCR training reward (issue #19); ocr_reward is the same authors'
       earlier MMR1 edit-distance reward, with rapidfuzz's Levenshtein distance (same unit costs
       as the nltk.edit_distance MMR1 calls).
    7. Detection class cost: 1.0 for the same label, 0.0 otherwise. The released matcher takes a
       softmax over a length-90 one-hot vector (class term ~0.02) indexed off by one (issue #17),
       so its class costs are misaligned and a "toothbrush" prediction crashes the completion to 0.
       Matching is driven by the box terms either way (L1 is in pixels).
    8. A detection entry whose box is not 4 numbers with x2 > x1 and y2 > y1 counts as "wrong"
       (it lowers the format term), like an entry with a missing key or unknown label. In the
       released code a non-numeric, wrong-length or inverted box raises (inverted boxes fail
       GIoU's assert) and the whole completion scores 0; a zero-width or zero-height box passes
       there as a valid prediction that can never match (IoU 0), and is "wrong" here.
    9. Detection options that are off in the released defaults are not implemented: the
       size-weighted IoU (IS_SIZE_WEIGHT) and the coverage bonus (COVERAGE_SCALE). F1 has no
       1e-8 in its denominator (it is only computed when a match exists, so P + R > 0).
   10. A number outside +-1e9 (MAX_ABS_COORD; no image is that large) or not finite makes its box
       unparsable, so no float overflow or NaN can reach a reward.

Coordinates: all boxes are [x1, y1, x2, y2] (top-left, bottom-right), points are [x, y], and
distances are in the units of that frame (pixels for Qwen2.5-VL). See section 1.

Usage
    >>> import math
    >>> from perception_rewards import grounding_reward, counting_reward, TASK_PROMPTS
    >>> grounding_reward('[{"bbox_2d": [100, 100, 300, 300], "label": "cat"}]', [100, 100, 200, 200])
    0.0625
    >>> counting_reward('[{"point_2d": [10, 10]}, {"point_2d": [50, 50]}]', [[10, 10], [50, 50]],
    ...                 diagonal=math.hypot(640, 480))
    1.0
    >>> TASK_PROMPTS["grounding"].format(question="cat on the left").splitlines()[0]
    'Output the bounding box of the cat on the left in the image.'
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein
from scipy.optimize import linear_sum_assignment

Box = list[float]  # [x1, y1, x2, y2]
Point = tuple[float, float]  # (x, y)

# A coordinate beyond this (in absolute value) makes its box unparsable: no image is a billion
# pixels wide, and the bound keeps areas (< 4e18) and distances far from float64 overflow.
MAX_ABS_COORD = 1e9


# =============================================================================================
# 1. Parsing
# =============================================================================================
# COORDINATE CONVENTION (read this before using any reward below)
#   * Qwen2.5-VL writes boxes as ABSOLUTE PIXEL coordinates [x1, y1, x2, y2] of the image it
#     was given (i.e. after the processor's smart_resize), usually as JSON:
#         [{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}]
#     and points as {"point_2d": [x, y], "label": "cat"}.
#   * Qwen2-VL instead writes  <|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
#     on a 0-1000 grid (both axes normalised to 0..1000).
#   * We parse every syntax but take the numbers AS GIVEN: no x1000 or /1000 scaling, no
#     resizing. The rewards compare boxes in ONE frame, so the caller must pass gold boxes and
#     points in the frame of the model's answers (pixels of the resized input image for
#     Qwen2.5-VL, the 0-1000 grid for Qwen2-VL).
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"  # unambiguous: no catastrophic backtracking
_QWEN2VL_PAIR = rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)"
# A label and a box in Qwen2-VL's token syntax (one label may precede several boxes).
_QWEN2VL_TOKENS = re.compile(
    rf"<\|object_ref_start\|>(?P<label>[^<]*)<\|object_ref_end\|>"
    rf"|<\|box_start\|>\s*(?P<box>{_QWEN2VL_PAIR})\s*<\|box_end\|>")
# Boxes written anywhere in free text: [x1, y1, x2, y2], (x1, y1, x2, y2) or (x1,y1),(x2,y2).
_LOOSE_BOX = re.compile(
    rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]"
    rf"|\(\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\)"
    rf"|{_QWEN2VL_PAIR}")
_LOOSE_POINT = re.compile(rf"\"point_2d\"\s*:\s*\[\s*({_NUM})\s*,\s*({_NUM})\s*\]")


def _number(x) -> float | None:
    """x as a float if it is a real number (not a bool) that is finite and within
    +-MAX_ABS_COORD, else None. Accepts JSON values and regex-matched strings."""
    if isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError, OverflowError):  # e.g. "abc", None, an int with 400 digits
        return None
    return v if math.isfinite(v) and abs(v) <= MAX_ABS_COORD else None


def _numbers(xs, n: int) -> list[float] | None:
    """A list/tuple of exactly n valid numbers (see _number) as floats, else None."""
    if not isinstance(xs, (list, tuple)) or len(xs) != n:
        return None
    vals = [_number(x) for x in xs]
    return None if any(v is None for v in vals) else vals


def strip_code_fences(text: str) -> str:
    """Remove markdown fences (```json and ```) wherever they are, as the released detection
    parser does; Qwen2.5-VL usually wraps its JSON in them."""
    return text.replace("```json", "").replace("```", "")


def _load_json(text: str):
    """json.loads of the fence-stripped text, or None if it is not JSON. Model output can be
    anything: invalid JSON, nesting deep enough for RecursionError, 5,000-digit integers."""
    try:
        return json.loads(strip_code_fences(text))
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None


def _json_items(obj) -> list[tuple[str, list[float], str | None]]:
    """The boxes and points in a parsed JSON value, as (kind, coords, label) in order.

    Read: a list of {"bbox_2d": [4 numbers], "label": ...} or {"point_2d": [2 numbers], ...}
    objects (a single object is read as a list of one), a bare [x1, y1, x2, y2], a bare [x, y],
    and lists of bare 4- or 2-number lists. Anything else inside is skipped.
    """
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list):
        return []
    if _numbers(obj, 4) is not None:
        return [("box", _numbers(obj, 4), None)]
    if _numbers(obj, 2) is not None:
        return [("point", _numbers(obj, 2), None)]
    items = []
    for entry in obj:
        label = None
        if isinstance(entry, dict):
            label = entry.get("label") if isinstance(entry.get("label"), str) else None
            box, point = _numbers(entry.get("bbox_2d"), 4), _numbers(entry.get("point_2d"), 2)
        else:
            box, point = _numbers(entry, 4), _numbers(entry, 2)
        if box is not None:
            items.append(("box", box, label))
        elif point is not None:
            items.append(("point", point, label))
    return items


def _parse_items(response: str) -> list[tuple[str, list[float], str | None]]:
    """All boxes/points of a response, from the first of three readings that finds any:

    1. Qwen2-VL tokens anywhere: <|box_start|>(x1,y1),(x2,y2)<|box_end|>, labelled by the last
       <|object_ref_start|>label<|object_ref_end|> before it (junk inside a block is skipped).
    2. The whole response (fences removed) is JSON: see _json_items.
    3. Free text: every [x1, y1, x2, y2], (x1, y1, x2, y2), (x1,y1),(x2,y2) and "point_2d": [x, y]
       (this catches JSON embedded in prose or cut off mid-way; labels are not read here).
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    items, label = [], None
    for m in _QWEN2VL_TOKENS.finditer(response):
        if m.group("label") is not None:
            label = m.group("label").strip() or None
        else:
            box = _numbers(m.group(3, 4, 5, 6), 4)
            if box is not None:
                items.append(("box", box, label))
    if items:
        return items
    items = _json_items(_load_json(response))
    if items:
        return items
    found = []  # (position in text, item)
    for m in _LOOSE_BOX.finditer(response):
        box = _numbers([g for g in m.groups() if g is not None], 4)
        if box is not None:
            found.append((m.start(), ("box", box, None)))
    for m in _LOOSE_POINT.finditer(response):
        point = _numbers(m.groups(), 2)
        if point is not None:
            found.append((m.start(), ("point", point, None)))
    return [item for _, item in sorted(found, key=lambda f: f[0])]


def parse_boxes(response: str) -> list[tuple[Box, str | None]] | None:
    """Every box in the response as ([x1, y1, x2, y2], label or None), in order of appearance;
    None when there is no parsable box (the trainer counts these as unparsable outputs).

    Numbers are taken as given (see the coordinate convention above); a box is not checked for
    x2 > x1 here (IoU treats an inverted box as empty).

    >>> parse_boxes('```json\\n[{"bbox_2d": [1, 2, 30, 40], "label": "cat"}]\\n```')
    [([1.0, 2.0, 30.0, 40.0], 'cat')]
    >>> parse_boxes("<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(30,40)<|box_end|>")
    [([1.0, 2.0, 30.0, 40.0], 'cat')]
    >>> parse_boxes("I see no box") is None
    True
    """
    boxes = [(coords, label) for kind, coords, label in _parse_items(response) if kind == "box"]
    return boxes or None


def box_center(box: Sequence[float]) -> Point:
    """((x1 + x2) / 2, (y1 + y2) / 2)."""
    return ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)


def parse_points(response: str) -> list[Point] | None:
    """Every predicted object as one point (x, y): the centre of each parsed box, or a point
    given directly (Qwen2.5-VL's {"point_2d": [x, y]} or a JSON list [[x, y], ...]); None when
    there is none.

    >>> parse_points('[{"bbox_2d": [0, 0, 10, 20]}, {"point_2d": [5, 5]}]')
    [(5.0, 10.0), (5.0, 5.0)]
    """
    points = [box_center(c) if kind == "box" else (c[0], c[1]) for kind, c, _ in _parse_items(response)]
    return points or None


def _is_real(x) -> bool:
    """True for a real number that is not a bool (int, float, numpy scalars)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_gold_box(box, what: str = "gold box") -> list[float]:
    """The caller's gold box as 4 floats, or ValueError (a dataset bug, never a model error)."""
    vals = _numbers(list(box) if isinstance(box, (tuple, np.ndarray)) else box, 4)
    if vals is None:
        raise ValueError(f"{what} must be 4 finite numbers [x1, y1, x2, y2] within +-{MAX_ABS_COORD:g}, got {box!r}")
    return vals


# =============================================================================================
# 2. Box geometry: IoU and GIoU
# =============================================================================================
def _area(box: Sequence[float]) -> float:
    """max(0, x2 - x1) * max(0, y2 - y1): an inverted or degenerate box has area 0."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU = |A n B| / |A u B| of two [x1, y1, x2, y2] boxes, in [0, 1].

    |A n B| = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1)); |A u B| = |A| + |B| - |A n B|.
    Inverted boxes (x2 < x1 or y2 < y1) are empty: they overlap nothing. A zero union gives 0.

    >>> box_iou([0, 0, 2, 2], [1, 1, 3, 3])   # 1 / (4 + 4 - 1)
    0.14285714285714285
    """
    inter = (max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
             * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def generalized_box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """GIoU = IoU - (|C| - |A u B|) / |C| (arXiv:1902.09630, Alg. 1), in [-1, 1], where C is
    the smallest box enclosing A and B. Unlike IoU it still ranks boxes that do not overlap
    (farther apart -> closer to -1). Meant for valid boxes; inverted boxes count as empty, and
    an empty enclosing box gives GIoU = IoU = 0.

    >>> generalized_box_iou([0, 0, 1, 1], [2, 0, 3, 1])   # 0 - (3 - 2) / 3
    -0.3333333333333333
    """
    inter = (max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
             * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))
    union = _area(a) + _area(b) - inter
    iou = inter / union if union > 0 else 0.0
    hull = _area([min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])])
    return iou - (hull - union) / hull if hull > 0 else iou


# =============================================================================================
# 3. Matching (Hungarian algorithm)
# =============================================================================================
def hungarian_match(cost: np.ndarray) -> list[tuple[int, int]]:
    """The one-to-one assignment of rows to columns with the smallest total cost, as sorted
    (row, column) pairs; a rectangular (N, M) matrix gives min(N, M) pairs, an empty one none.

    cost: (N, M) finite floats. scipy's linear_sum_assignment solves it exactly (Kuhn-Munkres /
    Jonker-Volgenant), where trying all assignments would take N! steps.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.size == 0:
        return []
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j)) for i, j in zip(rows, cols)]


# =============================================================================================
# 4. Grounding (RefCOCO-style referring expressions)
# =============================================================================================
def grounding_reward(response: str, gold_box: Sequence[float], power: float = 2.0) -> float:
    """r = IoU(first parsed box, gold_box) ** power, in [0, 1]; 0 when no box parses.

    The released PR1 code uses IoU squared (power=2, the default), which favours tight boxes:
    IoU 0.5 is worth 0.25. power=1 gives plain IoU (the earlier MMR1 variant, and the reward as
    the paper describes it in words). gold_box is in the frame the model answers in (module
    header, section 1).

    >>> grounding_reward("<|box_start|>(100,100),(300,300)<|box_end|>", [100, 100, 200, 200])
    0.0625
    """
    gold = _check_gold_box(gold_box)
    if not (_is_real(power) and power > 0):
        raise ValueError(f"power must be > 0, got {power!r}")
    boxes = parse_boxes(response)
    if boxes is None:
        return 0.0
    return box_iou(boxes[0][0], gold) ** power


# The Qwen2-VL answer, whole: optional label, one box, optional end-of-turn and pad tokens
# (the released grounding run keeps special tokens in the decoded text).
_QWEN2VL_ONE_BOX = re.compile(
    rf"(?:<\|object_ref_start\|>[^<]*<\|object_ref_end\|>)?<\|box_start\|>\s*{_QWEN2VL_PAIR}\s*<\|box_end\|>"
    rf"(?:<\|im_end\|>)?(?:<\|endoftext\|>)*")
_FENCED = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


def grounding_format_reward(response: str) -> float:
    """r_fmt in {0, 1}: 1 iff the whole response (surrounding whitespace aside) is exactly one
    box in an accepted syntax:

      * JSON, optionally inside ```json fences: [{"bbox_2d": [x1, y1, x2, y2]}] with an optional
        string "label" and no other key, or a bare [x1, y1, x2, y2];
      * Qwen2-VL tokens: [<|object_ref_start|>label<|object_ref_end|>]<|box_start|>(x1,y1),(x2,y2)<|box_end|>
        followed optionally by <|im_end|> and pad tokens.

    Only the syntax is checked, plus that the numbers are finite and within +-MAX_ABS_COORD (an
    inverted box is well-formed; grounding_reward scores it 0).
    The released regex meant the Qwen2-VL form but, with '|' unescaped, accepts anything that
    starts with '<' (deviation 2).

    >>> grounding_format_reward('[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]')
    1.0
    >>> grounding_format_reward("<think>x</think>")   # the released regex gives 1.0
    0.0
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    text = response.strip()
    token_answer = _QWEN2VL_ONE_BOX.fullmatch(text)
    if token_answer:
        return 1.0 if _numbers(token_answer.groups(), 4) is not None else 0.0
    fenced = _FENCED.fullmatch(text)
    try:
        obj = json.loads(fenced.group(1) if fenced else text)
    except (ValueError, RecursionError):
        return 0.0
    if _numbers(obj, 4) is not None:  # a bare [x1, y1, x2, y2]
        return 1.0
    one_object = (isinstance(obj, list) and len(obj) == 1 and isinstance(obj[0], dict)
                  and set(obj[0]) <= {"bbox_2d", "label"}
                  and _numbers(obj[0].get("bbox_2d"), 4) is not None
                  and isinstance(obj[0].get("label", ""), str))
    return 1.0 if one_object else 0.0


# =============================================================================================
# 5. Counting (PixMo-Count): match predicted to gold points
# =============================================================================================
def counting_reward(response: str, gold_points: Sequence[Sequence[float]], diagonal: float) -> float:
    """r = (min(P, G) / max(P, G)) * (1 - mean_{(i,j) matched} ||p_i - g_j||_2 / diagonal),
    clamped at 0 from below; in [0, 1].

    P predicted points (box centres or points, see parse_points), G gold points [x, y], both in
    the same frame. The matching is the Hungarian assignment on the (P, G) Euclidean distance
    matrix, so min(P, G) pairs are scored; the count ratio punishes missing and extra objects.
    0 when nothing parses, or when P = 0 or G = 0.

    diagonal: the normaliser, in the same units as the points. The released code uses
    1000 * sqrt(2), the diagonal of Qwen2-VL's 0-1000 grid; for a pixel frame pass the image's
    own diagonal math.hypot(width, height) (the same normalisation for a square image; for other
    shapes the 0-1000 grid stretches x and y differently, ours measures true pixel distances).

    >>> counting_reward("(0,0),(2,2) (8,8),(10,10)", [[1, 1]], diagonal=1000 * math.sqrt(2))
    0.5
    """
    if not (_is_real(diagonal) and math.isfinite(diagonal) and diagonal > 0):
        raise ValueError(f"diagonal must be a finite number > 0, got {diagonal!r}")
    gold = [_numbers(list(p) if isinstance(p, (tuple, np.ndarray)) else p, 2) for p in gold_points]
    if any(g is None for g in gold):
        raise ValueError(f"gold_points must be [x, y] pairs of finite numbers, got {gold_points!r}")
    pred = parse_points(response)
    if not pred or not gold:
        return 0.0
    diff = np.asarray(pred, dtype=np.float64)[:, None, :] - np.asarray(gold, dtype=np.float64)[None, :, :]
    dist = np.sqrt((diff ** 2).sum(-1))  # (P, G) Euclidean distances
    pairs = hungarian_match(dist)
    mean_dist = float(np.mean([dist[i, j] for i, j in pairs]))
    count_ratio = min(len(pred), len(gold)) / max(len(pred), len(gold))
    return max(0.0, count_ratio * (1.0 - mean_dist / diagonal))


# =============================================================================================
# 6. OCR: normalised edit distance
# =============================================================================================
def ocr_reward(response: str, gold_text: str) -> float:
    """r = max(0, 1 - ED(pred, gold) / max(|pred|, |gold|)), in [0, 1]; 0 when both are empty.

    ED is the character-level Levenshtein distance (insert, delete, substitute each cost 1;
    no transpositions). Both strings first have runs of whitespace collapsed to one space and
    ends stripped (" ".join(s.split())); case is kept.

    Source: PR1 did not release its OCR training reward (issue #19). This is the same authors'
    earlier MMR1 reward (src/open_r1/rewards.py, perpo_ocr_edit_distance_reward), which the
    paper's "edit distance" reward description matches; the PR1 evaluation reports the same
    ratio (un-normalised whitespace) as its edit-distance metric.

    >>> ocr_reward("Hello  world", "Hello world!")   # 1 insertion over 12 characters
    0.9166666666666666
    """
    if not isinstance(response, str) or not isinstance(gold_text, str):
        raise TypeError(f"response and gold_text must be str, got {type(response).__name__}, "
                        f"{type(gold_text).__name__}")
    pred, gold = " ".join(response.split()), " ".join(gold_text.split())
    longest = max(len(pred), len(gold))
    if longest == 0:
        return 0.0
    return max(0.0, 1.0 - Levenshtein.distance(pred, gold) / longest)


# =============================================================================================
# 7. Detection (COCO): DETR-style matching, then F1 + class accuracy + IoU
# =============================================================================================
DET_FORMAT_WEIGHT = 0.25  # released: reward = 0.25 * format_reward before the other terms
DET_IOU_THRESHOLD = 0.5  # released: a matched pair counts only if IoU > 0.5 (strict)
DET_REWARD_MAX = 3.0  # released: clamp to [0, 3] = 0.25 + 0.75 + 1 + 1
# DETR's matching weights (arXiv:2005.12872, Sec. 4 / its HungarianMatcher), as released.
DET_COST_L1, DET_COST_CLASS, DET_COST_GIOU = 5.0, 1.0, 2.0


def _detection_entries(response: str, class_names) -> tuple[list[tuple[Box, str]], int] | None:
    """(valid predictions [(box, label)], number of wrong entries), or None when the response
    (fences removed) is not a non-empty JSON list.

    An entry is wrong if it is not an object, misses "bbox_2d" or "label", has a label not in
    class_names (exact, case-sensitive), or a box that is not 4 numbers with x2 > x1, y2 > y1.
    """
    entries = _load_json(response)
    if not isinstance(entries, list) or not entries:
        return None
    valid, wrong = [], 0
    for entry in entries:
        box = _numbers(entry.get("bbox_2d"), 4) if isinstance(entry, dict) else None
        label = entry.get("label") if isinstance(entry, dict) else None
        if (box is None or not isinstance(label, str) or label not in class_names
                or not (box[2] > box[0] and box[3] > box[1])):
            wrong += 1
        else:
            valid.append((box, label))
    return valid, wrong


def _cxcywh(box: Sequence[float]) -> list[float]:
    """[x1, y1, x2, y2] -> [centre x, centre y, width, height]."""
    return [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]]


def detection_cost(pred: list[tuple[Box, str]], gold: list[tuple[Box, str]]) -> np.ndarray:
    """DETR's matching cost, (P, G):

        cost[i, j] = 5 * ||cxcywh(p_i) - cxcywh(g_j)||_1 - 1 * [label_i == label_j] - 2 * GIoU(p_i, g_j)

    The L1 term is in pixels (the released code does not normalise boxes), so it dominates and
    the matching is mostly by position; the class term is 1/0 (deviation 7).
    """
    cost = np.zeros((len(pred), len(gold)))
    for i, (pbox, plabel) in enumerate(pred):
        for j, (gbox, glabel) in enumerate(gold):
            l1 = sum(abs(p - g) for p, g in zip(_cxcywh(pbox), _cxcywh(gbox)))
            p_class = 1.0 if plabel == glabel else 0.0
            cost[i, j] = DET_COST_L1 * l1 - DET_COST_CLASS * p_class - DET_COST_GIOU * generalized_box_iou(pbox, gbox)
    return cost


def detection_reward(response: str, gold_boxes: Sequence[Sequence[float]], gold_labels: Sequence[str],
                     class_names: Sequence[str], penalty: bool = False, f1_weight: float = 0.75,
                     cls_weight: float = 1.0, iou_weight: float = 1.0) -> float:
    """The released PR1 detection reward, in [0, 3]:

        fmt = 1 - wrong entries / entries                       (see _detection_entries)
        r   = 0.25 * fmt                                        returned as is when no prediction
                                                                is valid, there is no gold object,
                                                                or no matched pair has IoU > 0.5
        match predictions to gold with the Hungarian algorithm on detection_cost;
        keep the M pairs with IoU > 0.5;   precision = M / P,  recall = M / G  (P valid predictions)
        r  += f1_weight * 2 PR / (P + R)  +  cls_weight * mean_kept [label_i == label_j]
              +  iou_weight * mean_kept IoU
        r  -= 0.5 * ((P - M) / P + (G - M) / G)                 only if penalty
        r   = clamp(r, 0, 3)

    The response must be a JSON list of {"bbox_2d": [x1, y1, x2, y2], "label": name} objects,
    optionally in ```json fences; anything else (prose, <think> tags) scores 0. gold_labels are
    names from class_names (map COCO ids to names first); gold boxes are in the frame of the
    model's answer (pixels of the resized input image for Qwen2.5-VL).

    penalty: the released code's default is on, but its detection script turns it off
    (DO_PENAIlty=False), so False is the default here. Weights: the released env-var defaults
    F1_SCALE=0.75, CLS_COE=1, IOU_COE=1.

    >>> gold = [[10, 10, 50, 50], [60, 60, 90, 90]]
    >>> detection_reward('[{"bbox_2d": [10, 10, 50, 50], "label": "person"}, '
    ...                  '{"bbox_2d": [60, 60, 90, 90], "label": "dog"}]', gold, ["person", "dog"], COCO_CLASSES)
    3.0
    """
    if len(gold_boxes) != len(gold_labels):
        raise ValueError(f"{len(gold_boxes)} gold boxes but {len(gold_labels)} gold labels")
    gold = [(_check_gold_box(b), lab) for b, lab in zip(gold_boxes, gold_labels)]
    unknown = [lab for _, lab in gold if lab not in class_names]
    if unknown:
        raise ValueError(f"gold labels not in class_names: {unknown!r} (pass names, not ids)")
    parsed = _detection_entries(response, set(class_names))
    if parsed is None:
        return 0.0
    pred, wrong = parsed
    reward = DET_FORMAT_WEIGHT * (1.0 - wrong / (len(pred) + wrong))
    if not pred or not gold:
        return reward

    pairs = hungarian_match(detection_cost(pred, gold))
    # ALGO: only well-localised pairs count as detections (the released code's IoU > 0.5)
    kept = [(i, j, box_iou(pred[i][0], gold[j][0])) for i, j in pairs]
    kept = [(i, j, iou) for i, j, iou in kept if iou > DET_IOU_THRESHOLD]
    if not kept:
        return reward  # released: returns before the F1 term and the penalty
    m, n_pred, n_gold = len(kept), len(pred), len(gold)
    precision, recall = m / n_pred, m / n_gold
    f1 = 2 * precision * recall / (precision + recall)
    cls_acc = sum(pred[i][1] == gold[j][1] for i, j, _ in kept) / m
    mean_iou = sum(iou for _, _, iou in kept) / m
    reward += f1_weight * f1 + cls_weight * cls_acc + iou_weight * mean_iou
    if penalty:  # false-positive rate + missed rate, half weight each
        reward -= 0.5 * ((n_pred - m) / n_pred + (n_gold - m) / n_gold)
    return min(max(reward, 0.0), DET_REWARD_MAX)


# The 80 COCO category names in the usual order (the released detection prompt lists these).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


# =============================================================================================
# 8. Prompts
# =============================================================================================
# The released per-task templates. Grounding and counting are the training templates
# (constants.py); counting has no final period in the release. OCR is the evaluation prompt
# (no OCR training template was released). Detection is the evaluation prompt: the released
# training template is a constant "Please output bbox coordinates and names of <80 names>."
# Fill {categories} with ", ".join(class_names).
RELEASED_TEMPLATES = {
    "grounding": "Output the bounding box of the {question} in the image.",
    "counting": "Output all the bounding boxes of the {question}",
    "ocr": "OCR this image:",
    "detection": ("Locate every item from the category list in the image and output the coordinates "
                  "in JSON format. The category set includes {categories}."),
}
# Ours, not in the release: one line stating Qwen2.5-VL's native answer syntax (absolute pixel
# boxes in JSON), so the parsers above read the answer. The released Qwen2-VL runs relied on the
# model's built-in grounding tokens instead. Braces are doubled so that str.format (which fills
# {question} / {categories}) prints them once.
ANSWER_SYNTAX = {
    "grounding": 'Answer in JSON as [{{"bbox_2d": [x1, y1, x2, y2], "label": "..."}}] in pixel coordinates.',
    "counting": ('Answer in JSON as [{{"bbox_2d": [x1, y1, x2, y2], "label": "..."}}, ...] with one entry '
                 "per object, in pixel coordinates."),
    "ocr": "Answer with the text of the image only, in reading order.",
    "detection": ('Answer in JSON as [{{"bbox_2d": [x1, y1, x2, y2], "label": "..."}}, ...] with one entry '
                  "per object, in pixel coordinates."),
}
TASK_PROMPTS = {task: RELEASED_TEMPLATES[task] + "\n" + ANSWER_SYNTAX[task] for task in RELEASED_TEMPLATES}


# =============================================================================================
# 9. Evaluation metrics of the sister paper (evaluate.py; validation in train_grpo.py)
# =============================================================================================
def grounding_hit(response: str, gold_box: Sequence[float], threshold: float = 0.5) -> bool:
    """Acc@0.5, the paper's grounding metric: the first predicted box has IoU >= threshold."""
    boxes = parse_boxes(response)
    return bool(boxes) and box_iou(boxes[0][0], _check_gold_box(gold_box)) >= threshold


def predicted_count(response: str) -> int:
    """The number of objects a counting answer names (boxes or points); 0 when nothing parses."""
    return len(parse_points(response) or [])


def ocr_edit_distance(response: str, gold_text: str) -> float:
    """The released OCR evaluation's edit distance: ED(pred, gold) / max(|pred|, |gold|) on the raw
    strings (lower is better); 0 when both are empty."""
    longest = max(len(response), len(gold_text))
    return Levenshtein.distance(response, gold_text) / longest if longest else 0.0


def detection_predictions(response: str, class_names: Sequence[str]) -> list[tuple[Box, str]]:
    """The valid (box, label) entries of a detection answer, [] when it does not parse (for AP:
    the released evaluation gives every box the score 1.0)."""
    parsed = _detection_entries(response, set(class_names))
    return parsed[0] if parsed else []
