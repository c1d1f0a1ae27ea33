"""Tests for cit.py: HF_HUB_OFFLINE=1 python -m pytest -q test_cit.py  (offline, CPU, under 3 minutes)."""
import copy
import importlib.util
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the network: the tiny model is built here

import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import cit

# A recipe of a few steps, for the tests of how bases are built and kept; every other test uses the shipped base.
TEST_BASE = dict(cit.TINY_BASE, align_steps=2, instruct_steps=1)


full_only = pytest.mark.skipif(not os.environ.get("CIT_FULL"), reason="slow: CIT_FULL=1 runs it (CI does)")


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """Where a base built from a changed recipe would go: with the shipped bases, no test run fills it."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny():
    """A random tiny LLaVA and its processor: enough for the mechanics of masking and methods."""
    torch.manual_seed(0)
    model, processor = cit.tiny_model_and_processor(cit.tiny_tokenizer(cit.tiny_corpus()))
    return model.eval(), processor


def run(tmp_path, cache, *flags):
    return cit.main(["--out", str(tmp_path / "out"), "--cache", str(cache), "--show", "0", *flags])


def write_task(folder, records):
    (folder / "images").mkdir(parents=True)
    for i, color in enumerate(["red", "blue"]):
        Image.new("RGB", (50, 20), color).save(folder / "images" / f"{i}.png")
    for split in ["train", "test"]:
        (folder / f"{split}.json").write_text(json.dumps(records))


def example(image, question, answer, history=()):
    return {"id": None, "image": image, "history": list(history), "question": question, "answer": answer,
            "references": [answer]}


def record(i, question, answer):
    return {"id": str(i), "image": f"images/{i}.png",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


# ---- data
def test_loader_reads_llava_records_with_images_relative_to_the_task(tmp_path):
    write_task(tmp_path / "colors", [record(0, "<image>\nWhat color?", "red"),
                                     record(1, "Which one?\n<image>", " blue ")])
    tasks = cit.load_tasks(tmp_path, ["colors"])
    first, second = tasks["colors"]["train"]
    assert first == {"id": "0", "image": str(tmp_path / "colors" / "images" / "0.png"), "history": [],
                     "question": "What color?", "answer": "red", "references": ["red"]}
    assert second["question"] == "Which one?" and second["answer"] == "blue"
    assert cit.default_task_names(tmp_path) == ["colors"]


def test_default_task_order_lists_the_tiny_tasks_and_skips_the_base_mixes():
    assert cit.default_task_names(cit.HERE / "tiny_tasks") == cit.TASK_ORDER


def test_labels_are_the_answer_tokens_only(tiny):
    _, processor = tiny
    examples = cit.load_split(cit.HERE / "tiny_tasks", "count", "train")[:3]
    batch = cit.training_batch(processor, examples, "cpu")
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["labels"][batch["input_ids"] == image_token] == -100).all()
    for row, example in zip(batch["labels"], examples):
        answer = processor.tokenizer.decode(row[row != -100])
        assert answer.strip() == example["answer"] + "</s>"


def test_the_head_runs_on_the_answer_positions_alone_and_gives_the_models_own_loss(tiny):
    model, processor = tiny
    batch = cit.training_batch(processor, cit.load_split(cit.HERE / "tiny_tasks", "caption", "train")[:3], "cpu")
    full = model(**batch)
    rows = []
    spy = model.lm_head.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[0]))
    logits, targets = cit.answer_logits(model, batch)
    spy.remove()
    answer = batch["labels"][:, 1:] != -100  # the logits at position t predict token t + 1
    assert rows == [answer.sum()] and logits.shape == (answer.sum(), full.logits.shape[-1])
    assert torch.allclose(logits, full.logits[:, :-1][answer], atol=1e-5)
    assert torch.equal(targets, batch["labels"][:, 1:][answer])
    assert F.cross_entropy(logits, targets).item() == pytest.approx(full.loss.item(), rel=1e-5)


def test_a_batch_of_encodings_kept_for_the_run_equals_the_processors_own_batch(tiny):
    _, processor = tiny
    examples = [e for name in ["caption", "count"] for e in cit.load_split(cit.HERE / "tiny_tasks", name, "train")[:3]]
    batch = cit.training_batch(processor, examples, "cpu")
    again = cit.training_batch(processor, examples, "cpu")  # from the encodings kept the first time
    processor.tokenizer.padding_side = "right"
    full = [processor.apply_chat_template(cit.chat(e)) for e in examples]
    expected = processor(images=cit.open_images(examples), text=full, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] > min(expected["attention_mask"].sum(1))  # lengths differ: padding is tested
    for key in ["input_ids", "attention_mask", "pixel_values"]:
        assert torch.equal(batch[key], expected[key]) and torch.equal(again[key], expected[key])
    assert (batch["labels"][expected["attention_mask"] == 0] == -100).all()


def test_tokenizer_covers_text_it_never_saw(tiny):
    tokenizer = tiny[1].tokenizer
    text = "Zürich, naïve café: ½ 🙂 qwxz"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_images_of_any_size_and_mode_reach_the_model_whole_and_model_sized(tmp_path, tiny):
    _, processor = tiny
    wide = Image.new("RGB", (300, 17), "white")
    wide.paste((255, 0, 0), (0, 0, 30, 17))  # red at the left end, blue at the right
    wide.paste((0, 0, 255), (270, 0, 300, 17))
    tall = Image.new("RGBA", (5, 90), "white")
    tall.paste((255, 0, 0, 255), (0, 0, 5, 9))  # red at the top, blue at the bottom
    tall.paste((0, 0, 255, 255), (0, 81, 5, 90))
    wide.save(tmp_path / "wide.png")
    tall.save(tmp_path / "tall.png")
    wide.convert("L").save(tmp_path / "grey.png")
    examples = [example(str(tmp_path / f"{name}.png"), "What?", "this") for name in ["wide", "tall", "grey"]]
    pixels = cit.training_batch(processor, examples, "cpu")["pixel_values"]
    size = cit.TINY_VISION["image_size"]
    assert pixels.shape == (3, 3, size, size)
    red, blue = 0, 2  # channels: a centre crop would have cut the coloured ends away, leaving white
    ends = [pixels[0, :, :, 0], pixels[0, :, :, -1], pixels[1, :, 0, :], pixels[1, :, -1, :]]
    assert all(edge[red].min() > edge[blue].max() for edge in ends[0::2])
    assert all(edge[blue].min() > edge[red].max() for edge in ends[1::2])


def test_a_conversation_trains_every_answer_and_nothing_else(tiny):
    _, processor = tiny
    chat = example(None, "And its size?", "big", history=[("What color?", "red")])
    image_less, pictured = cit.encode_example(processor, chat), cit.encode_example(processor, example(
        str(cit.HERE / "tiny_tasks" / "count" / "images" / "train_0000.png"), "How many?", "3"))
    labels = image_less["labels"][0]
    assert processor.tokenizer.decode(labels[labels != -100]).replace(" ", "") == "red</s>big</s>"
    assert "pixel_values" not in image_less
    batch = cit.collate([image_less, pictured], processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 1  # one picture, for the one <image>


def write_benchmark(root):
    """Task folders shaped as CoIN, UCIT and LLaVA release them, the images under one shared --image-root."""
    (root / "images" / "COCO2014").mkdir(parents=True)
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 30), color).save(root / "images" / "COCO2014" / f"{i}.jpg")
    image = lambda i: f"COCO2014/{i % 3}.jpg"
    conversation = lambda i, question, answer: {"id": i, "image": image(i), "conversations": [
        {"from": "human", "value": f"{question}\n<image>"}, {"from": "gpt", "value": answer}]}
    flat = lambda i, text, **answer: {"question_id": i, "image": image(i), "text": text, **answer}
    options = "Which color?\nA. red\nB. blue\nC. green\nAnswer with the option's letter from the given choices."
    tasks = {
        "scienceqa": ([conversation(i, options, "ABC"[i % 3]) for i in range(4)],
                      {"test.json": [flat(i, options, answer="ABC"[i % 3]) for i in range(3)]}),
        "textvqa": ([conversation(i, "What is written?", "stop") for i in range(4)],
                    {"test.json": [flat(i, "What is written?", answer="stop") for i in range(3)],
                     "val.json": [flat(i, "What is written?", answers=["stop"] * 7 + ["halt"] * 3) for i in range(3)]}),
        "grounding": ([conversation(i, "Where is the dog?", "[0.1, 0.2, 0.5, 0.6]") for i in range(4)],
                      {"test.json": [flat(i, "Where is the dog?", answer_bbox="[0.1, 0.2, 0.5, 0.6]", size=[40, 30])
                                     for i in range(3)]}),
        "imagenet": ([conversation(i, "What is this?", "goldfish") for i in range(4)],
                     {"test.jsonl": [flat(i, "What is this?", answer="goldfish") for i in range(3)]}),
        "flickr30k": ([conversation(i, "Describe the image briefly.", "a dog runs on the grass") for i in range(4)],
                      {"test.json": [flat(i, "Describe the image briefly.", answers=[
                          "a dog runs on the grass", "a brown dog is running"]) for i in range(3)]}),
        "chat": ([{"id": "t", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"},
                                                {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "hi"}]},
                  {"id": "long", "conversations": [{"from": "human", "value": "Repeat it."},
                                                   {"from": "gpt", "value": "Done. " * 300}]}],
                 {"test.json": [conversation(i, "What color?", "red") for i in range(3)]}),
        "caption": ([conversation(i, "Write a caption.", "a red square in the middle") for i in range(4)],
                    {"test.json": [conversation(i, "Write a caption.", "a red square in the middle")
                                   for i in range(3)]}),
    }
    for name, (train, evaluation) in tasks.items():
        (root / "tasks" / name).mkdir(parents=True)
        (root / "tasks" / name / "train.json").write_text(json.dumps(train))
        for file, records in evaluation.items():
            lines = "\n".join(map(json.dumps, records)) if file.endswith(".jsonl") else json.dumps(records)
            (root / "tasks" / name / file).write_text(lines)
    return list(tasks)


def test_the_released_benchmark_shapes_are_read_and_scored_by_their_own_metrics(tmp_path, cache):
    names = write_benchmark(tmp_path)
    results = run(tmp_path, cache, "--data", str(tmp_path / "tasks"), "--image-root", str(tmp_path / "images"),
                  "--tasks", ",".join(names), "--metrics", "imagenet=contains", "--eval-split", "val",
                  "--steps", "1", "--batch-size", "2", "--max-new-tokens", "8")
    assert results["metrics"] == {"scienceqa": "option", "textvqa": "vqa", "grounding": "iou", "imagenet": "contains",
                                  "flickr30k": "cider", "chat": "exact", "caption": "bleu4"}
    assert results["records_cut"] == 1  # the 300-sentence answer, beyond the tiny model's 256 positions
    # --eval-split val scores val.json where a task has one (textvqa) and test.json elsewhere, as CoIN does
    assert results["config"]["eval_split"] == "val"
    textvqa = cit.load_tasks(tmp_path / "tasks", ["textvqa"], image_root=tmp_path / "images")["textvqa"]
    assert textvqa["test"][0]["references"] == ["stop"] and textvqa["metric"] == "exact"  # test.json by default
    assert textvqa["test"][0]["image"] == str(tmp_path / "images" / "COCO2014" / "0.jpg")
    official = {"data": [{"question_id": i, "answers": ["halt"] * 10} for i in range(3)]}  # TextVQA's own file
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(official))
    textvqa = cit.load_tasks(tmp_path / "tasks", ["textvqa"], image_root=tmp_path / "images",
                             references={"textvqa": tmp_path / "TextVQA_0.5.1_val.json"})["textvqa"]
    assert [e["references"] for e in textvqa["test"]] == [["halt"] * 10] * 3
    coco = {"annotations": [{"image_id": i % 3 + 1, "caption": f"a dog runs, take {i}"} for i in range(6)]}  # UCIT's
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    flickr = cit.load_tasks(tmp_path / "tasks", ["flickr30k"], image_root=tmp_path / "images",
                            references={"flickr30k": tmp_path / "captions.json"})["flickr30k"]
    assert flickr["test"][1]["references"] == ["a dog runs, take 1", "a dog runs, take 4"]
    assert flickr["metric"] == "cider"


# ---- input errors: one line naming the file or flag, a non-zero exit, no traceback
def input_error(capsys, *argv):
    """Run cit.main and return its error line, checking it is one line that ends the run."""
    with pytest.raises(SystemExit) as stopped:
        cit.main(["--show", "0", *argv])
    code = stopped.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err  # argparse prints, sys.exit(str) carries
    assert code != 0 and code is not None
    lines = message.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cit.py: ")
    return lines[0]


def good_records():
    return [record(0, "<image>\nWhat color?", "red"), record(1, "<image>\nWhat color?", "blue")]


@pytest.mark.parametrize("damage, expected", [
    (lambda task: (task / "test.json").unlink(), "test.json: missing"),
    (lambda task: (task / "train.json").write_text('[\n {"id": 1,\n  oops}]'), "train.json:3:3: not valid JSON"),
    (lambda task: (task / "train.json").write_text("[]"), "train.json: expected a non-empty list"),
    (lambda task: ((task / "test.json").unlink(), (task / "test.jsonl").write_text(
        '{"question_id": 1, "text": "Q?", "answer": "red"}\n\n{oops}\n')), "test.jsonl:3:2: not valid JSON"),
    (lambda task: (task / "train.json").write_text('[{"conversations": []}]'), "record 0 has no 'conversations'"),
    (lambda task: (task / "train.json").write_text('[{"id": "a", "image": "images/0.png"}]'),
     "record 0 (id a) has neither 'conversations' nor a 'text' question"),
    (lambda task: (task / "test.json").write_text('[{"question_id": 7, "text": "Q?", "answer": " "}]'),
     "record 0 (question id 7) has an empty answer"),
    (lambda task: (task / "test.json").write_text('[{"question_id": 8, "text": "Q?", "answers": [null, "red"]}]'),
     "record 0 (question id 8) has an empty answer"),  # not the answer "None"
    (lambda task: (task / "train.json").write_text('{"id": 3}\n'), "expected a non-empty list of records"),
    (lambda task: (task / "train.json").write_text(json.dumps([dict(record(0, "Q?", "red"), image=["a", "b"])])),
     "'image' should be one path"),
    (lambda task: (task / "train.json").write_text(json.dumps([dict(record(0, "Q?", "red"), conversations=[
        {"from": "human", "value": "Q?"}])])), "needs a 'human' and a 'gpt' turn"),
    (lambda task: (task / "train.json").write_text(json.dumps([dict(record(0, "Q?", "red"), conversations=[
        {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q?"}])])), "needs a 'human' and a 'gpt' turn"),
    (lambda task: (task / "train.json").write_text(json.dumps([record(0, "Q?", "  ")])), "empty 'gpt' answer"),
    (lambda task: (task / "train.json").write_text(json.dumps([record(0, "Q?", "<image> red")])),
     "has '<image>' in a 'gpt' answer"),
    (lambda task: (task / "train.json").write_text("[" * 100000 + "]" * 100000), "nested too deeply"),
    (lambda task: (task / "images" / "1.png").unlink(), "1.png not found"),
    (lambda task: (task / "test.json").write_text(json.dumps([dict(record(0, "Q?", "red"), image="../../secret.png")])),
     "'../../secret.png' is outside"),
    (lambda task: (task / "test.json").write_text(json.dumps([dict(record(0, "Q?", "red"), image="/etc/hostname")])),
     "'/etc/hostname' is outside"),
])
def test_bad_data_ends_in_one_line_naming_the_file_and_the_problem(tmp_path, capsys, damage, expected):
    write_task(tmp_path / "data" / "colors", good_records())
    (tmp_path / "secret.png").write_bytes(b"not yours")
    damage(tmp_path / "data" / "colors")
    line = input_error(capsys, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"))
    assert expected in line and str(tmp_path / "data" / "colors") in line


@pytest.mark.parametrize("flags, expected", [
    (["--data", "no/such/folder"], "--data no/such/folder: no such folder"),
    (["--tasks", "count,nope"], "no task folder 'nope'"),
    (["--tasks", "count,ocr,count"], "--tasks: each task once"),
    (["--method", "magic"], "--method: invalid choice"),
    (["--steps", "0"], "--steps: must be above 0"),
    (["--show", "-1"], "--show: must be 0 or above"),
    (["--batch-size", "-4"], "--batch-size: must be above 0"),
    (["--lr", "0"], "--lr: must be above 0"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--method", "ewc", "--ewc-lambda", "inf"], "--ewc-lambda: must be a finite number"),
    (["--method", "replay", "--max-train", "10", "--replay-size", "11"], "--replay-size 11 is more than the 10"),
    (["--model", str(cit.HERE / "tiny_tasks")], "the folder has no config.json"),
    (["--method", "ewc", "--similarity-init"], "--similarity-init is a variant of eproj"),
    (["--method", "eproj", "--tir"], "--tir is a variant of ewc"),
    (["--seeds", "0,1,0"], "--seeds: each seed once"),
    (["--seed", str(2 ** 64)], "--seed: must be 4294967295 or below"),
    (["--device", "meta"], "--device meta: cit.py trains on cuda, mps or cpu"),
    (["--analyze", "pairs"], "--analyze pairs trains every pair of tasks: it needs two or more, got count"),
    (["--lora", "--lora-rank", "100000"], "--lora-rank 100000 is more than the 128 features of the narrowest layer"),
    (["--seed", "1", "--seeds", "0,1"], "not allowed with argument --seed"),
])
def test_bad_flags_end_in_one_line_naming_the_flag(tmp_path, capsys, flags, expected):
    assert expected in input_error(capsys, "--out", str(tmp_path), "--tasks", "count", *flags)


def test_a_model_without_image_support_is_refused_in_one_line(tmp_path, capsys, tiny):
    language_model = LlamaForCausalLM(LlamaConfig(**cit.TINY_TEXT, vocab_size=64))
    language_model.save_pretrained(tmp_path / "llama")
    tiny[1].save_pretrained(tmp_path / "llama")
    line = input_error(capsys, "--model", str(tmp_path / "llama"), "--tasks", "count", "--out", str(tmp_path / "out"))
    assert "is not an image-text-to-text model" in line


def test_unreadable_corrupt_or_huge_images_are_refused_by_name(tmp_path, monkeypatch):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(cit.InputError, match="corrupt.png: not a readable image"):
        cit.open_images([{"image": str(tmp_path / "corrupt.png")}])
    Image.new("RGB", (50, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses images over twice this many pixels
    with pytest.raises(cit.InputError, match="big.png: not a readable image.*decompression bomb"):
        cit.open_images([{"image": str(tmp_path / "big.png")}])


def test_a_broken_picture_or_a_reference_that_is_no_box_in_a_later_task_ends_before_any_training(tmp_path, capsys):
    write_task(tmp_path / "data" / "first", good_records())
    write_task(tmp_path / "data" / "second", good_records())
    (tmp_path / "data" / "second" / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    flags = ["--data", str(tmp_path / "data"), "--tasks", "first,second", "--out", str(tmp_path / "out")]
    assert "second/images/1.png: not a readable image" in input_error(capsys, *flags)
    photo = tmp_path / "photo.jpg"  # a JPEG cut short: its header is as good as a whole one's
    Image.effect_noise((64, 48), 60).convert("RGB").save(photo, quality=90)
    (tmp_path / "data" / "second" / "images" / "1.png").write_bytes(photo.read_bytes()[:-300])
    assert "second/images/1.png: not a readable image (image file is truncated" in input_error(capsys, *flags)
    Image.new("RGB", (50, 20)).save(tmp_path / "data" / "second" / "images" / "1.png")
    line = input_error(capsys, *flags, "--metrics", "second=iou")
    assert "task second is scored by iou, but its answer 'red' is not a box" in line
    assert not list((tmp_path / "out").glob("*.json")) and not list((tmp_path / "out").glob("checkpoint-*"))


def test_max_length_is_checked_on_every_training_record_before_any_training(tmp_path, capsys, cache):
    chat_only = [{"id": str(i), "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}
                 for i in range(2)]
    write_task(tmp_path / "data" / "chat", chat_only)  # no image: a short --max-length cuts nothing here
    long_answer = " ".join(["red"] * 60)
    write_task(tmp_path / "data" / "colors", good_records() * 3 + [record(0, "<image>\nWhat color?", long_answer)])
    flags = ["--data", str(tmp_path / "data"), "--tasks", "chat,colors", "--steps", "1", "--batch-size", "1"]
    line = input_error(capsys, *flags, "--max-length", "12", "--out", str(tmp_path / "out"))
    assert "--max-length 12 cuts into the image's tokens" in line  # the second task's, before the first trains
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    results = run(tmp_path, cache, *flags, "--max-length", "60", "--overwrite")
    assert results["records_cut"] == 1  # the long record, which one step of one example did not draw
    line = input_error(capsys, *flags, "--max-length", "22", "--out", str(tmp_path / "out"), "--overwrite")
    assert "--max-length 22 cuts off the whole answer of a record" in line  # else a loss over no tokens: nan


def test_a_missing_package_of_the_requirements_is_named_in_one_line():
    hidden = "import runpy, sys; sys.modules['peft'] = None; sys.argv = ['cit.py']; runpy.run_path('cit.py')"
    ran = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True, cwd=cit.HERE)
    assert ran.returncode == 1 and ran.stderr.strip() == (
        "cit.py needs peft, which is not installed here: pip install -r requirements.txt")


def test_an_earlier_run_is_not_overwritten_without_asking(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")
    assert "--overwrite" in input_error(capsys, "--out", str(tmp_path / "out"), "--tasks", "count")
    assert (tmp_path / "out" / "results.json").read_text() == "{}"


def test_flags_about_data_and_results_are_checked_against_them(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert "--out " + str(tmp_path / "file") + " is a file" in input_error(capsys, "--out", str(tmp_path / "file"))
    assert "not among the tasks" in input_error(capsys, "--tasks", "count", "--metrics", "gqa=exact")
    assert "a metric is one of exact, bleu4, vqa" in input_error(capsys, "--metrics", "count=accuracy")


# ---- metrics
def test_metrics_match_a_hand_worked_matrix():
    matrix = [[0.9, 0.1, 0.0],
              [0.5, 0.8, 0.2],
              [0.3, 0.4, 0.7]]
    metrics = cit.summarize(matrix)
    assert metrics["average"] == pytest.approx((0.3 + 0.4 + 0.7) / 3)
    assert metrics["bwt"] == pytest.approx(((0.3 - 0.9) + (0.4 - 0.8)) / 2)
    assert metrics["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.4)) / 2)
    zero_shot = [0.2, 0.3, 0.1]  # the base, untrained: task j's score just before its training, against this
    assert cit.forward_transfer(matrix, zero_shot) == pytest.approx(((0.1 - 0.3) + (0.2 - 0.1)) / 2)
    assert cit.forward_transfer(matrix[:1], zero_shot) is None  # one row (joint's): nothing came before


def test_forgetting_uses_the_best_earlier_score_not_the_first():
    metrics = cit.summarize([[0.2, 0.0, 0.0],
                             [0.6, 0.5, 0.0],
                             [0.1, 0.5, 0.9]])
    assert metrics["forgetting"] == pytest.approx(((0.6 - 0.1) + (0.5 - 0.5)) / 2)
    assert metrics["bwt"] == pytest.approx(((0.1 - 0.2) + (0.5 - 0.5)) / 2)


def hand_made(method, seed, matrix, rows=("a", "b")):
    return {"method": method, "tasks": ["a", "b"], "rows": list(rows), "matrix": matrix, **cit.summarize(matrix),
            "fwt": cit.forward_transfer(matrix, [0.1, 0.1]), "zero_shot": [0.1, 0.1], "wall_time_s": 10.0 + seed,
            "config": {"seed": seed, "model": "some/lmm"}}


def test_seeds_are_summarized_by_mean_and_sample_sd(tmp_path):
    runs = [[hand_made("finetune", 0, [[0.8, 0.0], [0.2, 0.6]]), hand_made("joint", 0, [[0.7, 0.5]], ["joint"])],
            [hand_made("finetune", 1, [[1.0, 0.0], [0.4, 0.8]]), hand_made("joint", 1, [[0.9, 0.7]], ["joint"])]]
    for results, (base, last) in zip([runs[0][0], runs[1][0]], [(0.9, 0.3), (0.9, 0.5)]):
        results["held_in"] = {"tasks": ["h"], "matrix": [[base], [0.6], [last]], "forgetting": base - last}
    summary = cit.compare(runs, tmp_path)
    finetune, joint = summary["methods"]["finetune"], summary["methods"]["joint"]
    assert summary["seeds"] == [0, 1]
    # averages 0.4 and 0.6: mean 0.5, sample sd sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414
    assert finetune["average"]["mean"] == pytest.approx(0.5) and finetune["average"]["sd"] == pytest.approx(0.02 ** 0.5)
    assert finetune["forgetting"]["values"] == pytest.approx([0.6, 0.6])
    assert finetune["forgetting"]["sd"] == pytest.approx(0)
    assert finetune["diagonal"]["values"] == pytest.approx([0.7, 0.9])  # mean of R[0][0] and R[1][1]
    assert torch.allclose(torch.tensor(finetune["matrix"]), torch.tensor([[0.9, 0.0], [0.3, 0.7]]))
    assert joint["diagonal"] == {"mean": None, "sd": None, "values": []}  # joint trains no task on its own
    assert json.loads((tmp_path / "summary.json").read_text())["methods"]["joint"]["average"]["mean"] == pytest.approx(0.7)
    table = (tmp_path / "summary.md").read_text()  # fwt: R[0][1] = 0 against the base's 0.1 on both seeds
    assert ("| finetune | 0.500 ± 0.141 | 0.600 ± 0.000 | -0.600 ± 0.000 | -0.100 ± 0.000 | 0.800 ± 0.141 "
            "| 0.500 ± 0.141 | 10 ± 1 |") in table  # held-in forgetting: 0.6 and 0.4
    assert "| joint | 0.700 ± 0.141 | - | - | - | - | - | 10 ± 1 |" in table
    assert torch.allclose(torch.tensor(finetune["held_in"]["matrix"]), torch.tensor([[0.6], [0.4]]))  # as R's rows
    assert Image.open(tmp_path / "summary.png").size[0] > 2 * 100


def test_exact_match_normalizes_case_and_punctuation():
    assert cit.exact_match(["Red.", " top  LEFT", "B"], [["red"], ["top left"], ["A"]]) == pytest.approx(2 / 3)
    assert cit.exact_match(["blue"], [["red", "Blue!"]]) == 1.0  # any of several references


def test_bleu4_is_one_for_identical_zero_without_shared_4grams_and_penalizes_short():
    reference = [["a red circle left of a blue square"]]
    assert cit.bleu4(reference[0], reference) == pytest.approx(1.0)
    assert cit.bleu4(["square blue a of left"], reference) == 0.0
    # every n-gram of the six words matches: BLEU-4 is the brevity penalty alone, exp(1 - 8/6)
    assert cit.bleu4(["a red circle left of a"], reference) == pytest.approx(math.exp(1 - 8 / 6))
    # clipped by the reference that has the most of an n-gram; brevity against the closest reference length
    two = [["a red circle left of a blue square", "a red circle left of a"]]
    assert cit.bleu4(["a red circle left of a"], two) == 1


def test_vqa_accuracy_averages_min_1_matches_over_3_over_leave_one_out_subsets():
    answers = ["red"] * 2 + ["blue"] * 8
    assert cit.vqa_accuracy(["red"], [answers]) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert cit.vqa_accuracy(["Blue."], [answers]) == 1.0
    assert cit.vqa_accuracy(["two"], [["2"] * 3 + ["3"] * 7]) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)


def test_evalai_normalization_of_vqa_answers():
    assert cit.evalai_normalize("The Dog's bowl!") == "dog 's bowl"
    assert cit.evalai_normalize("Don't") == cit.evalai_normalize("dont")
    assert cit.evalai_normalize("3.5 m.") == "3.5 m" and cit.evalai_normalize("one, two") == "1 2"
    assert cit.evalai_normalize("black-and-white") == "black and white"


def test_option_letter_follows_coins_three_rules():
    assert [cit.option_letter(p) for p in ["C", "B. because", "The answer is A", "a cat", "no"]] == [
        "C", "B", "A", "A", None]
    assert cit.option_accuracy(["B. blue", "C"], [["B"], ["A"]]) == 0.5


def test_contains_iou_and_their_edge_cases():
    assert cit.contains(["a goldfish", "fish", ""], [["goldfish"], ["goldfish"], ["goldfish"]]) == pytest.approx(2 / 3)
    whole = [["[0, 0, 1, 1]"]] * 3
    assert cit.iou_accuracy(["[0, 0, 0.8, 1]", "[0, 0, 0.5, 1]", "[0.1, 0.2]"], whole) == pytest.approx(1 / 3)


def test_cider_matches_a_hand_worked_value():
    # Two images, "a b" and "c d": every n-gram in one image's references only, so each weighs log 2.
    # "a b" against "a b": cosine 1 for n = 1, 2 and nothing for 3, 4: 10 * (1 + 1) / 4 = 5.
    # "c" against "c d": unigram cosine 1/sqrt(2), length 0 against 1 bigram: 10 * exp(-1/72) / sqrt(2) / 4.
    expected = (5 + 10 * math.exp(-1 / 72) / math.sqrt(2) / 4) / 2
    assert cit.cider(["a b", "c"], [["a b"], ["c d"]]) == pytest.approx(expected)
    assert cit.cider(["c d"], [["c d", "x y"]]) == 0.0  # one image: every n-gram is in every "document"


def test_cider_and_bleu4_equal_the_official_coco_caption_code_on_random_corpora():
    """pycocoevalcap (the COCO caption evaluation's own code, pure Python) is installed in CI's second venv."""
    bleu = pytest.importorskip("pycocoevalcap.bleu.bleu", reason="pycocoevalcap: CI's second venv has it").Bleu
    official_cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    rng = random.Random(0)
    words = "a the red blue green big small ring square circle left right of top bottom dots".split()
    for _ in range(5):
        captions = [[" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(rng.randint(1, 5))]
                    for _ in range(rng.randint(10, 40))]
        # a reference with some words changed and its end cut at random: n-grams shared, lengths different
        predictions = [" ".join(w if rng.random() < 0.7 else rng.choice(words) for w in rng.choice(refs).split()
                                [:rng.randint(1, 12)]) for refs in captions]
        truth, guess = dict(enumerate(captions)), {i: [p] for i, p in enumerate(predictions)}
        assert cit.cider(predictions, captions) == pytest.approx(official_cider().compute_score(truth, guess)[0],
                                                                 rel=1e-12)
        assert cit.bleu4(predictions, captions) == pytest.approx(
            bleu(4).compute_score(truth, guess, verbose=0)[0][3], rel=1e-6)  # it adds 1e-9 to each count
        assert cit.bleu4(predictions, captions) > 0.05


def test_metric_is_inferred_from_the_shape_of_the_answers():
    def task(question, *references):
        return [dict(example(None, question, references[0]), references=list(references))]
    assert cit.metric_for(task("Where?", "[0.1, 0.2, 0.5, 0.6]")) == "iou"
    assert cit.metric_for(task("Which?\nA. red\nB. blue", "B")) == "option"
    assert cit.metric_for(task("Which letter?", "B")) == "exact"  # a letter, but no options listed
    assert cit.metric_for(task("What?", "stop", "halt")) == "vqa"
    assert cit.metric_for(task("Describe.", "a dog runs on the grass", "a brown dog")) == "cider"
    assert cit.metric_for(task("Describe.", "a dog runs on the grass")) == "bleu4"
    assert {task["metric"] for task in cit.load_tasks(cit.HERE / "tiny_tasks", cit.TASK_ORDER, max_test=5).values()} \
        == {"bleu4", "exact", "option"}


# ---- methods' mechanics
def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it(tiny):
    model, processor = copy.deepcopy(tiny[0]), tiny[1]  # its weights are moved below
    args = cit.parse_args(["--batch-size", "4", "--ewc-samples", "8"])
    run = cit.Run(args, "cpu", processor)
    cit.ewc_after_task(run, model, cit.load_split(cit.HERE / "tiny_tasks", "count", "train"))
    assert cit.ewc_penalty(run, model) == 0
    importance = run.memory["importance"].values()
    assert all((i >= 0).all() for i in importance) and sum(i.sum() for i in importance).item() == pytest.approx(1)
    with torch.no_grad():
        model.lm_head.weight += 0.01
        small = cit.ewc_penalty(run, model).item()
        model.lm_head.weight += 0.01
        large = cit.ewc_penalty(run, model).item()
    assert 0 < small < large


def per_example_gradients(model, processor, examples, objective):
    """Each example's gradients of objective(batch, outputs), by itself: what the importances must average."""
    params = cit.trainable(model)
    for e in examples:
        batch = cit.training_batch(processor, [e], "cpu")
        yield dict(zip(params, torch.autograd.grad(objective(batch, model(**batch)), list(params.values()),
                                                   allow_unused=True)))


def normalized_mean(gradients, measure, params):
    total = {n: sum(measure(g[n]) for g in gradients if g[n] is not None) for n in params}
    total = {n: t if torch.is_tensor(t) else torch.zeros_like(params[n]) for n, t in total.items()}
    scale = sum(t.sum() for t in total.values())
    return {n: t / scale for n, t in total.items()}


def test_the_fisher_is_the_mean_of_each_examples_squared_gradient_not_of_the_batchs(tiny):
    model, processor = tiny
    examples = cit.load_split(cit.HERE / "tiny_tasks", "ocr", "train")[:6]
    run = cit.Run(cit.parse_args(["--ewc-samples", "6"]), "cpu", processor)
    fisher = cit.fisher_importance(run, model, examples)
    params = cit.trainable(model)
    expected = normalized_mean(list(per_example_gradients(model, processor, examples, lambda b, o: o.loss)),
                               torch.square, params)
    assert all(torch.allclose(fisher[n], expected[n], rtol=1e-4, atol=1e-12) for n in params)
    batch = cit.training_batch(processor, examples, "cpu")
    whole = dict(zip(params, torch.autograd.grad(model(**batch).loss, list(params.values()), allow_unused=True)))
    batch_form = normalized_mean([whole], torch.square, params)
    assert not all(torch.allclose(fisher[n], batch_form[n], rtol=0.1, atol=1e-9) for n in params)
    assert sum(f.sum() for f in fisher.values()).item() == pytest.approx(1)


def test_mas_measures_how_the_answer_logits_move_and_ignores_unused_embeddings(tiny):
    model, processor = tiny
    examples = cit.load_split(cit.HERE / "tiny_tasks", "count", "train")[:4]
    run = cit.Run(cit.parse_args(["--ewc-samples", "4"]), "cpu", processor)
    mas = cit.mas_importance(run, model, examples)

    def squared_logits(batch, outputs):  # the squared norm of the logits that predict the answer, per position
        answer = batch["labels"][:, 1:] != -100
        return outputs.logits[:, :-1][answer].square().sum(-1).mean()
    params = cit.trainable(model)
    expected = normalized_mean(list(per_example_gradients(model, processor, examples, squared_logits)), torch.abs,
                               params)
    # atol: a millionth of the largest importance (~1e-4); the head on answer positions alone rounds differently
    assert all(torch.allclose(mas[n], expected[n], rtol=1e-4, atol=1e-10) for n in params)
    embeddings = mas["model.language_model.embed_tokens.weight"]
    used = torch.unique(torch.cat([cit.training_batch(processor, [e], "cpu")["input_ids"][0] for e in examples]))
    unused = torch.ones(len(embeddings), dtype=torch.bool)
    unused[used] = False
    assert embeddings[unused].abs().sum() == 0 and embeddings[used].abs().sum() > 0
    assert not torch.allclose(mas["lm_head.weight"], cit.fisher_importance(run, model, examples)["lm_head.weight"])


def test_tir_similarity_is_the_product_of_sigmoids_of_z_scored_cosines():
    cosines = {"image": torch.tensor([0.2, 0.6]), "instruction": torch.tensor([0.5, 0.5]),
               "answer": torch.tensor([0.1, 0.3])}
    seen = {"image": torch.tensor([0.4, 0.2, 0.6]), "instruction": torch.tensor([0.5, 0.5, 0.5]),
            "answer": torch.tensor([0.2, 0.1, 0.3])}
    z = 0.2 / (0.08 / 3) ** 0.5  # image: mean 0.4, population sd sqrt(0.08 / 3); answer: 0.1 / sqrt(0.02 / 3), alike

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))
    expected = [sigmoid(-z) * 0.5 * sigmoid(-z), sigmoid(z) * 0.5 * sigmoid(z)]  # instruction: no spread, z = 0
    assert cit.informed_similarity(cosines, seen).tolist() == pytest.approx(expected)


