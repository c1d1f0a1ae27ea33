"""cit.py: continual instruction tuning of a large multimodal model (LMM), after He, Guo, Tang, Wang (2023).

    python cit.py --method ewc      # a tiny LLaVA, tuned on seven tiny tasks one after another, on a CPU

Part 1, the paper, reads top to bottom: data, the model, the loop, evaluation and metrics, the methods (EWC and MAS,
TIR, LwF, replay, expanded projection, joint), the entry point. Part 2, after the fence, is support, in the order a
run meets it: flags and checks, models and the tiny base, encodings, checkpoints, scorers, pictures, analyses, torchrun.
"""
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

try:
    import torch
    import torch.nn.functional as F
    from peft import get_peft_model
    from PIL import Image  # part 2 opens the pictures
    from tqdm import tqdm
except ImportError as missing:  # a package of requirements.txt: one line saying so, not a traceback
    raise SystemExit(f"cit.py needs {missing.name or missing}, which is not installed here: "
                     "pip install -r requirements.txt") from None

# ================================================================ PART 1: THE PAPER

# ---------------------------------------------------------------- data: conversations to batches
# A task is {"train": examples, "test": examples, "metric": how its test answers are scored}, read by part 2's
# load_tasks from LLaVA's records, which the real benchmarks ship and tiny_tasks/ copies exactly: {"id", "image",
# "conversations": [{"from": "human", "value": "<image>\nWhat is written?"}, {"from": "gpt", "value": "cat"}, ...]}.
# An example is {"id", "image": a path or None, "history": earlier (question, answer) turns, "question", "answer",
# "references": the answers it is scored against}. Every exchange is trained on; the last one is what a test asks.
def chat(example, answer=True):
    """An example as chat messages, so that each model's own chat template builds the prompt. The image goes first
    in the first turn, where LLaVA's own preprocessing moves <image>."""
    messages = []
    for turn, (question, reply) in enumerate([*example["history"], (example["question"], example["answer"])]):
        image = [{"type": "image"}] if turn == 0 and example["image"] else []
        messages += [{"role": "user", "content": [*image, {"type": "text", "text": question}]},
                     {"role": "assistant", "content": [{"type": "text", "text": reply}]}]
    return messages if answer else messages[:-1]


def prompt(processor, example):
    """The text a question is asked with: the conversation so far in the model's own chat template, then the
    opening of the assistant's turn, where its answer starts."""
    return processor.apply_chat_template(chat(example, answer=False), add_generation_prompt=True)


def prompt_batch(processor, examples, device):
    """Questions to be answered: their prompts with their pictures, padded to one length, on the device."""
    images = open_images(examples)  # part 2's: each example's picture, if it has one
    return processor(images=images, text=[prompt(processor, e) for e in examples], padding=True,
                     return_tensors="pt").to(device)


def encode_example(processor, example):
    """Tokenize the whole conversation with its image; labels are the answers' tokens only (every other token is
    -100), so the loss is on every assistant turn and never on a prompt or an image token. Part 2's training_batch
    keeps each example's encoding for the run and pads a batch of them to one length."""
    text = processor.apply_chat_template(chat(example))
    encoding = dict(processor(images=open_images([example]), text=[text], return_tensors="pt"))  # open_images: part 2's
    tokens = encoding["input_ids"][0]
    encoding["labels"] = torch.full_like(encoding["input_ids"], -100)
    for start, end in answer_spans(processor, example, tokens):  # part 2's: each reply's tokens, in any template
        encoding["labels"][0, start:end] = tokens[start:end]
    return encoding


def answer_positions(batch):
    """Where the logits predict an answer token: the logits at position t predict token t + 1."""
    return batch["labels"][:, 1:] != -100


# ---------------------------------------------------------------- the model: an LMM whose vision encoder is frozen
def load_model(args, device):
    """The base LMM on its device, ready to tune: its vision encoder frozen, as in LLaVA's stage 2 (aligned once with
    the language model, never tuned after). --model tiny is a LLaVA made and pre-trained here (--base align or
    instruct); any other is a transformers image-text-to-text model: how each family loads is part 2's base_model."""
    model, processor = base_model(args, device)  # part 2's
    model.to(device)
    freeze_vision_encoder(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model, processor


def freeze_vision_encoder(model):
    """The vision encoder is never tuned after pre-training (nor Qwen-VL's, but its merger, which is the connector).
    An LMM's parts, vision encoder, connector, language model, are found by what they are (part 2's model_parts)."""
    parts = model_parts(model)  # part 2's
    for name, p in model.named_parameters():
        if name.startswith(parts["vision"] + ".") and name not in parts["connector"]:
            p.requires_grad_(False)


# What trains (--train; the default prepare hook): the connector alone, LoRA plus the connector, or all but vision.
def train_connector(run, model):
    """--train connector: only the connector learns (InstructBLIP's instruction tuning); it is saved whole."""
    connector = set(model_parts(model)["connector"])  # part 2's
    for name, p in model.named_parameters():
        p.requires_grad_(name in connector)
    return model


def add_lora(run, model):
    """--train lora: only the LoRA adapters and the connector train; the shared weights stay as the base had them.
    LoRA goes on every linear layer of the language model; the connector's modules train whole (part 2's
    lora_config). The adapters are in the model's own dtype (peft would make them float32), so a bfloat16 model
    multiplies in bfloat16 throughout."""
    model.requires_grad_(False)
    return get_peft_model(model, lora_config(run.args, model), autocast_adapter_dtype=False)  # part 2's lora_config


def train_all(run, model):
    """--train all: every weight but the vision encoder's."""
    return model


TRAINING = {"connector": train_connector, "lora": add_lora, "all": train_all}


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def snapshot(model):
    """A copy of the trainable weights: what EWC anchors to, LwF distils from, the pair analysis goes back to."""
    return {name: p.detach().clone() for name, p in trainable(model).items()}


@torch.no_grad()
def load_snapshot(model, weights):
    for name, p in trainable(model).items():
        p.copy_(weights[name])


@contextmanager
def weights_in(model, weights):
    """The trainable weights set to a snapshot for a while, then back as they were. Under --shard the whole model's
    own weights are gathered meanwhile (part 2's PROCESSES.whole): the model's parts are called outside a forward."""
    current = snapshot(model)
    load_snapshot(model, weights)
    try:
        with PROCESSES.whole(model):
            yield
    finally:
        load_snapshot(model, current)


@torch.no_grad()
def prototype_features(model, processor, examples, device):
    """What each example looks like to the model, before any answer: its mean image feature (what the vision tower
    and the connector hand the language model) and its instruction's mean token embedding, each of unit length.

    eproj's routing and task similarity (TIR, the pair analysis) are both built on these.
    """
    text = mean_embedding(model, processor, [e["question"] for e in examples], device)
    pictured = [i for i, e in enumerate(examples) if e["image"]]
    if not pictured:  # a text-only instruction has no image feature
        return torch.zeros_like(text), text
    features = image_features(model, processor, [examples[i] for i in pictured], device)  # any family's: part 2
    image = text.new_zeros(len(examples), features.shape[-1])
    image[pictured] = features
    return F.normalize(image, dim=-1), text


@torch.no_grad()
def mean_embedding(model, processor, texts, device):
    """Each text's mean input token embedding, of unit length: the model's own view of an instruction or answer."""
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt").to(device)
    mask = tokens["attention_mask"].unsqueeze(-1)
    mean = (model.get_input_embeddings()(tokens["input_ids"]) * mask).sum(1) / mask.sum(1)
    return F.normalize(mean.float(), dim=-1)


# ---------------------------------------------------------------- the loop: hooks, training, the sequential run
# A continual-learning method is a few hooks around one loop (avalanche's and mammoth's design). Every hook
# has a default that changes nothing, so the loop calls each one and never asks which method it runs:
#   stages(tasks, args) -> [(name, examples, steps)]   what is trained, in order: by default one stage per task
#   prepare(run, model) -> model                       once, before the first stage (default: what --train says)
#   before_task(run, model, examples)                  before a stage is trained
#   mix_batch(run, examples, rng) -> examples          what a training batch holds
#   extra_loss(run, model, batch, logits) -> loss      a term on the batch added to the loss at every step (LwF's)
#   penalty(run, model) -> loss                        a term on the weights alone added at every step (EWC's)
#   after_step(run, model, step)                       after each optimizer step (the pair analysis scores there)
#   after_task(run, model, examples)                   after a stage is trained
#   answer(run, model, examples, task) -> answers      how a task's test questions are answered
#   after_row(run, model, tasks, answer)               after each row of R, the base's too (part 2 keeps the books:
#                                                      the held-in tasks' scores and a checkpoint to resume from)
@dataclass
class Run:
    """What the loop knows of the run it drives; what a method keeps between tasks is its own, in `memory`."""
    args: object  # the flags
    device: str = "cpu"
    processor: object = None  # the model's: its tokenizer, image processor and chat template
    rng: random.Random = None  # the batches' draws
    stage: int = 0  # the stage being trained: its index, and its row of R
    matrix: list = field(default_factory=list)  # R's rows so far
    held_in: dict = field(default_factory=dict)  # tasks the base was tuned on, only scored (part 2: --held-in)
    report: dict = field(default_factory=dict)  # what results.json keeps beside R
    started: float = field(default_factory=time.time)  # the run's clock
    memory: dict = field(default_factory=dict)  # the method's: EWC's importance and anchor, replay's buffer...


def one_stage_per_task(tasks, args):
    return [(name, task["train"], args.steps) for name, task in tasks.items()]


def greedy_answers(run, model, examples, task):
    return generate(model, run.processor, examples, run.args, run.device)


NO_HOOKS = dict(stages=one_stage_per_task, prepare=train_all, before_task=lambda run, model, examples: None,
                mix_batch=lambda run, examples, rng: examples, extra_loss=lambda run, model, batch, logits: 0.0,
                penalty=lambda run, model: 0.0, after_step=lambda run, model, step: None,
                after_task=lambda run, model, examples: None,
                answer=greedy_answers, after_row=lambda run, model, tasks, answer: None)


def method_hooks(args):
    """args.method's hooks over the defaults; with --tir, EWC's importances are the paper's TIR; then part 2's hooks:
    its books after each row of R, and a variant of a method only where its flag is given."""
    hooks = dict(NO_HOOKS, prepare=TRAINING[args.train]) | METHODS[args.method]
    if args.tir and args.method == "ewc":
        hooks |= TIR
    return hooks | support_hooks(args)  # part 2's


def train(model, examples, steps, run, hooks=NO_HOOKS, desc=""):
    """AdamW on the answer-token loss for `steps` batches of --batch-size examples drawn from `examples`; a method
    may change what a batch holds, add a term to the loss and look at the model after each step."""
    optimizer = adamw(trainable(model).values(), run.args.lr, run.device)  # part 2's: float32 masters of bf16 weights
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine(steps))
    shared = TrainingSteps(model, steps, desc)  # part 2's: the progress bar; under torchrun, each process's share
    model.train()
    for step in shared:
        for _ in range(run.args.grad_accum):  # micro-batches whose gradients add up to one batch
            drawn = hooks["mix_batch"](run, shared.draw(examples, run.args.batch_size, run.rng), run.rng)
            batch = training_batch(run.processor, shared.share(drawn), run.device)  # part 2's: kept encodings, padded
            logits, targets = answer_logits(model, batch, shared.forward)
            loss = F.cross_entropy(logits.float(), targets) + hooks["extra_loss"](run, model, batch, logits)
            penalty = shared.whole(hooks["penalty"](run, model))  # part 2's: under --shard, summed over the shards
            # The loss is a mean over this process's share of the batch, weighted so that the processes' average is
            # the whole batch's mean (DDP averages); the penalty is on the weights alone, the same in every process.
            ((loss * shared.weight(batch) + penalty) / run.args.grad_accum).backward()
        shared.check(loss + penalty, step)  # a loss no longer finite ends the run before the optimizer spreads it
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        hooks["after_step"](run, model, step + 1)
    model.eval()


def warmup_then_cosine(steps):
    """LLaVA's schedule as a factor on --lr at each step: 5% linear warm-up, then a cosine to 0. The warm-up starts
    one step above 0 (transformers' starts at 0), so that the first step of every task trains."""
    warmup = steps // 20

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
    return factor


def answer_logits(model, batch, forward=None):
    """The logits that predict the answer tokens, a row per token, and those tokens. The head runs on these positions
    alone where the family lets it: the loss, LwF and MAS read no others, and a head over the whole vocabulary at
    every position is a large share of a step. `forward`: the model called another way (DDP, other weights)."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    answer = answer_positions(batch)
    keep, forward = F.pad(answer, (0, 1)), forward or model  # the last position predicts nothing
    if head_on_positions(model):  # part 2's
        logits = forward(**inputs, logits_to_keep=keep).logits
    else:
        logits = forward(**inputs).logits[keep]
    return logits, batch["labels"][:, 1:][answer]


def start_run(args, device, hooks):
    """A fresh run: the base model, the random generators seeded, the method's prepare hook; no rows yet."""
    run = Run(args, device)
    model, run.processor = load_model(args, device)
    torch.manual_seed(args.seed)  # after loading: building a base on the first run must not shift what follows
    run.rng = random.Random(args.seed)
    return hooks["prepare"](run, model), run


def run_sequence(model, tasks, hooks, run):
    """Train the stages one after another; after each, score every task: row i of the accuracy matrix R. A resumed
    run brings the rows it has (run.matrix) and goes on with the next stage. Returns the stages' names."""
    stages = hooks["stages"](tasks, run.args)
    if not run.matrix:  # the base before any task: what each task scores untrained, for forward transfer
        run.report["zero_shot"] = evaluate_all(
            run, model, tasks, "before any task (the base: the first row of the accuracy matrix R, printed at the end)")
        hooks["after_row"](run, model, tasks, greedy_answers)
    for i, (name, examples, steps) in enumerate(stages[len(run.matrix):], start=len(run.matrix)):
        run.stage = i
        hooks["before_task"](run, model, examples)
        train(model, examples, steps, run, hooks, desc=f"task {i + 1}/{len(stages)}: {name}")
        hooks["after_task"](run, model, examples)
        run.matrix.append(evaluate_all(run, model, tasks, f"after {name} (row {i + 1} of R)", hooks["answer"]))
        hooks["after_row"](run, model, tasks, hooks["answer"])
    return [name for name, _, _ in stages]


# ---------------------------------------------------------------- evaluation and metrics
@torch.no_grad()
def generate(model, processor, examples, args, device):
    """Greedy answers, batched with left padding so every prompt ends where generation starts."""
    processor.tokenizer.padding_side = "left"

    def answer(chunk):
        batch = prompt_batch(processor, chunk, device)
        output = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
        return processor.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in PROCESSES.answered(model, examples, args.eval_batch_size, answer)]  # part 2's: shared


def evaluate_all(run, model, tasks, title, answer=greedy_answers, first=0):
    """Score every task, seen or not, and print a few answers so the forgetting can be seen, not just counted.
    `first`: the index of the first task as the answer hook sees it (held-in tasks come after the continual ones)."""
    model.eval()
    scores = []
    print(f"\n{title}:")
    for j, (name, task) in enumerate(tasks.items(), start=first):
        examples = task["test"]
        predictions = answer(run, model, examples, j)
        scores.append(score(task, predictions))
        print(f"  {name:<12} {scores[-1]:.2f}")
        for example, prediction in list(zip(examples, predictions))[:run.args.show]:
            question = (example["question"].splitlines() or [""])[0]  # a question may be the picture alone
            print(f"      Q: {question}  A: {prediction!r}  (expected {example['answer']!r})")
    return scores


def score(task, predictions):
    """A task's metric over its test examples: exact match and BLEU-4 score the tiny tasks; the real benchmarks'
    own scorers (VQA accuracy, option letters, box IoU, CIDEr...) are in part 2's METRICS, with metric_for, which
    picks one from the shape of a task's answers."""
    return METRICS[task["metric"]](predictions, [e["references"] for e in task["test"]])  # part 2's


def summarize(matrix):
    """Average accuracy, backward transfer and forgetting of an accuracy matrix R (rows: after task i)."""
    final, rows = matrix[-1], len(matrix)
    average = sum(final) / len(final)
    if rows == 1:  # one row (joint): nothing learned earlier to forget
        return {"average": average, "forgetting": None, "bwt": None}
    bwt = sum(final[j] - matrix[j][j] for j in range(rows - 1)) / (rows - 1)
    forgetting = sum(max(matrix[i][j] for i in range(j, rows - 1)) - final[j] for j in range(rows - 1)) / (rows - 1)
    return {"average": average, "forgetting": forgetting, "bwt": bwt}


def forward_transfer(matrix, zero_shot):
    """fwt: how much the tasks before task j help it before it is trained, against the base's untrained score:
    the mean over j > 0 of R[j-1][j] - zero_shot[j] (None with one row, as joint's)."""
    if len(matrix) < 2:
        return None
    return sum(matrix[j - 1][j] - zero_shot[j] for j in range(1, len(matrix))) / (len(matrix) - 1)


# ---------------------------------------------------------------- the methods: regularization (EWC and MAS, TIR, LwF)
def ewc_after_task(run, model, examples):
    """Elastic Weight Consolidation (Kirkpatrick et al., 2017), online (Schwarz et al., 2018); with --importance mas,
    Memory Aware Synapses (Aljundi et al., 2018): the same quadratic penalty, another measure of importance.

    On an LMM: each trainable weight's importance (projector, language model or LoRA) is measured on a sample of
    the task's instruction data and summed over tasks; the weights after the task are the anchor.
    """
    importance, previous = measured_and_anchored(run, model, examples), run.memory.get("importance", {})
    run.memory["importance"] = {name: i + previous.get(name, 0) for name, i in importance.items()}


def measured_and_anchored(run, model, examples):
    """The task's importance of each weight (--importance), and the weights after the task kept as the anchor."""
    importance = IMPORTANCE[run.args.importance](run, model, examples)
    run.memory["anchor"] = snapshot(model)
    return importance


def fisher_importance(run, model, examples):
    """EWC's diagonal Fisher: the mean over examples of each one's squared gradient of its answer-token loss."""
    return per_example_importance(run, model, examples, F.cross_entropy, torch.square)


def mas_importance(run, model, examples):
    """MAS: the mean over examples of the absolute gradient of the squared norm of the output (the logits at the
    answer's positions, averaged over them): how much the output moves with the weight, labels not needed."""
    return per_example_importance(run, model, examples, lambda logits, targets: logits.square().sum(-1).mean(),
                                  torch.abs)


def per_example_importance(run, model, examples, objective, measure):
    """measure(gradient of objective) per trainable weight, averaged over --ewc-samples examples taken one at a time
    (a batch's mean gradient would let the examples' gradients cancel: its square is not the Fisher), then
    normalized to sum 1, so that every task weighs the same whatever its loss's scale, and one --ewc-lambda
    serves Fisher and MAS alike (the paper's TIR normalizes so too)."""
    sample = random.Random(run.args.seed + run.stage).sample(examples, min(run.args.ewc_samples, len(examples)))
    params = trainable(model)
    total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    model.train()
    for example in PROCESSES.share(sample):  # part 2's: under torchrun, each process its share; summed below
        model.zero_grad(set_to_none=True)
        logits, targets = answer_logits(model, training_batch(run.processor, [example], run.device))  # part 2's
        objective(logits.float(), targets).backward()
        for name, p in params.items():
            if p.grad is not None:  # a weight the objective does not reach has no importance
                total[name] += measure(p.grad.detach().float())
    model.zero_grad(set_to_none=True)
    model.eval()
    PROCESSES.sum(total.values())  # part 2's
    scale = sum(t.sum() for t in total.values())
    return {name: t / scale for name, t in total.items()}


IMPORTANCE = {"fisher": fisher_importance, "mas": mas_importance}  # --importance


def ewc_penalty(run, model):
    """lambda/2 * sum Omega (theta - theta_old)^2 over the trainable weights, Omega their importance: zero at the
    anchor, quadratic away from it."""
    if "importance" not in run.memory:
        return 0.0
    importance, anchor = run.memory["importance"], run.memory["anchor"]
    penalty = sum((importance[name] * (p - anchor[name]) ** 2).sum() for name, p in trainable(model).items())
    return run.args.ewc_lambda / 2 * penalty


