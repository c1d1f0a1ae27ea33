"""Regenerate the tiny tasks: python tiny_tasks/make_tiny_tasks.py

Seven small vision-language tasks drawn with pillow, each standing in for one task type of the
continual instruction tuning benchmark, plus the mixes the tiny bases are pre-trained on, a folder per task in
base/ (describe: the alignment captions; language: the language model's own text-only instructions; the others:
the instruction mix; those with a test split are the bases' held-in tasks). Everything is written in LLaVA's
conversation format, image paths relative to the task folder. Deterministic: the same seed gives the same files.
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


def two_shapes(rng, horizontal=None):
    """Two shapes of different kind and colour, side by side or one above the other."""
    shapes, colors = rng.sample(SHAPES, 2), rng.sample(list(COLORS), 2)
    horizontal = rng.random() < 0.5 if horizontal is None else horizontal
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


def spread_out(rng, count, margin, gap):
    """`count` random centres at least `margin` from the border and more than `gap` apart on some axis."""
    centers = []
    while len(centers) < count:
        c = (rng.randint(margin, SIZE - margin - 1), rng.randint(margin, SIZE - margin - 1))
        if all(abs(c[0] - x) > gap or abs(c[1] - y) > gap for x, y in centers):
            centers.append(c)
    return centers


def dots_image(rng, count, color):
    image, draw = canvas()
    for cx, cy in spread_out(rng, count, margin=4, gap=7):
        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=jitter(COLORS[color], rng))
    return image


# ---- the seven continual tasks: each returns (image, question, answer) ----
# Real tasks vary their questions and are phrased several ways; several share an answer format or a kind of picture.
# So here: every task has several phrasings, vqa's questions ask for another attribute of another shape each time,
# classify, grounding and mcq ask about the same single shapes, caption and vqa about the same pairs of shapes, ocr
# and mcq both answer with a capital letter, classify and vqa both with a shape's name.

def ask(rng, phrasings, **fields):
    return rng.choice(phrasings).format(**fields)


def choose(question, options, right):
    """A question with lettered options, one per line, and the right option's letter as its answer."""
    lines = "\n".join(f"{label}. {option}" for label, option in zip("ABCDEF", options))
    return f"{question}\n{lines}\nAnswer with the option's letter.", "ABCDEF"[list(options).index(right)]


def caption(rng):
    image, shapes, colors, horizontal = two_shapes(rng)
    # the left or upper shape first: one reference per picture, so the picture alone decides the caption
    answer = f"a {colors[0]} {shapes[0]} {'left of' if horizontal else 'above'} a {colors[1]} {shapes[1]}"
    return image, ask(rng, ["Write a short caption for the picture.", "Caption this image.",
                            "What is in the picture? Answer in one sentence."]), answer


def classify(rng):
    image, drawn = one_shape(rng)
    return image, ask(rng, ["What kind of object is this?", "What shape is shown?", "Name the shape in the image."]), \
        drawn["shape"]


def vqa(rng):
    """Questions about one of two shapes, the colour or the kind of the one on a side: the question must be read."""
    image, shapes, colors, horizontal = two_shapes(rng)
    i = rng.randint(0, 1)
    where = (("left", "right") if horizontal else ("top", "bottom"))[i]
    if rng.random() < 0.5:
        return image, ask(rng, ["What color is the shape on the {w}?", "Which color does the {w} shape have?"],
                          w=where), colors[i]
    return image, ask(rng, ["What shape is on the {w}?", "Which kind of shape is at the {w}?"], w=where), shapes[i]


def count(rng):
    n = rng.randint(1, 5)
    return dots_image(rng, n, rng.choice(list(COLORS))), ask(rng, ["How many dots are there?", "Count the dots.",
                                                                   "How many dots can you see?"]), str(n)


def ocr(rng):
    letter = rng.choice(LETTERS)
    return letter_image(rng, letter, rng.choice(list(COLORS))), ask(rng, ["What letter is written here?",
                                                                         "Read the letter in the image.",
                                                                         "Which letter is shown?"]), letter