def test_tir_merges_importance_by_maximum_and_relaxes_it_by_the_owners_similarity():
    merged, owner = cit.max_merge(None, None, {"w": torch.tensor([0.5, 0.1, 0.4])}, 0)
    assert owner["w"].tolist() == [0, 0, 0]
    merged, owner = cit.max_merge(merged, owner, {"w": torch.tensor([0.2, 0.6, 0.4])}, 1)
    assert merged["w"].tolist() == pytest.approx([0.5, 0.6, 0.4]) and owner["w"].tolist() == [0, 1, 0]
    relaxed = cit.relax(merged, owner, torch.tensor([0.8, 0.3]))  # the new task is like task 0, unlike task 1
    assert relaxed["w"].tolist() == pytest.approx([0.5 * 0.2, 0.6 * 0.7, 0.4 * 0.2])


def test_tir_is_wired_in_by_its_flag_and_reports_each_new_tasks_similarities(tmp_path, cache):
    assert cit.method_hooks(cit.parse_args(["--method", "ewc"]))["before_task"] is cit.NO_HOOKS["before_task"]
    results = run(tmp_path, cache, "--method", "ewc", "--tir", "--importance", "mas", "--tasks", "count,ocr,mcq",
                  "--steps", "2", "--max-test", "4", "--ewc-samples", "8")
    similarity = results["tir_similarity"]
    assert sorted(similarity) == [1, 2] and len(similarity[1]) == 1 and len(similarity[2]) == 2
    assert similarity[1] == pytest.approx([0.5 ** 3])  # one pair seen: no spread to z-score by
    assert all(0 < s < 1 for s in similarity[2]) and results["config"]["importance"] == "mas"


