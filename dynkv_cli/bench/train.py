"""Train dynkv's bundled model (tokenizer + small Llama) from scratch on the task suite.

    python -m dynkv_cli.bench.train --out examples/model --minutes 50 --seed 0 [--device cpu|cuda]
    python -m dynkv_cli.bench.train --out examples/model --eval-only --lengths 8192 16384 --n-eval 5
    python -m dynkv_cli.bench.train --out examples/model --binding --n-eval 24

Everything is generated here (filler text, tasks, tokenizer), with a fixed seed. Loss is on the
answer tokens only (with `--lm-weight`, on the other tokens as well; with `--attn-weight`, also on
where three chosen heads attend, see ATTENTION_HINTS). Lengths follow a curriculum
(short to 4k) and most sequences get PoSE-style position skipping (the second part of the sequence
is shifted by a random gap), so positions up to `max_position_embeddings` are seen without training
at that length. Logs go to stderr; `<out>/training.json` records the config, the run, the accuracy
per task and length, and the key-to-value binding probe (`--binding`).

A run can start from a trained model (`--init`) and change it first without changing what it
computes: deeper (`--grow-after`), more heads (`--kv-group`, `--add-kv-heads`) or wider (`--widen`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from dynkv_cli.bench.tasks import (
    TASKS,
    format_prompt,
    make_example,
    make_suite,
    score,
    suffix_text,
    suite_seed,
    vocabulary_text,
)

MAX_POS = 32768


def log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(seed: int, vocab_size: int = 4096):
    """A byte-level BPE tokenizer for the suite's text. Numbers are split left to right into groups
    of up to three digits, each one token, the first with its leading space (" 844880" is " 844",
    "880"). With single-digit tokens the small model learnt which digits a needle holds but not
    their order (a digit recurs within and across needles, so it cannot point at the next one); with
    the space as a token of its own, "for K is" was three tokens away from the value instead of two,
    and the key was not matched (multi-key lookups at chance after 30 minutes)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\d{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # every digit group twice (first, so their merges are learnt whatever the vocabulary size), then the suite's text
    groups = [f"{i:0{k}d}" for k in (1, 2, 3) for i in range(10**k)]
    groups += [" " + g for g in groups]
    tok.train_from_iterator(["\n".join(groups)] * 2 + list(vocabulary_text(seed, 400)), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=MAX_POS,
        padding_side="left",
    )


# ----------------------------------------------------------------------------------------------
# Data


def encode_example(ex, tokenizer):
    """(prompt ids with BOS, answer ids + EOS) in the suite's prompt format."""
    be = tokenizer.backend_tokenizer
    doc, suffix = format_prompt(ex)
    ids = be.encode(doc).ids + be.encode(suffix, add_special_tokens=False).ids
    ans = be.encode(" " + ex.answer, add_special_tokens=False).ids + [tokenizer.eos_token_id]
    return ids, ans


def encode_training(ex, tokenizer, rng: random.Random, max_tokens: int):
    """(ids, labels): the document, the evaluation question and as many of the example's extra
    questions (in random order) as fit in `max_tokens` more tokens, each answer followed by EOS;
    labels mark the answers."""
    be = tokenizer.backend_tokenizer
    ids, ans = encode_example(ex, tokenizer)
    labels = [-100] * len(ids) + ans
    ids = ids + ans
    extra = list(ex.extra)
    rng.shuffle(extra)
    room = max_tokens
    for q, prefix, a in extra:
        p = be.encode(suffix_text(q, prefix), add_special_tokens=False).ids
        a_ids = be.encode(" " + a, add_special_tokens=False).ids + [tokenizer.eos_token_id]
        room -= len(p) + len(a_ids)
        if room < 0:
            break
        ids += p + a_ids
        labels += [-100] * len(p) + a_ids
    return ids, labels


def _copy_parts(rng: random.Random, n_tokens: int, tokenizer) -> list[tuple[str, list[int]]]:
    """Parts (each with a leading space) of filler sentences, keyed numbers and invented words, with
    their token ids, about `n_tokens // 2` tokens in all: the text the copying tasks repeat."""
    from dynkv_cli.bench import tasks as T

    be = tokenizer.backend_tokenizer
    parts: list[tuple[str, list[int]]] = []
    total = 0
    while total < n_tokens // 2:
        r = rng.random()
        if r < 0.35:
            part = T._magic(rng.choice(T.KEYS), T._number(rng, rng.choice((5, 6)), set()))
        elif r < 0.5:
            part = " " + " ".join(rng.choice(T.KEYS + T.MARKED) for _ in range(rng.randint(2, 5))) + "."
        else:
            part = " " + T._sentence(rng)
        ids = be.encode(part, add_special_tokens=False).ids
        parts.append((part, ids))
        total += len(ids)
    return parts


def copy_sequence(rng: random.Random, n_tokens: int, tokenizer):
    """A training-only warm-up task (not in the suite): a short text of filler, keyed numbers and
    invented words, then the same text again. Every token of the repeat is a copying target, which
    makes a copying circuit form in about 1000 steps; trained on the suite's lookups alone it did not
    form in 2000."""
    text = "".join(part for part, _ in _copy_parts(rng, n_tokens, tokenizer)).lstrip(" ")
    be = tokenizer.backend_tokenizer
    ids = be.encode(text + "\nRepeat the text.\nAnswer:").ids
    ans = be.encode(" " + text, add_special_tokens=False).ids + [tokenizer.eos_token_id]
    return ids + ans, [-100] * len(ids) + ans


def recall_sequence(rng: random.Random, n_tokens: int, tokenizer):
    """A training-only task (not in the suite): the parts of a copy text, then the same parts in a
    shuffled order. The first token of each repeated part is not a target (nothing tells which part
    comes next); every later token is, and only content tells it: the token after this one where
    it was read before (an induction head). The plain copy can be learnt by position alone, and a
    model that had learnt only that answered with the right tokens in the wrong order."""
    parts = _copy_parts(rng, n_tokens, tokenizer)
    be = tokenizer.backend_tokenizer
    ids = be.encode("".join(part for part, _ in parts).lstrip(" ") + "\nRepeat the parts in any order.\nAnswer:").ids
    labels = [-100] * len(ids)
    for _, p in rng.sample(parts, len(parts)):
        ids += p
        labels += [-100] + p[1:]
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    return ids, labels


def chains_sequence(rng: random.Random, n_tokens: int, tokenizer):
    """A training-only task (not in the suite): variable tracking without the haystack and with more
    chains. 2-12 chains (fewer in short sequences) of 1-4 assignments (` VAR A = 12345.`, ` VAR B =
    VAR A.`, each chain in order, the chains interleaved), then the suite's vt question for each
    chain in a random order, as many as fit in `n_tokens` (at least one). With two chains a model can
    score half of vt by picking either; here the value must be matched among several, and every
    question asks for it again."""
    from dynkv_cli.bench import tasks as T

    be = tokenizer.backend_tokenizer
    lens = [rng.randint(1, 4) for _ in range(rng.randint(2, max(2, min(12, n_tokens // 45))))]
    names = iter(rng.sample(T.VARS, sum(lens)))
    used: set[str] = set()
    chains = [(T._number(rng, 5, used), [next(names) for _ in range(k)]) for k in lens]
    pending = [T.assignments(c, v) for v, c in chains]
    lines = []
    while any(pending):  # a random interleaving that keeps each chain's order
        lines.append(rng.choice([p for p in pending if p]).pop(0))
    ids = be.encode("".join(lines).lstrip(" ")).ids
    labels = [-100] * len(ids)
    for i, (v, c) in enumerate(rng.sample(chains, len(chains))):
        q = be.encode(suffix_text(T.ask_vars(v)), add_special_tokens=False).ids
        a = be.encode(" " + " ".join(c), add_special_tokens=False).ids + [tokenizer.eos_token_id]
        if i and len(ids) + len(q) + len(a) > n_tokens:
            break
        ids += q + a
        labels += [-100] * len(q) + a
    return ids, labels


# task mix (documents per task): the tasks with extra questions already give more answers per document
TASK_WEIGHTS = {
    "niah_single": 1.0,
    "niah_multikey": 1.0,
    "niah_multivalue": 1.2,
    "niah_multiquery": 1.2,
    "vt": 1.6,
    "aggregation": 1.4,
    "fact_start": 0.8,
    "fact_end": 0.8,
    "copy": 0.3,  # the warm-up copying task (copy_sequence), kept in the mix at a low weight
}
# the training-only tasks (not in the suite); those not in TASK_WEIGHTS (recall, chains) join the mix
# only when given a weight (--task-weight recall=0.4)
_TRAINING_ONLY = {"copy": copy_sequence, "recall": recall_sequence, "chains": chains_sequence}


def task_weights(overrides: list[str] | None) -> dict[str, float]:
    """TASK_WEIGHTS with `--task-weight NAME=W` overrides applied (W = 0 drops a task from the mix)."""
    weights = dict(TASK_WEIGHTS)
    for item in overrides or []:
        name, sep, value = item.partition("=")
        if not sep or name not in {*TASKS, *_TRAINING_ONLY}:
            known = ", ".join([*TASKS, *_TRAINING_ONLY])
            raise SystemExit(f"--task-weight takes NAME=WEIGHT with NAME one of {known} (got {item!r})")
        try:
            w = float(value)
        except ValueError:
            raise SystemExit(f"--task-weight {item!r}: the weight must be a number") from None
        if w < 0:
            raise SystemExit(f"--task-weight {item!r}: the weight must be 0 or more")
        weights[name] = w
    mix = {n: w for n, w in weights.items() if w > 0}
    if not mix:
        raise SystemExit("--task-weight: every task has weight 0, nothing is left to train on")
    return mix


COPY_TASKS = ("copy",)
LOOKUP_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "copy")


class PreStage(NamedTuple):
    """A stage run until its answer loss (EMA) is below `until` (a command-line option) or `cap` of the
    training time has passed, whichever comes first."""

    name: str
    lengths: list[int]
    batch_tokens: int
    pose: float
    tasks: tuple[str, ...]
    until: str  # the option holding the loss threshold
    cap: float


# First the copying warm-up alone on short texts, in small batches (many steps: the copy circuit
# appears suddenly after enough steps, not enough tokens; mixed with the suite's tasks it did not
# appear in 2000 steps, alone it does in about 1000-1500). Then the keyed lookups (with copying
# kept in the mix) on short documents: after the copy stage the curriculum below learnt which digits
# a needle holds but not their order (answers came out as permutations of the right digits).
# The STAGES then share the rest of the time.
PRE_STAGES = [
    PreStage("copy", [96], 2048, 0.0, COPY_TASKS, "warm_loss", 0.4),
    PreStage("lookup", [128, 192, 256], 2048, 0.0, LOOKUP_TASKS, "lookup_loss", 0.7),
]
STAGE_NAMES = [s.name for s in PRE_STAGES] + ["curriculum"]

STAGES = [  # (end as a fraction of the time after the pre-stages, lengths, batch tokens, PoSE probability, tasks)
    # every task, then longer documents, keeping some short ones in the mix so nothing learnt is lost
    (0.30, [96, 128, 256, 512], 8192, 0.3, None),
    (0.60, [256, 512, 1024, 1536, 2048], 8192, 0.5, None),
    (1.01, [512, 1024, 2048, 3072, 4096], 8192, 0.5, None),
]


def curriculum_fraction(start: float, end: float, rest: float) -> float:
    """The curriculum's fraction when `rest` (0 to 1) of the curriculum's time has passed: from
    `start` to `end`, so a run can stay in the short stages (`--curriculum-end 0.3`)."""
    return start + (end - start) * rest


def stage(frac: float, batch_tokens: int | None = None):
    """(lengths, batch tokens, PoSE probability, tasks or None for all) at this fraction of the time;
    `batch_tokens` (--batch-tokens) replaces the stage's own."""
    lengths, own, pose, tasks = next((rest for end, *rest in STAGES if frac < end), STAGES[-1][1:])
    return lengths, batch_tokens or own, pose, tasks


def make_batch(
    rng: random.Random,
    counter: list[int],
    length: int,
    batch_tokens: int,
    tokenizer,
    seed,
    pose: float,
    tasks=None,
    weights: dict[str, float] | None = None,
):
    bsz = max(1, batch_tokens // length)
    mix = weights or TASK_WEIGHTS  # the curriculum's mix; a stage's own `tasks` are drawn uniformly
    names = list(tasks or mix)
    draw = [1.0] * len(names) if tasks else [mix[n] for n in names]
    seqs, labs = [], []
    for _ in range(bsz):
        task = rng.choices(names, draw)[0]
        counter[0] += 1
        if task in _TRAINING_ONLY:
            ids, lab = _TRAINING_ONLY[task](rng, length, tokenizer)
        else:
            ex = make_example(task, length, suite_seed("train", seed, task, length, counter[0]), tokenizer)
            ids, lab = encode_training(ex, tokenizer, rng, max_tokens=max(48, length // 2))
        seqs.append(ids)
        labs.append(lab)
    T = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((bsz, T), pad, dtype=torch.long)
    labels = torch.full((bsz, T), -100, dtype=torch.long)
    pos = torch.arange(T).repeat(bsz, 1)
    for b, (s, lab) in enumerate(zip(seqs, labs, strict=True)):
        input_ids[b, : len(s)] = torch.tensor(s)
        labels[b, : len(s)] = torch.tensor(lab)
        if rng.random() < pose:
            # PoSE-style skip: positions after a random split jump by a random gap
            split = rng.randint(1, len(s) - 1)
            room = MAX_POS - T - 1
            if room > 0:  # half uniform, half log-uniform (many small gaps, some up to MAX_POS)
                gap = rng.randint(0, room) if rng.random() < 0.5 else int(math.exp(rng.uniform(0, math.log(room))))
                pos[b, split:] += gap
    return input_ids, labels, pos


def answer_loss(model, input_ids, labels, pos, lm_weight: float = 0.0, repeats=None):
    """(loss to train on, answer loss): the cross-entropy of the answer tokens, plus `lm_weight`
    times that of every other next token (the documents and questions, padding excluded), plus,
    with `repeats` = (weight, item mask), that weight times :func:`repeat_loss`."""
    # An explicit mask: without one, transformers reads a jump in position_ids as the start of a
    # new packed sequence and blocks attention across it, which would cut PoSE sequences in two.
    mask = torch.ones_like(input_ids)
    out = model.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False)
    h = out.last_hidden_state[:, :-1]
    tgt = labels[:, 1:]
    m = tgt != -100
    loss = torch.nn.functional.cross_entropy(model.lm_head(h[m]).float(), tgt[m])
    total = loss
    if lm_weight > 0:
        nxt = input_ids[:, 1:]
        rest = ~m & (nxt != model.config.pad_token_id)
        total = total + lm_weight * torch.nn.functional.cross_entropy(model.lm_head(h[rest]).float(), nxt[rest])
    if repeats is not None and repeats[0] > 0:
        total = total + repeats[0] * repeat_loss(model, out.last_hidden_state, input_ids, labels, repeats[1])
    return total, loss


def repeat_loss(model, hidden, input_ids, labels, items) -> torch.Tensor:
    """Unlikelihood of repeating an item (--repeat-weight): where an answer's next item starts
    (:func:`said_targets`: never where the right item repeats one), the mean of -log(1 - p(any item
    the answer has already said)). The lists' commonest error is naming their first item again."""
    targets = said_targets(input_ids, labels, items)
    if not targets:
        return hidden.new_zeros(())
    rows = torch.tensor([b for b, _, _ in targets], device=hidden.device)
    at = torch.tensor([t for _, t, _ in targets], device=hidden.device)
    p = log_p_said(model.lm_head(hidden[rows, at]).float(), input_ids, targets).exp().clamp(max=1 - 1e-6)
    return -torch.log1p(-p).mean()


def log_p_said(logits, input_ids, targets) -> torch.Tensor:
    """Per target of :func:`said_targets` (one row of `logits` each): log p(any item already said)."""
    said = torch.zeros_like(logits, dtype=torch.bool)
    for i, (b, _, sources) in enumerate(targets):
        said[i, input_ids[b, sources]] = True
    return torch.logsumexp(logits.masked_fill(~said, float("-inf")), 1) - torch.logsumexp(logits, 1)


# ----------------------------------------------------------------------------------------------
# Attention hints (--attn-weight): a training-only loss on the attention of a few chosen heads


class Hint(NamedTuple):
    """Train head `head` of layer `layer` (negative: counted from the last layer) to attend, from each
    query position, to the target that `kind` names: "prev" the token before, "prev2" the one before
    that, "lookup" the place in the document where the number an answer starts with is written (and
    what the head reads there should name that number: see AttentionHints)."""

    layer: int
    head: int
    kind: str


# Key-to-value binding needs three heads working together, and none of them helps the answer until
# the others exist, so trained on the answers alone they did not form (docs/quality.md, sessions 4-6).
# For " for K is V" asked with "... for K is": one head brings K to the query (the token before " is"),
# one brings K to the value (two tokens before it), and one at the query matches K with K.
ATTENTION_HINTS = (Hint(0, 0, "prev"), Hint(0, 1, "prev2"), Hint(-1, 0, "lookup"))
_HINT_OFFSETS = {"prev": 1, "prev2": 2, "prev3": 3}

# More hints, turned on by name (--extra-hint), for the two skills the hints above do not reach
# (docs/quality.md, the eleventh session):
# - "chain", variable tracking: in " VAR B = VAR A." the variable that comes after A in the answer, B,
#   is three tokens before the A that is assigned from. One head of layer 1 brings each token the one
#   three before it ("prev3"), and a head of the last layer looks, from the answer's A, at
#   that A ("chain", with a copy term as "lookup" has): the next variable is what it reads there. The
#   chain's first variable is found the same way from its value (" VAR A = 123 45.": the 45). Its
#   copy term reads the sources alone (the attention it should have, not the one it has): with its
#   own attention, which found the sources slowly, it read nothing there that named the answer; and a
#   copy term on prev3 itself wrote the token three back in the directions of the token's own
#   embedding, where the chain head could not tell the two apart. (prev3 is in layer 1, not 0: in
#   the shipped model layer 1 computes almost nothing, and a head of layer 0 shares its keys with a
#   head the model needs. The chain head is in the last layer: in the second-to-last it learnt to
#   find and read the next variable, but what it wrote did not reach the answer through the last.
#   In the last layer of the shipped model it shares keys and values with the lookup head, and it
#   has not yet learnt to read there: docs/quality.md, the eleventh session.)
# - "said", the lists (all values of a key, the most frequent words): a head that attends from where
#   the next item starts to the items already written in the answer, and whose output alone makes
#   them unlikely ("anticopy"), so that the list does not repeat its first item.
EXTRA_HINTS = {
    "chain": (Hint(1, 1, "prev3"), Hint(-1, 1, "chain")),
    "said": (Hint(-2, 3, "said"),),
}


HINT_KINDS = ("prev", "prev2", "prev3", "lookup", "chain", "said")


def extra_hints(text: str) -> tuple[Hint, ...]:
    """`--extra-hint`: a set of EXTRA_HINTS by name, or one hint written KIND:LAYER:HEAD."""
    if text in EXTRA_HINTS:
        return EXTRA_HINTS[text]
    kind, _, rest = text.partition(":")
    layer, _, head = rest.partition(":")
    try:
        hint = Hint(int(layer), int(head), kind)
    except ValueError:
        hint = None
    if hint is None or kind not in HINT_KINDS or hint.head < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a hint set ({', '.join(sorted(EXTRA_HINTS))}) nor KIND:LAYER:HEAD "
            f"with KIND one of {', '.join(HINT_KINDS)} (for example chain:-1:6)"
        )
    return (hint,)


def number_tokens(tokenizer) -> torch.Tensor:
    """A mask over the vocabulary: the tokens that start a number (a space and up to three digits)."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([t is not None and t[:1] == "\u0120" and t[1:].isdigit() for t in vocab])


def word_tokens(tokenizer) -> torch.Tensor:
    """A mask over the vocabulary: the single-token invented words an answer can name by lookup (needle
    keys, author names, variable names; not the aggregation's marked words, which are counted)."""
    from dynkv_cli.bench import tasks as T

    be = tokenizer.backend_tokenizer
    mask = torch.zeros(len(tokenizer), dtype=torch.bool)
    for w in [*T.KEYS, *T.VARS]:
        ids = be.encode(" " + w, add_special_tokens=False).ids
        if len(ids) == 1:
            mask[ids[0]] = True
    return mask


def lookup_targets(input_ids, labels, starts_number, max_sources: int = 2, words=None):
    """[(row, query position, source positions)]: each answer token that starts a number whose first
    two tokens are written at most `max_sources` times before it, outside the answers; the query is
    the position that predicts it and the sources are where the number is written. With `words` (a
    vocabulary mask, :func:`word_tokens`), also each answer token that is such a word, written at
    most `max_sources` times before it (a variable of a chain, a key, a name)."""
    out = []
    for b in range(input_ids.shape[0]):
        ids, lab = input_ids[b], labels[b]
        context = lab == -100
        for j in (~context).nonzero().flatten().tolist():
            if j < 2 or j + 1 >= ids.shape[0]:
                continue
            if starts_number[ids[j]]:
                hit = (ids[: j - 1] == ids[j]) & (ids[1:j] == ids[j + 1]) & context[: j - 1]
            elif words is not None and words[ids[j]]:
                hit = (ids[:j] == ids[j]) & context[:j]
            else:
                continue
            src = hit.nonzero().flatten().tolist()
            if 1 <= len(src) <= max_sources:
                out.append((b, j - 1, src))
    return out


def chain_targets(input_ids, labels, words, equals: int):
    """[(row, query position, [source])]: each answer token that is a word (`words`, a vocabulary
    mask) assigned in the document as " VAR <word> = <rhs>." (the word followed by the token
    `equals`): the query is the position that predicts it, the source the token three after the word
    (the last token of the right-hand side: in a chain the variable assigned from, or the value's end)."""
    out = []
    for b in range(input_ids.shape[0]):
        ids, lab = input_ids[b], labels[b]
        context = lab == -100
        for j in (~context).nonzero().flatten().tolist():
            if j < 5 or not words[ids[j]]:  # an assignment takes 5 tokens before the answer
                continue
            at = ((ids[: j - 4] == ids[j]) & (ids[1 : j - 3] == equals) & context[: j - 4]).nonzero().flatten()
            src = [p + 3 for p in at.tolist() if context[p + 3]]
            if len(src) == 1:
                out.append((b, j - 1, src))
    return out


def said_targets(input_ids, labels, items):
    """[(row, query position, positions of the items already said)]: in each answer (a run of
    labelled tokens), each token that starts an item (`items`, a vocabulary mask: numbers, keys,
    variables, marked words) after the first, unless it repeats one; the query is the position that
    predicts it and the targets are where the answer's earlier items start."""
    out = []
    for b in range(input_ids.shape[0]):
        ids, lab = input_ids[b].tolist(), labels[b].tolist()
        said: list[int] = []
        for j, (t, y) in enumerate(zip(ids, lab, strict=True)):
            if y == -100:
                said = []  # outside an answer: the next answer starts afresh
                continue
            if not items[t]:
                continue
            if said and all(ids[i] != t for i in said):
                out.append((b, j - 1, list(said)))
            said.append(j)
    return out


def item_tokens(tokenizer) -> torch.Tensor:
    """A mask over the vocabulary: the tokens that start an answer's item (numbers, the invented words
    of :func:`word_tokens` and the aggregation's marked words)."""
    from dynkv_cli.bench import tasks as T

    be = tokenizer.backend_tokenizer
    mask = number_tokens(tokenizer) | word_tokens(tokenizer)
    for w in T.MARKED:
        mask[be.encode(" " + w, add_special_tokens=False).ids[0]] = True
    return mask


class AttentionHints:
    """Captures the input of the hinted layers' attention during a training forward pass and turns
    it into a loss: per hint, the mean over its query positions of -log(attention on the targets),
    recomputed for that one head from the layer's own projections and rotary embedding. A "lookup"
    hint adds a "copy" term: the cross-entropy of the answer token given the head's output alone
    (RMS-normalised, through the final norm's weight and the unembedding, weighted by `copy_scale`),
    so that what the head finds reaches the answer. With `words`, the lookups include the answers'
    invented words (:func:`word_tokens`) as well as their numbers. The "chain" and "said" hints of
    EXTRA_HINTS work the same way on their own targets (:func:`chain_targets`, :func:`said_targets`);
    the chain's copy term reads its sources alone, and "said" has an "anticopy" term instead."""

    def __init__(
        self,
        model,
        tokenizer,
        hints=ATTENTION_HINTS,
        positions: int = 256,
        copy_scale: float = 1.0,
        words: bool = False,
    ):
        cfg = model.config
        self.layers = model.model.layers
        self.unembed = model.lm_head.weight
        self.final_norm = model.model.norm.weight
        self.hints = [Hint(h.layer % cfg.num_hidden_layers, h.head, h.kind) for h in hints]
        self.head_dim = cfg.head_dim
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        self.pad = tokenizer.pad_token_id
        self.starts_number = number_tokens(tokenizer)
        invented = word_tokens(tokenizer)
        self.words = invented if words else None  # lookups of invented words too
        heads = [(h.layer, h.head) for h in self.hints]
        if any(h.head >= cfg.num_attention_heads for h in self.hints):
            raise ValueError(f"an attention hint names a head the model lacks ({cfg.num_attention_heads} per layer)")
        if len(set(heads)) < len(heads):
            raise ValueError(f"two attention hints on one head (layer, head): {heads}")
        if any(h.kind == "chain" for h in self.hints):
            self.chain_words = invented
            self.equals = tokenizer.backend_tokenizer.encode(" =", add_special_tokens=False).ids[0]
        if any(h.kind == "said" for h in self.hints):
            self.items = item_tokens(tokenizer)
        self.copy_scale = copy_scale  # the copy term's weight against the attention terms
        self.positions = positions
        self.inputs: dict[int, tuple] = {}
        self.handles = [
            self.layers[i].self_attn.register_forward_pre_hook(self._capturer(i), with_kwargs=True)
            for i in sorted({h.layer for h in self.hints})
        ]

    def _capturer(self, i: int):
        def hook(module, args, kwargs):
            if module.training:
                self.inputs[i] = (
                    kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                    kwargs["position_embeddings"],
                )

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _weights(self, hint: Hint):
        """The hinted head's (query, key, value, output) weight slices; key and value are its KV head's."""
        attn = self.layers[hint.layer].self_attn
        q, kv = slice(hint.head * self.head_dim, (hint.head + 1) * self.head_dim), hint.head // self.group
        kv = slice(kv * self.head_dim, (kv + 1) * self.head_dim)
        return attn.q_proj.weight[q], attn.k_proj.weight[kv], attn.v_proj.weight[kv], attn.o_proj.weight[:, q]

    def _qk(self, hint: Hint):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        hidden, (cos, sin) = self.inputs[hint.layer]
        w_q, w_k, _, _ = self._weights(hint)
        q, k = apply_rotary_pos_emb((hidden @ w_q.T).unsqueeze(1), (hidden @ w_k.T).unsqueeze(1), cos, sin)
        return q[:, 0], k[:, 0], self.layers[hint.layer].self_attn.scaling

    def _read(self, hint: Hint, q, k, scale, input_ids, targets):
        """(attention term, read term) of a targeted hint, over all its targets at once: the mean of
        -log(attention on the sources) and of what the head's output alone (RMS-normalised, through
        the final norm's weight and the unembedding) says: the cross-entropy of the next token, or for
        "said" log p(any item already said)."""
        _, _, w_v, w_o = self._weights(hint)
        dev = input_ids.device
        rows = torch.tensor([b for b, _, _ in targets], device=dev)
        at = torch.tensor([t for _, t, _ in targets], device=dev)
        n = int(at.max()) + 1
        s = torch.einsum("nd,ntd->nt", q[rows, at], k[rows, :n]) * scale
        s = s.masked_fill(torch.arange(n, device=dev) > at[:, None], float("-inf"))
        src = torch.zeros_like(s, dtype=torch.bool)
        for i, (_, _, sources) in enumerate(targets):
            src[i, sources] = True
        look = torch.logsumexp(s, 1) - torch.logsumexp(s.masked_fill(~src, float("-inf")), 1)
        v = self.inputs[hint.layer][0] @ w_v.T
        # "chain" reads its sources alone (see EXTRA_HINTS); the others read with their own attention
        attn = src / src.sum(1, keepdim=True) if hint.kind == "chain" else s.softmax(1)
        out = torch.einsum("nt,ntd->nd", attn, v[rows, :n]) @ w_o.T
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6) * self.final_norm
        logits = out @ self.unembed.T
        if hint.kind == "said":  # pushed down
            read = log_p_said(logits, input_ids, targets)
        else:  # what it reads there names the answer
            read = torch.nn.functional.cross_entropy(logits, input_ids[rows, at + 1], reduction="none")
        return look.mean(), read.mean()

    def _targets(self, kind: str, input_ids, labels, cache: dict):
        if kind not in cache:
            if kind == "lookup":
                cache[kind] = lookup_targets(input_ids, labels, self.starts_number, words=self.words)
            elif kind == "chain":
                cache[kind] = chain_targets(input_ids, labels, self.chain_words, self.equals)
            else:
                cache[kind] = said_targets(input_ids, labels, self.items)
        return cache[kind]

    def loss(self, input_ids, labels):
        """(sum of the hints' losses, {"layer.head kind": exp(-loss)}, the geometric mean over the
        query positions of the attention on the targets; for "anticopy" the probability that the
        head's output alone gives the items already said)."""
        parts: dict[str, torch.Tensor] = {}
        cache: dict[str, list] = {}
        for hint in self.hints:
            q, k, scale = self._qk(hint)
            name = f"{hint.layer}.{hint.head}"
            if hint.kind in ("lookup", "chain", "said"):
                targets = self._targets(hint.kind, input_ids, labels, cache)
                if not targets:
                    continue
                look, read = self._read(hint, q, k, scale, input_ids, targets)
                parts[f"{name} {hint.kind}"] = look
                parts[f"{name} {'anticopy' if hint.kind == 'said' else 'copy'}"] = read
            else:
                off, n, dev = _HINT_OFFSETS[hint.kind], input_ids.shape[1], input_ids.device
                pos = torch.arange(off, n, device=dev)
                if len(pos) > self.positions:
                    pos = pos[torch.randperm(len(pos), device=dev)[: self.positions]].sort().values
                s = (q[:, pos] @ k.transpose(1, 2)) * scale  # (batch, positions, keys)
                s = s.masked_fill(torch.arange(n, device=dev) > pos[:, None], float("-inf"))
                on = s.gather(2, (pos - off)[None, :, None].expand(s.shape[0], -1, 1))[..., 0]
                lp = on - torch.logsumexp(s, -1)
                real = input_ids[:, pos] != self.pad
                parts[f"{name} {hint.kind}"] = -lp[real].mean()
        total = sum(v * (self.copy_scale if name.endswith("copy") else 1.0) for name, v in parts.items())
        shown = {  # p(items said) to two significant digits: it is small
            name: float(f"{math.exp(v.item()):.2g}") if name.endswith("anticopy") else round(math.exp(-v.item()), 3)
            for name, v in parts.items()
        }
        return total if parts else torch.zeros(()), shown


# ----------------------------------------------------------------------------------------------
# Evaluation (plain transformers, full KV, greedy)


LIST_TASKS = ("niah_multivalue", "vt", "aggregation")  # answers that are lists of one-word items


def repeats_an_item(prediction: str) -> bool:
    """Whether a list answer (LIST_TASKS) names one item twice: its first line's words, split at
    spaces and commas."""
    items = [w for w in re.split(r"[,\s]+", prediction.split("\n")[0]) if w]
    return len(items) != len(set(items))


@torch.no_grad()
def evaluate(model, tokenizer, lengths, n, seed, device, tasks=None, predictions=None, repeats=None):
    """Full-KV greedy accuracy per length and task (and the average); with `repeats` (a dict), also
    the fraction of the LIST_TASKS' answers that name an item twice, per length and task."""
    model.eval()
    results: dict[str, dict[str, float]] = {}
    for length in lengths:
        row: dict[str, float] = {}
        for task in tasks or list(TASKS):
            scores, repeated = [], []
            for ex in make_suite([task], length, n, seed, "eval", tokenizer):
                ids, ans = encode_example(ex, tokenizer)
                x = torch.tensor([ids], device=device)
                gen = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=len(ans) + 4,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
                pred = tokenizer.decode(gen[0, len(ids) :], skip_special_tokens=True).strip()
                scores.append(score(ex, pred))
                repeated.append(repeats_an_item(pred))
                if predictions is not None:
                    predictions.append(
                        {
                            "task": task,
                            "n_tokens": length,
                            "prompt_tokens": len(ids),
                            "answer": ex.answer,
                            "prediction": pred,
                            "score": scores[-1],
                        }
                    )
            row[task] = round(sum(scores) / len(scores), 4)
            if repeats is not None and task in LIST_TASKS:
                repeats.setdefault(str(length), {})[task] = round(sum(repeated) / len(repeated), 4)
        row["average"] = round(sum(row[t] for t in row) / len(row), 4)
        results[str(length)] = row
    model.train()
    return results


@torch.no_grad()
def answer_token_accuracy(model, tokenizer, length: int, n: int, seed: int, device, tasks=None, first: int = 8):
    """Per task, the teacher-forced accuracy of each of the first `first` answer tokens (the answer
    given up to that token): it tells a model that finds a needle but not the order of its digits
    (a flat profile that rises on the last digit, which is the one left) from one that copies."""
    model.eval()
    out: dict[str, list[float]] = {}
    for task in tasks or list(TASKS):
        hits, seen = [0] * first, [0] * first
        for ex in make_suite([task], length, n, seed, "eval", tokenizer):
            ids, ans = encode_example(ex, tokenizer)
            x = torch.tensor([ids + ans], device=device)
            pred = model(x).logits[0, len(ids) - 1 : len(ids) + len(ans) - 1].argmax(-1).tolist()
            for i, (p, a) in enumerate(zip(pred[:first], ans[:first], strict=True)):
                hits[i] += int(p == a)
                seen[i] += 1
        out[task] = [round(h / s, 2) for h, s in zip(hits, seen, strict=True) if s]
    model.train()
    return out


BINDING_KS = (1, 2, 4, 8)


def _binding_prompts(tokenizer, k: int, n: int, seed: int):
    """The probe's prompts with `k` keys: (ids, the first token of each needle's value, the asked needle)."""
    from dynkv_cli.bench import tasks as T

    be = tokenizer.backend_tokenizer
    for i in range(n):
        rng = random.Random(f"binding:{seed}:{k}:{i}")
        keys = rng.sample(T.KEYS, k)
        # values whose first digit groups differ, so the first token names one needle
        heads = rng.sample(range(100, 1000), k)
        values = [f"{h}{rng.randrange(1000):03d}" for h in heads]
        firsts = [be.encode(" " + v, add_special_tokens=False).ids[0] for v in values]
        asked = rng.randrange(k)
        doc = "".join(T._magic(key, v) for key, v in zip(keys, values, strict=True)).lstrip(" ")
        ex = T.Example("niah_multikey", doc, T._ask1(keys[asked]), values[asked], prefix=T._cue1(keys[asked]))
        yield encode_example(ex, tokenizer)[0], firsts, asked


@torch.no_grad()
def binding_accuracy(model, tokenizer, n: int, seed: int, device) -> dict[str, dict[str, float]]:
    """Key-to-value binding with no haystack: `k` keyed needles in the suite's wording
    (" The special magic number for K is V."), then one key asked with the answer prefix. Per `k`:
    `right`, how often the next token predicted is the asked value's first token; `in_context`, how
    often it is the first token of some needle's value; and `chance` = 1/k. A model that copies a
    value from the context but has not bound values to keys scores `right` ≈ `chance` with
    `in_context` ≈ 1: the multi-key lookups fail that way whatever the document's length."""
    model.eval()
    out: dict[str, dict[str, float]] = {}
    for k in BINDING_KS:
        right = in_context = 0
        for ids, firsts, asked in _binding_prompts(tokenizer, k, n, seed):
            pred = model(torch.tensor([ids], device=device)).logits[0, -1].argmax().item()
            right += pred == firsts[asked]
            in_context += pred in firsts
        out[str(k)] = {"right": round(right / n, 3), "in_context": round(in_context / n, 3), "chance": round(1 / k, 3)}
    model.train()
    return out


@torch.no_grad()
def binding_heads(model, tokenizer, n: int, seed: int, device, k: int = 4) -> dict[str, dict[str, float]]:
    """Where each head ("layer.head") looks from the position that predicts the answer, on the
    probe's prompts with `k` keys: its attention on the first tokens of all the needles' values
    (`values`) and on the asked needle's (`asked`), mean over `n` prompts. A head that copies the
    bound value puts nearly all of `values` on `asked`; one that copies at chance about 1/k of it."""
    was = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the one that returns attention weights
    model.eval()
    sums: dict[str, list[float]] = {}
    try:
        for ids, firsts, asked in _binding_prompts(tokenizer, k, n, seed):
            attentions = model(torch.tensor([ids], device=device), output_attentions=True).attentions
            at = [ids.index(f) for f in firsts]
            for layer, a in enumerate(attentions):
                last = a[0, :, -1]  # (heads, keys)
                for h in range(last.shape[0]):
                    acc = sums.setdefault(f"{layer}.{h}", [0.0, 0.0])
                    acc[0] += last[h, at].sum().item()
                    acc[1] += last[h, at[asked]].item()
    finally:
        model.set_attn_implementation(was)
        model.train()
    return {name: {"values": round(v / n, 3), "asked": round(a / n, 3)} for name, (v, a) in sums.items()}


def _binding_record(model, tokenizer, args, device) -> dict:
    """The binding probe with --n-eval examples per number of keys, logged, as training.json keeps it."""
    bound = binding_accuracy(model, tokenizer, args.n_eval, args.seed, device)
    log("binding (next token after the answer prefix), by number of keys:\n" + fmt(bound))
    heads = binding_heads(model, tokenizer, args.n_eval, args.seed, device)
    rows: dict[str, dict[str, str]] = {}
    for name, r in heads.items():
        layer, h = name.split(".")
        rows.setdefault(f"layer {layer}", {})[f"h{h}"] = f"{r['values']:.2f}/{r['asked']:.2f}"
    log("attention from the answer position (4 keys), on all values / on the asked one, by head:\n" + fmt(rows))
    return {"examples_per_k": args.n_eval, "seed": args.seed, "by_keys": bound, "heads_4_keys": heads}


def fmt(results) -> str:
    lines = []
    for length, row in results.items():
        cells = (f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        lines.append(f"  {length:>6}: " + " ".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def model_config(tokenizer, args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )


def grow_layers(model, after: list[int]):
    """A deeper copy of `model` that computes the same function: after each original layer index in
    `after`, a new decoder layer is inserted, a copy of that layer whose attention output projection
    and MLP down projection are zero, so the new layer adds nothing to the residual stream until
    trained (block expansion). The embeddings, the final norm and every original layer are kept."""
    from transformers import LlamaForCausalLM

    n = model.config.num_hidden_layers
    bad = [i for i in after if not 0 <= i < n]
    if bad:
        raise ValueError(f"--grow-after: layer {bad[0]} does not exist (the model has layers 0-{n - 1})")
    source = []  # for each layer of the grown model: (original index, is a zero-output copy)
    for i in range(n):
        source += [(i, False)] + [(i, True)] * after.count(i)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(source)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i, _ in source]
    grown = LlamaForCausalLM._from_config(config, attn_implementation=model.config._attn_implementation)
    grown.to(device=model.device, dtype=model.dtype)
    new = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    for j, (i, fresh) in enumerate(source):
        for name, v in model.model.layers[i].state_dict().items():
            zero = fresh and name.rsplit(".", 1)[0] in ("self_attn.o_proj", "mlp.down_proj")  # weight, bias
            new[f"model.layers.{j}.{name}"] = torch.zeros_like(v) if zero else v.clone()
    grown.load_state_dict(new, strict=True)
    grown.tie_weights()
    return grown


def _head_plan(heads: int, kv_heads: int, group: int | None, add_kv: int) -> list[tuple[int | None, list]]:
    """The KV groups of a widened attention layer: for each new KV head, (the KV head it copies, or
    None for a fresh one; the query heads it serves: an original head's index, or None for a fresh
    one). `group` regroups the original heads so that each KV head serves `group` query heads (an
    original group padded with fresh heads to a multiple of it); `add_kv` adds fresh KV heads, each
    with as many fresh query heads as a group has."""
    g = heads // kv_heads
    size = group or g
    plan: list[tuple[int | None, list]] = []
    for kv in range(kv_heads):
        members: list = list(range(kv * g, (kv + 1) * g))
        members += [None] * (-len(members) % size)
        plan += [(kv, members[i : i + size]) for i in range(0, len(members), size)]
    return plan + [(None, [None] * size) for _ in range(add_kv)]


def widen_heads(model, group: int | None = None, add_kv: int = 0, seed: int = 0):
    """A copy of `model` with more attention heads that computes the same function (see
    :func:`_head_plan` for where they go). Every original query head keeps its weights and reads a
    copy of its KV head; a fresh query head has random query weights and a zero output projection, a
    fresh KV head random key and value weights, so nothing changes until training moves them. More
    KV heads give heads that shared keys and values their own, for circuits that need different ones."""
    from transformers import LlamaForCausalLM

    cfg = model.config
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if group is not None and group < 1:
        raise ValueError("the query heads per KV head must be at least 1")
    if add_kv < 0:
        raise ValueError("the KV heads to add cannot be negative")
    if getattr(cfg, "attention_bias", False):
        raise ValueError("widening attention with biases is not supported")
    plan = _head_plan(h, kv, group, add_kv)
    q_src = [q for _, members in plan for q in members]
    if cfg.hidden_size % len(q_src):  # transformers refuses to save such a config
        raise ValueError(
            f"{len(q_src)} query heads per layer do not divide the hidden size {cfg.hidden_size}: "
            "choose another --kv-group or --add-kv-heads"
        )
    config = copy.deepcopy(cfg)
    config.num_attention_heads, config.num_key_value_heads = len(q_src), len(plan)
    wide = LlamaForCausalLM._from_config(config, attn_implementation=cfg._attn_implementation)
    wide.to(device=model.device, dtype=model.dtype)
    gen = torch.Generator().manual_seed(seed)

    def rows(w, sources, fresh_std):  # stack head blocks of `w` (dim 0) in the order of `sources`
        parts = [
            w[s * d : (s + 1) * d] if s is not None else torch.randn(d, *w.shape[1:], generator=gen) * fresh_std
            for s in sources
        ]
        return torch.cat([p.to(w) for p in parts])

    std, kv_src = cfg.initializer_range, [k for k, _ in plan]
    state = {k: v for k, v in model.state_dict().items() if ".self_attn." not in k}
    for i, layer in enumerate(model.model.layers):
        a, pre = layer.self_attn, f"model.layers.{i}.self_attn."
        state[pre + "q_proj.weight"] = rows(a.q_proj.weight.detach(), q_src, std)
        state[pre + "k_proj.weight"] = rows(a.k_proj.weight.detach(), kv_src, std)
        state[pre + "v_proj.weight"] = rows(a.v_proj.weight.detach(), kv_src, std)
        state[pre + "o_proj.weight"] = rows(a.o_proj.weight.detach().T, q_src, 0.0).T.contiguous()
    wide.load_state_dict(state, strict=True)
    wide.tie_weights()
    return wide


def widen_hidden(model, hidden: int, intermediate: int, seed: int = 0):
    """A copy of `model` with a wider residual stream (`hidden`) and MLP (`intermediate`) that computes
    the same function. The new residual dimensions start at zero: every matrix that writes to them
    (the tied embedding, the attention output and MLP down projections) has zero rows there, and every
    matrix that reads them random columns, so they are trained from the first step. The norms' weights
    are scaled by sqrt(old / new hidden) and their epsilon by old / new hidden, which cancels the extra
    zero dimensions in the RMS. New MLP units have random input weights and a zero output. The
    attention heads keep their number and size (`head_dim` is explicit)."""
    from transformers import LlamaForCausalLM

    cfg = model.config
    h0, i0 = cfg.hidden_size, cfg.intermediate_size
    if hidden < h0 or intermediate < i0:
        raise ValueError(f"--widen can only grow the model (it is {h0} wide, its MLP {i0})")
    if hidden % cfg.num_attention_heads:  # transformers refuses to save such a config
        raise ValueError(f"the hidden size {hidden} is not a multiple of the {cfg.num_attention_heads} attention heads")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("widening a model with biases is not supported")
    config = copy.deepcopy(cfg)
    config.hidden_size, config.intermediate_size = hidden, intermediate
    config.rms_norm_eps = cfg.rms_norm_eps * h0 / hidden  # so that the RMS scales exactly, eps included
    wide = LlamaForCausalLM._from_config(config, attn_implementation=cfg._attn_implementation)
    wide.to(device=model.device, dtype=model.dtype)
    gen = torch.Generator().manual_seed(seed)
    std, scale = cfg.initializer_range, math.sqrt(h0 / hidden)

    def grow(w, rows: int, cols: int, fresh_rows: float, fresh_cols: float):
        """`w` in the top-left corner of a rows x cols matrix; new columns (of old rows) drawn with
        std `fresh_cols`, new rows with std `fresh_rows` (0: zeros)."""
        out = torch.zeros(rows, cols, dtype=w.dtype)
        out[: w.shape[0], : w.shape[1]] = w
        out[: w.shape[0], w.shape[1] :] = torch.randn(w.shape[0], cols - w.shape[1], generator=gen) * fresh_cols
        out[w.shape[0] :] = torch.randn(rows - w.shape[0], cols, generator=gen) * fresh_rows
        return out.to(w.device)

    def norm(w):
        return torch.cat(
            [w * scale, torch.full((hidden - h0,), float(w.mean()) * scale, dtype=w.dtype, device=w.device)]
        )

    state = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if k.endswith("norm.weight"):
            state[k] = norm(v)
        elif k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            state[k] = grow(v, v.shape[0], hidden, 0.0, std)  # they read the residual stream
        elif k.endswith("o_proj.weight"):  # writes to the residual stream
            state[k] = grow(v, hidden, v.shape[1], 0.0, 0.0)
        elif k.endswith("down_proj.weight"):  # writes to it, from the wider MLP
            state[k] = grow(v, hidden, intermediate, 0.0, 0.0)
        elif k.endswith(("gate_proj.weight", "up_proj.weight")):
            state[k] = grow(v, intermediate, hidden, std, std)
        elif k in ("model.embed_tokens.weight", "lm_head.weight"):
            state[k] = grow(v, v.shape[0], hidden, 0.0, 0.0)  # tied: written as zeros, read as zeros
        else:
            raise ValueError(f"widening does not know the weight {k}")
    wide.load_state_dict(state, strict=True)
    wide.tie_weights()
    return wide


def _shape(model) -> str:
    c = model.config
    return (
        f"{c.num_hidden_layers} layers, hidden {c.hidden_size} / MLP {c.intermediate_size}, "
        f"{c.num_attention_heads} query / {c.num_key_value_heads} KV heads"
    )


def _final_eval(title: str, model, tokenizer, args, device, predictions: list):
    """The evaluation at --lengths with --n-eval examples, logged: (accuracy, repeated list items)."""
    repeated: dict[str, dict[str, float]] = {}
    res = evaluate(
        model, tokenizer, args.lengths, args.n_eval, args.seed, device, predictions=predictions, repeats=repeated
    )
    log(f"{title}:\n" + fmt(res) + "\n  list answers that name an item twice:\n" + fmt(repeated))
    return res, repeated


def _summary(record: dict) -> dict:
    keys = ("command", "steps", "train_tokens", "train_minutes", "final_eval", "lr")
    return {k: record[k] for k in keys if k in record}


def save(model, tokenizer, out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="examples/model")
    p.add_argument("--minutes", type=float, default=50.0, help="training wall time (evaluation not included)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--rope-theta", type=float, default=1e6)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--lr", type=float, default=2.5e-3)
    p.add_argument("--eval-every", type=float, default=6.0, help="minutes between progress evaluations")
    p.add_argument("--n-eval", type=int, default=10, help="final evaluation examples per task and length")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096], help="final evaluation lengths")
    p.add_argument("--eval-only", action="store_true", help="evaluate the model in --out and record it")
    p.add_argument(
        "--token-accuracy",
        action="store_true",
        help="with --eval-only: also the teacher-forced accuracy of each answer token, per task and length",
    )
    p.add_argument(
        "--binding",
        action="store_true",
        help="only measure key-to-value binding (no haystack, --n-eval examples per number of keys) on the "
        "model in --out and record it",
    )
    p.add_argument(
        "--lm-weight",
        type=float,
        default=0.0,
        help="also train on predicting every document token, at this weight against the answer loss",
    )
    p.add_argument(
        "--attn-weight",
        type=float,
        default=0.0,
        help="train the heads of ATTENTION_HINTS towards their targets, at this weight against the answer loss",
    )
    p.add_argument(
        "--copy-weight",
        type=float,
        default=1.0,
        help="with --attn-weight: the weight of the lookup head's copy term against its attention terms",
    )
    p.add_argument(
        "--hint-words",
        action="store_true",
        help="with --attn-weight: the lookup hint also covers answers' invented words (variables, keys, names)",
    )
    p.add_argument(
        "--extra-hint",
        action="append",
        type=extra_hints,
        default=[],
        metavar="NAME|KIND:LAYER:HEAD",
        help=f"with --attn-weight: add these hints to ATTENTION_HINTS (repeatable): a set by name "
        f"({', '.join(sorted(EXTRA_HINTS))}, see EXTRA_HINTS) or one hint on a head of your choice, as "
        f"KIND:LAYER:HEAD (KIND one of {', '.join(HINT_KINDS)}; LAYER negative counts from the last)",
    )
    p.add_argument(
        "--repeat-weight",
        type=float,
        default=0.0,
        help="also train the answers' lists not to name an item twice (an unlikelihood term), at this weight",
    )
    p.add_argument("--warm-loss", type=float, default=0.5, help="answer loss that ends the copying stage")
    p.add_argument("--lookup-loss", type=float, default=0.3, help="answer loss that ends the short-lookup stage")
    p.add_argument(
        "--task-weight",
        action="append",
        metavar="NAME=W",
        help="change a task's share of the curriculum's mix (repeatable; recall joins only this way)",
    )
    p.add_argument(
        "--batch-tokens",
        type=int,
        metavar="N",
        help="tokens per batch in the curriculum's stages, instead of theirs (smaller: more steps per minute)",
    )
    p.add_argument("--init", help="continue from the model and tokenizer in this folder (a fresh optimizer)")
    p.add_argument(
        "--first-stage",
        choices=STAGE_NAMES,
        help="the stage to start at (default: copy from scratch, curriculum with --init)",
    )
    p.add_argument(
        "--curriculum-start", type=float, default=0.0, help="start the curriculum at this fraction (with --init)"
    )
    p.add_argument(
        "--curriculum-end",
        type=float,
        default=1.0,
        help="end the curriculum at this fraction (0.3: only the first stage's short documents)",
    )
    p.add_argument(
        "--grow-after",
        type=int,
        nargs="+",
        metavar="LAYER",
        help="with --init: insert a new layer after each of these layers, computing nothing at first "
        "(a zero-output copy of the layer before it), to train a deeper model from a trained one",
    )
    p.add_argument(
        "--kv-group",
        type=int,
        metavar="G",
        help="with --init: regroup the attention heads so that each KV head serves G query heads (fresh "
        "query heads fill the groups), computing the same function at first",
    )
    p.add_argument(
        "--add-kv-heads",
        type=int,
        default=0,
        metavar="N",
        help="with --init: add N fresh KV heads per layer, each with a group of fresh query heads whose "
        "output starts at zero",
    )
    p.add_argument(
        "--widen",
        type=int,
        nargs=2,
        metavar=("HIDDEN", "INTERMEDIATE"),
        help="with --init: widen the residual stream and the MLP to these sizes, computing the same "
        "function at first (the new dimensions start at zero)",
    )
    args = p.parse_args(argv)
    if (args.grow_after or args.kv_group or args.add_kv_heads or args.widen) and not args.init:
        p.error("--grow-after, --kv-group, --add-kv-heads and --widen need --init (the model to change)")
    if args.extra_hint and args.attn_weight <= 0:
        p.error("--extra-hint needs --attn-weight (the hints' weight)")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        p.error("--batch-tokens needs a positive number of tokens")
    if not 0.0 <= args.curriculum_start < args.curriculum_end <= 1.0:
        p.error("--curriculum-start and --curriculum-end need 0 <= start < end <= 1")
    weights = task_weights(args.task_weight)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    device = torch.device(args.device)

    from transformers import AutoTokenizer, LlamaForCausalLM

    if args.eval_only or args.binding:
        tokenizer = AutoTokenizer.from_pretrained(out)
        model = LlamaForCausalLM.from_pretrained(out, attn_implementation="sdpa").to(device)
        record = json.loads((out / "training.json").read_text()) if (out / "training.json").exists() else {}
        if args.binding:
            record["binding"] = _binding_record(model, tokenizer, args, device)
            (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
            return
        t0 = time.time()
        preds: list[dict] = []
        res, repeated = _final_eval("eval-only", model, tokenizer, args, device, preds)
        record.setdefault("final_eval_repeats", {}).update(repeated)
        if args.token_accuracy:
            per_token = {
                str(n): answer_token_accuracy(model, tokenizer, n, args.n_eval, args.seed, device) for n in args.lengths
            }
            log("answer-token accuracy (teacher-forced), by answer token:\n" + fmt(per_token))
            record["answer_token_accuracy"] = per_token
        record.setdefault("final_eval", {}).update(res)
        record.setdefault("final_eval_examples_per_task", {}).update({str(n): args.n_eval for n in args.lengths})
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        log(f"eval took {time.time() - t0:.0f}s")
        return

    t_start = time.time()
    if args.init:
        tokenizer = AutoTokenizer.from_pretrained(args.init)
        model = LlamaForCausalLM.from_pretrained(args.init, attn_implementation="sdpa").to(device)
        changes = [  # (asked for, the change): each computes the same function as the model it changes
            (args.grow_after, lambda m: grow_layers(m, args.grow_after)),
            (args.widen, lambda m: widen_hidden(m, *args.widen, seed=args.seed)),
            (args.kv_group or args.add_kv_heads, lambda m: widen_heads(m, args.kv_group, args.add_kv_heads, args.seed)),
        ]
        for wanted, change in changes:
            if wanted:
                before = _shape(model)
                try:
                    model = change(model)
                except ValueError as e:
                    p.error(str(e))
                log(f"changed from {before} to {_shape(model)}")
        config = model.config
        previous = Path(args.init) / "training.json"
        earlier = json.loads(previous.read_text()) if previous.exists() else {}
        log(f"continuing from {args.init}")
    else:
        tokenizer = train_tokenizer(args.seed, args.vocab)
        log(f"tokenizer: {len(tokenizer)} tokens ({time.time() - t_start:.1f}s)")
        config = model_config(tokenizer, args)
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").to(device)
        earlier = {}
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    rng = random.Random(args.seed)
    counter = [0]
    budget = args.minutes * 60
    warmup = 60
    step, tokens, t_train, t_eval = 0, 0, 0.0, 0.0
    next_eval = args.eval_every * 60
    history = []
    ema = None
    hint_list = list(ATTENTION_HINTS) + [h for hs in args.extra_hint for h in hs]
    try:
        hints = (
            AttentionHints(model, tokenizer, hint_list, copy_scale=args.copy_weight, words=args.hint_words)
            if args.attn_weight > 0
            else None
        )
    except ValueError as e:
        p.error(str(e))
    hinted: dict[str, float] = {}  # EMA of each hint's attention on its targets
    repeats = (args.repeat_weight, item_tokens(tokenizer)) if args.repeat_weight > 0 else None

    def rounded(d: dict[str, float]) -> dict[str, float]:
        return {k: round(v, 3) for k, v in d.items()}

    first = args.first_stage or ("curriculum" if args.init else "copy")
    stage_i = STAGE_NAMES.index(first)  # index into PRE_STAGES, len(PRE_STAGES) = the curriculum
    stage_steps = 0
    ended: dict[str, float] = {}
    command = "python -m dynkv_cli.bench.train " + " ".join(sys.argv[1:] if argv is None else argv)
    curriculum_from: float | None = None  # train time when the curriculum began
    model.train()
    while t_train < budget:
        t0 = time.time()
        if stage_i < len(PRE_STAGES):
            pre = PRE_STAGES[stage_i]
            threshold = getattr(args, pre.until)
            done = ema is not None and ema < threshold and stage_steps > 100
            if done or t_train > pre.cap * budget:
                why = f"loss {ema:.3f} < {threshold}" if done else f"{pre.cap:.0%} of the time"
                log(f"stage {pre.name} ended at step {step} ({t_train / 60:.1f} min, {why})")
                ended[pre.name] = round(t_train / 60, 2)
                stage_i, stage_steps, ema = stage_i + 1, 0, None
        if stage_i < len(PRE_STAGES):
            pre = PRE_STAGES[stage_i]
            lengths, batch_tokens, pose, tasks = pre.lengths, pre.batch_tokens, pre.pose, pre.tasks
        else:
            if curriculum_from is None:
                curriculum_from = t_train
            rest = (t_train - curriculum_from) / max(1e-9, budget - curriculum_from)
            frac = curriculum_fraction(args.curriculum_start, args.curriculum_end, rest)
            lengths, batch_tokens, pose, tasks = stage(frac, args.batch_tokens)
        stage_steps += 1
        length = rng.choice(lengths)
        x, y, pos = make_batch(rng, counter, length, batch_tokens, tokenizer, args.seed, pose, tasks, weights)
        x, y, pos = x.to(device), y.to(device), pos.to(device)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t_train / budget)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, ans_loss = answer_loss(model, x, y, pos, args.lm_weight, repeats)
        if hints is not None:
            hint_loss, on_target = hints.loss(x, y)
            loss = loss + args.attn_weight * hint_loss
            hinted.update({k: v if k not in hinted else 0.95 * hinted[k] + 0.05 * v for k, v in on_target.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        t_train += time.time() - t0
        ema = ans_loss.item() if ema is None else 0.95 * ema + 0.05 * ans_loss.item()
        if step % 20 == 0:
            log(
                f"step {step} len {length} bs {x.shape[0]} loss {ema:.3f} lr {lr:.2e} "
                f"{tokens / t_train:.0f} tok/s train {t_train / 60:.1f}m"
                + "".join(f" | {k} {v:.2f}" for k, v in hinted.items())
            )
        if t_train >= next_eval:
            next_eval += args.eval_every * 60
            t1 = time.time()
            res = evaluate(model, tokenizer, [512, 2048], 3, args.seed + 1, device)
            bound = binding_accuracy(model, tokenizer, 12, args.seed + 1, device)
            t_eval += time.time() - t1
            history.append(
                {"step": step, "train_minutes": round(t_train / 60, 2), "loss": ema, "eval": res, "binding": bound}
                | ({"attention_on_targets": rounded(hinted)} if hints else {})
            )
            log(f"eval at step {step} ({time.time() - t1:.0f}s):\n" + fmt(res) + "\n  binding by keys:\n" + fmt(bound))
            save(model, tokenizer, out, {"status": "checkpoint", "command": command, "step": step, "history": history})

    log(f"training done: {step} steps, {tokens} tokens, {t_train / 60:.1f} min")
    if hints is not None:
        hints.remove()
    t1 = time.time()
    preds: list[dict] = []
    final, repeated = _final_eval("final eval (full KV, greedy)", model, tokenizer, args, device, preds)
    bound = _binding_record(model, tokenizer, args, device)
    record = {
        "command": command,
        "seed": args.seed,
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "model_config": config.to_dict(),
        "n_parameters": n_params,
        "tokenizer_vocab": len(tokenizer),
        "continued_from": earlier.get("command") if args.init else None,
        "earlier_runs": (earlier.get("earlier_runs", []) + [_summary(earlier)]) if args.init else [],
        "grow_after": args.grow_after,
        "kv_group": args.kv_group,
        "add_kv_heads": args.add_kv_heads,
        "widen": args.widen,
        "curriculum_start": args.curriculum_start,
        "curriculum_end": args.curriculum_end,
        "first_stage": first,
        "pre_stages": [
            {
                "name": ps.name,
                "lengths": ps.lengths,
                "batch_tokens": ps.batch_tokens,
                "tasks": list(ps.tasks),
                "until_loss": getattr(args, ps.until),
                "time_cap_fraction": ps.cap,
                "ended_at_train_minutes": ended.get(ps.name),
            }
            for ps in PRE_STAGES
        ],
        "curriculum_from_train_minutes": None if curriculum_from is None else round(curriculum_from / 60, 2),
        "curriculum": [
            {"until_fraction": e, "lengths": ls, "batch_tokens": bt, "pose_probability": pp, "tasks": ts or "all"}
            for e, ls, bt, pp, ts in STAGES
        ],
        "curriculum_batch_tokens": args.batch_tokens,
        "pose_max_position": MAX_POS,
        "task_weights": weights,
        "lr": args.lr,
        "lm_weight": args.lm_weight,
        "repeat_weight": args.repeat_weight,
        "attn_weight": args.attn_weight,
        "attention_hints": [h._asdict() for h in hint_list] if hints else [],
        "copy_weight": args.copy_weight if hints else None,
        "hint_words": bool(args.hint_words and hints),
        "attention_on_targets": rounded(hinted),
        "steps": step,
        "train_tokens": tokens,
        "train_minutes": round(t_train / 60, 2),
        "progress_eval_minutes": round(t_eval / 60, 2),
        "wall_minutes": round((time.time() - t_start) / 60, 2),
        "history": history,
        "final_eval": final,
        "final_eval_examples_per_task": {str(n): args.n_eval for n in args.lengths},
        "final_eval_repeats": repeated,
        "final_eval_seed": args.seed,
        "final_eval_predictions_sample": preds[:: max(1, len(preds) // 40)],
        "binding": bound,
    }
    save(model, tokenizer, out, record)
    log(f"saved to {out} (final eval {time.time() - t1:.0f}s)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