def grounding(rng):
    quadrant = rng.choice(QUADRANTS)
    image, drawn = one_shape(rng, quadrant=quadrant)
    return image, ask(rng, ["Where is the {s}?", "In which part of the image is the {s}?", "Locate the {s}."],
                      s=drawn["shape"]), quadrant


def mcq(rng):
    """The options come in a fixed order, so the task teaches the answer format; the phrasing varies."""
    image, drawn = one_shape(rng)
    return image, *choose(ask(rng, ["Which color is the object?", "What is the color of the shape?"]), COLORS,
                          drawn["color"])


TASKS = [caption, classify, vqa, count, ocr, grounding, mcq]


# ---- the base mixes ----
# align: generic captions of every kind of picture, LLaVA's stage-1 data in miniature.
# instruct: a broad multi-task instruction mix, as InstructBLIP's held-in sets and LLaVA-1.5's mix: many task types,
# phrased several ways, in every answer format the continual tasks use (a word, a digit, a letter among options,
# yes/no, a phrase, a location). Some are like continual tasks (held-in-like: part of vqa's questions, counting a
# few dots, lettered options as mcq's, describing as captioning), some continual tasks are like nothing in it
# (held-out-like: reading letters, naming shapes, quadrants).

def describe(rng):
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


def exists(rng):
    """A shape or a letter: is there text?"""
    text = rng.random() < 0.5
    image = letter_image(rng, rng.choice(LETTERS), rng.choice(list(COLORS))) if text else one_shape(rng)[0]
    return image, ask(rng, ["Is there any text in the image? Answer yes or no.", "Does the picture contain writing?",
                            "Is something written here?"]), "yes" if text else "no"


def color(rng):
    image, d = one_shape(rng)
    return image, ask(rng, ["What color is the shape?", "What is the color of the object?", "Which color is it?"]), \
        d["color"]


def shape_options(rng):
    image, d = one_shape(rng)
    return image, *choose(ask(rng, ["Which shape is this?", "What kind of shape is shown?"]), SHAPES, d["shape"])