def test_lwf_term_is_zero_while_the_model_equals_its_frozen_copy(tiny):
    model, processor = copy.deepcopy(tiny[0]), tiny[1]  # its weights are moved below
    run = cit.Run(cit.parse_args([]), stage=1)
    cit.lwf_before_task(run, model, [])
    batch = cit.training_batch(processor, cit.load_split(cit.HERE / "tiny_tasks", "ocr", "train")[:4], "cpu")
    assert cit.lwf_distillation(run, model, batch, cit.answer_logits(model, batch)[0]).item() == pytest.approx(
        0, abs=1e-6)
    with torch.no_grad():
        model.lm_head.weight += 0.1 * torch.randn_like(model.lm_head.weight)
        assert cit.lwf_distillation(run, model, batch, cit.answer_logits(model, batch)[0]).item() > 1e-4


def test_replay_keeps_the_set_number_per_task_and_mixes_them_into_batches():
    args = cit.parse_args(["--replay-size", "5", "--replay-ratio", "0.25"])
    run = cit.Run(args)
    for task in range(2):
        run.stage = task
        cit.replay_after_task(run, None, [{"task": task, "i": i} for i in range(50)])
    assert [e["task"] for e in run.memory["buffer"]] == [0] * 5 + [1] * 5
    batch = cit.replay_mix(run, [{"task": 2, "i": i} for i in range(16)], random.Random(0))
    assert len(batch) == 16 and sum(e["task"] < 2 for e in batch) == 4
    run = cit.Run(cit.parse_args(["--replay-fraction", "0.01"]))  # the paper's 1%, at least one
    for size in [300, 50]:
        cit.replay_after_task(run, None, [{"i": i} for i in range(size)])
    assert len(run.memory["buffer"]) == 3 + 1


def test_eproj_leaves_the_shared_weights_and_earlier_experts_untouched_and_routes_right(tmp_path, cache):
    args = cit.parse_args(["--method", "eproj", "--tasks", "count,mcq", "--steps", "20", "--max-test", "20",
                           "--cache", str(cache), "--out", str(tmp_path), "--show", "0"])
    tasks = cit.load_tasks(cit.HERE / "tiny_tasks", ["count", "mcq"], None, 20)
    hooks = cit.method_hooks(args)
    model, run = cit.start_run(args, "cpu", hooks)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    first_expert = []
    hooks["after_task"] = lambda run, model, examples: (cit.eproj_after_task(run, model, examples),
                                                        first_expert.append(cit.snapshot(model)))
    cit.run_sequence(model, tasks, hooks, run)
    expert = run.memory["experts"][0]
    assert all(torch.equal(expert[n], first_expert[0][n]) for n in expert)  # task 0's expert, as it finished
    assert any(not torch.equal(expert[n], run.memory["experts"][1][n]) for n in expert)  # task 1 trained its own
    parts = cit.model_parts(model)
    assert set(expert) == set(parts["connector"])  # the paper's experts: projector copies, the rest frozen
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    language = [n for n, _ in model.named_parameters() if cit.in_module(n, parts["language"])]
    assert language and all(n in frozen for n in language)  # every weight of the language model stayed frozen
    assert run.memory["routing"] == {0: 1.0, 1: 1.0}
    assert run.report["trainable_per_task"] == sum(p.numel() for p in expert.values())


def test_eproj_keys_are_pulled_to_the_direction_of_their_tasks_features(tiny):
    model, processor = tiny
    run = cit.Run(cit.parse_args(["--method", "eproj"]), "cpu", processor)
    model = cit.eproj_prepare(run, copy.deepcopy(model))
    examples = cit.load_split(cit.HERE / "tiny_tasks", "ocr", "train")
    keys = cit.eproj_keys(run, model, examples)
    features = cit.routing_features(run, model, cit.prototype_sample(examples, 0))
    for key, feature in zip(keys, features):
        assert F.cosine_similarity(key, feature.mean(0), dim=0) > 0.999 and key.norm() == pytest.approx(1)


def test_eproj_copies_what_train_says_the_connector_by_default_and_lora_with_the_connector_on_request(tiny):
    model, _ = tiny
    assert cit.parse_args(["--method", "eproj"]).train == "connector" and cit.parse_args([]).train == "all"
    args = cit.parse_args(["--method", "eproj", "--train", "lora"])
    run = cit.Run(args)
    adapted = cit.method_hooks(args)["prepare"](run, copy.deepcopy(model))
    initial = run.memory["initial"]
    assert any(".lora_A." in n for n in initial) and any(".modules_to_save." in n for n in initial)
    assert set(initial) == set(cit.trainable(adapted))


# ---- the loop
def test_a_method_is_added_by_a_few_lines_and_one_entry_in_methods(tmp_path, cache, monkeypatch):
    """As the README shows: an L2 penalty towards the weights after the last task, in 7 lines."""
    def l2_after_task(run, model, examples):
        run.memory["anchor"] = cit.snapshot(model)

    def l2_penalty(run, model):
        if "anchor" not in run.memory:
            return 0.0
        return 1e3 * sum(((p - run.memory["anchor"][name]) ** 2).sum() for name, p in cit.trainable(model).items())
    monkeypatch.setitem(cit.METHODS, "l2", {"after_task": l2_after_task, "penalty": l2_penalty})
    results = run(tmp_path, cache, "--method", "l2", "--tasks", "count,ocr", "--steps", "3", "--max-test", "4")
    assert results["method"] == "l2" and len(results["matrix"]) == 2
    assert "l2" in {r["method"] for r in run(tmp_path / "all", cache, "--method", "all", "--tasks", "count",
                                                 "--steps", "1", "--max-test", "2")}


def test_the_loop_calls_a_methods_hooks_in_order(tmp_path, cache, monkeypatch):
    calls = []

    def recorder(event, returns):
        def hook(run, *args):
            calls.append((event, run.stage))
            return returns(*args)
        return hook
    monkeypatch.setitem(cit.METHODS, "finetune", {
        "prepare": recorder("prepare", lambda model: model),
        "before_task": recorder("before_task", lambda model, examples: None),
        "mix_batch": recorder("mix_batch", lambda examples, rng: examples),
        "extra_loss": recorder("extra_loss", lambda model, batch, outputs: 0.0),
        "penalty": recorder("penalty", lambda model: 0.0),
        "after_step": recorder("after_step", lambda model, step: None),
        "after_task": recorder("after_task", lambda model, examples: None),
        "answer": recorder("answer", lambda model, examples, task: [""] * len(examples))})
    results = run(tmp_path, cache, "--tasks", "count,ocr", "--steps", "2", "--max-test", "4")

    def task(i):
        step = [("mix_batch", i), ("extra_loss", i), ("penalty", i), ("after_step", i)]
        return [("before_task", i), *step * 2, ("after_task", i),
                *[("answer", i)] * 3]  # both tasks, then the align base's held-in captions
    assert calls == [("prepare", 0), *task(0), *task(1)]
    assert results["rows"] == ["count", "ocr"] and results["matrix"] == [[0.0, 0.0], [0.0, 0.0]]


# ---- whole runs
def test_a_short_run_writes_results_whose_metrics_follow_from_its_matrix(tmp_path, cache):
    results = run(tmp_path, cache, "--tasks", "count,grounding,ocr", "--steps", "3", "--max-test", "8")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["tasks"] == ["count", "grounding", "ocr"] and len(saved["matrix"]) == 3
    assert all(len(row) == 3 for row in saved["matrix"])
    for key, value in cit.summarize(saved["matrix"]).items():
        assert saved[key] == pytest.approx(value)
    assert len(saved["zero_shot"]) == 3 and saved["fwt"] == pytest.approx(
        cit.forward_transfer(saved["matrix"], saved["zero_shot"]))
    assert json.loads((tmp_path / "out" / "progress.json").read_text())["matrix"] == saved["matrix"]
    assert results["method"] == "finetune" and saved["config"]["steps"] == 3