def tir_before_task(run, model, examples):
    """Task-similarity-informed regularization (TIR), the paper's own (--tir, with --importance fisher or mas):
    before a new task, each weight's importance is relaxed by 1 - the new task's similarity to the task that weight
    mattered most to: what a similar old task learned carries over, so holding it fixed costs plasticity and
    protects little. On an LMM, as the paper: prototypes of images, instructions and answers from the base."""
    memory = run.memory
    if "base" not in memory:  # before the first task trains, the trainable weights are the base's
        memory["base"] = snapshot(model)
    with weights_in(model, memory["base"]):
        new = task_prototype(model, run.processor, examples, run.device, run.args.seed)
    earlier = memory.setdefault("prototypes", [])
    if earlier:
        cosines = {part: torch.stack([p[part] for p in earlier]) @ new[part] for part in new}
        seen = memory.setdefault("cosines_seen", {})
        for part, cosine in cosines.items():
            seen[part] = torch.cat([seen.get(part, cosine[:0]), cosine])
        similarity = informed_similarity(cosines, seen)
        run.report.setdefault("tir_similarity", {})[run.stage] = similarity.tolist()
        memory["importance"] = relax(memory["merged"], memory["owner"], similarity)
    earlier.append(new)


def informed_similarity(cosines, seen):
    """The paper's similarity of a new task to each earlier one: per modality, the cosine of their prototypes
    z-scored over all the task pairs seen so far (these included; 0 while they do not vary) and put through a
    sigmoid; the modalities' values multiplied. Each lies in (0, 1)."""
    similarity = 1.0
    for part, cosine in cosines.items():
        deviation = seen[part].std(correction=0)
        z = (cosine - seen[part].mean()) / deviation if deviation > 0 else torch.zeros_like(cosine)
        similarity = similarity * torch.sigmoid(z)
    return similarity


def tir_after_task(run, model, examples):
    """The task's importance (summing to 1) merged with the earlier tasks' by element-wise maximum, remembering
    which task each weight's maximum came from (its owner); the weights after the task are the anchor."""
    importance, memory = measured_and_anchored(run, model, examples), run.memory
    memory["merged"], memory["owner"] = max_merge(memory.get("merged"), memory.get("owner"), importance, run.stage)
    memory["importance"] = memory["merged"]


def max_merge(merged, owner, importance, task):
    if merged is None:
        return importance, {name: torch.full_like(i, task, dtype=torch.uint8) for name, i in importance.items()}
    return ({name: torch.maximum(merged[name], i) for name, i in importance.items()},
            {name: torch.where(i > merged[name], task, owner[name]) for name, i in importance.items()})


def relax(merged, owner, similarity):
    """Each weight's merged importance times 1 - similarity(new task, its owner). (Written as a sum over the owners,
    not by indexing with them, so that it holds for the shards of a sharded model's weights too.)"""
    kept = (1 - similarity).tolist()
    return {name: m * sum((owner[name] == task) * k for task, k in enumerate(kept)) for name, m in merged.items()}


def task_prototype(model, processor, examples, device, seed):
    """A task's prototype, as the paper's: its mean image feature, mean instruction and mean answer embedding
    over a sample of its examples (the paper takes about a thousand and embeds text with a separate BERT; here
    64 and the model's own input embeddings, so nothing more is downloaded)."""
    sample = prototype_sample(examples, seed)
    image, instruction = prototype_features(model, processor, sample, device)
    answer = mean_embedding(model, processor, [e["answer"] for e in sample], device)
    return {"image": image.mean(0), "instruction": instruction.mean(0), "answer": answer.mean(0)}


def prototype_sample(examples, seed):
    """The 64 training examples (or all, if fewer) that stand for a task in its prototype and its eproj keys."""
    return random.Random(seed).sample(examples, min(64, len(examples)))


TIR = {"before_task": tir_before_task, "after_task": tir_after_task}  # --tir: in place of EWC's own importances


def lwf_before_task(run, model, examples):
    """Learning without Forgetting (Li & Hoiem, 2016): the model before the task teaches the model in it. On an LMM:
    the old model is this network run with the trainable weights it had before the task (torch.func.functional_call),
    so the frozen copy costs only the trainable parameters, not a second LMM."""
    if run.stage > 0:
        run.memory["old"] = snapshot(model)


def lwf_distillation(run, model, batch, logits):
    """KL(old || new) at a temperature between next-token distributions on the new task's answer positions."""
    if "old" not in run.memory:
        return 0.0
    with torch.no_grad():
        old_logits, _ = answer_logits(model, batch, PROCESSES.called_with(model, run.memory["old"]))  # part 2's
    temperature = run.args.lwf_temperature
    new = torch.log_softmax(logits / temperature, dim=-1)
    old = torch.log_softmax(old_logits / temperature, dim=-1)
    kl = F.kl_div(new, old, log_target=True, reduction="batchmean")
    return run.args.lwf_alpha * temperature * temperature * kl


# ---------------------------------------------------------------- the methods: replay
def replay_after_task(run, model, examples):
    """Experience replay (e.g. Chaudhry et al., 2019): keep a few training examples of each finished task
    (--replay-size of them, or --replay-fraction of its training set, as the paper's 1%). On an LMM the buffer holds
    instruction data (image, instruction, answer), as the paper's does; later batches swap a share for buffered ones.
    """
    args = run.args
    size = max(1, round(args.replay_fraction * len(examples))) if args.replay_fraction else args.replay_size
    kept = random.Random(args.seed + run.stage).sample(examples, size)
    run.memory.setdefault("buffer", []).extend(kept)


def replay_mix(run, examples, rng):
    """Swap a fixed share of each batch (--replay-ratio) for examples drawn from the buffer."""
    buffer = run.memory.get("buffer", [])
    k = min(round(len(examples) * run.args.replay_ratio), len(buffer))
    return rng.sample(buffer, k) + examples[k:]


# ---------------------------------------------------------------- the methods: expansion (eproj)
def eproj_prepare(run, model):
    """Expanded projection (EProj), the paper's expansion: each task gets its own copy of what trains, so a later task
    cannot change an earlier one's. On an LMM: by default (--train connector) a copy of the connector (LLaVA's
    projector; BLIP's Q-Former and projection), all else frozen; --train lora: LoRA adapters and a connector copy."""
    model = TRAINING[run.args.train](run, model)
    run.memory["initial"] = snapshot(model)  # the base's connector (and LoRA's B = 0): where every expert starts
    run.report["trainable_per_task"] = sum(p.numel() for p in run.memory["initial"].values())
    run.memory["saved_with_model"] = ["experts", "keys"]  # <out>/model holds the last expert; these are all of them
    return model


def eproj_before_task(run, model, examples):
    """A new expert starts from the base's weights, not from the previous task's."""
    load_snapshot(model, run.memory["initial"])


def eproj_after_task(run, model, examples):
    run.memory.setdefault("experts", []).append(snapshot(model))
    run.memory.setdefault("keys", []).append(eproj_keys(run, model, examples))


@torch.enable_grad()
def eproj_keys(run, model, examples):
    """A task's two keys, an image key and an instruction key, tuned as the paper's: from random, pulled towards
    the features of (a sample of) the task's training examples by a cosine loss. (Its optimum is the direction
    of the features' mean: the keys end as the task's prototype.)"""
    features = routing_features(run, model, prototype_sample(examples, run.args.seed))
    generator = torch.Generator().manual_seed(run.args.seed + run.stage)
    keys = [torch.randn(f.shape[-1], generator=generator).to(f.device).requires_grad_() for f in features]
    optimizer = torch.optim.Adam(keys, lr=0.05)
    for _ in range(200):
        loss = sum((1 - F.cosine_similarity(f, key[None], dim=-1)).mean() for f, key in zip(features, keys))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.stack([F.normalize(key.detach(), dim=0) for key in keys])


def routing_features(run, model, examples):
    """What the router sees: prototype_features of the base model, an image and an instruction feature per example
    (the base's weights are put back for it, so the features come from what never changes and never drift)."""
    with weights_in(model, run.memory["initial"]):
        return prototype_features(model, run.processor, examples, run.device)


def eproj_answer(run, model, examples, task):
    """The task is not given at test time: each question goes to the expert of the seen task whose image and
    instruction keys have the highest summed cosine to its features."""
    keys = torch.stack(run.memory["keys"])  # tasks x (image, instruction) x features
    features = routing_features(run, model, examples)
    routes = sum(f @ keys[:, part].T for part, f in enumerate(features)).argmax(-1).tolist()
    if task <= run.stage:  # how often a seen task's questions reach its own parameters
        routing = run.memory.setdefault("routing", {})
        routing[task] = sum(r == task for r in routes) / len(routes)
        run.report["routing_accuracy"] = sum(routing.values()) / len(routing)
    return answer_with_experts(run, model, examples, routes)


def answer_with_experts(run, model, examples, routes):
    """Each question answered by the expert of the task it was routed to."""
    answers = [""] * len(examples)
    for task in sorted(set(routes)):
        chosen = [i for i, r in enumerate(routes) if r == task]
        with weights_in(model, run.memory["experts"][task]):
            for i, answer in zip(chosen, greedy_answers(run, model, [examples[i] for i in chosen], task)):
                answers[i] = answer
    return answers


# ---------------------------------------------------------------- the bounds: fine-tuning and joint training
def joint_stages(tasks, args):
    """The upper bound: one model trained on all tasks mixed, for the same total number of steps."""
    mixed = [example for task in tasks.values() for example in task["train"]]
    return [("joint", mixed, args.steps * len(tasks))]


METHODS = {
    "finetune": {},
    "ewc": {"after_task": ewc_after_task, "penalty": ewc_penalty},
    "lwf": {"before_task": lwf_before_task, "extra_loss": lwf_distillation},
    "replay": {"after_task": replay_after_task, "mix_batch": replay_mix},
    "eproj": {"prepare": eproj_prepare, "before_task": eproj_before_task, "after_task": eproj_after_task,
              "answer": eproj_answer},
    "joint": {"stages": joint_stages},
}


# ---------------------------------------------------------------- the entry point
def main(argv=None):
    """python cit.py --method ewc: the flags, the tasks, one continual run of the method."""
    args = parse_args(argv)  # part 2's
    with command_line(args):  # part 2's: one-line errors, torchrun's processes, --profile, --rebuild-base
        if args.plan or args.seeds or args.analyze or args.method == "all":
            return other_commands(args)  # part 2's: --plan; several runs: --seeds, --method all, --analyze pairs
        return run_method(args, check_inputs(args))  # part 2's: the tasks, every file and flag checked first


def run_method(args, tasks):
    """One continual run of args.method: the base model, the method's hooks, the tasks in turn; the accuracy matrix
    R and what it says, written to <out>/results.json with the model."""
    if finished := finished_run(args):  # part 2's: --resume of a run that has ended, its results
        return finished
    hooks = method_hooks(args)
    model, run = begin_run(args, hooks, tasks)  # part 2's: start_run, or --resume's checkpoint; the held-in tasks
    rows = run_sequence(model, tasks, hooks, run)
    results = {"method": args.method, "tasks": list(tasks), "rows": rows, "matrix": run.matrix,
               **summarize(run.matrix), "fwt": forward_transfer(run.matrix, run.report["zero_shot"]), **run.report}
    return finish_run(run, model, tasks, results)  # part 2's: <out>/model, results.json and .png; R printed


# ================================================================ PART 2: SUPPORT
# Below the fence: what a real tool needs and the paper does not, in the order a run meets it.

# What part 2 needs beyond part 1's imports.
import argparse
import errno
import fcntl
import hashlib
import inspect
import json
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import sys
import weakref
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from peft import LoraConfig, PeftConfig, PeftModel
from PIL import ImageDraw, ImageFont
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode
from transformers import (AutoConfig, AutoModelForImageTextToText, AutoProcessor, BatchFeature, CLIPImageProcessorPil,
                          CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          PreTrainedTokenizerFast)
from transformers.utils.logging import disable_progress_bar

HERE = Path(__file__).resolve().parent
# Under torchrun, this process's place among the processes (see "several processes", at the end); else 0 of 1.
RANK, WORLD_SIZE = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

# ---------------------------------------------------------------- flags
class InputError(Exception):
    """A problem the user can fix (a flag, a data file, a model name): reported in one line, no traceback."""


def bounded(kind, above=None, at_least=None, at_most=None):
    """An argparse type for a bounded number, so that a bad value is refused where its flag is read."""
    def parse(text):
        value = kind(text)  # the comparisons below are all False for nan, so nan is refused too
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        for ok, bound in [(above is None or value > above, f"above {above}"),
                          (at_least is None or value >= at_least, f"{at_least} or above"),
                          (at_most is None or value <= at_most, f"{at_most} or below")]:
            if not ok:
                raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its 'invalid int value' message
    return parse


def task_names(text):
    names = text.split(",")
    if "" in names or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"each task once, no empty names: got {text}")
    return names


def per_task(accept, problem):
    """An argparse type for TASK=VALUE,... (--metrics, --references): {task: value}, each value accepted."""
    def parse(text):
        values = dict(item.partition("=")[::2] for item in text.split(","))
        wrong = [f"{task}={value}" for task, value in values.items() if not accept(value)]
        if wrong:
            raise argparse.ArgumentTypeError(f"{', '.join(wrong)}: {problem}")
        return values
    return parse


def number_list(text):
    """Comma-separated positive numbers, e.g. --gpu-memory 24,80."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


MAX_SEED = 2 ** 32 - 1  # what every generator a run seeds (Python's, torch's, a method's own) takes


def seed_list(text):
    try:
        seeds = [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated whole numbers, e.g. 0,1,2: got {text}") from None
    if len(set(seeds)) < len(seeds) or min(seeds) < 0 or max(seeds) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"each seed once, from 0 to {MAX_SEED}: got {text}")
    return seeds


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none to show."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineErrors(argparse.ArgumentParser):
    """A bad flag gets one line naming it, like every other input error, instead of the full usage."""
    def error(self, message):
        self.exit(2, f"cit.py: {message} (see --help)\n")


def parse_args(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.jobs > 1 and (args.profile or WORLD_SIZE > 1):
        parser.error("argument --jobs: --profile and torchrun time and share one process; run them with --jobs 1")
    if args.analyze and args.resume:
        parser.error("argument --resume: an analysis has no checkpoints; it starts over with --overwrite")
    args.out = Path(args.out) if args.out else default_out(args)
    if args.method != "all":  # with all, each method gets its own default (several_runs)
        args.train = args.train or default_training(args.model, "finetune" if args.analyze else args.method)
    if args.max_new_tokens is None:
        args.max_new_tokens = 16 if args.model == "tiny" else 64
    return args


def argument_parser():
    parser = OneLineErrors(description=__doc__.splitlines()[0], formatter_class=HelpWithDefaults)
    run = parser.add_argument_group("run")
    run.add_argument("--method", default="finetune", choices=[*METHODS, "all"],
                     help="continual-learning method, or all of them side by side")
    run.add_argument("--out", help="output folder (default runs/<method>; runs/<method>-2, -3, ... where that holds "
                                   "an earlier run)")
    seeding = run.add_mutually_exclusive_group()
    seeding.add_argument("--seed", type=bounded(int, at_least=0, at_most=MAX_SEED), default=0,
                         help="seed for sampling and initialization")
    seeding.add_argument("--seeds", type=seed_list,
                         help="run once per seed (e.g. 0,1,2), each in <out>/seed<k>, and report every metric's mean "
                              "and standard deviation over them in <out>/summary.json, .md and .png")
    run.add_argument("--jobs", type=bounded(int, above=0), default=1,
                     help="with --seeds or --method all: run this many runs at a time, each in a process of its own "
                          "with its share of the CPU threads")
    run.add_argument("--device", help="cuda, mps or cpu (default: the first one available)")
    run.add_argument("--threads", type=bounded(int, above=0),
                     help="CPU threads per run (default: 1 for the tiny model, which a second thread speeds little "
                          "and slows much on a machine shared with other work; else the cores, shared among --jobs)")
    run.add_argument("--show", type=bounded(int, at_least=0), default=1,
                     help="sample answers printed per task after each task")
    run.add_argument("--plan", action="store_true",
                     help="instead of a run: from the model's config alone (no weights), what each method would "
                          "train and how much memory one process needs; writes <out>/plan.json")
    run.add_argument("--gpu-memory", type=number_list, default=[24.0, 40.0, 80.0],
                     help="--plan: say what fits on GPUs of these sizes, in GB")
    run.add_argument("--shard", action="store_true",
                     help="under torchrun: each process keeps 1/N of every weight, gradient and optimizer state "
                          "(FSDP2, as DeepSpeed ZeRO-3), for full tuning of a model that one GPU cannot hold; "
                          "finetune, replay and joint")
    run.add_argument("--nproc", type=bounded(int, above=0), default=1,
                     help="--plan --shard: plan each GPU's memory for this many processes")
    run.add_argument("--analyze", choices=["pairs"],
                     help="instead of a run: fine-tune every pair of tasks (A, then B) and relate the forgetting "
                          "to the tasks' similarity; writes <out>/pairs.json and pairs.png")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last finished task (or start it, if there is none)")
    again.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    run.add_argument("--debug", action="store_true", help="show a traceback for input errors too")
    run.add_argument("--profile", action="store_true",
                     help="at the end, say where the time went and how much of this CPU's or GPU's matmul rate "
                          "training used")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=str(HERE / "tiny_tasks"), help="folder of task folders (LLaVA format)")
    data.add_argument("--tasks", type=task_names, help="comma-separated task names, in training order "
                                      f"(default for the tiny tasks: {','.join(TASK_ORDER)})")
    data.add_argument("--max-train", type=bounded(int, above=0),
                      help="use at most this many training examples per task")
    data.add_argument("--max-test", type=bounded(int, above=0), help="use at most this many test examples per task")
    data.add_argument("--image-root", help="resolve image paths against this folder instead of each task folder")
    data.add_argument("--eval-split", default="test", choices=["test", "val"],
                      help="the file each task is scored on, where it has one (else the other)")
    data.add_argument("--metrics", type=per_task(METRICS.__contains__, f"a metric is one of {', '.join(METRICS)}"),
                      help="how a task is scored, e.g. grounding=iou,imagenet=contains "
                           f"(one of {', '.join(METRICS)}; default: inferred from the task's answers)")
    data.add_argument("--references", type=per_task(os.path.isfile, "no such file"), default={},
                      help="a task's answers from a file of its own, by question id, e.g. "
                           "textvqa=TextVQA_0.5.1_val.json (the official 10 answers per question)")
    data.add_argument("--held-in", type=folder_list,
                      help="task folders scored after every task but never trained: the base's own abilities, as "
                           "InstructBLIP's held-in sets (default for the tiny model: its base's, in tiny_tasks/base; "
                           "'none' for none)")
    data.add_argument("--max-length", type=bounded(int, above=0),
                      help="cut training records to this many tokens (default: the language model's limit)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="tiny", help="'tiny', or a Hugging Face hub id or local folder")
    model.add_argument("--base", default="align", choices=["align", "instruct"],
                       help="tiny model only: start from the alignment base or the instruction-tuned base")
    model.add_argument("--cache", default=str(HERE / "runs" / "cache"),
                       help="where a tiny base built from a changed recipe is kept")
    model.add_argument("--rebuild-base", action="store_true",
                       help="build both tiny bases again from the recipe in cit.py into tiny_tasks/base/models "
                            "(after changing the recipe), then run as usual")
    model.add_argument("--train", choices=list(TRAINING), help="what trains: the connector only (InstructBLIP's "
                       "setting), LoRA on the language model plus the connector, or all but the vision encoder "
                       "(default: lora for real models, all for tiny; eproj: connector)")
    model.add_argument("--lora", dest="train", action="store_const", const="lora", help="short for --train lora")
    model.add_argument("--no-lora", dest="train", action="store_const", const="all", help="short for --train all")
    model.add_argument("--lora-rank", type=bounded(int, above=0), default=8,
                       help="rank of LoRA adapters (--train lora)")
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="the weights' type; bfloat16 and float16 train through float32 master copies "
                            "(float16 without loss scaling: prefer bfloat16); auto: float32 for tiny on any device, "
                            "and for a real model bfloat16 on a GPU that has it, else float32")
    model.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    model.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--steps", type=bounded(int, above=0), default=200, help="training steps per task")
    optim.add_argument("--batch-size", type=bounded(int, above=0), default=16, help="examples per (micro-)batch")
    optim.add_argument("--grad-accum", type=bounded(int, above=0), default=1, help="micro-batches per optimizer step")
    optim.add_argument("--lr", type=bounded(float, above=0), default=2e-4,
                       help="peak AdamW learning rate (LLaVA's LoRA recipe uses 2e-4 too; about 2e-5 for a real "
                            "model tuned whole)")
    optim.add_argument("--eval-batch-size", type=bounded(int, above=0), default=100, help="questions answered at once")
    optim.add_argument("--max-new-tokens", type=bounded(int, above=0),
                       help="longest answer generated (default: 16 for tiny, whose longest answer is 9 tokens; "
                            "64 for real models)")
    cl = parser.add_argument_group("continual-learning methods")
    cl.add_argument("--ewc-lambda", type=bounded(float, at_least=0), default=3e6,
                    help="EWC: weight of the quadratic penalty")
    cl.add_argument("--ewc-samples", type=bounded(int, above=0), default=128,
                    help="EWC: training examples, one at a time, over which a weight's importance is measured")
    cl.add_argument("--importance", choices=list(IMPORTANCE), default="fisher",
                    help="EWC: a weight's importance, the Fisher (EWC) or output sensitivity (MAS)")
    cl.add_argument("--lwf-alpha", type=bounded(float, at_least=0), default=1.0,
                    help="LwF: weight of the distillation term")
    cl.add_argument("--lwf-temperature", type=bounded(float, above=0), default=2.0, help="LwF: softmax temperature")
    cl.add_argument("--replay-size", type=bounded(int, above=0), default=20,
                    help="replay: examples kept per finished task")
    cl.add_argument("--replay-fraction", type=bounded(float, above=0, at_most=1),
                    help="replay: keep this share of each finished task's training set instead (the paper's: 0.01), "
                         "at least one example")
    cl.add_argument("--replay-ratio", type=bounded(float, at_least=0, at_most=1), default=0.25,
                    help="replay: share of each batch from the buffer")
    cl.add_argument("--oracle-task", action="store_true", help="eproj: give the true task instead of routing")
    cl.add_argument("--similarity-init", action="store_true",
                    help="eproj: start a new task's expert from the most similar earlier task's")
    cl.add_argument("--tir", action="store_true",
                    help="ewc: the paper's task-similarity-informed regularization: relax each weight's importance "
                         "by the new task's similarity to the task it mattered most to")
    return parser


def default_out(args):
    """runs/<method> (runs/plan, runs/pairs); when it holds an earlier run, the next free runs/<method>-2, -3, ...,
    so that running a command again, perhaps with other flags, keeps what the last run found (said in a line).
    --resume and --overwrite mean the run there; under torchrun every process must pick the same folder."""
    first = Path("runs") / ("plan" if args.plan else args.analyze or args.method)
    if args.plan or args.resume or args.overwrite or WORLD_SIZE > 1:
        return first
    out, number = first, 1
    while out.exists() and any(p.name != ".lock" for p in out.iterdir()):
        number += 1
        out = first.with_name(f"{first.name}-{number}")
    if out != first:
        print(f"{first} holds an earlier run: this one goes to {out} (--out chooses the folder; --overwrite "
              "replaces; --resume continues)")
    return out


def default_training(model, method):
    """What trains when --train is not given: the paper's connector copies for eproj; else LoRA for a real model
    and all but the vision encoder for the tiny one, which is small enough to tune whole."""
    if method == "eproj":
        return "connector"
    return "all" if model == "tiny" else "lora"


def with_args(args, **changes):
    """A copy of the flags with some changed: one method of --method all, one seed of --seeds."""
    return argparse.Namespace(**{**vars(args), **changes})


# ---------------------------------------------------------------- the command: one-line errors, threads, --out held
@contextmanager
def command_line(args):
    """What the command needs around its runs: one-line input errors, torchrun's processes, --out held for the
    command's life, --profile, and --rebuild-base before anything else."""
    disable_progress_bar()  # transformers' bars for loading and saving weights would bury the task's own
    torch.set_num_threads(threads_per_run(args))
    with errors_in_one_line(args), processes(args), out_held(args.out), profiled(args):
        if args.rebuild_base:
            with main_process_first():
                if RANK == 0:
                    rebuild_bases(args)
        yield