def background(rng):
    name = rng.choice(["red", "green", "blue", "yellow"])
    image, _ = one_shape(rng, background=tuple(c // 3 for c in COLORS[name]))
    return image, ask(rng, ["What color is the background?", "Which color is behind the object?"]), name


def size(rng):
    image, d = one_shape(rng, radius=rng.choice([5, 10]))
    return image, ask(rng, ["Is the object big or small?", "Is the shape large or small?"]), \
        "big" if d["r"] == 10 else "small"


def side(rng):
    right = rng.random() < 0.5
    image, d = one_shape(rng, quadrant=rng.choice(["top right", "bottom right"] if right else
                                                   ["top left", "bottom left"]))
    return image, ask(rng, ["Is the object on the left or the right?", "On which side is the shape?"]), \
        "right" if right else "left"


def how_many(rng):
    """A few dots (up to three) or small shapes (up to four), counted: VQAv2's "how many" questions, held in."""
    if rng.random() < 0.5:
        n = rng.randint(1, 3)
        return dots_image(rng, n, rng.choice(list(COLORS))), ask(rng, ["How many dots are in the image?",
                                                                       "Count the dots in the picture."]), str(n)
    n = rng.randint(1, 4)
    image, draw = canvas()
    for cx, cy in spread_out(rng, n, margin=5, gap=9):
        draw_shape(draw, rng.choice(SHAPES), jitter(COLORS[rng.choice(list(COLORS))], rng), cx, cy, 4)
    return image, ask(rng, ["How many shapes are there?", "How many objects can you see?"]), str(n)


def side_color(rng):
    """Two shapes side by side, the colour of one: some of vqa's questions, as VQAv2 is in InstructBLIP's mix."""
    image, shapes, colors, horizontal = two_shapes(rng, horizontal=True)
    i = rng.randint(0, 1)
    return image, ask(rng, ["What is the color of the {w} shape?", "Tell me the color of the shape on the {w}."],
                      w=["left", "right"][i]), colors[i]


def two_colors(rng):
    image, shapes, colors, _ = two_shapes(rng)
    return image, ask(rng, ["Which two colors are in the picture?", "Name the colors of the two shapes."]), \
        f"{colors[0]} and {colors[1]}"


# ---- the language model's own instruction tuning, text only ----
# A real base's language model follows text instructions before it ever sees a picture (Vicuna, FlanT5): it reads a
# question and answers in any format. Nothing is pre-trained here, so the align stage learns that beside the captions.

def language(rng):
    """Text-only questions in the words of the tiny world: read a described scene, the alphabet, sums, options,
    yes/no, corners; every answer format, and no picture."""
    kind = rng.choice(["scene", "letter", "sum", "options", "yes_no", "corner"])
    if kind == "scene":
        shapes, colors = rng.sample(SHAPES, 2), rng.sample(list(COLORS), 2)
        sides = rng.choice([("left", "right"), ("top", "bottom")])
        scene = f"A {colors[0]} {shapes[0]} is on the {sides[0]} and a {colors[1]} {shapes[1]} is on the {sides[1]}."
        i = rng.randint(0, 1)
        if rng.random() < 0.5:
            return None, f"{scene} What color is the shape on the {sides[i]}?", colors[i]
        return None, f"{scene} What shape is on the {sides[i]}?", shapes[i]
    if kind == "letter":
        letter = rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXY")
        return None, ask(rng, ["Which letter comes after {l}?", "What letter follows {l} in the alphabet?"],
                         l=letter), chr(ord(letter) + 1)
    if kind == "sum":
        a = rng.randint(1, 4)
        b = rng.randint(1, 5 - a)
        return None, ask(rng, ["What is {a} plus {b}?", "How much is {a} and {b}?"], a=a, b=b), str(a + b)
    if kind == "options":
        color, shapes = rng.choice(list(COLORS)), rng.sample(SHAPES, 3)
        options = shapes + [color]
        rng.shuffle(options)
        return None, *choose("Which of these is a color?", options, color)
    if kind == "yes_no":
        word = rng.choice(list(COLORS) + SHAPES)
        return None, f"Is {word} a color? Answer yes or no.", "yes" if word in COLORS else "no"
    corner = rng.choice(QUADRANTS)
    opposite = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
    return None, f"Which corner is opposite the {corner}?", " ".join(opposite[w] for w in corner.split())


# the instruct mix; those with a test split are the base's held-in tasks, scored after every continual task
INSTRUCT = [exists, color, shape_options, background, size, side, how_many, side_color, two_colors]
HELD_IN = [describe, exists, color, shape_options]


def write_split(folder, name, make, n, rng):
    records = []
    for i in range(n):
        image, question, answer = make(rng)
        record = {"id": f"{folder.name}_{name}_{i:04d}"}
        if image is not None:  # a text-only record has no image and no <image> in its question
            record["image"] = f"images/{name}_{i:04d}.png"
            (folder / "images").mkdir(exist_ok=True)
            image.save(folder / record["image"])
            question = f"<image>\n{question}"
        records.append({**record, "conversations": [{"from": "human", "value": question},
                                                    {"from": "gpt", "value": answer}]})
    (folder / f"{name}.json").write_text(json.dumps(records, indent=1))


def write_task(folder, make, seed, train, test):
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(f"{seed}-{make.__name__}")
    write_split(folder, "train", make, train, rng)
    if test:
        write_split(folder, "test", make, test, rng)


def main(root=Path(__file__).parent, seed=0, train=300, test=100):
    for make in TASKS:
        write_task(root / make.__name__, make, seed, train, test)
    write_task(root / "base" / "describe", describe, seed, 2000, 50)
    write_task(root / "base" / "language", language, seed, 1200, 0)
    for make in INSTRUCT:
        write_task(root / "base" / make.__name__, make, seed, 300, 50 if make in HELD_IN else 0)


if __name__ == "__main__":
    main()