def test_the_bases_held_in_tasks_are_scored_in_every_row_and_never_trained(tmp_path, cache, capsys):
    results = run(tmp_path, cache, "--base", "instruct", "--tasks", "count,ocr", "--steps", "2", "--max-test", "6")
    held_in = results["held_in"]
    assert held_in["tasks"] == ["describe", "exists", "color", "shape_options"]  # the instruct mix's scored tasks
    assert results["tasks"] == ["count", "ocr"] and len(held_in["matrix"]) == 3  # the base's row, then one per task
    columns = list(zip(*held_in["matrix"]))
    assert held_in["forgetting"] == pytest.approx(sum(max(c) - c[-1] for c in columns) / len(columns))
    assert held_in["matrix"][0][held_in["tasks"].index("color")] >= 0.9  # the base does its own task untuned
    assert "the base's held-in tasks, never trained" in capsys.readouterr().out
    assert run(tmp_path / "align", cache, "--tasks", "count", "--steps", "1", "--max-test", "4")["held_in"][
        "tasks"] == ["describe"]  # the align base's own: its captions
    assert "held_in" not in run(tmp_path / "none", cache, "--held-in", "none", "--tasks", "count", "--steps", "1",
                                "--max-test", "4")


def test_held_in_tasks_of_ones_own_need_only_a_test_split(tmp_path, cache, capsys):
    write_task(tmp_path / "mine" / "colours", [record(0, "<image>\nWhat colour?", "red"),
                                               record(1, "<image>\nWhat colour?", "blue")])
    (tmp_path / "mine" / "colours" / "train.json").unlink()
    results = run(tmp_path, cache, "--held-in", str(tmp_path / "mine" / "colours"), "--tasks", "count",
                  "--steps", "1", "--max-test", "4")
    assert results["held_in"]["tasks"] == ["colours"] and len(results["held_in"]["matrix"][0]) == 1
    message = input_error(capsys, "--held-in", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out2"))
    assert message == f"cit.py: --held-in: no task folder {tmp_path / 'nowhere'}"


@full_only
def test_the_tiny_world_is_regenerated_bit_for_bit(tmp_path):
    sys.path.insert(0, str(cit.HERE / "tiny_tasks"))
    import make_tiny_tasks
    make_tiny_tasks.main(root=tmp_path)
    data = lambda root: {p.relative_to(root): p for p in root.rglob("*") if p.is_file() and p.suffix in [".json", ".png"]
                         and not {"models", "pictures"} & set(p.parts)}  # the bases, and the README's pictures
    made, shipped = data(tmp_path), data(cit.HERE / "tiny_tasks")
    assert sorted(made) == sorted(shipped) and len(made) > 7000  # every image and record file, none left out
    assert all(made[p].read_bytes() == shipped[p].read_bytes() for p in made)


def test_a_single_step_changes_the_weights(tmp_path, cache):  # no warm-up that leaves it at learning rate 0
    results = run(tmp_path, cache, "--tasks", "count", "--steps", "1", "--max-test", "2")
    base = load_file(cit.SHIPPED_BASES / results["config"]["base"] / "model.safetensors")
    trained = weights(tmp_path / "out")
    assert any(not torch.equal(trained[name], base[name]) for name in trained)


def test_the_first_step_of_every_task_trains(tmp_path, cache, monkeypatch):  # a warm-up from 0 would waste it
    moved = []

    def keep_the_weights(run, model, examples):
        run.memory["before"] = cit.snapshot(model)

    def first_step_moved_them(run, model, step):
        if step == 1:
            moved.append(any(not torch.equal(p, run.memory["before"][name]) for name, p in cit.trainable(model).items()))
    monkeypatch.setitem(cit.METHODS, "finetune", {"before_task": keep_the_weights, "after_step": first_step_moved_them})
    run(tmp_path, cache, "--tasks", "count,ocr", "--steps", "40", "--max-test", "2")
    assert moved == [True, True]


def test_sequential_finetuning_forgets_and_joint_training_does_not(tmp_path, cache):
    flags = ["--tasks", "count,mcq", "--steps", "60", "--max-test", "40"]
    finetune = run(tmp_path / "ft", cache, *flags)
    joint = run(tmp_path / "joint", cache, "--method", "joint", *flags)
    assert finetune["matrix"][0][0] >= 0.5  # the first task was learned...
    assert finetune["forgetting"] >= 0.3  # ...and then forgotten
    assert joint["rows"] == ["joint"] and len(joint["matrix"]) == 1  # one model trained on both at once...
    assert joint["matrix"][0][0] >= 0.5 and joint["average"] >= finetune["average"] + 0.2  # ...keeps the first


def test_every_method_runs_and_all_draws_the_comparison(tmp_path, cache):
    results = run(tmp_path, cache, "--method", "all", "--tasks", "count,ocr", "--steps", "2", "--max-test", "4",
                  "--ewc-samples", "8")
    assert [r["method"] for r in results] == list(cit.METHODS)
    assert "| eproj |" in (tmp_path / "out" / "summary.md").read_text()
    assert Image.open(tmp_path / "out" / "summary.png").size[0] > 6 * 100
    assert results[list(cit.METHODS).index("eproj")]["routing_accuracy"] == 1.0  # counting and reading look apart
    trained = {r["method"]: r["config"]["train"] for r in results}  # each method's own default, as it trained
    assert trained == {"finetune": "all", "ewc": "all", "lwf": "all", "replay": "all", "eproj": "connector",
                       "joint": "all"}


def test_profile_says_where_the_time_went_and_leaves_the_functions_as_they_were(tmp_path, cache, capsys):
    train = cit.train
    run(tmp_path, cache, "--profile", "--tasks", "count", "--steps", "3", "--max-test", "4")
    report = capsys.readouterr().out.split("--profile:")[1]
    assert "training steps (forward, backward, optimizer)" in report and "evaluation" in report
    assert "training: 3 steps" in report and "GFLOP each" in report and "matmul rate" in report
    assert cit.train is train


def test_seeds_run_each_seed_in_its_own_folder_and_summarize(tmp_path, cache):
    summary = run(tmp_path, cache, "--seeds", "0,1", "--tasks", "count,ocr", "--steps", "2", "--max-test", "4")
    out = tmp_path / "out"
    saved = [json.loads((out / f"seed{seed}" / "results.json").read_text()) for seed in [0, 1]]
    assert [r["config"]["seed"] for r in saved] == [0, 1] and saved[0]["config"]["out"] == str(out / "seed0")
    assert summary["methods"]["finetune"]["average"]["values"] == [r["average"] for r in saved]
    assert (out / "summary.md").is_file() and (out / "summary.png").is_file()


@full_only
def test_jobs_run_side_by_side_to_the_results_of_one_at_a_time(tmp_path, cache):
    flags = ["--method", "all", "--seeds", "0,1", "--base", "instruct", "--tasks", "count", "--steps", "3",
             "--max-test", "10"]  # the instruct base already counts: the matrices to compare are not all zeros
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of two jobs gets on two cores, so that the sums run in the same order
    try:
        alone = run(tmp_path / "alone", cache, *flags)
        together = run(tmp_path / "together", cache, *flags, "--jobs", "2")
    finally:
        torch.set_num_threads(threads)
    for method in list(cit.METHODS):
        assert together["methods"][method]["matrix"] == alone["methods"][method]["matrix"]
        assert any((v or 0) > 0 for row in alone["methods"][method]["matrix"] for v in row)
        assert together["methods"][method]["average"]["values"] == alone["methods"][method]["average"]["values"]
    expected, got = [saved_weights(tmp_path / name / "out" / "seed1" / "ewc" / "model")
                     for name in ["alone", "together"]]
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert "after count" in (tmp_path / "together" / "out" / "seed1" / "ewc" / "log.txt").read_text()


def test_a_base_is_built_once_per_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(cit, "TINY_BASE", TEST_BASE)
    train, builds = cit.train, []
    monkeypatch.setattr(cit, "train", lambda *args, **kwargs: (builds.append(kwargs["desc"]), train(*args, **kwargs)))
    args = cit.parse_args(["--cache", str(tmp_path)])
    first, _ = cit.tiny_base("align", args, "cpu")
    again, _ = cit.tiny_base("align", args, "cpu")
    assert builds == ["base: align"] and len(list(tmp_path.iterdir())) == 1
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    args.seed = 1  # another run seed starts from the same base...
    cit.tiny_base("align", args, "cpu")
    assert builds == ["base: align"]
    monkeypatch.setattr(cit, "TINY_BASE", dict(TEST_BASE, align_steps=3))  # ...another recipe does not
    cit.tiny_base("align", args, "cpu")
    assert builds == ["base: align"] * 2 and len(list(tmp_path.iterdir())) == 2


def test_the_shipped_bases_are_the_ones_the_recipe_in_cit_py_makes():
    """Fails when the recipe (model shape, stages, their data) changes and `python cit.py --rebuild-base` was not run."""
    for flavour in ["align", "instruct"]:
        shipped = json.loads((cit.SHIPPED_BASES / flavour / "recipe.json").read_text())
        assert shipped == cit.base_recipe(flavour)
        assert cit.base_folder(flavour, cit.parse_args([])) == cit.SHIPPED_BASES / flavour


# ---- nothing lost: checkpoints after each task, --resume
def interrupt_the_second_task(monkeypatch):
    """cit.train stops as Ctrl-C would stop it when the second task starts; returns the real one."""
    train, calls = cit.train, []

    def interrupted_on_the_second_task(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train(*args, **kwargs)
    monkeypatch.setattr(cit, "train", interrupted_on_the_second_task)
    return train


def saved_weights(folder):
    """Every tensor a run saved in <out>/model, by file and name."""
    from peft.utils import load_peft_weights
    if (folder / "config.json").is_file():
        return cit.LlavaForConditionalGeneration.from_pretrained(folder).state_dict()
    return {f"{a.parent.name}/{name}": tensor for a in folder.glob("**/adapter_config.json")
            for name, tensor in load_peft_weights(str(a.parent)).items()}


@pytest.mark.parametrize("flags", [["--method", "ewc"], ["--method", "replay", "--lora"], ["--method", "eproj"],
                                   ["--method", "eproj", "--train", "lora"]])
def test_a_run_interrupted_after_its_first_task_resumes_to_the_same_end(tmp_path, cache, monkeypatch, flags):
    flags += ["--base", "instruct", "--tasks", "count,ocr", "--steps", "4", "--max-test", "6", "--max-train", "30",
              "--replay-size", "8"]  # the instruct base already counts: the matrices to compare are not all zeros
    whole = run(tmp_path / "whole", cache, *flags)
    assert any(v > 0 for row in whole["matrix"] for v in row)
    train = interrupt_the_second_task(monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path / "cut", cache, *flags)
    assert stopped.value.code == 130
    out = tmp_path / "cut" / "out"
    progress = json.loads((out / "progress.json").read_text())
    assert len(progress["matrix"]) == 1
    assert (out / "checkpoint-1" / "state.pt").is_file() and not (out / "results.json").exists()
    (out / "progress.json").write_text(json.dumps(progress | {"wall_time_s": 1000.0}))  # as if it had taken long
    monkeypatch.setattr(cit, "train", train)
    resumed = run(tmp_path / "cut", cache, *flags, "--resume")
    assert resumed["matrix"] == whole["matrix"] and resumed.get("routing_accuracy") == whole.get("routing_accuracy")
    assert resumed["wall_time_s"] >= 1000  # the time before the interruption counts
    expected, got = saved_weights(tmp_path / "whole" / "out" / "model"), saved_weights(out / "model")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert not list(out.glob("checkpoint-*"))  # the final model replaces the last checkpoint


def test_a_second_run_into_the_same_out_and_an_out_that_cannot_be_written_end_before_training(tmp_path, capsys):
    with cit.out_held(tmp_path / "busy"):  # as a run in another process holds it
        line = input_error(capsys, "--out", str(tmp_path / "busy"), "--tasks", "count")
    assert "is in use by another run (pid" in line
    (tmp_path / "file").write_text("")
    assert "cannot be written" in input_error(capsys, "--out", str(tmp_path / "file" / "out"), "--tasks", "count")


def test_text_only_examples_are_refused_where_only_the_connector_trains(tmp_path, capsys):
    write_task(tmp_path / "data" / "chat", [dict(record(0, "Say hi.", "hi"), image=None), record(1, "Color?", "red")])
    flags = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    line = input_error(capsys, *flags, "--method", "eproj")
    assert "--train connector (eproj's default) needs a picture in every example; task chat has 1 without" in line
    assert "needs a picture" in input_error(capsys, *flags, "--train", "connector")


def test_a_file_where_a_methods_out_would_go_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "ewc").write_text("")
    line = input_error(capsys, "--out", str(tmp_path), "--method", "all", "--tasks", "count")
    assert f"--out {tmp_path / 'ewc'} is a file" in line


def test_a_checkpoint_that_does_not_read_back_ends_resume_in_one_line(tmp_path, cache, capsys, monkeypatch):
    flags = ["--out", str(tmp_path / "out"), "--cache", str(cache), "--tasks", "count,ocr", "--steps", "2",
             "--max-test", "4"]
    train = interrupt_the_second_task(monkeypatch)
    with pytest.raises(SystemExit):
        cit.main(["--show", "0", *flags])
    monkeypatch.setattr(cit, "train", train)
    state = tmp_path / "out" / "checkpoint-1" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # cut short, as by a full disk
    assert "checkpoint-1 does not read back" in input_error(capsys, *flags, "--resume")
    progress = tmp_path / "out" / "progress.json"
    progress.write_text(progress.read_text()[:50])
    assert "progress.json:" in input_error(capsys, *flags, "--resume")


def test_a_diverging_run_stops_in_one_line_at_its_first_non_finite_loss(tmp_path, capsys):
    line = input_error(capsys, "--out", str(tmp_path), "--tasks", "count,ocr", "--steps", "4", "--max-test", "4",
                       "--lr", "1e12")
    assert "task 1/2: count: the loss is" in line and "training diverged" in line
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "model").exists()


def test_resume_goes_on_only_with_the_flags_the_run_was_started_with(tmp_path, cache, capsys):
    flags = ["--out", str(tmp_path / "out"), "--cache", str(cache), "--tasks", "count", "--steps", "2",
             "--max-test", "4"]
    first = cit.main(["--show", "0", *flags])
    again = cit.main(["--show", "1", "--eval-batch-size", "3", *flags, "--resume"])  # flags that change nothing
    assert again["matrix"] == first["matrix"]
    assert "--steps 2, not 3" in input_error(capsys, *flags, "--steps", "3", "--resume")
    assert "--method finetune, not ewc" in input_error(capsys, *flags, "--method", "ewc", "--resume")
    assert "--tasks count, not ocr" in input_error(capsys, *flags, "--tasks", "ocr", "--resume")


def test_an_interrupted_overwrite_leaves_nothing_of_the_run_it_replaces(tmp_path, cache, monkeypatch):
    flags = ["--tasks", "count,ocr", "--steps", "2", "--max-test", "4"]
    run(tmp_path, cache, *flags)
    train = interrupt_the_second_task(monkeypatch)
    with pytest.raises(SystemExit):
        run(tmp_path, cache, *flags, "--steps", "3", "--overwrite")
    assert not (tmp_path / "out" / "results.json").exists()
    monkeypatch.setattr(cit, "train", train)
    resumed = run(tmp_path, cache, *flags, "--steps", "3", "--resume")  # the new run goes on, not the old one
    assert resumed["config"]["steps"] == 3 and len(resumed["matrix"]) == 2


def test_an_interrupted_overwrite_of_several_runs_leaves_no_summary_picture_or_model_of_the_old(tmp_path, cache,
                                                                                                monkeypatch):
    out = tmp_path / "out"
    old = [out / "summary.json", out / "summary.png", out / "seed0" / "finetune" / "results.png",
           out / "seed0" / "summary.md", out / "seed0" / "finetune" / "model" / "model.safetensors"]
    for path in old:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the run being replaced")
    interrupt_the_second_task(monkeypatch)
    with pytest.raises(SystemExit):
        run(tmp_path, cache, "--tasks", "count,ocr", "--steps", "2", "--max-test", "4", "--seeds", "0", "--method",
            "all", "--overwrite")
    assert not any(path.exists() for path in old)