CORES = torch.get_num_threads()  # torch's own default: the machine's cores


def threads_per_run(args):
    """--threads, else one for the tiny model: on 2 cores shared with another run its steps took 30-1,032 ms with two
    threads each (OpenMP's threads spin while they wait for a core) and 36-37 ms with one (README: threads);
    a real model's larger matrices use the cores, shared among the runs of --jobs."""
    return args.threads or (1 if args.model == "tiny" else max(1, CORES // args.jobs))


@contextmanager
def out_held(out):
    """--out, locked for as long as the command runs, so that two runs never write into one folder: a second is
    refused in one line naming the first. Taking it also proves, before any training, that --out can be written."""
    if RANK > 0:  # under torchrun the first process writes, and holds the folder
        yield
        return
    refuse_a_file(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")
    except OSError as error:
        raise InputError(f"--out {out} cannot be written: {error.strerror or error}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise InputError(f"--out {out} is in use by another run ({lock.read().strip() or 'a process'}): wait for "
                             "it to end, or choose another --out") from None
        with disk_full_in_one_line(out / ".lock"):
            lock.truncate(0)
            lock.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
            lock.flush()
        yield


def refuse_a_file(out):
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: results go into a folder")


@contextmanager
def disk_full_in_one_line(where):
    """A full disk while the run writes ends in one line; what was finished before is kept (checkpoints are written
    beside the last one, and progress.json names a checkpoint only once it is whole)."""
    try:
        yield
    except Exception as error:  # safetensors says so in an error of its own, not an OSError
        if getattr(error, "errno", None) != errno.ENOSPC and "No space left on device" not in str(error):
            raise
        raise InputError(f"no space left on the disk while writing {where}: what was finished before is kept; free "
                         "some space and go on with --resume") from None


@contextmanager
def errors_in_one_line(args):
    """An InputError ends the program in one line (a traceback with --debug); Ctrl-C keeps what is finished."""
    try:
        yield
    except InputError as error:
        if args.debug:
            raise
        sys.exit(f"cit.py: {error}" if RANK == 0 else 1)  # under torchrun every process stops; the first says why
    except KeyboardInterrupt:
        kept = ("an analysis keeps nothing to go on from: start it again with --overwrite" if args.analyze else
                f"what was finished is kept in {args.out} (a run goes on with --resume --out {args.out})")
        print(f"\ncit.py: interrupted; {kept}", file=sys.stderr)
        sys.exit(130)


def other_commands(args):
    """What the command does other than one run: --plan, from the model's config alone; or several runs."""
    if args.plan:
        return plan(args)
    return several_runs(args, check_inputs(args))


# ---------------------------------------------------------------- input checks: one line naming the file or flag
# mcq's options and letter answers would make it scored as ScienceQA is (METRICS' "option"), where a caption's
# first word "a" reads as option A; the tiny task asks for the letter, so exact match scores it.
TINY_METRICS = {"mcq": "exact"}


def check_inputs(args):
    """Everything a user can get wrong, checked before any training: the data, the flags that depend on
    it, and earlier results in --out that a run would replace. Returns the tasks, loaded."""
    data_dir = Path(args.data)
    args.tasks = args.tasks or default_task_names(data_dir)
    if not args.tasks:
        raise InputError(f"--data {data_dir}: no task folders in it (folders holding train.json and test.json)")
    for flag in ["metrics", "references"]:
        unknown = [name for name in getattr(args, flag) or {} if name not in args.tasks]
        if unknown:
            raise InputError(f"--{flag} names {', '.join(unknown)}, not among the tasks ({', '.join(args.tasks)})")
    metrics = {**(TINY_METRICS if data_dir.resolve() == HERE / "tiny_tasks" else {}), **(args.metrics or {})}
    tasks = load_tasks(data_dir, args.tasks, args.max_train, args.max_test, args.image_root, args.eval_split,
                       metrics, args.references)
    smallest = min(args.tasks, key=lambda name: len(tasks[name]["train"]))
    too_many = not args.replay_fraction and args.replay_size > len(tasks[smallest]["train"])
    if args.method in ["replay", "all"] and too_many:
        raise InputError(f"--replay-size {args.replay_size} is more than the {len(tasks[smallest]['train'])} "
                         f"training examples of task {smallest!r}")
    for flag, method in {"tir": "ewc", **{flag: method for flag, (method, _) in VARIANTS.items()}}.items():
        if getattr(args, flag) and not args.analyze and args.method not in [method, "all"]:
            raise InputError(f"--{flag.replace('_', '-')} is a variant of {method}: use it with --method {method} "
                             "or all")
    if args.held_in is None:  # the tiny base's own: those of its mixes that have a test split
        mixes = BASE_MIXES[args.base] if args.model == "tiny" else []
        args.held_in = [str(TINY_MIXES / mix) for mix in mixes if split_file(TINY_MIXES / mix, "test").is_file()]
    held_in_tasks(args)  # read now, so that bad held-in data is found before training
    args.identity = run_identity(args)  # kept with the flags: what --resume compares the data by
    check_images(tasks)
    for name, task in tasks.items():
        not_a_box = next((r for e in task["test"] for r in e["references"] if not parsed_box(r)), None)
        if task["metric"] == "iou" and not_a_box is not None:
            raise InputError(f"task {name} is scored by iou, but its answer {not_a_box!r} is not a box [x1, y1, x2, y2]")
    if args.analyze and len(args.tasks) < 2:
        raise InputError(f"--analyze pairs trains every pair of tasks: it needs two or more, got {args.tasks[0]}")
    runs = [args.out / f"seed{seed}" for seed in args.seeds] if args.seeds else [args.out]
    outs = [run / method for run in runs for method in METHODS] if args.method == "all" else runs
    for out in outs:
        refuse_a_file(out)
        earlier = [out / f for f in ["results.json", "progress.json", "pairs.json"]]
        if not (args.resume or args.overwrite) and any(f.exists() for f in earlier):
            go_on = "" if args.analyze else "add --resume to continue it, "  # an analysis keeps no checkpoints
            raise InputError(f"--out {out} holds an earlier run: {go_on}--overwrite to replace it, or choose "
                             "another --out")
    if args.overwrite and RANK == 0:  # an interrupted replacement must not leave anything of the run it replaces
        for out in outs:
            remove_checkpoints(out)
            shutil.rmtree(out / "model", ignore_errors=True)
        # a run's results and pictures, and the summaries that --seeds and --method all write in the folders above
        for folder in {args.out, *runs, *outs}:
            for name in ["results", "progress", "pairs", "summary"]:
                for kind in ["json", "md", "png"]:
                    (folder / f"{name}.{kind}").unlink(missing_ok=True)
    return tasks


def check_images(tasks):
    """Every picture the run will read opens as an image, so that a broken file in the last task's data is found
    before the first task trains: a PNG's every chunk is read and checked (no pixel decoded); any other picture is
    decoded, since a JPEG cut short (COCO's, GQA's, TextVQA's are JPEG) has a header as good as a whole one's
    (about 3.5 ms for a 640 x 480 JPEG here, about 7 minutes for COCO's 118 K train images)."""
    for path in sorted({e["image"] for task in tasks.values() for split in ["train", "test"] for e in task[split]
                        if e["image"]}):
        with readable_image(path) as image:
            image.verify() if image.format == "PNG" else image.load()


@contextmanager
def readable_image(path):
    """A picture opened by Pillow, or one line naming it where it does not read; Pillow's decompression-bomb limit
    stays on, so an absurdly large image is refused."""
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"{path}: not a readable image ({error})") from None


def folder_list(text):
    return [] if text == "none" else [folder for folder in text.split(",") if folder]


def held_in_tasks(args):
    """--held-in's tasks, their scored split only, images found in each task's own folder."""
    tasks = {}
    for folder in map(Path, args.held_in):
        if not folder.is_dir():
            raise InputError(f"--held-in: no task folder {folder}")
        if folder.name in tasks:
            raise InputError(f"--held-in names two tasks {folder.name!r}")
        test = load_split(folder.parent, folder.name, scored_split(folder, args.eval_split))
        tasks[folder.name] = {"test": test[:args.max_test], "metric": metric_for(test)}
    return tasks


# The seven tiny tasks of tiny_tasks/ in their default order: captioning first, as in the paper, multiple choice last.
TASK_ORDER = ["caption", "ocr", "classify", "vqa", "count", "grounding", "mcq"]


def default_task_names(data_dir):
    if not data_dir.is_dir():
        raise InputError(f"--data {data_dir}: no such folder")
    names = sorted(p.name for p in data_dir.iterdir() if split_file(p, "train").is_file())
    return [n for n in TASK_ORDER if n in names] + [n for n in names if n not in TASK_ORDER]


def check_task_folders(data_dir, names):
    for name in names:
        if not (data_dir / name).is_dir():
            raise InputError(f"--tasks: no task folder {name!r} in {data_dir} "
                             f"(there: {', '.join(default_task_names(data_dir)) or 'none'})")


def load_tasks(data_dir, names, max_train=None, max_test=None, image_root=None, eval_split="test", metrics=None,
               references=None):
    """{task: {"train": examples, "test": examples, "metric": how test is scored}}, in training order (part 1 says
    what an example is). The scored split is test.json (--eval-split val: val.json), or the other where a task has
    only that; the metric is inferred from the answers where --metrics does not name it."""
    check_task_folders(data_dir, names)
    tasks = {}
    for name in names:
        test = load_split(data_dir, name, scored_split(data_dir / name, eval_split), image_root)[:max_test]
        if name in (references or {}):  # answers kept apart from the questions, as TextVQA's official 10
            take_references(test, references[name])
        tasks[name] = {"train": load_split(data_dir, name, "train", image_root)[:max_train], "test": test,
                       "metric": (metrics or {}).get(name) or metric_for(test)}
    return tasks


def load_split(data_dir, name, split, image_root=None):
    """One split of a task folder: LLaVA conversation records, or the benchmarks' flat evaluation records.

    Images resolve against the task folder, or --image-root when the benchmark keeps them in one place.
    """
    path = split_file(data_dir / name, split)
    image_dir, allowed = (Path(image_root), Path(image_root)) if image_root else (data_dir / name, data_dir)
    examples = []
    for index, record in enumerate(read_records(path)):
        conversation = isinstance(record, dict) and "conversations" in record
        examples.append((conversation_example if conversation else flat_example)(record, f"{path}: record {index}",
                                                                         image_dir, allowed))
    return examples


def split_file(folder, split):
    """<split>.json (a JSON list of records) or, where that is absent, <split>.jsonl (one record per line)."""
    lines = folder / f"{split}.jsonl"
    return lines if lines.is_file() and not (folder / f"{split}.json").is_file() else folder / f"{split}.json"


def scored_split(folder, eval_split):
    """--eval-split (test or val) where the task has that file, else the other one: with --eval-split val, CoIN
    is scored as it scores itself, on val for TextVQA, VizWiz and VQAv2 and on test for the other tasks."""
    other = {"test": "val", "val": "test"}[eval_split]
    return other if not split_file(folder, eval_split).is_file() and split_file(folder, other).is_file() else eval_split


def read_records(path):
    """A task file's records, or an InputError naming the file (and line and column) and the problem."""
    if not path.is_file():
        raise InputError(f"{path}: missing (a task folder holds train.json and test.json, or .jsonl)")
    records = read_json(path)
    if not isinstance(records, list) or not records:
        raise InputError(f"{path}: expected a non-empty list of records")
    return records


def read_json(path):
    """A .json file's document, or a .jsonl file's lines as a list (LLaVA's evaluation question files);
    what does not parse ends in an InputError naming the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    jsonl = path.suffix == ".jsonl"
    documents = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()] if jsonl else [(1, text)]
    parsed = []
    for first_line, document in documents:
        try:
            parsed.append(json.loads(document))
        except RecursionError:
            raise InputError(f"{path}:{first_line}: nested too deeply to be a task file") from None
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{first_line + error.lineno - 1}:{error.colno}: not valid JSON: "
                             f"{error.msg}") from None
    return parsed if jsonl else parsed[0]


def with_record_id(record, where):
    """Where a record is, with its id (LLaVA's 'id' or the benchmarks' 'question_id') from here on."""
    if not isinstance(record, dict):
        raise InputError(f"{where} is not a JSON object")
    key = next((key for key in ["id", "question_id"] if key in record), None)
    return f"{where} ({key.replace('_', ' ')} {record[key]})" if key else where


def check_record(record, where):
    """That a conversation alternates human and gpt turns with text, from a question to a non-empty answer."""
    where = with_record_id(record, where)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, dict) for turn in turns):
        raise InputError(f"{where} has no 'conversations' list")
    roles = ["human" if i % 2 == 0 else "gpt" for i in range(len(turns))]
    if (len(turns) % 2 or [t.get("from") for t in turns] != roles
            or not all(isinstance(t.get("value"), str) for t in turns)):
        raise InputError(f"{where} needs a 'human' and a 'gpt' turn with a 'value', alternating, 'gpt' last")
    if not all(t["value"].strip() for t in turns[1::2]):
        raise InputError(f"{where} has an empty 'gpt' answer")
    if any("<image>" in t["value"] for t in turns[1::2]):
        raise InputError(f"{where} has '<image>' in a 'gpt' answer: the picture belongs to a 'human' turn")
    return where


def conversation_example(record, where, image_dir, allowed):
    """A LLaVA record: {"image"?, "conversations": [{"from": "human", "value"}, {"from": "gpt", "value"}, ...]}, as
    part 1's example. <image> may stand anywhere in a question: part 1's chat puts the picture first."""
    where = check_record(record, where)  # and names the record by its id from here on
    turns = record["conversations"]
    exchanges = [(without_image_tag(asked["value"]), said["value"].strip())
                 for asked, said in zip(turns[::2], turns[1::2])]
    (question, answer), history = exchanges[-1], exchanges[:-1]
    return {"id": record.get("id"), "image": image_path(record, where, image_dir, allowed), "history": history,
            "question": question, "answer": answer, "references": [answer]}


def without_image_tag(question):
    return question.replace("<image>", "").strip()


def flat_example(record, where, image_dir, allowed):
    """A benchmark's evaluation record, as CoIN and UCIT release their test files: {"question_id", "image"?,
    "text": the question, and "answer", "answers" (several human answers, as strings or {"answer": ...}) or
    "answer_bbox" ("[x1, y1, x2, y2]" on a 0-1 scale)}. Trained on, its answer is its most common reference."""
    where = with_record_id(record, where)
    references = flat_references(record)
    if not isinstance(record.get("text"), str) or references is None:
        raise InputError(f"{where} has neither 'conversations' nor a 'text' question with an 'answer', 'answers' "
                         "or 'answer_bbox'")
    if not references or not all(references):
        raise InputError(f"{where} has an empty answer")
    return {"id": record.get("question_id", record.get("id")), "image": image_path(record, where, image_dir, allowed),
            "history": [], "question": without_image_tag(record["text"]),
            "answer": Counter(references).most_common(1)[0][0], "references": references}


def flat_references(record):
    """The answers a flat record is scored against, as stripped strings; None where it has no answer field."""
    if "answer_bbox" in record:
        bbox = record["answer_bbox"]
        return [bbox.strip() if isinstance(bbox, str) else json.dumps(bbox)]
    answers = record.get("answers", record.get("answer"))
    if answers is None or isinstance(answers, dict):
        return None
    answers = answers if isinstance(answers, list) else [answers]
    answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
    return ["" if a is None else str(a).strip() for a in answers]  # a null answer is an empty one


def take_references(examples, path):
    """--references TASK=FILE: each test question's answers from FILE. FILE is a list of records {"question_id",
    "answers": [...]} (.json or .jsonl), or holds one under "data" (TextVQA's official annotation) or
    "annotations" (VQAv2's, answers as {"answer": ...}); or it is a COCO caption file (UCIT's), whose
    {"image_id", "caption"} records number the test questions 1, 2, ... in file order, as MCITlib scores them."""
    records = read_json(Path(path))
    records = records.get("data", records.get("annotations")) if isinstance(records, dict) else records
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InputError(f"--references {path}: expected records with 'question_id' and 'answers'")
    captions = all("caption" in r and "image_id" in r for r in records)
    answers = {}
    for r in records:
        if captions:
            answers.setdefault(str(r["image_id"]), []).append(str(r["caption"]).strip())
        else:
            answers[str(r.get("question_id"))] = flat_references(r)
    for position, example in enumerate(examples, 1):
        key = str(position if captions else example["id"])
        if not answers.get(key):
            raise InputError(f"--references {path}: no answers for question {'number' if captions else 'id'} {key}")
        example["references"] = answers[key]


def image_path(record, where, image_dir, allowed):
    """The record's image as an absolute path, if it exists and lies inside `allowed` (--data or --image-root);
    None for a record without one (a text-only instruction).

    A lexical check (no symlinks followed): a data file may not point at any file on the machine
    ('../../.ssh/id_rsa', '/etc/passwd'), while folders the user links in stay usable.
    """
    if record.get("image") is None:
        return None
    if not isinstance(record["image"], str):
        raise InputError(f"{where}: 'image' should be one path, not {record['image']!r}")
    image = os.path.abspath(image_dir / record["image"])
    if not Path(image).is_relative_to(os.path.abspath(allowed)):
        raise InputError(f"{where}: image {record['image']!r} is outside {allowed}: refused")
    if not os.path.isfile(image):
        raise InputError(f"{where}: image {image} not found")
    return image


# ---------------------------------------------------------------- model families: their parts, prompts and pictures
# load_model's plumbing: any transformers family from the hub or a folder (or the tiny LLaVA, below), its parts
# found by what they are, its prompts, its image features. A new family is supported here, and here only.
def pick_device(requested=None):
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise InputError(f"--device {requested}: not a device name torch knows (cuda, cuda:1, mps, cpu)") from None
        if device.type not in ["cuda", "mps", "cpu"]:
            raise InputError(f"--device {requested}: cit.py trains on cuda, mps or cpu")
        if device.type == "cuda" and not torch.cuda.is_available() or device.type == "mps" and not (
                torch.backends.mps.is_available()):
            raise InputError(f"--device {requested}: not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(args, device):
    """--dtype auto: float32 for the tiny model on every device, so that a GPU teaches the lessons a CPU does (in
    bfloat16 the tiny run learned less: caption 0.45 against 0.53 on an H200); a real model in bfloat16 on a GPU
    that has it (its trained weights updated through float32 copies: adamw), else float32."""
    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    if args.model == "tiny" or torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32


def base_model(args, device):
    """The model load_model starts from, at --dtype: the tiny base, or any image-text-to-text model of transformers;
    prompts its model card's way where its processor has no chat template; --max-length as the tokenizer's limit."""
    dtype = pick_dtype(args, device)
    if args.model == "tiny":
        model, processor = tiny_base(args.base, args, device)
        model.to(dtype)
    else:
        model, processor = load_pretrained(args.model, args, dtype)
    if processor.chat_template is None:
        processor.chat_template = CARD_TEMPLATES.get(model.config.model_type) or llava_template(processor)
    refuse_encoder_decoder(model, args.model)
    mend_blip_image_token(processor)
    # Training records longer than this are cut (--max-length; by default the language model's own limit).
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    processor.tokenizer.model_max_length = args.max_length or min(processor.tokenizer.model_max_length,
                                                                  limit or math.inf)
    return model, processor


def refuse_encoder_decoder(model, name):
    if getattr(model.config.get_text_config(), "is_encoder_decoder", False):  # Flan-T5 BLIP-2s, Florence-2
        raise InputError(f"--model {name}: its language model is an encoder-decoder; cit.py tunes decoder-only "
                         "ones (its labels, masks and generation read one sequence)")


def load_pretrained(name, args, dtype):
    """Any image-text-to-text model of transformers, from the hub or a folder, through the generic classes.

    A folder that a run saved with LoRA holds an adapter: it is loaded onto the base it names and merged.
    """
    with model_loading_errors(name):
        if (Path(name) / "adapter_config.json").is_file():
            model, _ = load_pretrained(PeftConfig.from_pretrained(name).base_model_name_or_path, args, dtype)
            return PeftModel.from_pretrained(model, name).merge_and_unload(), AutoProcessor.from_pretrained(name)
        remote = args.trust_remote_code
        return (AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, trust_remote_code=remote),
                AutoProcessor.from_pretrained(name, trust_remote_code=remote))


@contextmanager
def model_loading_errors(name):
    """A model that cannot be found or is not an image-text-to-text model ends in one line saying which."""
    folder = Path(name)
    if folder.is_dir() and not any((folder / f).is_file() for f in ["config.json", "adapter_config.json"]):
        raise InputError(f"--model {name}: the folder has no config.json, so it is not a Hugging Face model folder")
    try:
        yield
    except OSError as error:
        first_line = str(error).strip().splitlines()[0]
        raise InputError(f"cannot load --model {name}: tried a local folder and the Hugging Face hub "
                         f"({first_line}). Check the name, or download it while online and pass its folder.") from None
    except ValueError as error:
        first_line = str(error).strip().splitlines()[0]
        raise InputError(f"--model {name} is not an image-text-to-text model that transformers can load: "
                         f"{first_line}") from None
    except ImportError as error:  # Qwen-VL, SmolVLM, LLaVA-OneVision and InternVL processors need torchvision, ...
        said = re.split(r"(?<=\.)\s", str(error).strip().splitlines()[0])[0]
        advice = next((how for package, how in INSTALL_ADVICE.items() if package in said.lower()),
                      "install it and run again")
        raise InputError(f"--model {name} needs a package that requirements.txt leaves out ({said}): "
                         f"{advice}") from None


# What to install for a family's extra packages.
INSTALL_ADVICE = {"torchvision": "pip install torchvision, the release built for your torch (the README's family "
                                 "table names a tested pair: torch==2.14.1 torchvision==0.29.1)",
                  "num2words": "pip install num2words"}


def mend_blip_image_token(processor):
    """transformers 5.23's BLIP-2 and InstructBLIP processors read their image token's .content, as if it were always
    the AddedToken they make when the tokenizer names none; a tokenizer that names one (image_token in its config)
    would end every call in an AttributeError. They get the AddedToken they expect."""
    if hasattr(processor, "num_query_tokens") and isinstance(getattr(processor, "image_token", None), str):
        processor.image_token = AddedToken(processor.image_token, normalized=False, special=True)


# A family whose processor has no chat template gets prompts as its model card writes them: BLIP-2 "Question: ...
# Answer:", InstructBLIP the bare instruction (their processors put the query tokens in front), PaliGemma the
# prompt after its image (its processor adds <bos> after the image and "\n" after the prompt, and joins the answer
# itself). Any other family without one gets LLaVA-1.5's (llava_template). (transformers renders templates with
# trim_blocks, which drops a newline written right after a tag: hence {{ '\n' }}.)
TURN_TEXT = "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"


CARD_TEMPLATES = {
    "blip-2": "{% for m in messages %}{% if m['role'] == 'user' %}{% if not loop.first %} {% endif %}Question: "
              + TURN_TEXT + " Answer:{% else %} " + TURN_TEXT + "{{ eos_token }}{% endif %}{% endfor %}",
    "instructblip": "{% for m in messages %}{% if m['role'] == 'user' %}{% if not loop.first %} {% endif %}"
                    + TURN_TEXT + "{% else %} " + TURN_TEXT + "{{ eos_token }}{% endif %}{% endfor %}",
    "paligemma": "{% for m in messages %}{% if m['role'] == 'user' %}{% if loop.first %}{% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}" + TURN_TEXT
                 + "{% else %}{{ '\\n' }}" + TURN_TEXT + "{{ '\\n' }}{% endif %}{% endfor %}",
}


def llava_template(processor):
    """LLaVA-1.5's prompt, for a family without a template of its own: with its processor's image token and its
    tokenizer's end token in place of LLaVA's <image> and </s>."""
    image = str(getattr(processor, "image_token", None) or "<image>")
    return TINY_CHAT_TEMPLATE.replace("<image>", image).replace("</s>", "{{ eos_token }}")


def model_parts(model):
    """An LMM's parts, found by what they are, whatever a family calls them: the vision encoder and the language
    model are what transformers' get_encoder("image") and get_decoder() give; the connector is every weight outside
    both and the output head (a projector, a Q-Former with its query tokens, an image-newline vector), or, where a
    family keeps it inside the vision encoder, what has weights after that encoder's stack of layers (Qwen-VL's
    merger; Qwen3-VL's DeepStack mergers too, which feed image features into the language model's early layers).
    Returns module names: "vision", "language", "head", and "connector" (names of its parameters)."""
    names = {id(module): name for name, module in model.named_modules()}
    vision, language, head = model.get_encoder("image"), model.get_decoder(), model.get_output_embeddings()
    if vision is model and language is not model and head is not None:
        raise InputError(f"{type(model).__name__} has no separate vision encoder (as Fuyu, whose language model reads "
                         "the image patches itself): cit.py freezes one and takes the image features from it")
    missing = [part for part, module in [("vision encoder", vision), ("language model", language)] if module is model]
    if missing or head is None:
        raise InputError(f"{type(model).__name__} has no {' or '.join(missing) or 'output head'} that transformers "
                         "can point to: is it an image-text-to-text model?")
    if not hasattr(model, "get_image_features"):
        raise InputError(f"{type(model).__name__} gives no image features as tokens for its language model (Llama 3.2 "
                         "Vision reads them through cross-attention layers): cit.py's connector, eproj's routing, "
                         "TIR and the pair study work on those tokens")
    parts = {"vision": names[id(vision)], "language": names[id(language)], "head": names[id(head)]}
    connector = [n for n, _ in model.named_parameters() if not any(in_module(n, parts[p]) for p in parts)]
    if not connector:  # inside the vision encoder: what has weights after its stack of layers (its longest list)
        children = list(vision.named_children())
        stack = max((i for i, (_, module) in enumerate(children) if isinstance(module, torch.nn.ModuleList)),
                    key=lambda i: len(children[i][1]))
        after = [f"{parts['vision']}.{child}" for child, module in children[stack + 1:]
                 if any(True for _ in module.parameters())]
        connector = [n for n, _ in model.named_parameters() if any(in_module(n, module) for module in after)]
    return parts | {"connector": connector}


def in_module(name, module):
    return name == module or name.startswith(module + ".")


def unwrapped(model):
    """Under peft, the model it wraps; else the model."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def lora_config(args, model):
    """LoRA on every linear layer of the language model (its attention and MLP projections, whatever their names);
    the connector's modules train fully (peft keeps a trainable copy of each). Bare connector weights that are no
    module's own (BLIP's query tokens, LLaVA-NeXT's image newline) stay as pre-trained: peft copies modules only."""
    parts = model_parts(model)
    head = model.get_output_embeddings()
    linear = {name: module for name, module in model.named_modules() if in_module(name, parts["language"])
              and isinstance(module, torch.nn.Linear) and module is not head}
    narrowest = min(min(module.in_features, module.out_features) for module in linear.values())
    if args.lora_rank > narrowest:
        raise InputError(f"--lora-rank {args.lora_rank} is more than the {narrowest} features of the narrowest "
                         "layer it adapts")
    projections = sorted({name.rsplit(".", 1)[-1] for name in linear})
    return LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                      target_modules=rf"{re.escape(parts['language'])}\..*\.({'|'.join(projections)})",
                      modules_to_save=whole_modules(model, parts["connector"]))


