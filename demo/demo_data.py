"""Generate a small geometry dataset with drawn diagrams and *true* visual facts.

What it is for
    The paper trains on 1,442 Geometry3K problems whose `visual_key_info` was extracted from
    Gemini solutions (Perception-R1, arXiv 2506.07218, method section "visual annotation"). We
    cannot download those here, so the CPU demo and the tests use problems drawn with PIL, in
    exactly the training schema:

        id, kind, split     provenance ("demo-train-00007", the problem family, the split)
        problem             "<image>Find AC." - the numbers are only in the picture
        answer              "13"
        choices             four option strings (the answer among them), answer_letter "C"
        images              ["images/train_00007.png"] (relative to the JSONL file)
        visual_key_info     "<info1>AB = 5</info1>\n<info2>BC = 8</info2>\n<info3>..."
        solution            a correct step-by-step answer in the training format, stating the
                            facts (what a distilled chain-of-thought looks like)

    Because the generator draws the diagram from the facts, the facts are true by construction
    and sufficient: `solve_from_facts` recomputes every answer from the fact strings alone
    (the tests check this for every row).

Problem families (each needs the diagram to answer):
    segment_sum, triangle_angle, right_triangle, rectangle_perimeter, circle_diameter,
    parallel_lines, linear_pair, isosceles_base_angle

Output (under --output_dir): train.jsonl, test.jsonl, train.parquet, test.parquet (images
embedded as a Hugging Face `Image` feature), images/*.png.

Usage
    python -m demo.demo_data --output_dir demo_data --num_train 256 --num_test 64 --seed 0
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from pathlib import Path

import tyro
from PIL import Image, ImageDraw, ImageFont

from judge import format_facts

SIZE = 336  # pixels per side (12 x 12 Qwen2.5-VL merged tokens at full size)


@dataclasses.dataclass
class Args:
    output_dir: str = "demo_data"
    """folder to write (created if missing)"""
    num_train: int = 256
    """number of training problems"""
    num_test: int = 64
    """number of test problems (drawn from a different random stream than train)"""
    seed: int = 0
    """random seed; the same seed gives the same files"""
    no_parquet: bool = False
    """write only the JSONL files (skips the `datasets` import)"""
    task: str = "geometry"
    """geometry (the Perception-R1 demo: diagrams with visual facts), one of the sister paper's
    perception tasks (grounding, counting, ocr, detection: synthetic shapes, dots and words with
    gold boxes, points or text), or "all" (geometry in output_dir, each task in output_dir/<task>)"""


# ---------------------------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------------------------
def _font(size: int = 22):
    return ImageFont.load_default(size=size)


def _label(draw: ImageDraw.ImageDraw, xy, text: str, size: int = 22, color: str = "black") -> None:
    draw.text(xy, text, fill=color, font=_font(size), anchor="mm")


def _point(draw, xy, name: str, offset=(0, -18)) -> None:
    x, y = xy
    draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill="black")
    _label(draw, (x + offset[0], y + offset[1]), name, 22)


def _right_angle_mark(draw, corner, a, b, s: float = 14) -> None:
    """Small square at `corner` between the directions to points a and b."""
    cx, cy = corner
    ux, uy = _unit(corner, a)
    vx, vy = _unit(corner, b)
    p1 = (cx + ux * s, cy + uy * s)
    p2 = (cx + ux * s + vx * s, cy + uy * s + vy * s)
    p3 = (cx + vx * s, cy + vy * s)
    draw.line([p1, p2, p3], fill="black", width=2)


def _unit(p, q):
    dx, dy = q[0] - p[0], q[1] - p[1]
    n = math.hypot(dx, dy)
    return dx / n, dy / n


def _tick(draw, p, q, n: int = 1) -> None:
    """n congruence tick marks across the middle of segment pq."""
    mx, my = (p[0] + q[0]) / 2, (p[1] + q[1]) / 2
    ux, uy = _unit(p, q)
    nx, ny = -uy, ux
    for k in range(n):
        off = (k - (n - 1) / 2) * 6
        cx, cy = mx + ux * off, my + uy * off
        draw.line([(cx - nx * 8, cy - ny * 8), (cx + nx * 8, cy + ny * 8)], fill="black", width=2)


def _mid(p, q, push=(0, 0)):
    return ((p[0] + q[0]) / 2 + push[0], (p[1] + q[1]) / 2 + push[1])


def _canvas():
    img = Image.new("RGB", (SIZE, SIZE), "white")
    return img, ImageDraw.Draw(img)


# ---------------------------------------------------------------------------------------------
# Problem families: each returns (image, problem, answer, facts, reasoning)
# ---------------------------------------------------------------------------------------------
def segment_sum(rng: random.Random):
    a, b = rng.randint(2, 19), rng.randint(2, 19)
    img, d = _canvas()
    y = SIZE / 2
    xa, xc = 30, SIZE - 30
    xb = xa + (xc - xa) * a / (a + b)
    A, B, C = (xa, y), (xb, y), (xc, y)
    d.line([A, C], fill="black", width=3)
    for p, n in ((A, "A"), (B, "B"), (C, "C")):
        _point(d, p, n, (0, 22))
    _label(d, _mid(A, B, (0, -22)), str(a))
    _label(d, _mid(B, C, (0, -22)), str(b))
    facts = [f"AB = {a}", f"BC = {b}", "B lies on segment AC"]
    why = f"B lies on segment AC, so AC = AB + BC = {a} + {b} = {a + b}."
    return img, "<image>Find AC.", a + b, facts, why


def triangle_angle(rng: random.Random):
    a = rng.randint(30, 80)
    b = rng.randint(30, 150 - a)
    img, d = _canvas()
    A, B = (40, 280), (296, 280)
    # Apex C from the two base angles (drawn to scale).
    ta, tb = math.radians(a), math.radians(b)
    w = B[0] - A[0]
    h = w / (1 / math.tan(ta) + 1 / math.tan(tb))
    C = (A[0] + h / math.tan(ta), A[1] - min(h, 230))
    d.polygon([A, B, C], outline="black", width=3)
    _point(d, A, "A", (-16, 10)); _point(d, B, "B", (16, 10)); _point(d, C, "C", (0, -18))
    _label(d, (A[0] + 48, A[1] - 14), f"{a}°", 20)
    _label(d, (B[0] - 48, B[1] - 14), f"{b}°", 20)
    c = 180 - a - b
    facts = [f"m∠A = {a}°", f"m∠B = {b}°"]
    why = f"The angles of triangle ABC sum to 180°, so m∠C = 180° - {a}° - {b}° = {c}°."
    return img, "<image>Find m∠C.", c, facts, why


def right_triangle(rng: random.Random):
    k = rng.randint(1, 4)
    p, q, r = rng.choice([(3, 4, 5), (5, 12, 13), (8, 15, 17), (6, 8, 10)])
    p, q, r = p * k, q * k, r * k
    img, d = _canvas()
    C = (50, 280)
    s = 220 / max(p, q)
    A = (C[0], C[1] - p * s)
    B = (C[0] + q * s, C[1])
    d.polygon([A, B, C], outline="black", width=3)
    _right_angle_mark(d, C, A, B)
    _point(d, A, "A", (-16, 0)); _point(d, B, "B", (0, 18)); _point(d, C, "C", (-16, 10))
    _label(d, _mid(A, C, (-24, 0)), str(p))
    _label(d, _mid(B, C, (0, 22)), str(q))
    facts = [f"AC = {p}", f"BC = {q}", "∠ACB is a right angle"]
    why = f"Triangle ABC is right-angled at C, so AB = √({p}² + {q}²) = √{p * p + q * q} = {r}."
    return img, "<image>Find AB.", r, facts, why


def rectangle_perimeter(rng: random.Random):
    w, h = rng.randint(3, 20), rng.randint(2, 15)
    img, d = _canvas()
    s = 240 / max(w, h)
    A = (48, 60 + h * s); B = (48 + w * s, 60 + h * s); C = (48 + w * s, 60); D = (48, 60)
    d.polygon([A, B, C, D], outline="black", width=3)
    for corner, p1, p2 in ((A, B, D), (B, C, A), (C, D, B), (D, A, C)):
        _right_angle_mark(d, corner, p1, p2, 12)
    for p, n, o in ((A, "A", (-14, 12)), (B, "B", (14, 12)), (C, "C", (14, -12)), (D, "D", (-14, -12))):
        _point(d, p, n, o)
    _label(d, _mid(A, B, (0, 20)), str(w))
    _label(d, _mid(B, C, (22, 0)), str(h))
    facts = ["ABCD is a rectangle", f"AB = {w}", f"BC = {h}"]
    why = f"Opposite sides of a rectangle are equal, so the perimeter is 2 × ({w} + {h}) = {2 * (w + h)}."
    return img, "<image>Find the perimeter of rectangle ABCD.", 2 * (w + h), facts, why


def circle_diameter(rng: random.Random):
    r = rng.randint(2, 30)
    img, d = _canvas()
    O, R = (SIZE / 2, SIZE / 2), 120
    t = rng.uniform(0, 2 * math.pi)
    A = (O[0] + R * math.cos(t), O[1] + R * math.sin(t))
    d.ellipse((O[0] - R, O[1] - R, O[0] + R, O[1] + R), outline="black", width=3)
    d.line([O, A], fill="black", width=2)
    _point(d, O, "O", (0, 18)); _point(d, A, "A", (14 * math.cos(t), 14 * math.sin(t)))
    _label(d, _mid(O, A, (14 * -math.sin(t), 14 * math.cos(t))), str(r))
    facts = ["O is the center of the circle", f"OA = {r}", "A lies on the circle"]
    why = f"OA is a radius of length {r}, so the diameter is 2 × {r} = {2 * r}."
    return img, "<image>Find the diameter of circle O.", 2 * r, facts, why


def parallel_lines(rng: random.Random):
    a = rng.randint(35, 145)
    img, d = _canvas()
    y1, y2 = 110, 230
    d.line([(20, y1), (316, y1)], fill="black", width=3)
    d.line([(20, y2), (316, y2)], fill="black", width=3)
    for y in (y1, y2):  # arrowheads mark the lines as parallel
        d.polygon([(290, y - 7), (304, y), (290, y + 7)], fill="black")
    _label(d, (30, y1 - 16), "l"); _label(d, (30, y2 - 16), "m")
    # Transversal through P (on l) and Q (on m) at angle a measured from the right part of l.
    dx = (y2 - y1) / math.tan(math.radians(a))
    P, Q = (SIZE / 2 + dx / 2, y1), (SIZE / 2 - dx / 2, y2)
    ux, uy = _unit(P, Q)
    d.line([(P[0] - ux * 60, P[1] - uy * 60), (Q[0] + ux * 60, Q[1] + uy * 60)], fill="black", width=3)
    _label(d, (P[0] + 30, P[1] + 16), f"{a}°", 20)  # below l, right of the transversal
    _label(d, (Q[0] + 30, Q[1] - 16), "x°", 20)  # above m, right of the transversal
    x = 180 - a
    facts = ["line l ∥ line m", f"the angle below l to the right of the transversal is {a}°",
             "x is the angle above m to the right of the transversal"]
    why = (f"Lines l and m are parallel, so the same-side interior angles are supplementary: "
           f"x = 180 - {a} = {x}.")
    return img, "<image>Find x.", x, facts, why


def linear_pair(rng: random.Random):
    a = rng.randint(25, 155)
    img, d = _canvas()
    E = (SIZE / 2, 220)
    d.line([(20, E[1]), (316, E[1])], fill="black", width=3)
    t = math.radians(a)
    F = (E[0] + 150 * math.cos(t), E[1] - 150 * math.sin(t))
    d.line([E, F], fill="black", width=3)
    _point(d, E, "E", (0, 18)); _point(d, (20, E[1]), "D", (0, 18)); _point(d, (316, E[1]), "G", (0, 18))
    _point(d, F, "F", (12 * math.cos(t), -12 * math.sin(t)))
    _label(d, (E[0] + 44 * math.cos(t / 2), E[1] - 44 * math.sin(t / 2)), f"{a}°", 20)
    _label(d, (E[0] - 44 * math.cos((math.pi - t) / 2), E[1] - 44 * math.sin((math.pi - t) / 2)), "x°", 20)
    x = 180 - a
    facts = ["D, E and G lie on one straight line", f"m∠FEG = {a}°", "x is the measure of ∠DEF"]
    why = f"∠DEF and ∠FEG form a linear pair, so x = 180 - {a} = {x}."
    return img, "<image>Find x.", x, facts, why


def isosceles_base_angle(rng: random.Random):
    apex = 2 * rng.randint(10, 70)
    img, d = _canvas()
    B, C = (50, 280), (286, 280)
    half = (C[0] - B[0]) / 2
    hgt = min(half / math.tan(math.radians(apex / 2)), 240)
    A = (SIZE / 2, 280 - hgt)
    d.polygon([A, B, C], outline="black", width=3)
    _tick(d, A, B); _tick(d, A, C)
    _point(d, A, "A", (0, -18)); _point(d, B, "B", (-16, 10)); _point(d, C, "C", (16, 10))
    _label(d, (A[0], A[1] + 34), f"{apex}°", 18)
    base = (180 - apex) // 2
    facts = ["AB = AC", f"m∠A = {apex}°"]
    why = f"Triangle ABC is isosceles with AB = AC, so m∠B = (180° - {apex}°) / 2 = {base}°."
    return img, "<image>Find m∠B.", base, facts, why


FAMILIES = {f.__name__: f for f in (segment_sum, triangle_angle, right_triangle, rectangle_perimeter,
                                     circle_diameter, parallel_lines, linear_pair, isosceles_base_angle)}


# ---------------------------------------------------------------------------------------------
# Facts -> answer, independently of the drawing code (used by tests to prove sufficiency)
# ---------------------------------------------------------------------------------------------
def solve_from_facts(kind: str, facts: list[str]) -> int:
    """Recompute the answer of a `kind` problem from its fact strings alone."""
    nums = [int(n) for f in facts for n in re.findall(r"(?<![A-Za-z])\d+", f)]
    text = " ".join(facts)
    if kind == "segment_sum":
        assert "B lies on segment AC" in text
        return nums[0] + nums[1]
    if kind == "triangle_angle":
        return 180 - nums[0] - nums[1]
    if kind == "right_triangle":
        assert "right angle" in text
        return round(math.hypot(nums[0], nums[1]))
    if kind == "rectangle_perimeter":
        assert "rectangle" in text
        return 2 * (nums[0] + nums[1])
    if kind == "circle_diameter":
        assert "center" in text
        return 2 * nums[0]
    if kind in ("parallel_lines", "linear_pair"):
        assert "∥" in text or "straight line" in text
        return 180 - nums[0]
    if kind == "isosceles_base_angle":
        assert "AB = AC" in text
        return (180 - nums[0]) // 2
    raise ValueError(f"unknown problem family {kind!r}")


def make_choices(answer: int, rng: random.Random) -> list[str]:
    """Four distinct positive options including the answer, in increasing order."""
    opts = {answer}
    while len(opts) < 4:
        cand = answer + rng.choice([-1, 1]) * rng.randint(1, max(3, answer // 2))
        if cand > 0:
            opts.add(cand)
    return [str(o) for o in sorted(opts)]


def make_row(split: str, index: int, rng: random.Random, image_dir: Path) -> dict:
    kind = list(FAMILIES)[index % len(FAMILIES)] if split == "test" else rng.choice(list(FAMILIES))
    img, problem, answer, facts, why = FAMILIES[kind](rng)
    name = f"{split}_{index:05d}.png"
    img.save(image_dir / name)
    choices = make_choices(answer, rng)
    fact_text = " ".join(f.rstrip(".") + "." for f in facts)
    solution = (f"<think>\nFrom the diagram: {fact_text} {why}\n</think>\n"
                f"<answer>\n\\boxed{{{answer}}}\n</answer>")
    return {
        "id": f"demo-{split}-{index:05d}",
        "kind": kind,
        "split": split,
        "problem": problem,
        "answer": str(answer),
        "choices": choices,
        "answer_letter": "ABCD"[choices.index(str(answer))],
        "images": [f"images/{name}"],
        "visual_key_info": format_facts(facts),  # judge.format_facts: "<info1>fact</info1>..."
        "solution": solution,
    }


def generate(output_dir: str | Path, num_train: int = 256, num_test: int = 64, seed: int = 0,
             parquet: bool = True) -> Path:
    """Write the demo dataset; returns the output folder. Deterministic for `seed`."""
    from data import write_jsonl

    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", num_train), ("test", num_test)):
        rng = random.Random(f"{seed}-{split}")  # independent streams: test is not a prefix of train
        rows = [make_row(split, i, rng, out / "images") for i in range(n)]
        write_jsonl(out / f"{split}.jsonl", rows)
        if parquet:
            write_parquet(out / f"{split}.parquet", rows, out)
    return out


# ---------------------------------------------------------------------------------------------
# The sister paper's perception tasks (arXiv 2504.07954): grounding, counting, OCR, detection
# ---------------------------------------------------------------------------------------------
TASK_SIZE = 224  # pixels per side: a multiple of 28, so the images are not resized (8 x 8 tokens)
TASKS = ("grounding", "counting", "ocr", "detection")
SHAPES = ("circle", "square", "triangle")  # also the detection classes
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220)}
WORDS = ("cat", "sun", "map", "tree", "blue", "seven", "river", "glass", "robot", "apple", "stone", "paper")


def _shape(draw, kind: str, box: list[int], color) -> None:
    x1, y1, x2, y2 = box
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=color)


def _free_boxes(rng: random.Random, n: int, lo: int = 36, hi: int = 72) -> list[list[int]]:
    """n non-overlapping square boxes [x1, y1, x2, y2] inside the canvas."""
    boxes = []
    while len(boxes) < n:
        s = rng.randint(lo, hi)
        x, y = rng.randint(4, TASK_SIZE - s - 4), rng.randint(4, TASK_SIZE - s - 4)
        box = [x, y, x + s, y + s]
        if all(box[2] + 4 < b[0] or b[2] + 4 < box[0] or box[3] + 4 < b[1] or b[3] + 4 < box[1] for b in boxes):
            boxes.append(box)
    return boxes


def task_row(task: str, rng: random.Random) -> tuple[Image.Image, str, str, str, dict]:
    """(image, problem, answer, solution, extra columns) of one synthetic task problem. Gold
    coordinates are pixels of the image (x1, y1, x2, y2); solutions are in Qwen2.5-VL's JSON."""
    img = Image.new("RGB", (TASK_SIZE, TASK_SIZE), "white")
    draw = ImageDraw.Draw(img)
    if task == "ocr":
        text = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
        draw.text((TASK_SIZE / 2, TASK_SIZE / 2), text, fill="black", font=_font(30), anchor="mm")
        return img, "text", text, text, {}
    if task == "counting":
        color, other = rng.sample(list(COLORS), 2)
        boxes = _free_boxes(rng, rng.randint(2, 6) + rng.randint(0, 2), lo=14, hi=22)
        n = rng.randint(2, len(boxes))
        for k, box in enumerate(boxes):
            draw.ellipse(box, fill=COLORS[color if k < n else other])
        points = [[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in boxes[:n]]
        entries = [{"bbox_2d": b, "label": f"{color} dot"} for b in boxes[:n]]
        return img, f"{color} dots", json.dumps(points), json.dumps(entries), {}
    k = rng.randint(2, 3) if task == "grounding" else rng.randint(1, 4)
    boxes = _free_boxes(rng, k)
    objects = [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in boxes]
    if task == "grounding":
        objects = list({(s, c): None for s, c in objects})  # distinct (shape, colour) pairs
        while len(objects) < len(boxes):
            objects.append((rng.choice(SHAPES), rng.choice(list(COLORS))))
            objects = list(dict.fromkeys(objects))
    for box, (shape, color) in zip(boxes, objects):
        _shape(draw, shape, box, COLORS[color])
    if task == "grounding":
        t = rng.randrange(len(boxes))
        name = f"{objects[t][1]} {objects[t][0]}"
        return img, name, json.dumps(boxes[t]), json.dumps([{"bbox_2d": boxes[t], "label": name}]), {}
    entries = [{"bbox_2d": b, "label": s} for b, (s, _) in zip(boxes, objects)]
    return img, "objects", json.dumps(entries), json.dumps(entries), {"classes": list(SHAPES)}


def generate_task(output_dir: str | Path, task: str, num_train: int = 256, num_test: int = 64, seed: int = 0) -> Path:
    """Write one task's dataset (train.jsonl, test.jsonl, images/) in the training schema plus a
    `task` column; deterministic for `seed`. Returns the folder."""
    from data import write_jsonl

    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", num_train), ("test", num_test)):
        rng = random.Random(f"{seed}-{task}-{split}")
        rows = []
        for i in range(n):
            img, problem, answer, solution, extra = task_row(task, rng)
            name = f"{task}_{split}_{i:05d}.png"
            img.save(out / "images" / name)
            rows.append({"id": f"{task}-{split}-{i:05d}", "task": task, "split": split, "problem": problem,
                         "answer": answer, "images": [f"images/{name}"], "solution": solution, **extra})
        write_jsonl(out / f"{split}.jsonl", rows)
    return out


def write_parquet(path: Path, rows: list[dict], base: Path) -> None:
    """Parquet with the images embedded (Hugging Face `Image` feature), like hub datasets."""
    import datasets

    embedded = [{**r, "images": [{"bytes": (base / p).read_bytes(), "path": Path(p).name} for p in r["images"]]}
                for r in rows]
    features = datasets.Features({
        "id": datasets.Value("string"), "kind": datasets.Value("string"), "split": datasets.Value("string"),
        "problem": datasets.Value("string"), "answer": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")), "answer_letter": datasets.Value("string"),
        "images": datasets.List(datasets.Image()), "visual_key_info": datasets.Value("string"),
        "solution": datasets.Value("string"),
    })
    datasets.Dataset.from_list(embedded, features=features).to_parquet(str(path))


def main(args: Args) -> None:
    if args.task not in ("geometry", "all", *TASKS):
        raise SystemExit(f"--task must be geometry, all or one of {TASKS}, got {args.task!r}")
    if args.task in ("geometry", "all"):
        out = generate(args.output_dir, args.num_train, args.num_test, args.seed, parquet=not args.no_parquet)
        print(f"wrote {args.num_train} train + {args.num_test} test geometry problems to {out}/")
    for task in TASKS if args.task == "all" else [args.task] if args.task != "geometry" else []:
        folder = Path(args.output_dir) / task if args.task == "all" else Path(args.output_dir)
        out = generate_task(folder, task, args.num_train, args.num_test, args.seed)
        print(f"wrote {args.num_train} train + {args.num_test} test {task} problems to {out}/")


if __name__ == "__main__":
    main(tyro.cli(Args))