def test_resume_goes_on_with_the_same_data_however_named_and_refuses_other_data_under_the_same_name(
        tmp_path, cache, capsys, monkeypatch):
    import shutil
    for task in ["count", "ocr"]:
        shutil.copytree(cit.HERE / "tiny_tasks" / task, tmp_path / "first" / task)
    flags = ["--tasks", "count,ocr", "--steps", "2", "--max-test", "4", "--out", str(tmp_path / "out")]
    train = interrupt_the_second_task(monkeypatch)
    with pytest.raises(SystemExit):
        run(tmp_path, cache, *flags, "--data", str(tmp_path / "first"))
    monkeypatch.setattr(cit, "train", train)
    (tmp_path / "first").rename(tmp_path / "moved")  # the same data, moved and named from elsewhere
    monkeypatch.chdir(tmp_path)
    records = tmp_path / "moved" / "ocr" / "train.json"
    kept = records.read_bytes()
    records.write_text(json.dumps(json.loads(kept)[1:]))  # other data under the same name
    said = input_error(capsys, *flags, "--cache", str(cache), "--data", "moved", "--resume")
    assert "holds a run on other data (task ocr's files differ" in said
    records.write_bytes(kept)
    assert len(run(tmp_path, cache, *flags, "--data", "./moved/../moved", "--resume")["matrix"]) == 2


@pytest.mark.parametrize("name, text", [("results.json", "garbage"), ("results.json", ""), ("results.json", "{}"),
                                        ("progress.json", "[]"), ("progress.json", '{"checkpoint": "x"}')])
def test_a_damaged_run_file_ends_resume_in_one_line(tmp_path, capsys, name, text):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / name).write_text(text)
    said = input_error(capsys, "--out", str(tmp_path / "out"), "--tasks", "count", "--resume")
    assert f"{name} is damaged" in said and "--overwrite" in said


def test_a_full_disk_while_checkpointing_ends_in_one_line_and_keeps_the_last_checkpoint(tmp_path, cache, capsys,
                                                                                         monkeypatch):
    save = torch.save

    def full_on_the_second(*args, **kwargs):
        if "checkpoint-2" in str(args[1]):
            raise OSError(28, "No space left on device")
        return save(*args, **kwargs)
    monkeypatch.setattr(torch, "save", full_on_the_second)
    said = input_error(capsys, "--out", str(tmp_path / "out"), "--cache", str(cache), "--tasks", "count,ocr",
                       "--steps", "2", "--max-test", "4")
    assert said.startswith("cit.py: no space left on the disk while writing") and "--resume" in said
    assert json.loads((tmp_path / "out" / "progress.json").read_text())["checkpoint"] == "checkpoint-1"


def test_a_question_that_is_only_the_picture_is_shown_with_its_answer(tiny, capsys):
    run = cit.Run(cit.parse_args(["--show", "1", "--out", "unused"]))
    tasks = {"look": {"test": [example(None, "", "red")], "metric": "exact"}}
    assert cit.evaluate_all(run, tiny[0], tasks, "after look", lambda *_: ["red"]) == [1.0]
    assert "A: 'red'" in capsys.readouterr().out


# The command with --jobs 2 over two seeds, and a way to wait for its workers (spawned: their command line names
# multiprocessing's spawn_main) to exist.
def started_with_workers(tmp_path):
    command = subprocess.Popen([sys.executable, str(cit.HERE / "cit.py"), "--tasks", "count,ocr", "--steps", "30",
                                "--max-train", "16", "--max-test", "8", "--seeds", "0,1", "--jobs", "2", "--out",
                                str(tmp_path / "out")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        children = proc(command.pid, f"task/{command.pid}/children").split()
        workers = [int(pid) for pid in children if "spawn_main" in proc(pid, "cmdline")]
        if len(workers) == 2 and (tmp_path / "out" / "seed0" / "log.txt").exists():
            return command, workers
        time.sleep(0.1)
    raise AssertionError("no workers started")


def proc(pid, name):
    """/proc/<pid>/<name>, or "" once the process has gone."""
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return ""


def gone(pid):
    return proc(pid, "stat").split()[2:3] in ([], ["Z"])  # no more, or a zombie its parent has not reaped


@full_only
def test_a_killed_jobs_worker_ends_the_command_in_one_line_and_the_others_with_it(tmp_path):
    command, workers = started_with_workers(tmp_path)
    os.kill(workers[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would
    _, said = command.communicate(timeout=120)
    assert command.returncode != 0 and said.strip().splitlines()[-1].startswith("cit.py: a process of --jobs died")
    assert all(gone(pid) for pid in workers)


@full_only
def test_sigterm_to_the_command_ends_its_jobs_workers_before_it_ends(tmp_path):
    command, workers = started_with_workers(tmp_path)
    command.terminate()  # SIGTERM, what kill and pkill send
    command.communicate(timeout=120)
    assert command.returncode != 0 and all(gone(pid) for pid in workers)


# ---- task pairs and similarity
def test_task_similarity_is_one_for_identical_tasks_and_symmetric(tiny):
    model, processor = tiny
    examples = {name: cit.load_split(cit.HERE / "tiny_tasks", name, "train") for name in ["count", "ocr"]}
    prototypes = [cit.task_prototype(model, processor, examples[name], "cpu", seed=0)
                  for name in ["count", "ocr", "count"]]
    similarity = cit.task_similarity(prototypes)
    assert set(similarity) == {"image", "instruction", "answer", "combined"}
    for matrix in similarity.values():
        assert torch.equal(matrix, matrix.T)
        assert torch.allclose(matrix.diagonal(), torch.ones(3)) and matrix[0, 2] == pytest.approx(1, abs=1e-6)
        assert (matrix <= 1 + 1e-6).all() and (matrix >= -1 - 1e-6).all()
    assert similarity["instruction"][0, 1] < 0.99  # counting and reading are asked differently


def test_spearman_matches_hand_worked_ranks():
    assert cit.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1)
    assert cit.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    # ranks with the tie shared: x -> 0, 1.5, 1.5, 3 and y -> 0, 2, 1, 3: 4.5 / sqrt(4.5 * 5)
    assert cit.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert cit.spearman([1, 1, 1], [1, 2, 3]) is None


def test_within_row_correlation_ranks_each_as_forgetting_by_similarity_alone():
    similarity = [[1, 0.6, 0.7, 0.8], [0.6, 1, 0.1, 0.2], [0.7, 0.1, 1, 0.4], [0.8, 0.2, 0.4, 1]]
    forgetting = [[None, 0.1, 0.2, 0.3],  # in the order of the similarity: +1
                  [0.9, None, 0.8, 0.7],  # the most similar first, the other two swapped: +0.5
                  [0.5, 0.5, None, 0.5],  # constant: no ranking, left out
                  [0.95, 0.9, 0.92, None]]  # +1
    assert cit.within_rows(similarity, forgetting) == pytest.approx(2.5 / 3)
    assert cit.spearman(*cit.off_diagonal(similarity, forgetting)) < 0  # pooled, the rows' levels dominate


def test_pair_analysis_trains_b_from_a_and_keeps_its_books(tmp_path, cache, monkeypatch):
    train, starts, ends = cit.train, {}, {}

    def recording(model, *args, **kwargs):
        starts[kwargs["desc"]] = cit.snapshot(model)
        train(model, *args, **kwargs)
        ends[kwargs["desc"]] = cit.snapshot(model)
    monkeypatch.setattr(cit, "train", recording)
    quiet_score, mid_training = cit.quiet_score, []
    monkeypatch.setattr(cit, "quiet_score", lambda *a: mid_training.append(1) or quiet_score(*a))
    report = run(tmp_path, cache, "--analyze", "pairs", "--tasks", "count,ocr", "--steps", "3", "--max-test", "6")

    def same(a, b):
        return all(torch.equal(a[n], b[n]) for n in a)
    assert sorted(starts) == ["count alone", "count then ocr", "ocr alone", "ocr then count"]
    assert same(starts["count alone"], starts["ocr alone"])  # both from the base
    assert same(starts["count then ocr"], ends["count alone"]) and same(starts["ocr then count"], ends["ocr alone"])
    assert not same(starts["count then ocr"], starts["count alone"])
    saved = json.loads((tmp_path / "out" / "pairs.json").read_text())
    single, pairs, curves = saved["single"], saved["pair_scores"], saved["curves"]
    assert saved["scored_at"] == [1, 2, 3] and cit.doubling_steps(200) == [1, 2, 4, 8, 16, 32, 64, 128, 200]
    assert len(curves["count"]["ocr"]) == 3 and curves["count"]["ocr"][-1] == pairs["count"]["ocr"][0]
    assert len(mid_training) == 2 * 2  # steps 1 and 2 of each pair; the last point is the final evaluation's
    assert saved["pair_forgetting"] == [[None, single["count"] - statistics.fmean(curves["count"]["ocr"])],
                                        [single["ocr"] - statistics.fmean(curves["ocr"]["count"]), None]]
    assert saved["final_forgetting"] == [[None, single["count"] - pairs["count"]["ocr"][0]],
                                         [single["ocr"] - pairs["ocr"]["count"][0], None]]
    assert saved["transfer"] == [[None, pairs["count"]["ocr"][1] - single["ocr"]],
                                 [pairs["ocr"]["count"][1] - single["count"], None]]
    combined = saved["similarity"]["combined"]
    assert combined[0][1] == combined[1][0] and combined[0][0] == pytest.approx(1)
    assert report["tasks"] == ["count", "ocr"] and Image.open(tmp_path / "out" / "pairs.png").size[0] > 400


def test_similarity_init_starts_a_new_expert_from_the_nearest_earlier_one(tmp_path, cache):
    args = cit.parse_args(["--method", "eproj", "--similarity-init", "--cache", str(cache)])
    hooks = cit.method_hooks(args)
    model, run = cit.start_run(args, "cpu", hooks)
    hooks["before_task"](run, model, cit.load_split(cit.HERE / "tiny_tasks", "count", "train"))
    with torch.no_grad():  # stands in for training task 0: its expert is no longer the base's
        for p in cit.trainable(model).values():
            p.add_(0.01 * torch.randn_like(p))
    hooks["after_task"](run, model, cit.load_split(cit.HERE / "tiny_tasks", "count", "train"))
    run.stage = 1
    hooks["before_task"](run, model, cit.load_split(cit.HERE / "tiny_tasks", "ocr", "train"))
    now = cit.trainable(model)
    assert all(torch.equal(now[n], run.memory["experts"][0][n]) for n in now)
    assert any(not torch.equal(now[n], run.memory["initial"][n]) for n in now)
    assert run.report["started_from"] == {1: 0}


# ---- real-model path, exercised on folders this project saves itself
@pytest.mark.parametrize("method", list(cit.METHODS))
def test_every_method_runs_with_lora_and_saves_its_adapter(tmp_path, cache, method):
    results = run(tmp_path, cache, "--method", method, "--lora", "--tasks", "count,ocr", "--steps", "2",
                  "--max-test", "4", "--ewc-samples", "8")
    assert results["config"]["train"] == "lora" and len(results["matrix"]) == (1 if method == "joint" else 2)
    saved = json.loads((tmp_path / "out" / "model" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["model.multi_modal_projector"]
    assert saved["target_modules"] == r"model\.language_model\..*\.(down_proj|gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)"


def test_a_saved_lora_run_loads_back_through_the_generic_path(tmp_path, cache):
    run(tmp_path / "first", cache, "--lora", "--tasks", "count", "--steps", "5", "--max-test", "4")
    saved = tmp_path / "first" / "out" / "model"
    args = cit.parse_args(["--model", str(saved), "--cache", str(cache)])
    loaded, processor = cit.load_pretrained(str(saved), args, torch.float32)
    base, _ = cit.tiny_base("align", args, "cpu")
    weights, base_weights = loaded.state_dict(), base.state_dict()
    assert set(weights) == set(base_weights)  # a plain LLaVA again: the adapter merged in, no LoRA left
    changed = {name for name in weights if not torch.equal(weights[name], base_weights[name])}
    assert "model.multi_modal_projector.linear_1.weight" in changed  # the trained copy of the connector came back
    assert {"q_proj", "v_proj", "down_proj"} <= {name.split(".")[-2] for name in changed if ".layers." in name}
    results = run(tmp_path / "second", cache, "--model", str(saved), "--method", "ewc", "--lora",
                  "--tasks", "count,ocr", "--steps", "3", "--max-test", "4")
    assert len(results["matrix"]) == 2


def test_an_unknown_model_ends_in_one_clear_line(tmp_path, capsys):
    message = input_error(capsys, "--model", "no-such-org/no-such-model", "--out", str(tmp_path))
    assert message.startswith("cit.py: cannot load --model no-such-org/no-such-model") and "\n" not in message


# ---- model families: tiny random models of each, built here from their configs, saved in the Hugging Face layout
# Each family gets the project's tokenizer with its own special tokens, its own processor and chat template (written
# as its model card's, short), and a config of a few 64-wide layers. CIT_FULL=1 runs the slow ones (CI does).
SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(SIZE, num_key_value_heads=2, max_position_embeddings=512)
VISION = dict(SIZE, image_size=32, patch_size=8)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
          "{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IDEFICS3_CHAT = ("<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
                 "{% if m['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}{% for c in m['content'] %}"
                 "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<image>{% endif %}{% endfor %}"
                 "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
GEMMA3_CHAT = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
               "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}"
               "{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
               "{% endif %}")


def family_tokenizer(special=(), plain=(), image_token="<image>", turn_end=None, **named):
    """The shipped base's tokenizer with a family's special tokens; turn_end becomes its end-of-answer token."""
    named = {"image_token": image_token, **named} if image_token else named
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(cit.SHIPPED_BASES / "align" / "tokenizer.json"), bos_token="<s>", pad_token="<pad>",
        eos_token=turn_end or "</s>", extra_special_tokens=named)
    tokenizer.add_special_tokens({"additional_special_tokens": [*special, *named.values()]},
                                 replace_extra_special_tokens=False)
    tokenizer.add_tokens(list(plain))
    return tokenizer


def ids(tokenizer, **tokens):
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in tokens.items()}


def text_config(tokenizer, **more):
    return dict(TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **more)


def llava_next(t):
    pins = [[32, 32], [32, 64], [64, 32]]
    tok = family_tokenizer()
    processor = t.LlavaNextProcessor(
        t.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                     image_grid_pinpoints=pins), tok, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=cit.TINY_CHAT_TEMPLATE)
    config = t.LlavaNextConfig(vision_config=t.CLIPVisionConfig(**VISION),
                               text_config=t.LlamaConfig(**text_config(tok)), image_token_index=tok.image_token_id,
                               image_grid_pinpoints=pins, vision_feature_layer=-1)
    return t.LlavaNextForConditionalGeneration(config), processor


def blip(t, instruct):
    """BLIP-2 / InstructBLIP: no chat template (cit.py writes the card's prompt); the processor adds the query tokens.
    InstructBLIP's tokenizer names its image token, BLIP-2's does not: both kinds must work (mend_blip_image_token)."""
    tok = family_tokenizer(image_token="<image>" if instruct else None)
    kind = "InstructBlip" if instruct else "Blip2"
    qformer = getattr(t, f"{kind}QFormerConfig")(vocab_size=len(tok), encoder_hidden_size=64, pad_token_id=0, **SIZE)
    vision = getattr(t, f"{kind}VisionConfig")(**VISION)
    config = getattr(t, f"{kind}Config")(vision_config=vision, qformer_config=qformer,
                                         text_config=t.LlamaConfig(**text_config(tok)), num_query_tokens=8,
                                         image_token_index=tok.convert_tokens_to_ids("<image>"))
    images = t.BlipImageProcessorPil(size={"height": 32, "width": 32})
    processor = (t.InstructBlipProcessor(images, tok, tok, num_query_tokens=8) if instruct
                 else t.Blip2Processor(images, tok, num_query_tokens=8))
    return getattr(t, f"{kind}ForConditionalGeneration")(config), processor


def qwen_vl(t, kind):
    tok = family_tokenizer(["<|im_start|>", "<|vision_start|>", "<|vision_end|>"], image_token="<|image_pad|>",
                           video_token="<|video_pad|>", turn_end="<|im_end|>")
    template = CHATML.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
    processor = getattr(t, f"{kind}Processor")(
        t.Qwen2VLImageProcessorPil(min_pixels=1024, max_pixels=1024, patch_size=8, merge_size=2), tok,
        t.Qwen2VLVideoProcessor(patch_size=8, merge_size=2), chat_template=template)
    vision = dict(depth=2, hidden_size=64, num_heads=4, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    vision |= (dict(embed_dim=64, mlp_ratio=2) if kind == "Qwen2VL" else
               dict(intermediate_size=128, out_hidden_size=64, window_size=32, fullatt_block_indexes=[1]))
    text = text_config(tok, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    config = getattr(t, f"{kind}Config")(text_config=text, vision_config=vision, **ids(
        tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>", vision_start_token_id="<|vision_start|>",
        vision_end_token_id="<|vision_end|>"))
    return getattr(t, f"{kind}ForConditionalGeneration")(config), processor


def qwen3_vl(t):
    """Qwen3-VL: the merger and DeepStack mergers (image features into the language model's early layers)."""
    tok = family_tokenizer(["<|im_start|>", "<|vision_start|>", "<|vision_end|>"], image_token="<|image_pad|>",
                           video_token="<|video_pad|>", turn_end="<|im_end|>")
    processor = t.Qwen3VLProcessor(
        t.Qwen2VLImageProcessorPil(min_pixels=1024, max_pixels=1024, patch_size=8, merge_size=2), tok,
        t.Qwen3VLVideoProcessor(patch_size=8, merge_size=2),
        chat_template=CHATML.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"))
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0])
    text = text_config(tok, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                          "mrope_section": [2, 3, 3]})
    config = t.Qwen3VLConfig(text_config=text, vision_config=vision, **ids(
        tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>", vision_start_token_id="<|vision_start|>",
        vision_end_token_id="<|vision_end|>"))
    return t.Qwen3VLForConditionalGeneration(config), processor


def idefics3(t, smol):
    tok = family_tokenizer(["<fake_token_around_image>", "<global-img>", "<|im_start|>"], turn_end="<end_of_utterance>",
                           plain=[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])
    images = (t.SmolVLMImageProcessorPil if smol else t.Idefics3ImageProcessorPil)(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = (t.SmolVLMProcessor(images, tok, t.SmolVLMVideoProcessor(), image_seq_len=4,
                                    chat_template=IDEFICS3_CHAT) if smol
                 else t.Idefics3Processor(images, tok, image_seq_len=4, chat_template=IDEFICS3_CHAT))
    config = (t.SmolVLMConfig if smol else t.Idefics3Config)(
        vision_config=VISION, text_config=dict(model_type="llama", **text_config(tok)), scale_factor=2,
        image_token_id=tok.image_token_id)
    return (t.SmolVLMForConditionalGeneration if smol else t.Idefics3ForConditionalGeneration)(config), processor


def paligemma(t):
    """No chat template (cit.py writes the card's prompt); its processor joins prompt and answer itself."""
    tok = family_tokenizer()
    images = t.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    images.image_seq_length = 16
    processor = t.PaliGemmaProcessor(images, tok)  # adds PaliGemma's <loc> and <seg> tokens
    config = t.PaliGemmaConfig(vision_config=t.SiglipVisionConfig(**VISION), projection_dim=64,
                               text_config=t.GemmaConfig(head_dim=16, **text_config(tok)),
                               image_token_index=tok.image_token_id)
    return t.PaliGemmaForConditionalGeneration(config), processor


def gemma3(t):
    tok = family_tokenizer(["<start_of_turn>"], image_token="<image_soft_token>", turn_end="<end_of_turn>",
                           boi_token="<start_of_image>", eoi_token="<end_of_image>")
    processor = t.Gemma3Processor(t.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tok,
                                  chat_template=GEMMA3_CHAT, image_seq_length=4)
    config = t.Gemma3Config(text_config=t.Gemma3TextConfig(head_dim=16, sliding_window=64, **text_config(tok)),
                            vision_config=t.SiglipVisionConfig(**VISION), mm_tokens_per_image=4, **ids(
                                tok, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                                image_token_index="<image_soft_token>"))
    return t.Gemma3ForConditionalGeneration(config), processor


def onevision(t):
    pins = [[32, 32], [32, 64], [64, 32]]
    tok = family_tokenizer(["<|im_start|>"], video_token="<video>", turn_end="<|im_end|>")
    processor = t.LlavaOnevisionProcessor(
        t.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pins), tok,
        t.LlavaOnevisionVideoProcessor(), num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=CHATML.replace("IMAGE", "<image>\n"))
    config = t.LlavaOnevisionConfig(vision_config=t.SiglipVisionConfig(**VISION), text_config=t.Qwen2Config(
        **text_config(tok)), image_grid_pinpoints=pins, vision_feature_select_strategy="full", vision_feature_layer=-1,
        **ids(tok, image_token_index="<image>", video_token_index="<video>"))
    return t.LlavaOnevisionForConditionalGeneration(config), processor


def internvl(t):
    tok = family_tokenizer(["<|im_start|>"], image_token=None, turn_end="<|im_end|>", start_image_token="<img>",
                           end_image_token="</img>", context_image_token="<IMG_CONTEXT>", video_token="<video>")
    processor = t.InternVLProcessor(t.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}), tok,
                                    t.InternVLVideoProcessor(), image_seq_length=4,
                                    chat_template=CHATML.replace("IMAGE", "<IMG_CONTEXT>\n"))
    vision = t.InternVLVisionConfig(**dict(VISION, image_size=[32, 32], patch_size=[8, 8]))
    config = t.InternVLConfig(vision_config=vision, text_config=t.Qwen2Config(**text_config(tok)), image_seq_length=4,
                              image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
                              vision_feature_layer=-1)
    return t.InternVLForConditionalGeneration(config), processor


