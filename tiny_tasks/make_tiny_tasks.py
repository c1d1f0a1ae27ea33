"""Regenerate the tiny tasks: python tiny_tasks/make_tiny_tasks.py

Seven small vision-language tasks drawn with pillow, each standing in for one task type of the
continual instruction tuning benchmark, plus the two disjoint mixes that the tiny base models are
pre-trained on (base/align, base/instruct). Everything is written in LLaVA's conversation format,
image paths relative to the task folder. Deterministic: the same seed gives the same files.
"""
import json
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = 32
BACKGROUND = (24, 24, 24)
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 240),
          "yellow": (230, 210, 40), "purple": (160, 70, 210), "white": (235, 235, 235)}
SHAPES = ["circle", "square", "triangle", "diamond", "cross", "ring"]
LETTERS = list("AEHKMNRSTXYZ")
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]
FONT = ImageFont.load_default(size=22)
DESCRIBE = "Describe the image."


def jitter(rgb, rng):
    return tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in rgb)


def draw_shape(draw, shape, color, cx, cy, r):
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif shape == "cross":
        w = max(1, r // 2)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, r // 2))


def canvas(background=BACKGROUND):
    image = Image.new("RGB", (SIZE, SIZE), background)
    return image, ImageDraw.Draw(image)


def one_shape(rng, quadrant=None, radius=None, background=BACKGROUND):
    """One shape of random kind and colour; returns the image and what was drawn."""
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    r = radius or rng.randint(6, 9)
    if quadrant is None:
        cx, cy = rng.randint(r + 1, SIZE - r - 2), rng.randint(r + 1, SIZE - r - 2)
    else:
        right, bottom = "right" in quadrant, "bottom" in quadrant
        cx = rng.randint(SIZE // 2 + 1, SIZE - r - 2) if right else rng.randint(r + 1, SIZE // 2 - 2)
        cy = rng.randint(SIZE // 2 + 1, SIZE - r - 2) if bottom else rng.randint(r + 1, SIZE // 2 - 2)
    image, draw = canvas(background)
    draw_shape(draw, shape, jitter(COLORS[color], rng), cx, cy, r)
    return image, {"shape": shape, "color": color, "cx": cx, "cy": cy, "r": r}


def two_shapes(rng):
    """Two shapes of different kind and colour, side by side or one above the other."""
    shapes, colors = rng.sample(SHAPES, 2), rng.sample(list(COLORS), 2)
    horizontal = rng.random() < 0.5
    a, b = rng.randint(8, 9), rng.randint(23, 24)
    other = [rng.randint(8, 23), rng.randint(8, 23)]
    centers = [(a, other[0]), (b, other[1])] if horizontal else [(other[0], a), (other[1], b)]
    image, draw = canvas()
    for shape, color, (cx, cy) in zip(shapes, colors, centers):
        draw_shape(draw, shape, jitter(COLORS[color], rng), cx, cy, 7)
    return image, shapes, colors, horizontal


def letter_image(rng, letter, color, cx=None, background=BACKGROUND):
    image, draw = canvas(background)
    cx = cx if cx is not None else rng.randint(13, 19)
    draw.text((cx, rng.randint(14, 18)), letter, fill=jitter(COLORS[color], rng), font=FONT, anchor="mm")
    return image


def dots_image(rng, count, color):
    image, draw = canvas()
    centers = []
    while len(centers) < count:
        c = (rng.randint(4, SIZE - 5), rng.randint(4, SIZE - 5))
        if all(abs(c[0] - x) > 7 or abs(c[1] - y) > 7 for x, y in centers):
            centers.append(c)
    for cx, cy in centers:
        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=jitter(COLORS[color], rng))
    return image


# ---- the seven continual tasks: each returns (image, question, answer) ----

def caption(rng):
    image, shapes, colors, horizontal = two_shapes(rng)
    relation = ("left of", "right of") if horizontal else ("above", "below")
    first = rng.randint(0, 1)
    answer = (f"a {colors[first]} {shapes[first]} {relation[first]} "
              f"a {colors[1 - first]} {shapes[1 - first]}")
    return image, "Write a short caption for the picture.", answer


def classify(rng):
    image, drawn = one_shape(rng)
    return image, "What kind of object is this?", drawn["shape"]


def vqa(rng):
    image, shapes, colors, horizontal = two_shapes(rng)
    i = rng.randint(0, 1)
    where = (("left", "right") if horizontal else ("top", "bottom"))[i]
    return image, f"What color is the shape on the {where}?", colors[i]


def count(rng):
    n = rng.randint(1, 5)
    return dots_image(rng, n, rng.choice(list(COLORS))), "How many dots are there?", str(n)


def ocr(rng):
    letter = rng.choice(LETTERS)
    return letter_image(rng, letter, rng.choice(list(COLORS))), "What letter is written here?", letter


def grounding(rng):
    quadrant = rng.choice(QUADRANTS)
    image, drawn = one_shape(rng, quadrant=quadrant)
    return image, f"Where is the {drawn['shape']}?", quadrant


def mcq(rng):
    """The options come in a fixed order, so the task teaches the answer format rather than reading."""
    image, drawn = one_shape(rng)
    lines = "\n".join(f"{label}. {color}" for label, color in zip("ABCDEF", COLORS))
    question = f"Which color is the object?\n{lines}\nAnswer with the option's letter."
    return image, question, "ABCDEF"[list(COLORS).index(drawn["color"])]


TASKS = [caption, classify, vqa, count, ocr, grounding, mcq]


# ---- the base mixes, disjoint from the tasks above ----

def align(rng):
    """Generic captions of every kind of picture: the tiny stand-in for LLaVA's stage-1 data."""
    kind = rng.choice(["shape", "two", "letter", "dots"])
    if kind == "two":
        image, shapes, colors, _ = two_shapes(rng)
        return image, DESCRIBE, f"a {colors[0]} {shapes[0]} and a {colors[1]} {shapes[1]}"
    if kind == "shape":
        image, d = one_shape(rng)
        size = "big" if d["r"] >= 8 else "small"
        where = QUADRANTS[(d["cx"] >= SIZE // 2) + 2 * (d["cy"] >= SIZE // 2)]
        return image, DESCRIBE, f"a {size} {d['color']} {d['shape']} in the {where}"
    color, letter = rng.choice(list(COLORS)), rng.choice(LETTERS)
    if kind == "letter":
        return letter_image(rng, letter, color), DESCRIBE, f"the letter {letter} in {color}"
    n = rng.randint(1, 5)  # written as a digit, as captions on the web often do, and as the count task answers
    return dots_image(rng, n, color), DESCRIBE, f"{n} {color} dot{'s' if n > 1 else ''}"


def instruct(rng):
    """A multi-task instruction mix with four answer formats (yes/no, colour, size, side)."""
    kind = rng.choice(["exists", "background", "size", "side"])
    if kind == "exists":
        image, d = one_shape(rng)
        asked = d["shape"] if rng.random() < 0.5 else rng.choice(SHAPES)
        return image, f"Is there a {asked}? Answer yes or no.", "yes" if asked == d["shape"] else "no"
    if kind == "background":
        name = rng.choice(["red", "green", "blue", "yellow"])
        background = tuple(c // 3 for c in COLORS[name])
        image, _ = one_shape(rng, background=background)
        return image, "What color is the background?", name
    if kind == "size":
        image, d = one_shape(rng, radius=rng.choice([5, 10]))
        return image, "Is the object big or small?", "big" if d["r"] == 10 else "small"
    side = rng.choice(["left", "right"])
    image = letter_image(rng, rng.choice(LETTERS), rng.choice(list(COLORS)), cx=9 if side == "left" else 23)
    return image, "Is the letter on the left or the right?", side


def write_split(folder, name, make, n, rng):
    records = []
    for i in range(n):
        image, question, answer = make(rng)
        path = f"images/{name}_{i:04d}.png"
        image.save(folder / path)
        records.append({"id": f"{folder.name}_{name}_{i:04d}", "image": path, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    (folder / f"{name}.json").write_text(json.dumps(records, indent=1))


def main(root=Path(__file__).parent, seed=0, train=300, test=100):
    for make in TASKS:
        folder = root / make.__name__
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "images").mkdir(parents=True)
        rng = random.Random(f"{seed}-{make.__name__}")
        write_split(folder, "train", make, train, rng)
        write_split(folder, "test", make, test, rng)
    for name, make, n in [("align", align, 2000), ("instruct", instruct, 1200)]:
        folder = root / "base" / name
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "images").mkdir(parents=True)
        rng = random.Random(f"{seed}-{name}")
        write_split(folder, "train", make, n, rng)


if __name__ == "__main__":
    main()