def whole_modules(model, parameters):
    """The largest modules that hold nothing but these parameters: what peft can keep a trainable copy of."""
    chosen = set(parameters)

    def whole(module):  # peft copies a module, not a list of them (Qwen3-VL's DeepStack mergers): their items
        return not isinstance(model.get_submodule(module), torch.nn.ModuleList) and all(
            f"{module}.{name}" in chosen for name, _ in model.get_submodule(module).named_parameters())
    owners = set()
    for name in parameters:  # its enclosing modules, outermost first; a bare weight's may hold other things too
        enclosing = [name.rsplit(".", k)[0] for k in range(name.count("."), 0, -1)]
        owners.update(next(([module] for module in enclosing if whole(module)), []))
    return sorted(owners)


def image_features(model, processor, examples, device):
    """Each example's mean image feature, as the connector hands it to the language model, for any family: the
    processor's whole output for the prompts, of which get_image_features takes what it needs (InstructBLIP's
    Q-Former reads the instruction too). The families return features per image, per tile or as one batch, but
    always one per image token, in order: so each prompt's image tokens say which are its own."""
    batch = prompt_batch(processor, examples, device)
    wanted = inspect.signature(model.get_image_features).parameters
    output = model.get_image_features(**{key: value for key, value in batch.items() if key in wanted})
    features = torch.cat([f.reshape(-1, f.shape[-1]) for f in output.pooler_output]).float()
    per_image = features.split((batch["input_ids"] == image_token_id(model)).sum(1).tolist())
    return torch.stack([f.mean(0) for f in per_image])


def image_token_id(model):
    """The token that stands for image features in a prompt (configs name it image_token_id or image_token_index)."""
    token = getattr(model.config, "image_token_id", None)
    return model.config.image_token_index if token is None else token  # 0 is a token too


def head_on_positions(model):
    """Whether the family computes logits only at chosen positions (transformers' logits_to_keep; not BLIP-2's)."""
    return "logits_to_keep" in inspect.signature(unwrapped(model).forward).parameters


def open_images(examples):
    """The pictures of a batch, one list per example (empty without one), as every family's processor takes them, in
    RGB; None for a batch with no picture at all."""
    def rgb(path):
        with readable_image(path) as image:
            return image.convert("RGB")
    images = [[rgb(e["image"])] if e["image"] else [] for e in examples]
    return images if any(images) else None


def check_for_model(model, processor, tasks, args):
    """What only the loaded model can tell, said in one line before any training. With --max-length, every training
    record is encoded now (encodings are kept for the run anyway): a cut into an image's tokens is refused here, not
    when a batch first draws the record, and records_cut counts them all. And text-only examples where they cannot
    be taken, naming the task: a model whose forward requires pixels (BLIP-2 and InstructBLIP put their query tokens
    before every prompt), or a run where only the connector trains (--train connector, eproj's default), which a
    text-only batch never reaches."""
    if args.max_length:
        for task in tasks.values():
            for example in task["train"]:
                kept_encoding(processor, example)
    model = unwrapped(model)
    needs = inspect.signature(model.forward).parameters["pixel_values"].default is inspect.Parameter.empty
    if not needs and args.train != "connector":
        return
    for name, task in tasks.items():
        bare = [e for e in task["train"] + (task["test"] if needs else []) if not e["image"]]
        if bare:
            who = f"{type(model).__name__} needs" if needs else "--train connector (eproj's default) needs"
            raise InputError(f"{who} a picture in every example; task {name} has {len(bare)} without one, as "
                             f"{bare[0]['question'][:60]!r}")


# ---------------------------------------------------------------- the tiny base: a LLaVA made here and its recipe
# The tiny LMM: a CLIP vision tower (32x32 images, 8x8 patches: 16 image tokens), a two-layer MLP
# projector and a Llama language model, with a byte-level tokenizer made here.
TINY_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   image_size=32, patch_size=8)


TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256)


TINY_VOCAB_SIZE = 1024


# How the tiny bases are made: LLaVA's stage 1 (alignment on captions, every weight trains because nothing is
# pre-trained here), beside the text-only instructions a real base's language model was tuned on before it saw a
# picture (Vicuna's, FlanT5's): without them the tiny language model knows one instruction, and a task tuned into it
# is mostly lost to the next (README: how the tiny world was decided). Then for "instruct" joint multi-task
# instruction tuning on a broad mix (InstructBLIP's held-in sets in miniature) that keeps both, as LLaVA-1.5's and
# InstructBLIP's mixes do. The base has its own seed: every run, whatever its --seed, starts from the same base,
# as runs of a real LMM do.
TINY_BASE = dict(align_steps=2400, instruct_steps=1200, batch_size=32, lr=1e-3, seed=0)


TINY_MIXES = HERE / "tiny_tasks" / "base"  # a folder per task of the bases' mixes; those with a test split are held-in


BASE_MIXES = {"align": ["describe", "language"],
              "instruct": ["describe", "language", "exists", "color", "shape_options", "background", "size", "side",
                           "how_many", "side_color", "two_colors"]}


# The two bases ship with the project (4 MB each), so every machine starts from the same weights; a base is built
# again only when the recipe above changes (into --cache) or on request (--rebuild-base, into this folder).
SHIPPED_BASES = HERE / "tiny_tasks" / "base" / "models"


# LLaVA-1.5's conversation format, written as a chat template so that the tiny model and real models
# build prompts through the same call: processor.apply_chat_template.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tiny_base(flavour, args, device):
    """The tiny base, as real continual tuning starts from LLaVA or InstructBLIP, in the Hugging Face layout:
    the one shipped in tiny_tasks/base/models, or, if the recipe has changed since, one built from it once.
    "instruct" goes on from "align": each stage up to the one asked for is found or built in turn."""
    start = None
    for stage in ["align", "instruct"][:1 + (flavour == "instruct")]:
        folder = base_folder(stage, args)
        with main_process_first():  # under torchrun one process builds it, the others wait and read it
            if not (folder / "config.json").is_file():
                print(f"the {stage} base in {SHIPPED_BASES} was made by another recipe: building one, kept in {folder}")
                save_whole(*build_base(stage, start, args, device), folder, base_recipe(stage))
        start = folder
    return LlavaForConditionalGeneration.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def base_folder(flavour, args):
    """The shipped base if this recipe made it; otherwise one built from the recipe, kept in --cache by its key."""
    key = base_recipe(flavour)["key"]
    shipped = SHIPPED_BASES / flavour
    made_by = json.loads((shipped / "recipe.json").read_text())["key"] if (shipped / "recipe.json").is_file() else None
    return shipped if made_by == key else Path(args.cache) / f"base-{flavour}-{key}"


def base_recipe(flavour):
    """Everything that shapes a tiny base (the model's shape, the tokenizer's text, the stages and their data),
    and a key of it: a base is only used by a recipe whose key it carries."""
    stages = ["align"] if flavour == "align" else ["align", "instruct"]
    recipe = {"vision": TINY_VISION, "text": TINY_TEXT, "vocab_size": TINY_VOCAB_SIZE, "stages": TINY_BASE,
              "mixes": {stage: BASE_MIXES[stage] for stage in stages}, "chat_template": TINY_CHAT_TEMPLATE,
              "tokenizer_text": hashlib.sha256("\n".join(tiny_corpus()).encode()).hexdigest(),
              "data": {mix: files_digest(TINY_MIXES / mix) for mix in BASE_MIXES[flavour]}}
    return {"key": hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12], "recipe": recipe}


def files_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def rebuild_bases(args):
    """--rebuild-base: both tiny bases again from the recipe, into tiny_tasks/base/models, which ships them.

    A maintainer's step after changing the recipe; a test fails until the shipped bases match it again."""
    device = pick_device(args.device)
    for flavour, start in [("align", None), ("instruct", SHIPPED_BASES / "align")]:
        save_whole(*build_base(flavour, start, args, device), SHIPPED_BASES / flavour, base_recipe(flavour))


def build_base(flavour, start, args, device):
    """LLaVA's stages in miniature: "align" is stage 1 (captions, every weight trains, since nothing here is
    pre-trained); "instruct" goes on from the align base in folder `start` with joint multi-task instruction
    tuning, the vision encoder frozen."""
    if flavour == "align":
        torch.manual_seed(TINY_BASE["seed"])
        model, processor = tiny_model_and_processor(tiny_tokenizer(tiny_corpus()))
    else:
        model, processor = LlavaForConditionalGeneration.from_pretrained(start), AutoProcessor.from_pretrained(start)
        freeze_vision_encoder(model)
    model.to(device)
    examples = [e for mix in BASE_MIXES[flavour] for e in load_split(TINY_MIXES, mix, "train")]
    recipe = with_args(args, batch_size=TINY_BASE["batch_size"], lr=TINY_BASE["lr"], grad_accum=1)
    run = Run(recipe, device, processor, random.Random(TINY_BASE["seed"]))
    train(model, examples, TINY_BASE[f"{flavour}_steps"], run, desc=f"base: {flavour}")
    return model, processor


def tiny_tokenizer(texts):
    """A byte-level BPE tokenizer trained on the spot on the tiny world's text, as real LMMs' are on the web's.

    Every byte stays in the vocabulary, so any text a user's data brings is covered: no unknown tokens.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<s>", "</s>", "<image>"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def tiny_corpus():
    """The text the tiny tokenizer learns from: every instruction and answer in tiny_tasks, and the prompt format."""
    texts = ["USER: ASSISTANT:"]
    for path in sorted((HERE / "tiny_tasks").glob("**/train.json")):
        texts += [turn["value"] for record in json.loads(path.read_text()) for turn in record["conversations"]]
    return texts


def tiny_model_and_processor(tokenizer):
    """A real transformers LLaVA built from a small config with random weights: nothing is downloaded."""
    config, processor = tiny_config_and_processor(tokenizer)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def tiny_config_and_processor(tokenizer):
    """The tiny LLaVA's config (TINY_VISION, TINY_TEXT) and its processor."""
    size = TINY_VISION["image_size"]
    # Resize to the input size without cropping, so images of any shape keep all their content.
    image_processor = CLIPImageProcessorPil(size={"height": size, "width": size}, do_center_crop=False)
    # "default" drops the vision tower's CLS token: 16 patch features for 16 <image> tokens.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=TINY_VISION["patch_size"], vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=TINY_CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION),
        text_config=LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TINY_TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(size // TINY_VISION["patch_size"]) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    return config, processor


def save_whole(model, processor, folder, recipe=None):
    """Saved beside, then renamed: a run killed while saving leaves no half-written model to load next time."""
    partial = folder.with_name(folder.name + ".partial")
    save_model(model, processor, partial)
    if recipe:
        write_json(partial / "recipe.json", recipe)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


# ---------------------------------------------------------------- encodings kept for the run
ENCODINGS = weakref.WeakKeyDictionary()  # processor -> {(image, history, question, answer): encode_example's result}


ENCODED_BYTES = weakref.WeakKeyDictionary()  # processor -> bytes held for it


ENCODING_BUDGET = 2 ** 30  # the tiny tasks take 25 MB; a real benchmark's pixels are re-made beyond 1 GiB


def training_batch(processor, examples, device):
    """A batch of training examples, each encoded once per run (kept_encoding) and padded to one length."""
    return collate([kept_encoding(processor, e) for e in examples], processor.tokenizer.pad_token_id).to(device)


def collate(encodings, pad_id):
    """Examples into one batch, concatenated: token rows padded on the right (input_ids with the pad token, labels
    with -100, so padding is never learned), pixels and the like with zeros where examples differ, as processors do.
    An example without an image has no pixels: the others' are concatenated in order, as the processor would."""
    batch = {}
    for key in dict.fromkeys(key for e in encodings for key in e):
        tensors = [e[key] for e in encodings if key in e]
        sizes = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors))]
        fill = {"input_ids": pad_id, "labels": -100}.get(key, 0)
        # F.pad takes (before, after) pairs from the last dimension backwards; the first is the one concatenated.
        pads = [[p for size, have in zip(sizes[::-1], t.shape[:0:-1]) for p in (0, size - have)] for t in tensors]
        batch[key] = torch.cat([F.pad(t, pad, value=fill) for t, pad in zip(tensors, pads)])
    return BatchFeature(batch)