# family: (builder, packages it needs beyond requirements.txt, the modules its connector is made of)
FAMILIES = {
    "llava": (lambda t: cit.tiny_model_and_processor(family_tokenizer()), [], ["model.multi_modal_projector"]),
    "llava_next": (llava_next, [], ["model.multi_modal_projector"]),
    "instructblip": (lambda t: blip(t, instruct=True), [], ["qformer", "language_projection"]),
    "blip2": (lambda t: blip(t, instruct=False), [], ["qformer", "language_projection"]),
    "idefics3": (lambda t: idefics3(t, smol=False), [], ["model.connector"]),
    "paligemma": (paligemma, [], ["model.multi_modal_projector"]),
    "gemma3": (gemma3, [], ["model.multi_modal_projector"]),
    "qwen2_vl": (lambda t: qwen_vl(t, "Qwen2VL"), ["torchvision"], ["model.visual.merger"]),
    "qwen2_5_vl": (lambda t: qwen_vl(t, "Qwen2_5_VL"), ["torchvision"], ["model.visual.merger"]),
    "qwen3_vl": (qwen3_vl, ["torchvision"], ["model.visual.merger", "model.visual.deepstack_merger_list"]),
    "smolvlm": (lambda t: idefics3(t, smol=True), ["torchvision", "num2words"], ["model.connector"]),
    "llava_onevision": (onevision, ["torchvision"], ["model.multi_modal_projector"]),
    "internvl": (internvl, ["torchvision"], ["model.multi_modal_projector"]),
}


def family_params(*marks):
    """One test per family; a family whose packages are missing here is skipped, saying what CI installs for it."""
    return [pytest.param(name, id=name, marks=[*marks, *[pytest.mark.skipif(
        importlib.util.find_spec(package) is None, reason=f"needs {package}: CI installs .ci/families.txt in a "
        "second venv for it") for package in needs]]) for name, (_, needs, _) in FAMILIES.items()]


@pytest.fixture(scope="session")
def family_folder(tmp_path_factory):
    """A function: the folder of a family's tiny model, built once per session."""
    built = {}

    def folder(name):
        if name not in built:
            torch.manual_seed(0)
            model, processor = FAMILIES[name][0](transformers)
            model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
            model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
            built[name] = tmp_path_factory.mktemp(name)
            model.save_pretrained(built[name])
            processor.save_pretrained(built[name])
        return built[name]
    return folder


def loaded(folder):
    args = cit.parse_args(["--model", str(folder)])
    return cit.load_model(args, "cpu")


@pytest.mark.parametrize("name", family_params())
def test_each_family_trains_the_answers_of_a_conversation_and_nothing_else(name, family_folder):
    _, processor = loaded(family_folder(name))
    picture = str(cit.HERE / "tiny_tasks" / "count" / "images" / "test_0000.png")
    conversation = example(picture, "What shape is it?", "a ring", history=[("What colour is it?", "red")])
    encoding = cit.kept_encoding(processor, conversation)
    labels = encoding["labels"][0]
    assert labels.shape == encoding["input_ids"][0].shape
    answered = torch.nonzero(labels != -100).flatten().tolist()
    spans = []  # runs of consecutive labelled positions: one per answer the family's format trains
    for position in answered:
        if spans and spans[-1][-1] == position - 1:
            spans[-1].append(position)
        else:
            spans.append([position])
    said = [processor.tokenizer.decode(labels[span], skip_special_tokens=True).strip() for span in spans]
    assert said == (["a ring"] if name == "paligemma" else ["red", "a ring"])  # PaliGemma's card is single-turn
    ends = [processor.tokenizer.convert_ids_to_tokens(int(labels[span[-1]])) for span in spans]
    assert set(ends) == {processor.tokenizer.eos_token}  # each answer ends with the token that stops generation


@pytest.mark.parametrize("name", family_params())
def test_each_familys_parts_are_found_by_what_they_are(name, family_folder):
    model, _ = loaded(family_folder(name))
    parts = cit.model_parts(model)
    bare = {"query_tokens", "model.image_newline"}  # BLIP's queries, LLaVA-NeXT's and OneVision's newline
    assert parts["connector"] and all(any(cit.in_module(n, module) for module in FAMILIES[name][2]) or n in bare
                                      for n in parts["connector"])
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if cit.in_module(n, parts["vision"]) and n not in parts["connector"])
    lora = cit.add_lora(cit.Run(cit.parse_args([])), model)
    adapted = {n.split(".lora_A")[0] for n, _ in lora.named_parameters() if ".lora_A." in n}
    assert adapted and all(".layers." in n and f"{parts['language']}." in n for n in adapted)
    assert all(".modules_to_save." in n or ".lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    connector_only = cit.train_connector(None, loaded(family_folder(name))[0])
    assert {n for n, p in connector_only.named_parameters() if p.requires_grad} == set(parts["connector"])


@pytest.mark.parametrize("name", family_params())
def test_each_family_runs_expansion_routing_by_its_own_image_features(tmp_path, cache, name, family_folder):
    results = run(tmp_path, cache, "--model", str(family_folder(name)), "--method", "eproj", "--train", "lora",
                  "--tasks", "count,ocr", "--steps", "2", "--max-test", "4")
    assert len(results["matrix"]) == 2 and 0 <= results["routing_accuracy"] <= 1
    kept = torch.load(tmp_path / "out" / "model" / "method_state.pt", weights_only=True)
    assert len(kept["experts"]) == len(kept["keys"]) == 2


@full_only
@pytest.mark.parametrize("train", ["lora", "all", "connector"])
@pytest.mark.parametrize("name", family_params())
def test_each_family_runs_every_method_with_each_choice_of_what_trains(tmp_path, cache, name, train, family_folder):
    every = run(tmp_path, cache, "--model", str(family_folder(name)), "--method", "all", "--train", train,
                "--tasks", "count,ocr", "--steps", "2", "--max-test", "4")
    assert [r["method"] for r in every] == list(cit.METHODS) and all(r["config"]["train"] == train for r in every)
    assert (tmp_path / "out" / "summary.png").is_file()


def llava_next_from_the_tiny_base(folder):
    """LLaVA-NeXT (anyres tiles, an image-newline vector, its own processor) on the align base's weights: a real
    checkpoint arrives able to see, and a random frozen vision encoder barely lets a short run learn (README)."""
    base, processor = cit.tiny_base("align", cit.parse_args([]), "cpu")
    pins = [[32, 32], [32, 64], [64, 32]]
    processor = transformers.LlavaNextProcessor(
        transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                image_grid_pinpoints=pins), processor.tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=cit.TINY_CHAT_TEMPLATE)
    config = transformers.LlavaNextConfig(vision_config=base.config.vision_config, text_config=base.config.text_config,
                                          image_token_index=base.config.image_token_index, image_grid_pinpoints=pins,
                                          vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = transformers.LlavaNextForConditionalGeneration(config)
    assert model.load_state_dict(base.state_dict(), strict=False).missing_keys == ["model.image_newline"]
    model.generation_config = base.generation_config
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@full_only
@pytest.mark.parametrize("train", ["lora", "all"])
def test_another_family_learns_a_task_with_lora_and_with_full_tuning(tmp_path, cache, train):
    folder = llava_next_from_the_tiny_base(tmp_path / "llava_next")
    args = cit.parse_args(["--model", str(folder), "--max-test", "40", "--show", "0"])
    model, processor = cit.load_model(args, "cpu")
    test = cit.load_tasks(cit.HERE / "tiny_tasks", ["count"], None, 40)["count"]["test"]
    before = cit.exact_match(cit.generate(model, processor, test, args, "cpu"), [e["references"] for e in test])
    results = run(tmp_path, cache, "--model", str(folder), "--train", train, "--tasks", "count", "--steps", "150",
                  "--max-test", "40")
    assert before < 0.3 and results["matrix"][0][0] >= 0.5


def test_a_family_that_needs_a_picture_refuses_text_only_examples_in_one_line(tmp_path, capsys, family_folder):
    _, processor = loaded(family_folder("paligemma"))  # its processor refuses them
    with pytest.raises(cit.InputError, match="PaliGemmaProcessor takes no text-only example"):
        cit.kept_encoding(processor, example(None, "Say hi.", "hi"))
    write_task(tmp_path / "data" / "chat", [record(0, "<image>\nWhat colour?", "red"),
                                            {"id": "1", "conversations": [{"from": "human", "value": "Say hi."},
                                                                          {"from": "gpt", "value": "hi"}]}])
    message = input_error(capsys, "--model", str(family_folder("blip2")), "--data", str(tmp_path / "data"),
                          "--out", str(tmp_path / "out"))  # its model puts query tokens before every prompt
    assert "Blip2ForConditionalGeneration needs a picture in every example; task chat has 2 without one" in message


def meta_model_of(model_type):
    """A family's default model (its real size), built on the meta device: its shapes, no weights."""
    with torch.device("meta"):
        return transformers.AutoModelForImageTextToText.from_config(transformers.AutoConfig.for_model(model_type))


def test_qwen3_vls_connector_is_its_merger_and_the_deepstack_mergers_and_each_trains(tmp_path):
    model = meta_model_of("qwen3_vl")
    connector = cit.model_parts(model)["connector"]
    modules = {n.split(".linear_fc")[0].split(".norm")[0] for n in connector}
    assert modules == {"model.visual.merger", *(f"model.visual.deepstack_merger_list.{i}" for i in range(3))}
    with torch.device("meta"):
        lora = cit.add_lora(cit.Run(cit.parse_args([])), model)  # peft copies each merger, not the list
    saved = {n.split(".modules_to_save.")[0] for n, p in lora.named_parameters() if ".modules_to_save." in n}
    assert saved == {f"base_model.model.{m}" for m in modules}
    assert set(cit.trainable(cit.train_connector(None, meta_model_of("qwen3_vl")))) == set(connector)


def test_a_model_that_reads_images_by_cross_attention_is_refused_in_one_line(tmp_path, capsys):
    transformers.AutoConfig.for_model("mllama").save_pretrained(tmp_path / "llama-3.2-vision")
    line = input_error(capsys, "--plan", "--model", str(tmp_path / "llama-3.2-vision"), "--out", str(tmp_path / "o"))
    assert "MllamaForConditionalGeneration gives no image features as tokens" in line


def test_a_family_without_a_chat_template_is_prompted_with_its_own_image_and_end_tokens():
    tok = family_tokenizer(image_token="<img_here>", turn_end="<turn_end>")
    processor = transformers.LlavaProcessor(transformers.CLIPImageProcessorPil(), tok, patch_size=8)
    processor.chat_template = cit.llava_template(processor)
    text = processor.apply_chat_template(cit.chat(example("x.png", "What colour?", "red")))
    assert text == "USER: <img_here>\nWhat colour? ASSISTANT: red<turn_end>"


def test_an_encoder_decoder_language_model_is_refused_in_one_line(tmp_path, capsys):
    tok = family_tokenizer(image_token=None)
    qformer = transformers.Blip2QFormerConfig(vocab_size=len(tok), encoder_hidden_size=64, pad_token_id=0, **SIZE)
    flan_t5 = transformers.T5Config(vocab_size=len(tok), d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                                    pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.pad_token_id)
    config = transformers.Blip2Config(vision_config=transformers.Blip2VisionConfig(**VISION), qformer_config=qformer,
                                      text_config=flan_t5, num_query_tokens=8,
                                      image_token_index=tok.convert_tokens_to_ids("<image>"))
    transformers.Blip2ForConditionalGeneration(config).save_pretrained(tmp_path / "blip2-t5")
    transformers.Blip2Processor(transformers.BlipImageProcessorPil(size={"height": 32, "width": 32}), tok,
                                num_query_tokens=8).save_pretrained(tmp_path / "blip2-t5")
    line = input_error(capsys, "--model", str(tmp_path / "blip2-t5"), "--tasks", "count", "--out", str(tmp_path))
    assert "its language model is an encoder-decoder" in line


def test_a_model_without_a_separate_vision_encoder_is_told_what_it_lacks():
    config = transformers.FuyuConfig(text_config=dict(model_type="persimmon", vocab_size=300, **SIZE), hidden_size=64,
                                     patch_size=8, vocab_size=300)
    with pytest.raises(cit.InputError, match="FuyuForCausalLM has no separate vision encoder"):
        cit.model_parts(transformers.FuyuForCausalLM(config))


# ---- several processes: torchrun on CPU (gloo), two processes against one with the same global batch
SHORT = ["--base", "instruct", "--tasks", "count,ocr", "--steps", "4", "--max-test", "6", "--max-train", "30",
         "--replay-size", "4"]


def torchrun(tmp_path, cache, *flags, script=cit.HERE / "cit.py"):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               "--out", str(tmp_path / "out"), "--cache", str(cache), "--show", "0", *flags]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=900)  # a collective that one process never joins would wait for ever


def weights(folder):
    return load_file(folder / "model" / "model.safetensors")


@full_only
def test_two_processes_train_and_score_every_method_as_one_process_with_their_global_batch(tmp_path, cache):
    # answers of many lengths (captions), so each process's share of the answer tokens differs; a base that
    # already answers, so the matrices are not all zeros; evaluation batches that both processes answer
    flags = ["--base", "instruct", "--tasks", "count,caption", "--steps", "4", "--max-test", "6",
             "--eval-batch-size", "2", "--max-train", "30", "--replay-size", "4"]
    alone = run(tmp_path / "one", cache, "--method", "all", "--batch-size", "8", *flags)
    two = torchrun(tmp_path / "two", cache, "--method", "all", "--batch-size", "4", *flags)
    assert two.returncode == 0, two.stderr[-3000:]
    for one in alone:
        method = one["method"]
        shared = json.loads((tmp_path / "two" / "out" / method / "results.json").read_text())
        # The same batches, split in two: the gradients differ only in the order of float sums (1e-7 here), too
        # little to change a greedy answer, so the matrices are equal and the weights close. AdamW's first step
        # moves each weight by about lr * the sign of its gradient, so the few whose gradient is float noise
        # (3 of 1.1 M here) may move apart by up to 2 lr; a global batch twice as large moves 578 k of them.
        assert shared["matrix"] == one["matrix"] and any(v > 0 for row in one["matrix"] for v in row), method
        expected, got = weights(tmp_path / "one" / "out" / method), weights(tmp_path / "two" / "out" / method)
        apart = [(expected[k] - got[k]).abs() for k in expected]
        assert sum((d > 1e-5).sum() for d in apart) <= 10 and max(d.max() for d in apart) <= 2 * 2e-4, method
    assert (tmp_path / "two" / "out" / "summary.md").is_file() and two.stdout.count("======== ewc") == 1


def stopped_on_the_second_task(tmp_path):
    """A script that runs cit.py as Ctrl-C would stop it when the second task starts."""
    stopper = tmp_path / "stopped_on_the_second_task.py"
    stopper.write_text(f"import sys\nsys.path.insert(0, {str(cit.HERE)!r})\nimport cit\n"
                       "train, calls = cit.train, []\n\n"
                       "def interrupted_on_the_second_task(*args, **kwargs):\n"
                       "    calls.append(1)\n"
                       "    if len(calls) == 2:\n"
                       "        raise KeyboardInterrupt\n"
                       "    return train(*args, **kwargs)\n\n"
                       "cit.train = interrupted_on_the_second_task\ncit.main()\n")
    return stopper


@full_only
@pytest.mark.parametrize("flags", [["--method", "ewc", "--tir"], ["--method", "replay", "--shard"],
                                   ["--method", "ewc", "--tir", "--shard"], ["--method", "eproj", "--shard"]])
def test_a_run_interrupted_under_torchrun_resumes_to_the_same_end(tmp_path, cache, flags):
    flags = [*flags, "--batch-size", "4", *SHORT]
    whole = torchrun(tmp_path / "whole", cache, *flags)
    cut = torchrun(tmp_path / "cut", cache, *flags, script=stopped_on_the_second_task(tmp_path))
    out = tmp_path / "cut" / "out"
    assert cut.returncode != 0 and "interrupted" in cut.stderr and not (out / "results.json").exists()
    assert len(json.loads((out / "progress.json").read_text())["matrix"]) == 1
    resumed = torchrun(tmp_path / "cut", cache, *flags, "--resume")
    assert whole.returncode == resumed.returncode == 0, resumed.stderr[-3000:]
    saved = [json.loads((folder / "results.json").read_text()) for folder in [tmp_path / "whole" / "out", out]]
    assert saved[0]["matrix"] == saved[1]["matrix"] and saved[0].get("tir_similarity") == saved[1].get("tir_similarity")
    expected, got = weights(tmp_path / "whole" / "out"), weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@full_only
@pytest.mark.parametrize("method", [  # EWC at a lambda whose penalty moves the weights beyond float noise
    "finetune --train all", "replay --train all", "joint --train all", "ewc --ewc-lambda 1e9 --train all",
    "ewc --tir --train all", "eproj --train connector", "finetune --train lora", "replay --train lora",
    "ewc --ewc-lambda 1e9 --train lora", "eproj --train lora", "lwf --train all", "lwf --train lora"])
def test_two_sharded_processes_train_as_one_and_save_a_model_that_one_process_loads_and_scores_alike(
        tmp_path, cache, method):
    flags = ["--base", "instruct", "--tasks", "count,caption", "--steps", "4", "--max-test", "6", "--eval-batch-size",
             "2", "--max-train", "30", "--replay-size", "4", "--method", *method.split()]
    alone = run(tmp_path / "one", cache, "--batch-size", "8", *flags)
    two = torchrun(tmp_path / "two", cache, "--batch-size", "4", "--shard", *flags)
    assert two.returncode == 0, two.stderr[-3000:]
    sharded = json.loads((tmp_path / "two" / "out" / "results.json").read_text())
    assert sharded["matrix"] == alone["matrix"] and any(v > 0 for row in alone["matrix"] for v in row)
    saved = tmp_path / "two" / "out" / "model"
    expected, got = [load_file(next(folder.glob("*.safetensors"))) for folder in [tmp_path / "one" / "out" / "model",
                                                                                saved]]
    apart = [(expected[k] - got[k]).abs() for k in expected]  # as DDP's: a few float-noise gradients, see above
    assert set(expected) == set(got) and sum((d > 1e-5).sum() for d in apart) <= 10
    if method.startswith("eproj"):  # every expert and key, gathered whole; the model holds the last expert alone
        expected, got = [torch.load(folder / "model" / "method_state.pt") for folder in [tmp_path / "one" / "out",
                                                                                        tmp_path / "two" / "out"]]
        assert all(torch.allclose(e, g, atol=1e-6) for e, g in zip(expected["keys"], got["keys"]))
        assert all(sum((one[k] - two[k]).abs().gt(1e-5).sum() for k in one) <= 10
                   for one, two in zip(expected["experts"], got["experts"], strict=True))
        return
    args = cit.parse_args([*flags, "--batch-size", "8", "--model", str(saved), "--show", "0"])
    model, processor = cit.load_model(args, "cpu")  # one process, the Hugging Face layout (LoRA: the adapter)
    tasks = cit.load_tasks(cit.HERE / "tiny_tasks", ["count", "caption"], 30, 6)
    assert cit.evaluate_all(cit.Run(args, "cpu", processor), model, tasks, "loaded") == sharded["matrix"][-1]