def kept_encoding(processor, example):
    """encode_example (or PaliGemma's), cut to --max-length, done once per example while the budget lasts: every
    step reuses the tokens and pixels."""
    cache = ENCODINGS.setdefault(processor, {})
    key = (example["image"], tuple(example["history"]), example["question"], example["answer"])
    if key in cache:
        return cache[key]
    encode = encode_with_suffix if takes_suffix(processor) else encode_example
    encoding = cut_to_length(encode(processor, example), processor, example)
    size = sum(tensor.numel() * tensor.element_size() for tensor in encoding.values())
    if ENCODED_BYTES.get(processor, 0) + size <= ENCODING_BUDGET:
        cache[key] = encoding
        ENCODED_BYTES[processor] = ENCODED_BYTES.get(processor, 0) + size
    return encoding


def takes_suffix(processor):
    """Whether the processor takes the answer apart from the prompt (PaliGemma's `suffix`)."""
    return "suffix" in inspect.signature(processor.__call__).parameters


def encode_with_suffix(processor, example):
    """PaliGemma's training example as its card makes it: prompt and answer go in apart, and the processor masks
    the prompt in the labels and marks it for prefix attention (token_type_ids)."""
    images = open_images([example])
    if images is None:
        raise InputError(f"{type(processor).__name__} takes no text-only example, as {example['question'][:60]!r}")
    return dict(processor(images=images, text=[prompt(processor, example)], suffix=[example["answer"]],
                          return_tensors="pt"))


def answer_spans(processor, example, tokens):
    """Where each reply lies in the conversation's tokens, for any chat template: from the length of the conversation
    up to the reply's start to the length up to its end. Each prefix goes through the processor with the image
    too, so that <image> expands exactly as in the whole text."""
    images, messages = open_images([example]), chat(example)

    def length(prefix, **options):
        return len(processor(images=images, text=[processor.apply_chat_template(prefix, **options)])["input_ids"][0])
    for reply in range(1, len(messages), 2):
        start = length(messages[:reply], add_generation_prompt=True)
        end = length(messages[:reply + 1]) if reply + 1 < len(messages) else len(tokens)
        while not processor.tokenizer.decode(tokens[end - 1]).strip():  # a template's newline after the turn's end
            end -= 1
        yield start, end


CUT = weakref.WeakKeyDictionary()  # processor -> the training records cut to --max-length


def cut_to_length(encoding, processor, example):
    """An encoding cut to the tokenizer's model_max_length (--max-length), as LLaVA cuts its training records;
    refused where the cut would split the image's tokens or leave no answer. The first cut of a run says so;
    results.json counts them."""
    limit, length = processor.tokenizer.model_max_length, encoding["input_ids"].shape[1]
    if length <= limit:
        return encoding
    image_token = getattr(processor, "image_token_id", None)
    if image_token is not None and (encoding["input_ids"][0, limit:] == image_token).any():
        raise InputError(f"--max-length {limit} cuts into the image's tokens of a record with question "
                         f"{example['question'][:60]!r}: raise it")
    if "labels" in encoding and not (encoding["labels"][0, 1:limit] != -100).any():  # nothing left to learn
        raise InputError(f"--max-length {limit} cuts off the whole answer of a record with question "
                         f"{example['question'][:60]!r}: raise it")
    if not CUT.get(processor):
        tqdm.write(f"cit.py: a training record of {length} tokens is cut to --max-length {limit}, as are any "
                   "others that long (results.json counts them in records_cut)")
    CUT.setdefault(processor, set()).add((example["question"], example["answer"]))
    return {key: tensor[:, :limit] if key != "pixel_values" and tensor.shape[:2] == (1, length) else tensor
            for key, tensor in encoding.items()}


# ---------------------------------------------------------------- the run around the loop: start, books, optimizer, end
def support_hooks(args):
    """The hooks part 2 adds to a method's: the books after each row of R, and each variant whose flag is given."""
    hooks = {"after_row": keep_books}
    for flag, (method, variant) in VARIANTS.items():
        if getattr(args, flag) and args.method == method:
            hooks |= variant
    return hooks


def eproj_start_from_most_similar(run, model, examples):
    """--similarity-init: the new expert starts as a copy of the earlier task's whose keys are nearest to the new
    task's, instead of the base's, to transfer what the two share."""
    if run.stage == 0:
        return eproj_before_task(run, model, examples)
    new = eproj_keys(run, model, examples)
    source = int((torch.stack(run.memory["keys"]) * new).sum((1, 2)).argmax())
    run.report.setdefault("started_from", {})[run.stage] = source
    load_snapshot(model, run.memory["experts"][source])


def eproj_oracle_answer(run, model, examples, task):
    """--oracle-task: a seen task's questions go to its own parameters, for comparison with routing by keys;
    a task not yet seen has no parameters of its own, so its questions are still routed."""
    if task > run.stage:
        return eproj_answer(run, model, examples, task)
    return answer_with_experts(run, model, examples, [task] * len(examples))


VARIANTS = {  # flag: (the method it varies, the hooks it puts in place of the method's own)
    "similarity_init": ("eproj", {"before_task": eproj_start_from_most_similar}),
    "oracle_task": ("eproj", {"answer": eproj_oracle_answer}),
}


def begin_run(args, hooks, tasks):
    """part 1's start_run, or with --resume the last checkpoint's run; with --shard, the model sharded across the
    processes; then the held-in tasks, and what only the loaded model can tell about the tasks, before any of them
    is scored."""
    device = pick_device(args.device)
    model, run = (resume_run if args.resume else start_run)(args, device, hooks)
    if args.shard:
        model = shard_model(model, run)
    run.held_in = held_in_tasks(args)
    check_for_model(model, run.processor, tasks, args)
    return model, run


def keep_books(run, model, tasks, answer):
    """The after_row hook: the held-in tasks scored in every row, the base's included, and after each trained stage
    a checkpoint to resume from."""
    score_held_in(run, model, answer, first=len(tasks))
    if run.matrix:
        save_checkpoint(run, model, list(tasks))


def score_held_in(run, model, answer, first):
    """The base's own held-in tasks (--held-in: InstructBLIP's instruction-tuning sets, say), scored in every row as
    the paper's code does: never trained, out of the continual metrics; forgetting: best row's score minus last."""
    if not run.held_in:
        return
    held_in = run.report.setdefault("held_in", {"tasks": list(run.held_in), "matrix": []})
    held_in["matrix"].append(evaluate_all(run, model, run.held_in, "  held-in tasks of the base", answer, first))
    columns = list(zip(*held_in["matrix"]))
    held_in["forgetting"] = sum(max(column) - column[-1] for column in columns) / len(columns)


def adamw(weights, lr, device):
    """The loop's optimizer: AdamW, fused (one kernel over all the weights instead of a Python loop over them: a few
    ms of each tiny step), over float32 master copies of whatever trains in a lower precision."""
    return MasterWeightAdamW(weights, lr=lr, fused=torch.device(device).type in ["cpu", "cuda"])


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW for weights kept in bfloat16 (or float16): it updates float32 copies of them, the master weights, with
    float32 moments, then copies the result back, so that an update smaller than a bfloat16 weight's precision (about
    1/256 of it) still adds up over steps (the bf16 recipe of LLaVA, CoIN and DeepSpeed). 4 + 4 + 8 bytes per trained
    weight beside the weight itself: its float32 copy, that copy's gradient, the two moments. Float32 weights are
    their own masters: then it is AdamW itself, step for step. (float16 gets no loss scaling here.)"""
    def __init__(self, weights, **options):
        weights = list(weights)
        masters = [w if w.dtype == torch.float32 else w.detach().float() for w in weights]
        super().__init__(masters, **options)
        self.copies = [(w, m) for w, m in zip(weights, masters) if m is not w]

    @torch.no_grad()
    def step(self, closure=None):
        for weight, master in self.copies:  # one weight's gradient at a time moves to float32
            master.grad = None if weight.grad is None else weight.grad.float()
            weight.grad = None
        super().step(closure)
        for weight, master in self.copies:
            weight.copy_(master)


def finish_run(run, model, tasks, results):
    """What results.json keeps beside a run's metrics (each task's metric, how many records --max-length cut, the
    wall time, before an interruption too, and every flag); the final model in the Hugging Face layout (with LoRA
    only the adapter, which names its base model) and what a method needs beside it to answer (eproj: every expert
    and key); the checkpoints go; R and the metrics printed. Under torchrun the first process writes."""
    args = run.args
    results |= {"metrics": {name: task["metric"] for name, task in tasks.items()},
                "records_cut": len(CUT.get(run.processor, ())), "wall_time_s": wall_time(run), "config": vars(args)}
    weights = full_weights(model)  # under --shard, gathered by every process for the first
    kept = gathered({key: run.memory[key] for key in run.memory.get("saved_with_model", [])})
    if RANK == 0:
        with disk_full_in_one_line(args.out / "model"):
            save_model(model, run.processor, args.out / "model", weights)
            if kept:
                torch.save(kept, args.out / "model" / "method_state.pt")
            write_json(args.out / "results.json", results)
            draw_results(results, args.out / "results.png")
        remove_checkpoints(args.out)  # <out>/model now holds the same weights
    print_results(results, args.out)
    return results


def finished_run(args):
    """--resume of a run that has finished: its results, as results.json keeps them; else None."""
    if args.resume and (args.out / "results.json").is_file():
        results = run_file(args.out / "results.json", ["config", "matrix"])
        check_same_run(results["config"], args)
        print(f"--resume: {args.method} had finished: {args.out / 'results.json'}")
        return results
    return None


def save_model(model, processor, folder, weights=None):
    """A model folder in the Hugging Face layout: what --model loads. `weights`: a sharded model's, whole."""
    model.save_pretrained(folder, state_dict=weights)
    processor.save_pretrained(folder)


def write_json(path, data):
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1, default=str))
    os.replace(temporary, path)


# ---------------------------------------------------------------- checkpoints and resume
def save_checkpoint(run, model, task_names):
    """After each task, what the run needs to go on: weights (safetensors), the method's memory and the
    random generators (torch.save of tensors and plain values, read back with weights_only=True), the rows.

    progress.json is renamed into place last and names the checkpoint: it only ever points at a complete one.
    """
    args, weights = run.args, full_weights(model)  # under --shard, gathered by every process for the first
    memory = gathered(run.memory)  # under --shard, a method's copies too
    if RANK > 0:  # under torchrun the first process keeps the books
        return
    folder = args.out / f"checkpoint-{len(run.matrix)}"
    shutil.rmtree(folder, ignore_errors=True)  # a leftover of a run killed while saving
    with disk_full_in_one_line(folder):
        save_model(model, run.processor, folder / "model", weights)
        torch.save({"memory": memory, "report": run.report, "rng": run.rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "trains": list(trainable(model))}, folder / "state.pt")
        write_json(args.out / "progress.json", {"tasks": task_names, "matrix": run.matrix, "checkpoint": folder.name,
                                                "wall_time_s": wall_time(run), "config": vars(args)})
    remove_checkpoints(args.out, keep=folder)


def wall_time(run):
    """Seconds the run has taken so far; a resumed run's clock starts as far back as the time it had taken."""
    return round(time.time() - run.started, 1)


def remove_checkpoints(out, keep=None):
    for old in out.glob("checkpoint-*"):
        if old != keep:
            shutil.rmtree(old)


def resume_run(args, device, hooks):
    """--resume, one step before the loop (nanoGPT's init_from='resume'): the model, the method's memory and the
    random generators as the last checkpoint left them, and its rows; with no finished task, a fresh start."""
    checkpoint, progress = find_checkpoint(args)
    if checkpoint is None:
        return start_run(args, device, hooks)
    started, saved = time.time(), checkpoint / "model"
    with unreadable_in_one_line(checkpoint):
        saved_state = torch.load(checkpoint / "state.pt", map_location=device, weights_only=True)
    if (saved / "adapter_config.json").is_file():  # LoRA (eproj's experts too): the adapter goes back onto the base
        model, processor = load_model(args, device)
        with unreadable_in_one_line(checkpoint):
            model = PeftModel.from_pretrained(model, saved, autocast_adapter_dtype=False)  # as add_lora made it
    else:  # full weights: the checkpoint is a model folder of its own
        with unreadable_in_one_line(checkpoint):
            model, processor = load_model(with_args(args, model=str(saved)), device)
    for name, p in model.named_parameters():  # what trained before trains, whatever the method made train
        p.requires_grad_(name in saved_state["trains"])
    memory = saved_state["memory"]
    report = saved_state.get("report", memory.pop("report", {}))  # checkpoints of 2026-12 and before kept it there
    run = Run(args, device, processor, random.Random(), matrix=progress["matrix"], report=report, memory=memory,
              started=started - progress.get("wall_time_s", 0))  # and some kept no time
    run.rng.setstate(saved_state["rng"])
    torch.set_rng_state(saved_state["torch_rng"].cpu())
    return model, run


@contextmanager
def unreadable_in_one_line(checkpoint):
    """A checkpoint's file that does not read back (cut short by a full disk, say) ends --resume in one line."""
    try:
        yield
    except Exception as error:  # only reading the checkpoint's own files happens in here
        said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"--resume: {checkpoint} does not read back ({said}): start again with --overwrite") from None


def find_checkpoint(args):
    """The checkpoint that --resume continues from and progress.json's record of it, after checking that it is a run
    of the same kind; (None, None) where no task has finished."""
    progress = args.out / "progress.json"
    saved = run_file(progress, PROGRESS_KEYS) if progress.is_file() else {}
    if not (args.out / saved.get("checkpoint", "none") / "state.pt").is_file():
        print(f"--resume: no finished task in {args.out}: starting from the first one")
        return None, None
    check_same_run({**saved["config"], "tasks": saved["tasks"]}, args)
    print(f"--resume: continuing {args.out} after task {len(saved['matrix'])} of {len(args.tasks)}")
    return args.out / saved["checkpoint"], saved


PROGRESS_KEYS = ["checkpoint", "config", "tasks", "matrix"]  # what save_checkpoint writes, and wall_time_s


def run_file(path, keys):
    """A run's own results.json or progress.json, or one line saying it is damaged (cut short, emptied, edited)."""
    try:
        saved = read_json(path)
    except InputError as error:
        saved = error
    if not isinstance(saved, dict) or not all(key in saved for key in keys):
        why = saved if isinstance(saved, InputError) else "not what a run writes"
        raise InputError(f"--resume: {path} is damaged ({why}): start the run again with --overwrite")
    return saved


# Flags that cannot change what a run trains or scores: a resumed run may give them otherwise.
HARMLESS = {"device", "show", "debug", "profile", "resume", "overwrite", "cache", "rebuild_base", "seeds", "jobs",
            "threads", "eval_batch_size", "gradient_checkpointing", "trust_remote_code", "out", "gpu_memory", "nproc"}


# The flags that name data: compared by what they name and hold (run_identity), not as typed, where a run keeps that.
PATH_FLAGS = {"data", "held_in", "image_root", "references"}


def portable(path):
    """A path as a run keeps it: resolved, and relative to the checkout where it lies in it, so that the same folder
    named otherwise is the same, and a checkout moved elsewhere still finds its own tiny tasks."""
    resolved = Path(path).resolve()
    return f"<checkout>/{resolved.relative_to(HERE).as_posix()}" if resolved.is_relative_to(HERE) else str(resolved)


def run_identity(args):
    """What a run reads: a fingerprint of each task's and held-in task's record files and of each references file
    (their bytes; the pictures are named by those records), and where the pictures are looked up."""
    def fingerprint(*files):
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + path.read_bytes())
        return digest.hexdigest()[:16]
    files = {f"task {name}": fingerprint(*sorted((Path(args.data) / name).glob("*.json*"))) for name in args.tasks}
    files |= {f"held-in task {Path(f).name}": fingerprint(*sorted(Path(f).glob("*.json*"))) for f in args.held_in}
    files |= {f"references of {task}": fingerprint(Path(f)) for task, f in args.references.items()}
    return {"files": files, "image_root": args.image_root and portable(args.image_root)}


def check_same_run(saved, args):
    """--resume goes on only with the flags the run was started with, but for HARMLESS ones, and on the same data,
    however its folders are named now; else one line naming the first flag that differs and both values."""
    now = json.loads(json.dumps(vars(args), default=str))  # as results.json and progress.json keep them
    ignored = HARMLESS | (PATH_FLAGS if "identity" in saved else {"identity"})  # runs before identities: as typed
    different = [key for key in now if key not in ignored and saved.get(key) != now[key]]
    flags = [key for key in different if key != "identity"]  # a flag first: other --tasks also read other files
    if flags:
        key = flags[0]
        shown = [",".join(map(str, v)) if isinstance(v, list) else v for v in (saved.get(key), now[key])]
        raise InputError(f"--resume: {args.out} holds a run with --{key.replace('_', '-')} {shown[0]}, not "
                         f"{shown[1]}{f' (and {len(flags) - 1} more)' if len(flags) > 1 else ''}: give its "
                         "flags, or --overwrite, or another --out")
    if different:
        was, new = saved["identity"], now["identity"]
        changed = next((f"{item}'s files" for item in {**was["files"], **new["files"]}
                        if was["files"].get(item) != new["files"].get(item)), "its pictures' --image-root")
        raise InputError(f"--resume: {args.out} holds a run on other data ({changed} differ from those it was "
                         "trained on): give its data, or --overwrite, or another --out")


# ---------------------------------------------------------------- scorers of the real benchmarks
def metric_for(examples):
    """The metric a task's answers call for: boxes -> iou; a letter answer to listed options -> option; several
    answers per question -> vqa (short) or cider (captions); one caption -> bleu4; else exact."""
    references = [e["references"] for e in examples]
    if all(parsed_box(r) for refs in references for r in refs):
        return "iou"
    if all(re.fullmatch(r"[A-Z]", r) for refs in references for r in refs) and all(
            re.search(r"^\(?[A-Z][.)] ", e["question"], re.MULTILINE) for e in examples):
        return "option"
    long = sum(len(refs[0].split()) for refs in references) / len(references) >= 4
    if max(map(len, references)) > 1:
        return "cider" if long else "vqa"
    return "bleu4" if long else "exact"


def vqa_accuracy(predictions, references):
    """VQA accuracy (Antol et al., 2015) as TextVQA and VQAv2 are scored: a prediction matching k of the other
    human answers earns min(1, k/3), averaged over leaving each of the n answers out; EvalAI's normalization."""
    total = 0.0
    for prediction, refs in zip(predictions, references):
        guess, answers = evalai_normalize(prediction), [evalai_normalize(r) for r in refs]
        others = [answers[:i] + answers[i + 1:] for i in range(len(answers))]
        total += sum(min(1.0, rest.count(guess) / 3) for rest in others) / len(answers)
    return total / len(references)


NUMBER_WORDS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5", six="6", seven="7",
                    eight="8", nine="9", ten="10")


# EvalAI's contractions, without their apostrophes: "dont" and "don't" are one answer ("im", "ive" are not there).
CONTRACTIONS = set("""aint arent cant couldnt couldntve couldve didnt doesnt dont hadnt hadntve hasnt havent hed hedve
hes howd howll hows isnt itd itdve itll lets maam mightnt mightntve mightve mustnt mustve neednt notve oclock oughtnt
owsat shant shedve shes shouldnt shouldntve shouldve somebodyd somebodydve somebodyll somebodys someoned someonedve
someonell someones somethingd somethingdve somethingll thats thered theredve therere theres theyd theydve theyll
theyre theyve twas wasnt wedve werent weve whatll whatre whats whatve whens whered wheres whereve whod whodve wholl
whos whove whyll whyre whys wont wouldnt wouldntve wouldve yall yalldve yallll youd youdve youll youre youve""".split())