def test_shard_is_refused_without_torchrun_and_for_the_pair_analysis(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out"), "--tasks", "count"]
    assert "start it with torchrun --nproc_per_node N" in input_error(capsys, "--shard", "--method", "ewc", *out)
    assert "--analyze pairs runs in one process" in input_error(capsys, "--shard", "--analyze", "pairs", *out)


def test_plan_for_sharded_processes_divides_what_each_keeps_and_adds_what_it_gathers(tmp_path):
    transformers.AutoConfig.for_model("llava").save_pretrained(tmp_path / "llava")  # LLaVA-1.5-7B's shapes
    one, eight, whole = [next(iter(planned(tmp_path, tmp_path / "llava", "--train", "all", *flags)["methods"].values()))
                         for flags in [["--shard"], ["--shard", "--nproc", "8"], []]]
    for item in ["weights", "gradients", "optimizer"]:
        assert eight["memory_gb"][item] == pytest.approx(one["memory_gb"][item] / 8)
        assert one["memory_gb"][item] == pytest.approx(whole["memory_gb"][item])
    gathered = eight["memory_gb"]["gathered"]  # embeddings, connector, head, two decoder layers and their gradients
    assert 1 < gathered < one["memory_gb"]["weights"] / 4 and eight["torchrun_total_gb"] == eight["total_gb"]


@full_only
@pytest.mark.parametrize("train", ["all", "lora"])
def test_plan_for_sharded_processes_estimates_what_each_of_two_adds_on_a_cpu(tmp_path, train, mid_llava):
    """Each of two sharded processes' growth from before the model loads to the peak of training, against the plan's
    total for each process (its shares, what it gathers, activations)."""
    common = ["--model", str(mid_llava), "--tasks", "count", "--batch-size", "8", "--dtype", "float32", "--train",
              train, "--shard"]
    script = tmp_path / "peak.py"
    script.write_text(SHARDED_PEAK)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *common,
         "--steps", "2", "--max-train", "16", "--max-test", "4", "--eval-batch-size", "4", "--max-new-tokens", "4",
         "--show", "0", "--held-in", "none", "--out", str(tmp_path / "run")], capture_output=True, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1",
                 CIT_HERE=str(cit.HERE), CIT_PEAKS=str(tmp_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    measured = [json.loads((tmp_path / f"peak-{rank}.json").read_text()) for rank in range(2)]
    plan = planned(tmp_path, mid_llava, *common, "--nproc", "2", "--max-length", str(measured[0]["tokens"]))
    estimate = next(iter(plan["methods"].values()))["total_gb"] * 2 ** 30
    print(f"--train {train} --shard: each process grew {[m['grown'] / 2 ** 20 for m in measured]} MiB, planned "
          f"{estimate / 2 ** 20:.0f} MiB")
    assert all(0.7 < m["grown"] / estimate < 1.3 for m in measured)


SHARDED_PEAK = '''
import gc, json, os, re, sys
from pathlib import Path
sys.path.insert(0, os.environ["CIT_HERE"])
import cit

def resident(key):
    return int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

load_model, train, before, peaks, lengths = cit.load_model, cit.train, [], [], []
def loaded(args, device):
    gc.collect()
    before.append(resident("VmRSS"))
    return load_model(args, device)
def trained(model, examples, steps, run, *rest, **named):
    lengths.append(max(cit.training_batch(run.processor, [e], "cpu")["input_ids"].shape[1] for e in examples))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size starts again from here
    train(model, examples, steps, run, *rest, **named)
    peaks.append(resident("VmHWM"))
cit.load_model, cit.train = loaded, trained
cit.main(sys.argv[1:])
Path(os.environ["CIT_PEAKS"], f"peak-{cit.RANK}.json").write_text(json.dumps(
    {"grown": max(peaks) - before[0], "tokens": max(lengths)}))
'''


@full_only
def test_the_pair_analysis_refuses_torchrun_in_one_line(tmp_path, cache):
    done = torchrun(tmp_path, cache, "--analyze", "pairs", *SHORT)
    assert done.returncode != 0  # torchrun adds its own report of the failed processes
    assert done.stderr.count("cit.py: --analyze pairs runs in one process") == 1  # said once, by the first


# ---------------------------------------------------------------- --plan: what a run would train and need
def planned(tmp_path, folder, *flags):
    return cit.main(["--plan", "--model", str(folder), "--out", str(tmp_path / "plan"), "--overwrite", *flags])


@pytest.mark.parametrize("name", family_params())
@pytest.mark.parametrize("train", ["lora", "connector"])
def test_plan_from_a_config_alone_counts_what_a_run_of_the_family_trains(tmp_path, name, train, family_folder):
    alone = tmp_path / "config_only"
    alone.mkdir()
    (alone / "config.json").write_text((family_folder(name) / "config.json").read_text())
    report = planned(tmp_path, alone, "--train", train, "--lora-rank", "4", "--tasks", "count,ocr")
    # the plan's dtype, auto, is a GPU's bfloat16
    args = cit.parse_args(["--model", str(family_folder(name)), "--train", train, "--lora-rank", "4", "--dtype",
                           "bfloat16"])
    model = cit.TRAINING[train](cit.Run(args), cit.load_model(args, "cpu")[0])
    entry, trained = report["methods"]["finetune"], list(cit.trainable(model).values())
    assert entry["trainable"] == sum(p.numel() for p in trained)
    assert {p.dtype for p in trained} == {torch.bfloat16}  # LoRA's adapters too: no float32 layer in a bf16 model
    assert entry["memory_gb"]["weights"] * 2 ** 30 == sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = cit.adamw(trained, 1e-4, "cpu")  # float32 masters and moments: 4 + 8 bytes a trained weight
    optimizer.zero_grad()
    for p in trained:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    held = [t for master in optimizer.param_groups[0]["params"] for t in [master, *optimizer.state[master].values()]
            if t.dim()]
    assert entry["memory_gb"]["optimizer"] * 2 ** 30 == sum(t.numel() * t.element_size() for t in held)
    assert entry["memory_gb"]["gradients"] * 2 ** 30 == 4 * entry["trainable"]  # float32 at the optimizer's step
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["methods"]["finetune"]["trainable"] == (
        entry["trainable"])


def test_plan_counts_coins_lora_on_llava_1_5_7b_as_its_layers_add_up(tmp_path):
    transformers.LlavaConfig().save_pretrained(tmp_path / "llava-1.5-7b")  # its defaults are that model
    report = planned(tmp_path, tmp_path / "llava-1.5-7b", "--lora-rank", "128", "--method", "all",
                     "--gradient-checkpointing", "--gpu-memory", "24,80")
    rank, h, i, layers = 128, 4096, 11008, 32
    per_layer = rank * (4 * (h + h) + 2 * (h + i) + (i + h))  # q, k, v, o; gate, up; down
    projector = 1024 * h + h + h * h + h
    assert report["weights"]["connector"] == projector and report["weights"]["total"] == 7_062_902_784
    assert report["methods"]["finetune"]["trainable"] == layers * per_layer + projector  # 340.8 M
    assert report["methods"]["eproj"]["trainable"] == projector
    methods = report["methods"]
    # the methods' own copies: EWC's importance and anchor, LwF's old weights, an expert per task
    assert methods["ewc"]["total_gb"] > methods["lwf"]["total_gb"] > methods["finetune"]["total_gb"]
    assert methods["finetune"]["fits"] == {"24": "with --batch-size 2 --grad-accum 8", "80": "yes"}
    whole = planned(tmp_path, tmp_path / "llava-1.5-7b", "--train", "all", "--gradient-checkpointing",
                    "--gpu-memory", "80")["methods"]["finetune"]
    # bf16 weights and gradients at the step in float32, float32 masters and moments: 7B tuned whole needs 113 GB
    # beside its weights, more than an 80 GB GPU; LoRA is what fits
    assert whole["trainable"] == 7_062_902_784 - 303_507_456 and whole["total_gb"] > 120
    assert whole["fits"] == {"80": "with --train lora"}


def kept_for_backward(model, step):
    """The bytes autograd keeps for the backward pass while `step` runs (weights aside, each storage once); with
    gradient checkpointing, what stays outside the checkpointed layers."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(kept.values())


def ready_to_train(tiny, train, checkpointing, dtype=torch.float32):
    """The tiny fixture as load_model and --train make it: vision frozen, checkpointing if asked, what trains."""
    model, processor = copy.deepcopy(tiny[0]).to(dtype), tiny[1]
    args = cit.parse_args(["--train", train] + ["--gradient-checkpointing"] * checkpointing)
    cit.freeze_vision_encoder(model)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return cit.TRAINING[train](cit.Run(args), model), processor, args


def caption_batch(processor, size=16):
    examples = cit.load_tasks(cit.HERE / "tiny_tasks", ["caption"], size, 1)["caption"]["train"]
    return examples, cit.training_batch(processor, examples, "cpu")


def test_plan_estimates_the_activations_autograd_keeps_for_a_training_step(tiny):
    model, processor, _ = ready_to_train(tiny, "all", checkpointing=False)
    _, batch = caption_batch(processor)
    kept = kept_for_backward(model.train(), lambda: cit.answer_logits(model, batch))
    args = cit.parse_args(["--batch-size", "16", "--max-length", str(batch["input_ids"].shape[1])])

    def estimate(model):  # what is kept; the plan's "backward" is made and freed during the backward pass
        planned = cit.plan_activations(model, args, 4)
        return planned["activations"] + planned["logits"]
    assert 0.8 < estimate(model) / kept < 1.25
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")  # keeps each layer's attention matrices too, and the plan counts them
    more = kept_for_backward(eager.train(), lambda: cit.answer_logits(eager, batch)) - kept
    assert 0.7 < more / (estimate(eager) - estimate(model)) < 1.3


@pytest.mark.parametrize("train", ["lora", "all"])
def test_gradient_checkpointing_keeps_a_fraction_of_what_a_step_keeps_with_lora_as_tuned_whole(tiny, train):
    _, batch = caption_batch(tiny[1])
    kept = {}
    for checkpointing in [False, True]:
        model, _, _ = ready_to_train(tiny, train, checkpointing)
        kept[checkpointing] = kept_for_backward(model.train(), lambda: cit.answer_logits(model, batch))
    assert kept[True] < 0.5 * kept[False]


def test_profiles_count_of_a_steps_flops_keeps_no_more_than_a_checkpointed_step(tiny):
    """--profile counts a step's FLOPs on a batch of each task, between evaluations: in evaluation mode transformers
    would skip checkpointing and that step alone would keep every activation (a 7B LoRA run's peak on a GPU)."""
    model, processor, args = ready_to_train(tiny, "lora", checkpointing=True)
    examples, batch = caption_batch(processor)
    run = cit.Run(cit.with_args(args, batch_size=16), "cpu", processor)
    step = kept_for_backward(model.train(), lambda: F.cross_entropy(*cit.answer_logits(model, batch)))
    work = cit.Counter()
    counted = kept_for_backward(model.eval(), lambda: cit.count_flops(model, examples, 1, run, work,
                                                                      cit.training_batch))
    assert work["flops"] > 0 and counted <= 1.05 * step and not model.training


def test_bfloat16_weights_learn_through_float32_masters_and_float32_weights_are_their_own():
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    masters, bf16_alone = cit.adamw([weight], 1e-4, "cpu"), torch.optim.AdamW([plain], lr=1e-4, weight_decay=0)
    for _ in range(100):  # each step 1e-4, under a bfloat16's spacing at 1 (2^-7): lost alone, kept by the master
        for p, optimizer in [(weight, masters), (plain, bf16_alone)]:
            p.grad = torch.ones_like(p)
            optimizer.step()
            optimizer.zero_grad()
    assert (plain == 1).all()
    assert weight.dtype == torch.bfloat16 and torch.allclose(weight.float(), torch.full((4,), 1 - 100e-4), atol=4e-3)
    assert masters.param_groups[0]["params"][0].dtype == torch.float32
    full = torch.nn.Parameter(torch.ones(4))
    assert cit.adamw([full], 1e-4, "cpu").param_groups[0]["params"][0] is full


def test_the_tiny_model_trains_in_float32_on_every_device_and_a_real_one_in_bfloat16_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    tiny, real = cit.parse_args([]), cit.parse_args(["--model", "some/lmm"])
    assert [cit.pick_dtype(tiny, d) for d in ["cpu", "cuda", "mps"]] == [torch.float32] * 3
    assert [cit.pick_dtype(real, d) for d in ["cpu", "cuda"]] == [torch.float32, torch.bfloat16]


# What a short CPU run adds to its memory while it trains, after its model is loaded (and its weights read in):
# the peak resident size within each task's training, less the size after loading. Printed as JSON.
PEAK_DURING_TRAINING = '''
import gc, json, re, sys
from pathlib import Path
import torch
import cit

def resident(key):
    return int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

def peak_from_now():
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size starts again from here

load_model, train, after_loading, peaks, lengths = cit.load_model, cit.train, [], [], []
def loaded(args, device):
    model, processor = load_model(args, device)
    with torch.no_grad():  # safetensors maps the file: its pages are read at first use
        for p in model.parameters():
            p.sum()
    gc.collect()
    after_loading.append(resident("VmRSS"))
    return model, processor
def trained(model, examples, *rest, **named):
    lengths.append(max(cit.training_batch(named.get("run", rest[1]).processor, [e], "cpu")["input_ids"].shape[1]
                       for e in examples))
    peak_from_now()
    train(model, examples, *rest, **named)
    peaks.append(resident("VmHWM"))
cit.load_model, cit.train = loaded, trained
cit.main(sys.argv[1:])
print(json.dumps({"grown": max(peaks) - after_loading[0], "tokens": max(lengths)}))
'''


def llava_shaped(folder, vision, text, vocab_size=None, device="cpu", dtype=torch.float32):
    """A LLaVA of the given shapes with random weights, built where it will run, saved in the Hugging Face layout
    with the tiny tokenizer and a processor for its image size (336 pixels, patches of 14: LLaVA-1.5's 576 image
    tokens)."""
    torch.manual_seed(0)
    tokenizer = cit.tiny_tokenizer(cit.tiny_corpus())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cit, "TINY_VISION", dict(cit.TINY_VISION, image_size=336, patch_size=14, **vision))
        patch.setattr(cit, "TINY_TEXT", dict(cit.TINY_TEXT, max_position_embeddings=4096, **text))
        config, processor = cit.tiny_config_and_processor(tokenizer)
    config.text_config.vocab_size = vocab_size or config.text_config.vocab_size  # a real vocabulary's head
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tokenizer.pad_token_id, (
        tokenizer.eos_token_id)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def mid_llava(tmp_path_factory):
    """A LLaVA with 576 image tokens (a record is about 590 tokens, as a real one) and a 6-layer, 512-wide
    language model: what a training step keeps is hundreds of MB, and a CPU trains it in seconds."""
    return llava_shaped(tmp_path_factory.mktemp("mid") / "llava", dict(hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2), dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=8))


@full_only
@pytest.mark.parametrize("flags", [["--train", "all"], ["--train", "all", "--gradient-checkpointing"],
                                   ["--train", "lora"], ["--train", "lora", "--gradient-checkpointing"],
                                   ["--train", "all", "--method", "ewc"], ["--train", "lora", "--method", "lwf"],
                                   ["--train", "all", "--dtype", "bfloat16"]])
def test_plan_estimates_what_a_cpu_run_adds_while_it_trains(tmp_path, flags, mid_llava):
    """What training adds (weights' gradients, AdamW's moments and masters, the method's copies, activations) to
    the resident memory, against the plan. glibc keeps freed memory resident unless told to hand large blocks back
    (MALLOC_MMAP_THRESHOLD_): without it the peak would count what an evaluation freed before training, and a
    LoRA run seemed to grow 4x its plan."""
    common = ["--model", str(mid_llava), "--tasks", "count", "--batch-size", "8", "--dtype", "float32", *flags]
    measured = subprocess.run(
        [sys.executable, "-c", PEAK_DURING_TRAINING, *common, "--steps", "2", "--max-train", "16", "--max-test", "4",
         "--eval-batch-size", "4", "--ewc-samples", "8", "--show", "0", "--held-in", "none",
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, check=True, cwd=cit.HERE,
        env=dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")).stdout.splitlines()[-1]
    measured = json.loads(measured)
    plan = planned(tmp_path, mid_llava, *common, "--max-length", str(measured["tokens"]))
    entry = next(iter(plan["methods"].values()))
    estimate = (entry["total_gb"] - entry["memory_gb"]["weights"]) * 2 ** 30
    print(f"{' '.join(flags)}: grew {measured['grown'] / 2 ** 20:.0f} MiB while training, planned "
          f"{estimate / 2 ** 20:.0f} MiB ({measured['grown'] / estimate:.2f} of it)")
    assert measured["tokens"] > 576 and 0.7 < measured["grown"] / estimate < 1.4


@full_only
@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision", "instructblip", "blip-2", "qwen2_vl",
                                        "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "paligemma", "gemma3",
                                        "internvl"])
def test_plan_reads_each_familys_default_config_with_nothing_else(tmp_path, model_type):
    """transformers' default configs are real sizes (LLaVA's is LLaVA-1.5-7B, Qwen2.5-VL's the 72B): built on the
    meta device, in seconds, every method planned."""
    transformers.AutoConfig.for_model(model_type).save_pretrained(tmp_path / model_type)
    report = planned(tmp_path, tmp_path / model_type, "--method", "all", "--tasks", "count,ocr")
    assert list(report["methods"]) == list(cit.METHODS) and report["weights"]["total"] > 1e9
    assert all(0 < entry["trainable"] < report["weights"]["total"] for entry in report["methods"].values())


# ---------------------------------------------------------------- on a GPU: CIT_GPU=1 (CIT_GPU=dry: a CPU dry run)
GPU = os.environ.get("CIT_GPU")
# llava-hf/llava-1.5-7b-hf's shapes: CLIP ViT-L/14 at 336 pixels, Vicuna-7B, a vocabulary of 32,064 (7.06 B weights)
LLAVA_7B = (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
            dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32), 32064)
DRY = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
       dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2), 32064)
# One run: cit's own output (--profile) and, on a GPU, the peak of CUDA memory over the whole run, as JSON.
CUDA_PEAK = """
import json, sys
import torch
import cit
cit.main(sys.argv[1:])
print("PEAK " + json.dumps(torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0))
"""


@pytest.mark.skipif(not (GPU == "dry" or GPU and torch.cuda.is_available()),
                    reason="on a GPU: CIT_GPU=1 (CIT_GPU=dry runs its mechanics on a CPU)")
def test_a_llava_1_5_7b_shaped_model_on_a_gpu_peaks_as_planned_and_keeps_the_matmul_units_busy(tmp_path):
    """LoRA rank 128 (CoIN's) at 4 and 16 examples a batch and full tuning at 4, gradient checkpointing, bfloat16
    over float32 masters, on the tiny count and ocr tasks (about 590 tokens an example): the peak of CUDA memory
    within 20% of --plan, a LoRA step no slower than a full one, 35% of the bfloat16 matmul rate at 16."""
    gpu = GPU != "dry"
    vision, text, vocab = LLAVA_7B if gpu else DRY
    folder = llava_shaped(tmp_path / "llava", vision, text, vocab, "cuda" if gpu else "cpu", torch.bfloat16)
    common = ["--model", str(folder), "--tasks", "count,ocr", "--steps", "8" if gpu else "2", "--max-train", "64",
              "--max-test", "8", "--eval-batch-size", "8", "--held-in", "none", "--show", "0", "--dtype", "bfloat16",
              "--gradient-checkpointing", "--lora-rank", "128" if gpu else "8"]
    rows = {}
    for name, flags in {"lora 4": ["--train", "lora", "--batch-size", "4"],
                        "lora 16": ["--train", "lora", "--batch-size", "16"],
                        "all 4": ["--train", "all", "--batch-size", "4"]}.items():
        done = subprocess.run([sys.executable, "-c", CUDA_PEAK, *common, *flags, "--profile", "--out",
                               str(tmp_path / name.replace(" ", "-"))], capture_output=True, text=True, cwd=cit.HERE)
        assert done.returncode == 0, done.stderr[-2000:]
        profile = re.search(r"training: \d+ steps, ([\d.]+) ms .* (\d+)% of this \w+'s bfloat16 matmul", done.stdout)
        plan = planned(tmp_path, folder, *common, *flags, "--max-length", "600")["methods"]["finetune"]
        peak = json.loads(done.stdout.split("PEAK ")[-1]) / 2 ** 30
        rows[name] = dict(peak_gb=peak, plan_gb=plan["total_gb"], ms=float(profile[1]), share=int(profile[2]) / 100)
        print(f"{name}: peak {peak:.1f} GB, plan {plan['total_gb']:.1f} GB, {rows[name]['ms']:.0f} ms a step, "
              f"{rows[name]['share']:.0%} of the bfloat16 matmul rate")
    if gpu:
        assert all(0.8 < row["peak_gb"] / row["plan_gb"] < 1.2 for row in rows.values()), rows
        assert rows["lora 4"]["ms"] <= rows["all 4"]["ms"] and rows["lora 16"]["share"] >= 0.35, rows