def evalai_normalize(answer):
    """The VQA challenges' answer processing (EvalAI; CoIN's m4c_evaluator): lower case, commas and question marks
    dropped, 's split off; other punctuation dropped where it touches a space, else made one; a period not before
    a digit dropped; number words as digits; articles dropped; a contraction with or without its apostrophe."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").replace("\n", " ").strip()
    spaced = text
    for mark in ';/[]"{}()=+\\_-><@`!':
        text = text.replace(mark, "" if f"{mark} " in spaced or f" {mark}" in spaced else " ")
    text = re.sub(r"\.(?!\d)", "", text)
    words = [NUMBER_WORDS.get(word, word) for word in text.split() if word not in ("a", "an", "the")]
    return " ".join(word.replace("'", "") if word.replace("'", "") in CONTRACTIONS else word for word in words)


def option_accuracy(predictions, references):
    """Multiple choice (ScienceQA) as CoIN scores it: the option letter read from the prediction (option_letter)
    against the answer's letter."""
    return sum(option_letter(p) in refs for p, refs in zip(predictions, references)) / len(references)


def option_letter(prediction):
    """The prediction itself if it is one capital letter; else the letter of an 'X. ' prefix; else its first
    one-character word, upper-cased (CoIN's eval_science_qa)."""
    if re.fullmatch(r"[A-Z]", prediction) or re.match(r"[A-Z]\. ", prediction):
        return prediction[0]
    words = re.findall(r"\b(\w)\b", prediction)
    return words[0].upper() if words else None


def contains(predictions, references):
    """Classification (ImageNet) as CoIN scores it: right when the label is in the prediction or the prediction in
    the label, on normalized text (an empty prediction is wrong here; CoIN's raw test would count it)."""
    def right(prediction, label):
        return bool(prediction) and (label in prediction or prediction in label)
    return sum(any(right(normalize(p), normalize(r)) for r in refs)
               for p, refs in zip(predictions, references)) / len(references)


def parsed_box(text):
    """A box [x1, y1, x2, y2] read from text: its four numbers, or None where there are not exactly four."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
    return [float(n) for n in numbers] if len(numbers) == 4 else None


def iou_accuracy(predictions, references):
    """Grounding (RefCOCO) as CoIN scores it: right when the predicted box overlaps the true one with an
    intersection over union above 0.5 (the same on CoIN's 0-1 scale as in pixels)."""
    def iou(a, b):
        inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0
    return sum(bool(parsed_box(p)) and any(iou(parsed_box(p), parsed_box(r)) > 0.5 for r in refs)
               for p, refs in zip(predictions, references)) / len(references)


def cider(predictions, references, sigma=6.0):
    """CIDEr-D (Vedantam et al., 2015) as the COCO caption evaluation computes it, for COCO, Flickr30k and UCIT:
    per n = 1..4, tf-idf vectors of n-grams (document frequencies over the task's own references), the
    prediction's weights clipped by the reference's, their cosine times a Gaussian penalty on the difference in
    length (counted in bigrams, as there); the mean over n and over references, times 10; averaged over examples."""
    def grams(text):
        return sum((ngrams(normalize(text).split(), n) for n in range(1, 5)), Counter())
    refs = [[grams(r) for r in rs] for rs in references]
    frequency = Counter(gram for rs in refs for gram in set().union(*rs))

    def tf_idf(counts):
        vector = {g: c * (math.log(len(refs)) - math.log(max(1.0, frequency[g]))) for g, c in counts.items()}
        norms = [math.sqrt(sum(v * v for g, v in vector.items() if len(g) == n)) for n in range(1, 5)]
        return vector, norms, sum(c for g, c in counts.items() if len(g) == 2)

    total = 0.0
    for prediction, rs in zip(predictions, refs):
        guess, guess_norms, guess_length = tf_idf(grams(prediction))
        for ref in rs:
            truth, truth_norms, truth_length = tf_idf(ref)
            penalty = math.exp(-(guess_length - truth_length) ** 2 / (2 * sigma ** 2))
            for n in range(1, 5):
                dot = sum(min(v, truth.get(g, 0.0)) * truth.get(g, 0.0) for g, v in guess.items() if len(g) == n)
                if guess_norms[n - 1] and truth_norms[n - 1]:
                    total += 10 * penalty * dot / (guess_norms[n - 1] * truth_norms[n - 1]) / 4 / len(rs)
    return total / len(refs)


def normalize(text):
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def exact_match(predictions, references):
    """The share of predictions equal to one of their references, on normalized text (case and punctuation)."""
    return sum(normalize(p) in map(normalize, refs) for p, refs in zip(predictions, references)) / len(references)


def bleu4(predictions, references):
    """Corpus BLEU-4 (Papineni et al., 2002) on normalized words: n-gram counts clipped by the most any one
    reference has, and the brevity penalty against each prediction's closest reference length."""
    matched, total = [0] * 4, [0] * 4
    prediction_length = reference_length = 0
    for prediction, refs in zip(predictions, references):
        p, rs = normalize(prediction).split(), [normalize(r).split() for r in refs]
        prediction_length += len(p)
        reference_length += min((abs(len(r) - len(p)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            p_grams = ngrams(p, n)
            most = Counter()
            for r in rs:
                most |= ngrams(r, n)
            matched[n - 1] += sum((p_grams & most).values())
            total[n - 1] += max(len(p) - n + 1, 0)
    if min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / 4
    brevity = min(0.0, 1 - reference_length / prediction_length)
    return math.exp(log_precision + brevity)


def ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


METRICS = {"exact": exact_match, "bleu4": bleu4, "vqa": vqa_accuracy, "option": option_accuracy,
           "contains": contains, "iou": iou_accuracy, "cider": cider}


# ---------------------------------------------------------------- several runs: methods side by side, seeds
def several_runs(args, tasks):
    """--seeds, --method all, --analyze pairs: part 1's run_method (or the pair analysis) once per seed and method,
    --jobs of them at a time; then the methods side by side per seed (<out>[/seed<k>]/summary.*) and over seeds."""
    seeds = [with_args(args, seed=seed, out=args.out / f"seed{seed}") for seed in args.seeds] if args.seeds else [args]
    methods = list(METHODS) if args.method == "all" and not args.analyze else [None]
    runs = [(method, run_args if method is None else with_args(
                run_args, method=method, out=run_args.out / method,
                train=run_args.train or default_training(run_args.model, method)))
            for run_args in seeds for method in methods]
    done = side_by_side(analyze_pairs if args.analyze else run_method, runs, tasks, args.jobs,
                        threads_per_run(args))
    per_seed = [done[k:k + len(methods)] for k in range(0, len(done), len(methods))]
    if methods != [None]:
        for run_args, results in zip(seeds, per_seed):
            compare([results], run_args.out)
    if not args.seeds:
        return per_seed[0] if methods != [None] else per_seed[0][0]
    if args.analyze:
        return compare_pairs([results[0] for results in per_seed], args.out)
    return compare(per_seed, args.out)


def side_by_side(function, runs, tasks, jobs, threads):
    """function(args, tasks) for each run: one after another, or --jobs of them at a time, each in a process of its
    own with `threads` threads, printing into <out>/log.txt; a line says when each has finished."""
    jobs = min(jobs, len(runs))  # a worker without a run would only hold memory
    if jobs == 1:
        done = []
        for method, run_args in runs:
            if method:
                print(f"\n======== {method} ========")
            done.append(function(run_args, tasks))
        return done
    print(f"--jobs {jobs}: {len(runs)} runs, {jobs} at a time with {threads} thread(s) each; each prints into "
          "<its out>/log.txt")
    # spawn, not fork: a process forked from one whose torch has started its threads can hang
    pool = ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), torch.set_num_threads, (threads,))
    pending = [pool.submit(logged, function, run_args, tasks) for _, run_args in runs]
    done = []
    try:
        with workers_end_with_the_command():
            for (_, run_args), job in zip(runs, pending):
                done.append(job.result())
                average = done[-1].get("average") if isinstance(done[-1], dict) else None
                shown = "" if average is None else f"  average {average:.3f}"
                print(f"  {len(done)}/{len(runs)} done: {run_args.out}{shown}")
    except BrokenProcessPool:  # a worker was killed (by the kernel for want of memory, say): the others end too
        unfinished = ", ".join(str(run_args.out) for (_, run_args), job in zip(runs, pending)
                               if not job.done() or job.exception())
        raise InputError(f"a process of --jobs died (killed from outside, or for want of memory) while running "
                         f"{unfinished}: the finished runs and tasks are kept, and every run goes on with "
                         "--resume") from None
    except BaseException:  # Ctrl-C, SIGTERM, SIGHUP, an error: the workers are ended, not waited for
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in list(pool._processes.values()):  # (Python 3.14 has pool.terminate_workers() for this)
            worker.terminate()
            worker.join()
        raise
    pool.shutdown()  # the workers end of themselves: terminated, they would leave a semaphore behind
    return done


@contextmanager
def workers_end_with_the_command():
    """SIGTERM and SIGHUP (kill, a closed terminal) end the command as Ctrl-C does: its workers are ended and
    waited for before --out's lock is let go, so that no run goes on writing into a folder nobody holds."""
    def interrupt(number, frame):
        raise KeyboardInterrupt
    before = {number: signal.signal(number, interrupt) for number in [signal.SIGTERM, signal.SIGHUP]}
    try:
        yield
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def logged(function, args, tasks):
    """One run of side_by_side, in its own process, its output in <out>/log.txt."""
    disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    # appended: a resumed run's log keeps what came before the interruption
    with open(args.out / "log.txt", "a" if args.resume else "w") as log, redirect_stdout(log), redirect_stderr(log):
        return function(args, tasks)


def compare(runs, out):
    """The methods side by side, over seeds: each metric's mean and standard deviation (summary.json; summary.md,
    also printed) and each method's mean accuracy matrix (summary.png). `runs` holds one list of results per seed."""
    summary = {"seeds": [results[0]["config"]["seed"] for results in runs], "methods": {}}
    for results in zip(*runs):  # one method, every seed
        summary["methods"][results[0]["method"]] = {
            "tasks": results[0]["tasks"], "rows": results[0]["rows"],
            "zero_shot": mean_matrix([[r["zero_shot"]] for r in results])[0],
            "matrix": mean_matrix([r["matrix"] for r in results]),
            **{key: mean_and_sd([r.get(key) for r in results])
               for key in ["average", "forgetting", "bwt", "fwt", "wall_time_s"]},
            "diagonal": mean_and_sd([diagonal_mean(r) for r in results]),
            "held_in_forgetting": mean_and_sd([r.get("held_in", {}).get("forgetting") for r in results])}
        if "held_in" in results[0]:  # below the base's row, as the main matrix's rows
            summary["methods"][results[0]["method"]]["held_in"] = {
                "tasks": results[0]["held_in"]["tasks"],
                "base": mean_matrix([r["held_in"]["matrix"][:1] for r in results])[0],
                "matrix": mean_matrix([r["held_in"]["matrix"][1:] for r in results])}
    if RANK > 0:  # under torchrun the first process writes
        return summary
    lines = ["| method | average | forgetting | bwt | fwt | mean of the diagonal | held-in forgetting | wall time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    forms = {"average": ".3f", "forgetting": ".3f", "bwt": "+.3f", "fwt": "+.3f", "diagonal": ".3f",
             "held_in_forgetting": ".3f", "wall_time_s": ".0f"}
    lines += [f"| {method} | " + " | ".join(plus_minus(m[key], form) for key, form in forms.items()) + " |"
              for method, m in summary["methods"].items()]
    seeds = f"mean ± sd over seeds {', '.join(map(str, summary['seeds']))}" if len(runs) > 1 else ""
    write_summary(out, summary, "\n".join(lines) + (f"\n\n({seeds})" if seeds else "")
                  + shorter_than_the_tables(runs[0][0]["config"]))
    means = [{"method": method, "average": m["average"]["mean"], "forgetting": m["forgetting"]["mean"],
              **{key: m[key] for key in ["tasks", "rows", "zero_shot", "matrix", "held_in"] if key in m}}
             for method, m in summary["methods"].items()]
    held_in = "   *: the base's held-in tasks, never trained" if any("held_in" in m for m in means) else ""
    draw_matrices([m | with_held_in(m) for m in means], out / "summary.png", seeds + held_in)
    return summary


def write_summary(out, summary, table):
    """summary.json, and its table printed and written to summary.md."""
    write_json(out / "summary.json", summary)
    print(f"\n{table}")
    (out / "summary.md").write_text(table + "\n")


def mean_and_sd(values):
    """The mean and sample standard deviation of numbers (None where undefined: no values, or only one)."""
    values = [v for v in values if v is not None]
    return {"mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None, "values": values}


def plus_minus(entry, form=".3f"):
    """A spread as 'mean ± sd', or the mean alone for one seed, or '-' where there is nothing to show."""
    if entry["mean"] is None:
        return "-"
    return f"{entry['mean']:{form}}" + ("" if entry["sd"] is None else f" ± {entry['sd']:{form.lstrip('+')}}")


def shorter_than_the_tables(config):
    """A note for a comparison of the tiny world run shorter than the README's tables (fewer steps, tasks or
    examples, one seed): such a run ranks the methods by fewer and noisier scores, and may rank them otherwise."""
    if config["model"] != "tiny" or Path(config["data"]).resolve() != HERE / "tiny_tasks":
        return ""
    defaults = argument_parser()
    shorter = [f"--{flag.replace('_', '-')} {config[flag]}" for flag in ["steps", "max_train", "max_test"]
               if config[flag] is not None and config[flag] < (defaults.get_default(flag) or math.inf)]
    if len(config["tasks"]) < len(TASK_ORDER):
        shorter.append(f"{len(config['tasks'])} of the {len(TASK_ORDER)} tasks")
    if not shorter:
        return ""
    return (f"\n\nNote: this comparison is shorter than the README's tables ({', '.join(shorter)}): its ranking of "
            "the methods may differ from theirs, and one seed's differences can be noise (--seeds 0,1,2 shows the "
            "spread).")


def mean_matrix(matrices):
    """Cell by cell mean of matrices of the same shape; an empty cell (None) stays empty."""
    return [[None if cells[0] is None else statistics.fmean(cells) for cells in zip(*rows)] for rows in zip(*matrices)]


def diagonal_mean(result):
    """How well each task was learned when it was trained: the mean of R[i][i] over the rows that trained a task
    (None for joint, whose one row trained them all at once)."""
    scores = [row[result["tasks"].index(name)] for name, row in zip(result["rows"], result["matrix"])
              if name in result["tasks"]]
    return sum(scores) / len(scores) if scores else None


# ---------------------------------------------------------------- tables and pictures
def format_table(rows, row_names, column_names, corner, digits=2):
    """A matrix as aligned text; an empty cell (None: a task paired with itself) shows as '-'."""
    width = max(8, digits + 6, *map(len, column_names)) + 1
    lines = [corner.ljust(width) + "".join(n.rjust(width) for n in column_names)]
    lines += [f"{r:<{width}}" + "".join("-".rjust(width) if v is None else f"{v:{width}.{digits}f}" for v in row)
              for r, row in zip(row_names, rows)]
    return "\n".join(lines)


# What the metrics mean, said where they are printed and drawn (part 1's summarize and forward_transfer).
METRICS_IN_A_LINE = ("average: the last row's mean; forgetting: an earlier task's best score before the end minus "
                     "its last; bwt: its last minus its score just after training it; fwt: a task's score just "
                     "before its training minus the base's")


def print_results(results, out):
    rows, zero_shot = results["rows"], results["zero_shot"]
    table = format_table([zero_shot, *results["matrix"]], ["(base)", *rows], results["tasks"], "after \\ on")
    print(f"\naccuracy matrix R (row: after training task i, the base first; column: score on task j)\n{table}")
    if "held_in" in results:
        held_in = results["held_in"]
        table = format_table(held_in["matrix"], ["(base)", *rows], held_in["tasks"], "after \\ held-in")
        print(f"\nthe base's held-in tasks, never trained (forgetting {held_in['forgetting']:.3f})\n{table}")
    if len(results["matrix"]) > 1:
        fwt = "" if results["fwt"] is None else f"  fwt {results['fwt']:+.3f}"
        metrics = f"forgetting {results['forgetting']:.3f}  bwt {results['bwt']:+.3f}{fwt}"
    else:  # one row (joint): nothing learned earlier to forget
        metrics = "forgetting -  bwt -"
    print(f"\n{results['method']}: average {results['average']:.3f}  {metrics}  ({results['wall_time_s']:.0f} s)  "
          f"-> {out / 'results.json'}, results.png\n({METRICS_IN_A_LINE})")


def with_held_in(results):
    """The held-in tasks as more columns of the matrix a picture draws, the base's row too, marked with a *."""
    if "held_in" not in results:
        return {}
    held = results["held_in"]
    return {"tasks": [*results["tasks"], *(f"*{t}" for t in held["tasks"])],
            "matrix": [row + held_row for row, held_row in zip(results["matrix"], held["matrix"])],
            "zero_shot": results["zero_shot"] + held["base"]}


TEXT = 14  # pixels: every picture's text, readable at 100%


COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]  # one a task, in the lines of results.png


def typeface(size=TEXT):
    return ImageFont.load_default(size=size)  # Pillow's scalable default font: no font file needed


def text_width(text, size=TEXT):
    return int(typeface(size).getlength(text))


def upright(picture, x, y, text):
    """A column's name written upwards, whole, its foot at (x, y)."""
    label = Image.new("RGB", (text_width(text) + 4, TEXT + 6), "white")
    ImageDraw.Draw(label).text((2, 1), text, fill="black", font=typeface())
    label = label.rotate(90, expand=True)
    picture.paste(label, (x, y - label.height))


def shade(level):
    """A colour from white (the low end of a scale, 0) to dark blue (its high end, 1)."""
    level = min(max(level, 0.0), 1.0)
    return (int(255 - 225 * level), int(255 - 190 * level), int(255 - 80 * level))


def heatmap_size(row_names, column_names, cell):
    """(width, height) of draw_heatmap's picture: row names left, column names above, written upwards."""
    left = max(map(text_width, row_names)) + 10
    head = max(map(text_width, column_names)) + 10
    return left + len(column_names) * cell, head + len(row_names) * cell


def draw_heatmap(picture, x0, y0, matrix, row_names, column_names, low=0.0, high=1.0, cell=44, digits=2):
    """A matrix as labelled cells, darker for higher values between low and high (draw_colour_bar says which);
    None cells stay blank."""
    draw = ImageDraw.Draw(picture)
    width, height = heatmap_size(row_names, column_names, cell)
    left, head = width - len(column_names) * cell, height - len(row_names) * cell
    for j, name in enumerate(column_names):
        upright(picture, x0 + left + j * cell + (cell - TEXT) // 2 - 3, y0 + head - 4, name)
    for i, (row_name, row) in enumerate(zip(row_names, matrix)):
        y = y0 + head + i * cell
        draw.text((x0 + 2, y + (cell - TEXT) // 2), row_name, fill="black", font=typeface())
        for j, value in enumerate(row):
            if value is None:
                continue
            level = (value - low) / (high - low) if high > low else 0.5
            square = [x0 + left + j * cell, y, x0 + left + (j + 1) * cell - 2, y + cell - 2]
            draw.rectangle(square, fill=shade(level))
            draw.text((square[0] + 3, y + (cell - TEXT) // 2), f"{value:.{digits}f}",
                      fill="white" if level > 0.55 else "black", font=typeface(TEXT - 2))


def draw_colour_bar(picture, x, y, height, low, high, digits=2):
    """The heatmaps' scale: its colours from low (bottom) to high (top), with both ends and the middle written."""
    draw = ImageDraw.Draw(picture)
    for k in range(height):
        draw.line([x, y + height - 1 - k, x + 14, y + height - 1 - k], fill=shade(k / (height - 1)))
    draw.rectangle([x, y, x + 14, y + height - 1], outline="gray")
    for fraction in [0, 0.5, 1]:
        value = low + fraction * (high - low)
        draw.text((x + 18, y + height - 1 - fraction * (height - 1) - TEXT // 2), f"{value:.{digits}f}",
                  fill="black", font=typeface())


def draw_axes(picture, box, x_ticks, y_range, y_title, y_digits=2):
    """A chart's frame: a y axis with five ticks over y_range, x ticks at the given positions (0..1 across) with
    their names written upwards below; returns the point of (x, y) in 0..1 of the box and y_range."""
    draw = ImageDraw.Draw(picture)
    x0, y0, x1, y1 = box
    low, high = y_range
    draw.line([x0, y0, x0, y1, x1, y1], fill="black", width=1)
    for k in range(5):
        y = y1 - k * (y1 - y0) / 4
        draw.line([x0 - 4, y, x0, y], fill="black")
        draw.line([x0 + 1, y, x1, y], fill=(230, 230, 230))
        label = f"{low + k * (high - low) / 4:.{y_digits}f}"
        draw.text((x0 - 8 - text_width(label), y - TEXT // 2), label, fill="black", font=typeface())
    for position, name in x_ticks:
        x = x0 + position * (x1 - x0)
        draw.line([x, y1, x, y1 + 4], fill="black")
        upright(picture, int(x - TEXT // 2 - 3), y1 + 8 + text_width(name), name)
    draw.text((x0, y0 - TEXT - 8), y_title, fill="black", font=typeface())
    return lambda x, y: (x0 + x * (x1 - x0), y1 - (y - low) / (high - low or 1) * (y1 - y0))


def wrapped(text, width, size=TEXT):
    """The text in lines no wider than width, broken between words."""
    lines = [""]
    for word in text.split():
        if lines[-1] and text_width(f"{lines[-1]} {word}", size) > width:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    return lines


def draw_results(results, path):
    """<out>/results.png, a single run's picture: the accuracy matrix with the base's row and the held-in tasks'
    columns, and each task's score along the sequence (the matrix's columns) as lines."""
    rows, tasks, held = ["(base)", *results["rows"]], results["tasks"], results.get("held_in")
    matrix = [results["zero_shot"], *results["matrix"]]
    columns = [*tasks, *(f"*{t} (held-in)" for t in held["tasks"])] if held else tasks
    if held:
        matrix = [row + held_row for row, held_row in zip(matrix, held["matrix"])]
    cell = 48
    width, height = heatmap_size(rows, columns, cell)
    chart = (80, 76 + height + 90, 80 + max(360, 60 * len(rows)), 76 + height + 90 + 240)
    legend = max(map(text_width, columns)) + 40
    picture = Image.new("RGB", (max(width + 90, chart[2] + legend) + 20, chart[3] + 24 + max(map(text_width, rows))),
                        "white")
    draw = ImageDraw.Draw(picture)
    summary = (f"{results['method']}: average {results['average']:.2f}, forgetting "
               f"{'-' if len(results['matrix']) < 2 else format(results['forgetting'], '.2f')}, bwt "
               f"{'-' if len(results['matrix']) < 2 else format(results['bwt'], '+.2f')}")
    draw.text((10, 8), summary, fill="black", font=typeface(TEXT + 4))
    notes = wrapped(f"{METRICS_IN_A_LINE}. Row: after training the task named; column: its score on each task (*: "
                    "the base's held-in tasks, never trained).", picture.width - 20, TEXT - 2)
    for k, line in enumerate(notes):
        draw.text((10, 34 + k * TEXT), line, fill="gray", font=typeface(TEXT - 2))
    draw_heatmap(picture, 10, 76, matrix, rows, columns, cell=cell)
    draw_colour_bar(picture, 10 + width + 16, 76 + height - len(rows) * cell, len(rows) * cell, 0.0, 1.0)
    draw.text((chart[0] - 70, chart[1] - 48), "each task's score after each training stage (a column of the "
              "matrix)", fill="black", font=typeface())
    point = draw_axes(picture, chart, [(i / (len(rows) - 1 or 1), r) for i, r in enumerate(rows)], (0.0, 1.0),
                      "score")
    for j, name in enumerate(columns):
        colour = COLOURS[j % len(COLOURS)]
        points = [point(i / (len(rows) - 1 or 1), row[j]) for i, row in enumerate(matrix)]
        draw.line(points, fill=colour, width=2 + 1 * (j < len(tasks)))
        draw.text((chart[2] + 12, chart[1] + j * (TEXT + 6)), name, fill=colour, font=typeface())
    picture.save(path)


def draw_matrices(all_results, path, note=""):
    """Each method's (mean) accuracy matrix with the base's row, side by side, one colour bar for all."""
    cell = 40
    names = all_results[0]["tasks"]
    rows = ["(base)", *all_results[0]["rows"]]
    width = max(heatmap_size(["(base)", *r["rows"]], names, cell)[0] for r in all_results)
    height = heatmap_size(rows, names, cell)[1]
    picture = Image.new("RGB", (len(all_results) * (width + 24) + 80, 70 + height + 40 + 24 * bool(note)), "white")
    draw = ImageDraw.Draw(picture)
    for k, result in enumerate(all_results):
        x0 = 10 + k * (width + 24)
        forgetting = "-" if len(result["rows"]) < 2 else f"{result['forgetting']:.2f}"
        draw.text((x0, 8), result["method"], fill="black", font=typeface(TEXT + 4))
        draw.text((x0, 34), f"average {result['average']:.2f}, forgetting {forgetting}", fill="black",
                  font=typeface())
        draw_heatmap(picture, x0, 60, [result["zero_shot"], *result["matrix"]], ["(base)", *result["rows"]], names,
                     cell=cell)
    bar_height = len(rows) * cell
    draw_colour_bar(picture, len(all_results) * (width + 24) + 10, 60 + height - bar_height, bar_height, 0.0, 1.0)
    draw.text((10, 70 + height + 10), "row: after training the task named; column: the score on each task"
              + (f";  {note}" if note else ""), fill="gray", font=typeface())
    picture.save(path)


# ---------------------------------------------------------------- task pairs: does similarity predict forgetting?
def task_similarity(prototypes):
    """Cosine similarity between task prototypes, for the image, instruction and answer parts, and their mean."""
    similarity = {}
    for part in ["image", "instruction", "answer"]:
        vectors = F.normalize(torch.stack([p[part] for p in prototypes]), dim=-1)
        matrix = vectors @ vectors.T
        similarity[part] = (matrix + matrix.T) / 2  # symmetric to the last bit, whatever the matmul's order
    similarity["combined"] = (similarity["image"] + similarity["instruction"] + similarity["answer"]) / 3
    return similarity


def doubling_steps(steps):
    """The steps of B's training after which the pair study scores A: 1, 2, 4, 8, ... and the last. A fine-tuned
    task is mostly lost within B's first ten steps here, so the points are evenly spaced on a log axis."""
    return [2 ** k for k in range(steps.bit_length()) if 2 ** k < steps] + [steps]


def analyze_pairs(args, tasks):
    """The paper's task-pair study, with plain fine-tuning. From the base, train each task A (its weights kept
    in memory), then from there each other task B, scoring A along B's training (doubling_steps) and B at its end:
        pair_forgetting[A][B]  = score(A after A) - the mean of A's scores along B's training (the area between
                                 A's curve and its start on a log axis of steps: how soon, not only how much, A is lost)
        final_forgetting[A][B] = score(A after A) - score(A after A then B)
        transfer[A][B]         = score(B after A then B) - score(B after B alone)
    and compare with the similarity of the tasks' prototypes, taken from the base before any training: over all
    pairs, and within each row (how B's similarity to A orders what happens to that A).
    """
    started = time.time()
    args = with_args(args, method="finetune")
    device = pick_device(args.device)
    model, run = start_run(args, device, method_hooks(args))
    processor, names = run.processor, list(tasks)
    prototypes = [task_prototype(model, processor, tasks[name]["train"], device, args.seed) for name in names]
    similarity = {part: matrix.tolist() for part, matrix in task_similarity(prototypes).items()}
    base = snapshot(model)

    def tune(weights, name, title, hooks=NO_HOOKS):
        """Train one task from the given weights, each time with the same seeds: only the start differs."""
        load_snapshot(model, weights)
        torch.manual_seed(args.seed)
        run.rng = random.Random(args.seed)
        train(model, tasks[name]["train"], args.steps, run, hooks, desc=title)

    scored_at = doubling_steps(args.steps)
    single, pair_scores, curves = {}, {}, {}
    for first in names:
        tune(base, first, f"{first} alone")
        single[first] = evaluate_all(run, model, {first: tasks[first]}, f"after {first}")[0]
        after_first = snapshot(model)
        for second in [n for n in names if n != first]:
            curve = curves.setdefault(first, {}).setdefault(second, [])
            # the curve's last point is A's score at B's end, taken once by evaluate_all below
            def score_first(run, model, step):
                if step in scored_at[:-1]:
                    curve.append(quiet_score(run, model, tasks[first]))
            tune(after_first, second, f"{first} then {second}", dict(NO_HOOKS, after_step=score_first))
            pair_scores.setdefault(first, {})[second] = evaluate_all(
                run, model, {first: tasks[first], second: tasks[second]}, f"after {first} then {second}")
            curve.append(pair_scores[first][second][0])
    report = {"tasks": names, "single": single, "pair_scores": pair_scores, "scored_at": scored_at, "curves": curves,
              "pair_forgetting": [[None if a == b else single[a] - statistics.fmean(curves[a][b]) for b in names]
                                  for a in names],
              "final_forgetting": [[None if a == b else single[a] - pair_scores[a][b][0] for b in names]
                                   for a in names],
              "transfer": [[None if a == b else pair_scores[a][b][1] - single[b] for b in names] for a in names],
              "similarity": similarity}
    kinds = ["pair_forgetting", "final_forgetting", "transfer"]
    report["spearman"] = {f"{kind} vs {part} similarity": spearman(*off_diagonal(similarity[part], report[kind]))
                          for kind in kinds for part in similarity}
    report["spearman_within_rows"] = {f"{kind} vs {part} similarity": within_rows(similarity[part], report[kind])
                                      for kind in kinds for part in similarity}
    report.update(wall_time_s=round(time.time() - started, 1), config=vars(args))
    write_json(args.out / "pairs.json", report)
    draw_pairs(report, args.out / "pairs.png")
    print_pairs(report)
    return report


def quiet_score(run, model, task):
    """A task's score in the middle of training, nothing printed; the model goes back to training mode."""
    predictions = greedy_answers(run, model.eval(), task["test"], 0)
    model.train()
    return score(task, predictions)


def within_rows(similarity, matrix):
    """Spearman's correlation within each row A over the tasks B != A, averaged over the rows where it is defined:
    how B's similarity to A orders the forgetting of that A, whatever how well A was learned."""
    rhos = [spearman(*off_diagonal([similarity[i]], [row], skip=i)) for i, row in enumerate(matrix)]
    rhos = [rho for rho in rhos if rho is not None]
    return statistics.fmean(rhos) if rhos else None


def spearman(xs, ys):
    """Spearman's rank correlation: Pearson's correlation of the ranks, tied values sharing their mean rank."""
    def ranks(values):
        return [sum(v < x for v in values) + (sum(v == x for v in values) - 1) / 2 for x in values]
    rx, ry = torch.tensor(ranks(xs)), torch.tensor(ranks(ys))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.norm() * ry.norm()).item()
    return (rx @ ry).item() / denominator if denominator > 0 else None  # None: one side has no ranking at all


def off_diagonal(*matrices, skip=0):
    """Each matrix's entries for the ordered pairs A != B, in the same order (rows numbered from skip)."""
    return [[row[j] for i, row in enumerate(m, start=skip) for j in range(len(row)) if i != j] for m in matrices]


def print_pairs(report):
    names = report["tasks"]
    steps = ", ".join(map(str, report["scored_at"]))
    tables = [(f"pair forgetting: score on A lost, on average over B's steps {steps}", report["pair_forgetting"], 2),
              ("final forgetting: score on A lost by the end of B's training", report["final_forgetting"], 2),
              ("transfer: score on B after A then B, minus after B alone", report["transfer"], 2)]
    tables += [(f"{part} similarity of the base's task prototypes (cosine)", matrix, 3)
               for part, matrix in report["similarity"].items()]
    for title, matrix, digits in tables:
        print(f"\n{title}\n{format_table(matrix, names, names, 'A, then B', digits)}")
    print(f"\nSpearman rank correlation over the {len(names) * (len(names) - 1)} ordered pairs, and within rows "
          "(each A's own, averaged over the A's):")
    for name, rho in report["spearman"].items():
        within = report["spearman_within_rows"][name]
        within = within_or_why(report, 'undefined' if within is None else f'{within:+.2f}')
        print(f"  {name:<48} {'undefined' if rho is None else f'{rho:+.2f}':>9}  {within:>9}")
    print(f"\n({report['wall_time_s']:.0f} s)  -> {report['config']['out']}/pairs.json, pairs.png")


def within_rows_shown(report):
    """Whether the within-row correlations mean something: each row ranks len(tasks) - 1 pairs, and with two or
    three points a rank correlation can only be +-1, +-0.5 or 0."""
    return len(report["tasks"]) >= 5


def within_or_why(report, shown):
    return shown if within_rows_shown(report) else f"{shown} (from {len(report['tasks']) - 1} points a row: too few)"


def compare_pairs(reports, out):
    """The pair analysis over seeds: each Spearman correlation's mean and sd, the mean pair matrices."""
    summary = {"seeds": [r["config"]["seed"] for r in reports], "tasks": reports[0]["tasks"],
               **{kind: {name: mean_and_sd([r[kind][name] for r in reports]) for name in reports[0][kind]}
                  for kind in ["spearman", "spearman_within_rows"]},
               **{kind: mean_matrix([r[kind] for r in reports])
                  for kind in ["pair_forgetting", "final_forgetting", "transfer"]},
               "similarity": {part: mean_matrix([r["similarity"][part] for r in reports])
                              for part in reports[0]["similarity"]}}
    lines = ["| Spearman correlation | over all pairs | within rows |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {plus_minus(entry, '+.2f')} | "
              f"{within_or_why(summary, plus_minus(summary['spearman_within_rows'][name], '+.2f'))} |"
              for name, entry in summary["spearman"].items()]
    write_summary(out, summary, "\n".join(lines) + f"\n\n(over seeds {', '.join(map(str, summary['seeds']))})")
    draw_pairs({**summary, **{kind: {name: entry["mean"] for name, entry in summary[kind].items()}
                              for kind in ["spearman", "spearman_within_rows"]}}, out / "summary.png")
    return summary


def draw_pairs(report, path, cell=44):
    """Pair forgetting and combined similarity as heatmaps, each with its own scale (their ranges differ), and one
    against the other as a scatter plot over the ordered pairs."""
    names = report["tasks"]
    forgetting, similarity = report["pair_forgetting"], report["similarity"]["combined"]
    xs, ys = off_diagonal(similarity, forgetting)
    # a task's similarity to itself (1) is no pair's: left blank, so that the scale spans the pairs alone
    similarity = [[None if i == j else value for j, value in enumerate(row)] for i, row in enumerate(similarity)]
    width, height = heatmap_size(names, names, cell)
    side = len(names) * cell
    picture = Image.new("RGB", (2 * (width + 90) + side + 150, 60 + height + 90), "white")
    draw = ImageDraw.Draw(picture)
    x0 = 10
    for title, matrix, values, digits in [("pair forgetting: A's score lost (row A, then column B)", forgetting, ys, 2),
                                          ("combined similarity of A and B", similarity, xs, 3)]:
        draw.text((x0, 8), title, fill="black", font=typeface())
        draw_heatmap(picture, x0, 40, matrix, names, names, min(values), max(values), cell, digits)
        draw_colour_bar(picture, x0 + width + 10, 40 + height - side, side, min(values), max(values), digits)
        x0 += width + 90
    rho, within = (report[key]["pair_forgetting vs combined similarity"] for key in ["spearman",
                                                                                     "spearman_within_rows"])
    said = "" if rho is None else f": Spearman {rho:+.2f} over pairs" + (
        "" if within is None or not within_rows_shown(report) else f", {within:+.2f} within rows")
    for k, line in enumerate(wrapped(f"forgetting against similarity{said}", side + 60)):
        draw.text((x0 + 50, 8 + k * (TEXT + 4)), line, fill="black", font=typeface())
    low, high = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ticks = [(k / 4, f"{low + k * (high - low) / 4:.3f}") for k in range(5)]
    box = (x0 + 70, 40 + height - side, x0 + 70 + side, 40 + height)
    point = draw_axes(picture, box, ticks, (min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1), "forgetting")
    for x, y in zip(xs, ys):
        px, py = point((x - low) / (high - low), y)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=COLOURS[0])
    draw.text((box[2] - text_width("similarity"), box[3] + 60), "similarity", fill="black", font=typeface())
    picture.save(path)


# ---------------------------------------------------------------- --plan: what a run would train and need
# From the model's config alone: the model is built on the meta device (shapes, no weights), its parts are found and
# what trains is chosen as a run would (load_model, TRAINING), and one process's memory is added up item by item.
# The weights, gradients, AdamW's moments and the methods' own copies are counted exactly; the activations are an
# estimate (plan_activations), checked in the README against what runs here measure.
PLAN_TOKENS = 2048  # tokens per training example where --max-length does not say (LLaVA's and CoIN's limit)


PLAN_HEADROOM = 0.9  # the share of a GPU's memory a run may plan on: CUDA's context and the allocator take the rest


def plan(args):
    """--plan: for each method of the run, the weights by part, what trains, and one process's memory by item;
    what fits on each --gpu-memory, or which flags would make it fit. Printed, and written to <out>/plan.json."""
    # auto: what a GPU with bfloat16 runs (pick_dtype): float32 for tiny, bfloat16 for a real model
    auto = torch.float32 if args.model == "tiny" else torch.bfloat16
    dtype = auto if args.dtype == "auto" else getattr(torch, args.dtype)
    tasks = args.tasks or default_task_names(Path(args.data))
    methods = list(METHODS) if args.method == "all" else [args.method]
    model = meta_model(args, dtype)
    parts = model_parts(model)
    counts = {part: sum(p.numel() for n, p in model.named_parameters() if in_module(n, parts[part])
                        and n not in parts["connector"]) for part in ["vision", "language", "head"]}
    counts |= {"connector": sum(p.numel() for n, p in model.named_parameters() if n in parts["connector"]),
               "total": sum(p.numel() for p in model.parameters())}
    # what each --train makes of the model: its weights' bytes, the number that train and their bytes
    shapes = {}
    for train in TRAINING:
        with torch.device("meta"):  # LoRA's adapters are made on the meta device too
            trained = TRAINING[train](Run(args), meta_model(args, dtype))
        for name, p in trained.named_parameters():  # there peft leaves them float32; a run's are the model's dtype
            if "lora_" in name:
                p.data = p.data.to(dtype)
        shapes[train] = (sum(p.numel() * p.element_size() for p in trained.parameters()),
                         sum(p.numel() for p in trainable(trained).values()),
                         sum(p.numel() * p.element_size() for p in trainable(trained).values()),
                         gathered_at_once(trained))
    report = {"model": args.model, "dtype": str(dtype).removeprefix("torch."), "weights": counts,
              "shard": args.nproc if args.shard else None,
              "tokens_per_example": args.max_length or PLAN_TOKENS, "batch_size": args.batch_size,
              "grad_accum": args.grad_accum, "gradient_checkpointing": args.gradient_checkpointing,
              "tasks": len(tasks), "methods": {}}
    for method in methods:
        train = args.train or default_training(args.model, method)
        memory = plan_memory(model, args, method, train, shapes, len(tasks), dtype)
        total = sum(memory.values())
        report["methods"][method] = {
            "train": train, "trainable": shapes[train][1], "memory_gb": {k: v / 2 ** 30 for k, v in memory.items()},
            "total_gb": total / 2 ** 30,
            # torchrun: the same memory in every process, plus DDP's buckets, a second copy of the gradients as
            # backward makes them (in the trained weights' dtype); sharded, the total is each process's already
            "torchrun_total_gb": (total + shapes[train][2] * (not args.shard)) / 2 ** 30,
            "fits": {f"{gb:g}": flags_to_fit(model, args, method, train, shapes, len(tasks), dtype, gb)
                     for gb in args.gpu_memory}}
    write_json(args.out / "plan.json", report)
    print_plan(report)
    return report


def meta_model(args, dtype):
    """The run's model without weights: built from its config on the meta device, its vision encoder frozen."""
    name = str(SHIPPED_BASES / args.base) if args.model == "tiny" else args.model
    with model_loading_errors(args.model):
        config = AutoConfig.from_pretrained(name, trust_remote_code=args.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype,
                                                            trust_remote_code=args.trust_remote_code)
    refuse_encoder_decoder(model, args.model)
    freeze_vision_encoder(model)
    return model


def plan_memory(model, args, method, train, shapes, tasks, dtype):
    """One process's memory in bytes, by item, for a run of `method` with `train` training. Below float32 the
    trained weights have float32 masters (MasterWeightAdamW): their gradients are float32 at the optimizer's step,
    and the optimizer holds the masters beside AdamW's two float32 moments."""
    weights, n, trained, gathered = shapes[train]
    masters = dtype != torch.float32
    memory = {"weights": weights, "gradients": 4 * n if masters else trained, "optimizer": 8 * n + 4 * n * masters,
              "method": method_bytes(args, method, n, trained, tasks)}
    if args.shard:  # each process keeps its 1/N of these, and gathers a few units whole at a time
        memory = {item: size / args.nproc for item, size in memory.items()} | {"gathered": gathered}
    return memory | plan_activations(model, args, dtype.itemsize)


def gathered_at_once(model):
    """Under --shard, the bytes a process holds whole beside its shards at the peak of a step: the whole model's own
    weights (embeddings, connector, head, norms: gathered for the step) and two layers (the one that runs and the
    next, which FSDP fetches ahead), each with its trained weights' gradients until they are reduced and sharded."""
    def size(parameters, trained_only=False):
        return sum(p.numel() * p.element_size() for p in parameters if p.requires_grad or not trained_only)
    units = shard_units(model)
    in_units = {id(p) for unit in units for p in unit.parameters()}
    own = [p for p in model.parameters() if id(p) not in in_units]
    layer = max(units, key=lambda unit: size(unit.parameters()))
    return size(own) + size(own, True) + 2 * size(layer.parameters()) + size(layer.parameters(), True)


def method_bytes(args, method, n, trained, tasks):
    """What a method keeps beside the model: copies of the n trainable weights (`trained` bytes each copy), and
    float32 importances (replay's buffer holds examples, not weights)."""
    if method == "ewc":
        # importance and anchor; the penalty's graph keeps each weight's distance from the anchor
        # TIR: also the base's weights, the merged importance and a byte for each weight's owner
        return 4 * n + 2 * trained + (trained + 4 * n + n if args.tir else 0)
    if method == "lwf":  # the weights before the task, which the model is run with to teach itself; under --shard
        return trained * (1 + args.shard)  # also the weights in training, kept aside while those are swapped in
    if method == "eproj":
        return (tasks + 1) * trained  # an expert per task and the base's weights they start from
    return 0


def plan_activations(model, args, size):
    """What a training step keeps for its backward pass, for --batch-size examples of the planned length: per token
    and decoder layer, its input and norm (2h), queries, keys, values and the attention's output (2h + 2kv), the
    output projection's input (h), the MLP's input (h) and its gate, up, activation and down-projection input (4i);
    with --gradient-checkpointing, each layer's input alone and one layer's whole while it is recomputed. Eager
    attention also keeps each layer's attention matrix, heads x length^2, as float32 softmax and in the dtype (SDPA
    and flash attention keep a row's log-sum-exp alone). And the logits the loss reads (the answers' alone where the
    family lets the head skip the rest); and what the backward pass makes while it runs, about one layer's
    activations. The frozen vision encoder keeps nothing: its forward's memory is freed as it goes."""
    text = model.config.get_text_config()
    h, layers = text.hidden_size, text.num_hidden_layers
    intermediate = getattr(text, "intermediate_size", None) or 4 * h
    heads = text.num_attention_heads
    kv = h // heads * (getattr(text, "num_key_value_heads", None) or heads)
    per_layer = 6 * h + 2 * kv + 4 * intermediate
    per_token = layers * h + per_layer if args.gradient_checkpointing else layers * per_layer
    length = args.max_length or PLAN_TOKENS
    tokens = args.batch_size * length
    eager = getattr(text, "_attn_implementation", None) == "eager"
    # one layer's attention matrices: the float32 softmax and, below float32, its copy in the dtype
    attention = eager * args.batch_size * heads * length ** 2 * (4 + size * (size < 4))
    answers = args.batch_size * min(args.max_new_tokens, args.max_length or PLAN_TOKENS)
    vocabulary = model.get_output_embeddings().out_features
    # the head's rows, as the dtype, a float32 copy and the softmax the loss's backward needs
    logits = answers * vocabulary * (size + 8) + (0 if head_on_positions(model) else tokens * vocabulary * size)
    stored = 1 if args.gradient_checkpointing else layers
    # while a layer's backward runs, the gradients of its activations: about one layer's activations again
    return {"activations": tokens * per_token * size + stored * attention, "backward": tokens * per_layer * size,
            "logits": logits}


def flags_to_fit(model, args, method, train, shapes, tasks, dtype, gb):
    """'yes', or the first flags (each added to those before) with which the run fits in gb, or 'no'."""
    candidates, changes, flags = [({}, [])], {}, []
    if not args.gradient_checkpointing:
        changes, flags = {"gradient_checkpointing": True}, ["--gradient-checkpointing"]
        candidates.append((changes, flags))
    if train == "all":
        changes, flags = changes | {"train": "lora"}, flags + ["--train lora"]
        candidates.append((changes, flags))
    batch, accum = args.batch_size, args.grad_accum
    while batch > 1:  # as many examples per optimizer step, in smaller micro-batches
        batch, accum = (batch + 1) // 2, accum * 2
        candidates.append((changes | {"batch_size": batch, "grad_accum": accum},
                           flags + [f"--batch-size {batch} --grad-accum {accum}"]))
    for changes, flags in candidates:
        memory = plan_memory(model, with_args(args, **changes), method, changes.get("train", train), shapes, tasks,
                             dtype)
        if sum(memory.values()) <= PLAN_HEADROOM * gb * 2 ** 30:
            return "with " + " ".join(flags) if flags else "yes"
    return "no"


def print_plan(report):
    counts = report["weights"]
    parts = ", ".join(f"{part} {counts[part] / 1e6:,.1f} M" for part in ["vision", "connector", "language", "head"])
    print(f"--plan {report['model']} at {report['dtype']}: {counts['total'] / 1e6:,.1f} M weights ({parts}); "
          f"micro-batches of {report['batch_size']} examples of {report['tokens_per_example']} tokens"
          + (", gradient checkpointing" if report["gradient_checkpointing"] else ""))
    first = next(iter(report["methods"].values()))
    print("| method | train | trainable | " + " | ".join(f"{item} GB" for item in first["memory_gb"])
          + " | total GB | torchrun GB | " + " | ".join(f"{gb} GB GPU" for gb in first["fits"]) + " |")
    print("| --- " * (5 + len(first["memory_gb"]) + len(first["fits"])) + "|")
    for method, entry in report["methods"].items():
        print(f"| {method} | {entry['train']} | {entry['trainable'] / 1e6:,.1f} M | "
              + " | ".join(f"{gb:.3g}" for gb in entry["memory_gb"].values())
              + f" | {entry['total_gb']:.3g} | {entry['torchrun_total_gb']:.3g} | " + " | ".join(entry["fits"].values())
              + " |")
    if report["shard"]:
        print(f"torchrun --nproc_per_node {report['shard']} ... --shard: each GPU holds the total (1/{report['shard']} "
              "of the weights, gradients, optimizer state and method, and the units gathered whole at a time), and a "
              f"step takes {report['shard']} times the examples: a global batch of {report['shard']} x "
              f"{report['batch_size']} x {report['grad_accum']}.", end=" ")
    else:
        print(f"torchrun --nproc_per_node N: every GPU holds the torchrun column (the run's memory and DDP's buckets, "
              f"a second copy of the gradients), and a step takes N times the examples: a global batch of "
              f"N x {report['batch_size']} x {report['grad_accum']}.", end=" ")
    print(f"Activations assume every example {report['tokens_per_example']} tokens long (--max-length).")


# ---------------------------------------------------------------- --profile: where the time goes
PROFILED = ["load_model", "train", "training_batch", "evaluate_all", "save_checkpoint"]


@contextmanager
def profiled(args):
    """--profile: the command's time split into its parts, and training's model FLOPs per second (counted by
    torch's FlopCounterMode on a batch of each task) as a share of this machine's fp32 matmul rate: nanoGPT's MFU."""
    if not args.profile:
        yield
        return
    module, spent, work = sys.modules[__name__], Counter(), Counter()

    def timed(name, function):
        def wrapper(*positional, **keywords):
            if name == "train":  # one step's FLOPs, before the steps: gradients are cleared after, nothing else moves
                call = inspect.signature(function).bind(*positional, **keywords).arguments
                count_flops(call["model"], call["examples"], call["steps"], call["run"], work,
                            originals["training_batch"])
            started = time.perf_counter()
            try:
                return function(*positional, **keywords)
            finally:
                spent[name] += time.perf_counter() - started
        return wrapper
    originals = {name: getattr(module, name) for name in PROFILED}
    for name, function in originals.items():
        setattr(module, name, timed(name, function))
    started = time.perf_counter()
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(module, name, function)
        print_profile(time.perf_counter() - started, spent, work, args)


def count_flops(model, examples, steps, run, work, make_batch):
    """The FLOPs of one training step (forward and backward) on a batch of this task, times the task's steps.
    Counted in training mode, as the steps run: in evaluation mode transformers skips gradient checkpointing, and
    this step alone would keep every activation (on an H200 it was the LoRA run's peak: 36 GB of a 7B, not 15)."""
    args = run.args
    sample = random.Random(0).sample(examples, min(args.batch_size, len(examples)))
    batch = make_batch(run.processor, sample, run.device)
    was_training = model.training
    model.train()
    with FlopCounterMode(display=False) as counter:
        logits, targets = answer_logits(model, batch)
        F.cross_entropy(logits.float(), targets).backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    work["flops"] += counter.get_total_flops() * steps * args.grad_accum
    work["steps"] += steps


def print_profile(total, spent, work, args):
    compute = spent["train"] - spent["training_batch"]
    parts = {"loading the model": spent["load_model"], "building batches": spent["training_batch"],
             "training steps (forward, backward, optimizer)": compute, "evaluation": spent["evaluate_all"],
             "checkpoints": spent["save_checkpoint"]}
    parts["the rest (start-up, saving results, analyses)"] = total - sum(parts.values())
    print(f"\n--profile: {total:.1f} s after start-up")
    for part, seconds in parts.items():
        print(f"  {part:<48} {seconds:7.1f} s  {100 * seconds / total:4.0f}%")
    if work["steps"]:
        device = pick_device(args.device)
        dtype = pick_dtype(args, device)
        rate, achieved = matmul_rate(device, dtype), work["flops"] / compute
        recomputed = " (the forward recomputed by --gradient-checkpointing counted too)" * args.gradient_checkpointing
        print(f"  training: {work['steps']} steps, {1000 * compute / work['steps']:.1f} ms and "
              f"{work['flops'] / work['steps'] / 1e9:.2f} GFLOP each{recomputed}: {achieved / 1e9:.1f} GFLOP/s, "
              f"{100 * achieved / rate:.0f}% of this {device.type}'s {str(dtype).removeprefix('torch.')} matmul "
              f"rate ({rate / 1e9:.0f} GFLOP/s)")


def matmul_rate(device, dtype=torch.float32, size=2048, seconds=1.0):
    """FLOPs per second of a large matrix product in the run's dtype on this device: the yardstick for training's
    throughput (a GPU multiplies bfloat16 many times faster than float32)."""
    gpu = device.type == "cuda"
    size, each = (8192, 10) if gpu else (size, 1)  # a GPU's rate needs products large and many between syncs
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(each):
            a @ b
        count += each
        if gpu:
            torch.cuda.synchronize()
    return 2 * size ** 3 * count / (time.perf_counter() - started)


# ---------------------------------------------------------------- several processes: torchrun, data-parallel
# torchrun --nproc_per_node N cit.py ... starts N copies of this file, each told its RANK and the WORLD_SIZE. They
# draw the same batches and train on their shares of each (DistributedDataParallel averages the gradients, so every
# optimizer step is the same in every process), answer their shares of the test questions and gather the answers;
# the first process prints and writes. Without torchrun none of this runs.
@contextmanager
def processes(args):
    """Under torchrun: the process group (NCCL between GPUs, gloo between CPUs), each process on its own GPU, and
    only the first one printing; in one process, nothing."""
    if args.shard:
        check_shardable(args)
    if WORLD_SIZE == 1:
        yield
        return
    if args.analyze or args.plan:
        raise InputError(f"{'--plan' if args.plan else '--analyze pairs'} runs in one process: start it with python, "
                         "not torchrun")
    gpu = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    if gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if gpu else "gloo")
    if RANK > 0:
        sys.stdout = open(os.devnull, "w")
    try:
        yield
        torch.distributed.barrier()  # the first process may still be writing: the others wait for it
    finally:
        torch.distributed.destroy_process_group()


def check_shardable(args):
    """--shard (but for --plan) only under torchrun, and not for the pair analysis: refused in one line before
    anything loads."""
    if args.analyze:
        raise InputError("--analyze pairs runs in one process: leave --shard out")
    if WORLD_SIZE == 1 and not args.plan:
        raise InputError("--shard splits the model across torchrun's processes: start it with torchrun "
                         "--nproc_per_node N cit.py ... (or leave --shard out)")


def shard_model(model, run):
    """--shard: FSDP2's fully_shard over each layer of the language model and of the vision encoder, then over the
    whole model (the rest: embeddings, connector, head): each process keeps 1/N of every weight (as a DTensor) and
    of its gradient and AdamW's state, and gathers a layer's weights only while that layer runs, forward and
    backward (DeepSpeed ZeRO-3's scheme, which LLaVA and CoIN use). Gradients are averaged over the processes in
    float32, as DDP's are; every process then answers every test question, since each forward is a collective.
    The method's copies of the weights (EWC's importance and anchor, eproj's experts) are sharded alike, so that
    outside a forward every weight and every copy is a shard and a method's arithmetic on them stays shard by shard.
    (The vision encoder's layers are sharded, not the encoder as one: transformers finds what a model can return by
    its class's name, which fully_shard changes.)"""
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in shard_units(model):
        fully_shard(layer, mp_policy=policy)
    # The whole model's own weights are sharded again after each forward too (FSDP keeps a root's gathered for the
    # backward by default): EWC's penalty, computed after the forward, meets them as shards.
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)
    # FSDP sets its layers up at the whole model's first forward; transformers' generate calls the vision encoder
    # before that forward, which would set them up as models of their own: so set them up now (FSDP's own step)
    model._get_fsdp_state()._lazy_init()
    PROCESSES.sharded = True
    run.memory = sharded_like(run.memory, trainable(model))  # eproj's base weights, or a resumed run's memory
    return model


def sharded_like(value, weights):
    """The tensors in a method's memory (nested in dicts and lists) that copy a trainable weight, keyed by its name,
    sharded as that weight is; the rest as it was."""
    if isinstance(value, dict):
        return {key: distribute_tensor(item, weights[key].device_mesh, weights[key].placements)
                if key in weights and isinstance(item, torch.Tensor) and item.shape == weights[key].shape
                else sharded_like(item, weights) for key, item in value.items()}
    if isinstance(value, list):
        return [sharded_like(item, weights) for item in value]
    return value


def gathered(value):
    """A method's memory with each of its shards gathered whole, on the CPU (every process takes part), as a
    checkpoint keeps it; the memory itself as it is without --shard."""
    if isinstance(value, dict):
        return {key: gathered(item) for key, item in value.items()}
    if isinstance(value, list):
        return [gathered(item) for item in value]
    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def shard_units(model):
    """The layers that --shard gathers one at a time: the language model's decoder layers and the vision encoder's
    (each part's longest list of modules); the rest is the whole model's own."""
    parts = model_parts(model)
    return [layer for part in ["language", "vision"] for layer in max(
        (m for m in model.get_submodule(parts[part]).modules() if isinstance(m, torch.nn.ModuleList)), key=len)]


def full_weights(model):
    """A sharded model's weights, whole, on the CPU of the first process (every process takes part in gathering
    them); None for a model that is not sharded, whose own state_dict is whole."""
    if not isinstance(model, FSDPModule):
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextmanager
def main_process_first():
    """The first process does something (builds a base) before the others, who then find it done."""
    if WORLD_SIZE > 1 and RANK > 0:
        torch.distributed.barrier()
    yield
    if WORLD_SIZE > 1 and RANK == 0:
        torch.distributed.barrier()


class TrainingSteps:
    """train's steps as one process or several take them (part 1 shows the step itself): a progress bar on the
    first process; under torchrun, the model in DDP, every batch drawn whole by every process and trained on in
    shares, each share's loss weighted so that DDP's average is one process's mean; a loss that is no longer finite
    ends the run in one line, before the optimizer spreads it into every weight (the tasks before stand)."""
    def __init__(self, model, steps, desc):
        self.forward, self.desc = data_parallel(model), desc
        self.progress = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True, mininterval=1,
                             disable=None if RANK == 0 else True)

    def __iter__(self):
        return iter(self.progress)

    def draw(self, examples, batch_size, rng):
        """The batch of every process, drawn alike by each: batch_size x the number of processes."""
        return rng.sample(examples, min(batch_size * WORLD_SIZE, len(examples)))

    def share(self, examples):
        return examples[RANK::WORLD_SIZE]

    def weight(self, batch):
        return token_share(batch)

    def whole(self, penalty):
        """A penalty on a sharded model's weights is a sum of each process's part (over its shards): summed over the
        processes, its gradient still reaches each process's own shards alone."""
        return penalty.full_tensor() if isinstance(penalty, DTensor) else penalty

    def check(self, loss, step):
        if not math.isfinite(loss.item()):
            raise InputError(f"{self.desc}: the loss is {loss.item()} at step {step + 1}: training diverged; lower "
                             "--lr (or the method's weight) and start again with --overwrite")
        self.progress.set_postfix(loss=f"{loss.item():.3f}")


class Processes:
    """torchrun's processes as part 1 meets them outside train; in one process each of these changes nothing."""
    sharded = False  # under --shard every process does all: a sharded model's forward is a collective
    gathering = False  # within whole(model)

    def share(self, items):
        """This process's share of a list: every n-th item."""
        return items if self.sharded else items[RANK::WORLD_SIZE]

    @contextmanager
    def whole(self, model):
        """A sharded model's own weights (embeddings, connector, head, the vision encoder's embeddings) gathered for
        a while, for calls to its parts outside a forward: transformers' generate takes the image features before it
        calls the model, and prototype features embed text and pictures. Nothing without --shard, or within a while
        already begun."""
        if not isinstance(model, FSDPModule) or self.gathering:
            yield
            return
        self.gathering = True
        model.set_reshard_after_forward(False, recurse=False)  # gathered for every forward of a generation
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
            model.set_reshard_after_forward(True, recurse=False)
            self.gathering = False

    def called_with(self, model, weights):
        """The model as a function of other trainable weights (LwF's teacher): torch.func.functional_call swaps them
        in for the call, without a copy of the rest. A sharded model's layers gather their own weights whatever
        functional_call swaps in, so there the shards are swapped in place for the call and back (weights_in)."""
        def sharded(**inputs):
            with weights_in(model, weights):
                return model(**inputs)
        if isinstance(model, FSDPModule):
            return sharded
        return lambda **inputs: torch.func.functional_call(model, weights, args=(), kwargs=inputs)

    def answered(self, model, items, size, function):
        """function over batches of `size` items, each process doing its share of the batches; every process gets
        every result, in the items' order. A sharded model's own weights are gathered meanwhile (whole)."""
        with self.whole(model):
            shares = {start: function(items[start:start + size]) for start in self.share(range(0, len(items), size))}
        if WORLD_SIZE > 1:
            everyone = [None] * WORLD_SIZE
            torch.distributed.all_gather_object(everyone, shares)
            shares = {start: results for share in everyone for start, results in share.items()}
        return [result for start in sorted(shares) for result in shares[start]]

    def sum(self, tensors):
        """Each tensor summed over the processes, in place (EWC's importances, of each process's examples); under
        --shard every process measured every example, each on its own shards: nothing to sum."""
        if WORLD_SIZE > 1 and not self.sharded:
            for tensor in tensors:
                torch.distributed.all_reduce(tensor)


PROCESSES = Processes()


def data_parallel(model):
    """DistributedDataParallel over the weights that train now, made anew for each stage (eproj changes what
    trains between tasks, and DDP must see exactly that); in one process, the model itself."""
    if WORLD_SIZE == 1 or isinstance(model, FSDPModule):  # a sharded model averages its gradients itself
        return model
    on_gpu = next(model.parameters()).is_cuda
    # Unused weights are looked for: a batch without pictures leaves the connector out of the forward pass.
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if on_gpu else None,
                                   find_unused_parameters=True)


def token_share(batch):
    """This process's share of the batch's answer tokens, times the number of processes: the factor that turns
    DDP's average of each process's mean loss into the mean over all the batch's tokens, as one process has it."""
    if WORLD_SIZE == 1:
        return 1.0
    own = answer_positions(batch).sum()  # the tokens the loss is a mean over
    everyone = own.clone()
    torch.distributed.all_reduce(everyone)
    return WORLD_SIZE * own / everyone


if __name__ == "__main__":
    main()
