"""Fast checks of the task generator (no model, no training)."""

from __future__ import annotations

import math
import re
import types

import pytest
import torch

from dynkv_cli.bench import tasks as T
from dynkv_cli.bench.tasks import TASKS, Example, count_tokens, format_prompt, make_example, make_suite, score


@pytest.fixture(scope="module")
def tokenizer():
    from dynkv_cli.bench.train import train_tokenizer

    return train_tokenizer(0)


def _prompt_tokens(ex: Example, tok) -> int:
    doc, suffix = format_prompt(ex)
    return len(tok.backend_tokenizer.encode(doc).ids) + count_tokens([suffix], tok)[0]


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_generates_at_512(task, tokenizer):
    ex = make_example(task, 512, 7, tokenizer)
    assert ex.task == task and ex.document and ex.question and ex.answer and ex.answers
    assert 0.0 <= ex.depth <= 1.0
    assert abs(_prompt_tokens(ex, tokenizer) - 512) <= 0.05 * 512
    assert score(ex, ex.answer) == 1.0


@pytest.mark.parametrize("n", [1024, 4096])
def test_lengths_within_tolerance(n, tokenizer):
    for ex in make_suite(None, n, 1, seed=3, split="eval", tokenizer=tokenizer):
        assert abs(_prompt_tokens(ex, tokenizer) - n) <= 0.05 * n, ex.task


def test_deterministic_by_seed(tokenizer):
    for task in TASKS:
        a = make_example(task, 600, 11, tokenizer)
        b = make_example(task, 600, 11, tokenizer)
        c = make_example(task, 600, 12, tokenizer)
        assert a == b
        assert a != c
    assert make_suite(None, 300, 2, seed=5) == make_suite(None, 300, 2, seed=5)


def test_eval_and_train_are_disjoint():
    ev = {T.suite_seed("eval", s, t, n, i) for s in range(3) for t in TASKS for n in (512, 4096) for i in range(50)}
    tr = {T.suite_seed("train", s, t, n, i) for s in range(3) for t in TASKS for n in (512, 4096) for i in range(50)}
    assert not ev & tr
    assert all(x >> 62 == 1 for x in ev) and all(x >> 62 == 0 for x in tr)
    e = make_suite(["niah_single"], 256, 20, seed=0, split="eval")
    r = make_suite(["niah_single"], 256, 20, seed=0, split="train")
    assert not {x.document for x in e} & {x.document for x in r}


def test_answers_are_in_the_document():
    for seed in range(5):
        for task in TASKS:
            ex = make_example(task, 800, seed)
            doc = ex.document
            if task == "niah_single":
                assert f"The pass key is {ex.answer}." in doc
            elif task == "niah_multikey":
                key = ex.question.split(" for ")[1].rstrip("?")
                assert f"The special magic number for {key} is {ex.answer}." in doc
            elif task == "niah_multivalue":
                key = ex.question.split(" for ")[1].rstrip("?")
                found = re.findall(rf"One of the special magic numbers for {key} is (\d+)\.", doc)
                assert found == ex.answers
            elif task == "niah_multiquery":
                keys = re.findall(r"[a-z]+", ex.question.split(" for ")[1].replace(" and ", " "))
                vals = [re.search(rf"magic number for {k} is (\d+)\.", doc).group(1) for k in keys]
                assert vals == ex.answers
            elif task == "vt":
                value = re.search(r"value (\d+)", ex.question).group(1)
                # follow the chain in the document
                names = re.findall(rf"VAR (\w+) = {value}\.", doc)
                while True:
                    nxt = re.findall(rf"VAR (\w+) = VAR {names[-1]}\.", doc)
                    if not nxt:
                        break
                    names += nxt
                assert names == ex.answers
            elif task == "aggregation":
                counts: dict[str, int] = {}
                for w in re.findall(r"The marked word is (\w+)\.", doc):
                    counts[w] = counts.get(w, 0) + 1
                top = sorted(counts, key=lambda w: -counts[w])[:3]
                assert top == ex.answers
                assert len({counts[w] for w in top}) == 3 and counts[top[2]] > max(
                    c for w, c in counts.items() if w not in top
                )
            elif task == "fact_start":
                assert f"The author of this report is {ex.answer}." in doc
            elif task == "fact_end":
                assert f"The final code is {ex.answer}." in doc
            # the needle is where depth says
            if task == "fact_start":
                assert ex.depth < 0.05 and doc.index(ex.answer) < 0.1 * len(doc)
            if task == "fact_end":
                assert ex.depth > 0.9 and doc.index(ex.answer) > 0.85 * len(doc)


def test_scoring_exact_partial_wrong():
    single = make_example("niah_single", 300, 1)
    assert score(single, single.answer) == 1.0
    assert score(single, " " + single.answer + ".") == 1.0
    assert score(single, "12") == 0.0
    assert score(single, single.answer + " 1") == 0.0
    multi = make_example("niah_multivalue", 300, 1)
    assert len(multi.answers) == 4
    assert score(multi, ", ".join(multi.answers)) == 1.0
    assert score(multi, ", ".join(multi.answers[:2]) + ", 1, 2") == 0.5
    assert score(multi, "nothing") == 0.0
    vt = make_example("vt", 300, 1)
    assert score(vt, " ".join(vt.answers[:3])) == pytest.approx(0.75)
    agg = make_example("aggregation", 300, 1)
    assert score(agg, " ".join(reversed(agg.answers))) == 1.0


def test_prompt_format():
    ex = make_example("fact_end", 300, 2)
    doc, suffix = format_prompt(ex)
    assert doc == ex.document
    assert suffix == "\n" + ex.question + "\nAnswer:"
    assert not re.search(r"\d", suffix.replace(ex.question, "")) and ex.answer not in ex.question
    # RULER-style answer prefixes: the keyed lookups give the start of the answer in the prompt
    mk = make_example("niah_multikey", 400, 2)
    key = mk.question.split(" for ")[1].rstrip("?")
    assert format_prompt(mk)[1] == f"\n{mk.question}\nAnswer: The special magic number for {key} is"
    mq = make_example("niah_multiquery", 400, 2)
    keys = re.findall(r"[a-z]+", mq.question.split(" for ")[1].replace(" and ", " "))
    assert format_prompt(mq)[1].endswith(f"Answer: {keys[0]} is")
    assert mq.answer == f"{mq.answers[0]}, {keys[1]} is {mq.answers[1]} and {keys[2]} is {mq.answers[2]}"
    for task in TASKS:
        ex = make_example(task, 400, 5)
        assert ex.answer not in format_prompt(ex)[1]


def test_extra_training_questions_are_answered_by_the_document():
    for seed in range(4):
        for task in TASKS:
            ex = make_example(task, 600, seed)
            for question, prefix, answer in ex.extra:
                assert answer not in question + prefix
                for item in re.split(r", | ", answer):
                    assert item in ex.document
            mk = make_example("niah_multikey", 600, seed)
            n_keys = len(re.findall("The special magic number for", mk.document))
            assert len(mk.extra) == n_keys - 1  # every key but the asked one


def test_training_sequences_label_only_the_answers(tokenizer):
    """train.py's sequences: the evaluation prompt comes first, unchanged; labels cover exactly the
    answers (+ EOS) of the questions that fit; the copying warm-up labels the repeated text."""
    import random

    from dynkv_cli.bench import train

    ex = make_example("niah_multikey", 300, 4, tokenizer)
    ids, labels = train.encode_training(ex, tokenizer, random.Random(0), max_tokens=10_000)
    prompt, ans = train.encode_example(ex, tokenizer)
    assert ids[: len(prompt) + len(ans)] == prompt + ans and len(ids) == len(labels)
    eos = tokenizer.eos_token_id
    spans, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != -100:
            assert lab == i
            cur.append(i)
            if i == eos:
                spans.append(tokenizer.decode(cur[:-1]).strip())
                cur = []
    assert spans[0] == ex.answer and sorted(spans[1:]) == sorted(a for _, _, a in ex.extra)
    short, short_labels = train.encode_training(ex, tokenizer, random.Random(0), max_tokens=20)
    assert len(short) - len(prompt) - len(ans) <= 20 and len(short) < len(ids)

    ids, labels = train.copy_sequence(random.Random(1), 200, tokenizer)
    text = tokenizer.decode(ids[1:]).split("\nRepeat the text.\nAnswer:")[0]
    target = [t for t in labels if t != -100]
    assert tokenizer.decode(target[:-1]).strip() == text and target[-1] == eos

    # recall: the same parts again in another order; each repeated part's first token is no target
    ids, labels = train.recall_sequence(random.Random(1), 200, tokenizer)
    head = "\nRepeat the parts in any order.\nAnswer:"
    n_prompt = len(tokenizer.backend_tokenizer.encode(tokenizer.decode(ids[1:]).split(head)[0] + head).ids)
    assert all(lab == -100 for lab in labels[:n_prompt]) and labels[-1] == ids[-1] == eos
    parts = [p.strip() for p in tokenizer.decode(ids[1:]).split(head)[0].split(".") if p.strip()]
    repeat, rlabels = ids[n_prompt:-1], labels[n_prompt:-1]
    starts = [i for i, lab in enumerate(rlabels) if lab == -100]  # one per repeated part
    pieces = [tokenizer.decode(repeat[a:b]).strip(" .") for a, b in zip(starts, [*starts[1:], len(repeat)])]
    assert sorted(pieces) == sorted(parts) and pieces != parts
    assert all(lab == i for i, lab in zip(repeat, rlabels) if lab != -100)


def test_train_script_runs_end_to_end(tmp_path):
    """A few seconds of python -m dynkv_cli.bench.train with a toy model: it saves a loadable model,
    its tokenizer and training.json with the final evaluation; --init continues from it."""
    import json

    from transformers import AutoTokenizer, LlamaForCausalLM

    from dynkv_cli.bench import train

    out = tmp_path / "m"
    small = ["--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1"]
    args = ["--out", str(out), "--minutes", "0.1", "--threads", "1", "--n-eval", "1", "--lengths", "128", *small]
    train.main(args)
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] >= 1 and set(record["final_eval"]["128"]) == {*TASKS, "average"}
    assert set(record["final_eval_repeats"]["128"]) == set(train.LIST_TASKS)
    assert record["curriculum"][0]["tasks"] == "all" and record["first_stage"] == "copy"
    copy, lookup = record["pre_stages"]
    assert copy["tasks"] == ["copy"] and "niah_multikey" in lookup["tasks"]
    # 3 s cannot reach the loss thresholds: each stage ends at its time cap, in order
    assert 0 < copy["ended_at_train_minutes"] <= lookup["ended_at_train_minutes"] <= record["train_minutes"]
    assert record["binding"]["examples_per_k"] == 1 and list(record["binding"]["by_keys"]) == ["1", "2", "4", "8"]
    assert set(record["binding"]["heads_4_keys"]) == {"0.0", "0.1"}  # one layer, two heads
    assert record["lm_weight"] == 0.0
    LlamaForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    # --binding re-measures the probe alone and keeps the rest of the record
    train.main(["--out", str(out), "--binding", "--n-eval", "2", "--threads", "1"])
    rebound = json.loads((out / "training.json").read_text())
    assert rebound["binding"]["examples_per_k"] == 2 and rebound["final_eval"] == record["final_eval"]
    out2 = tmp_path / "m2"
    train.main(
        [
            "--init",
            str(out),
            "--out",
            str(out2),
            "--minutes",
            "0.03",
            "--threads",
            "1",
            "--n-eval",
            "1",
            "--lengths",
            "128",
            "--task-weight",
            "recall=1",
            "--task-weight",
            "copy=0",
            "--lm-weight",
            "0.5",
            "--attn-weight",
            "1",
            "--grow-after",
            "0",
            "--add-kv-heads",
            "1",
            "--extra-hint",
            "prev3:1:2",
            "--repeat-weight",
            "1",
            "--batch-tokens",
            "256",
            "--widen",
            "48",
            "80",
        ]
    )
    record2 = json.loads((out2 / "training.json").read_text())
    config2 = LlamaForCausalLM.from_pretrained(out2).config
    assert record2["grow_after"] == [0] and config2.num_hidden_layers == 2
    assert record2["add_kv_heads"] == 1 and (config2.num_attention_heads, config2.num_key_value_heads) == (4, 2)
    assert record2["widen"] == [48, 80] and (config2.hidden_size, config2.intermediate_size) == (48, 80)
    assert record2["earlier_runs"][0]["steps"] == record["steps"] and record2["curriculum_from_train_minutes"] == 0
    assert "recall" not in record["task_weights"] and record["task_weights"]["copy"] == train.TASK_WEIGHTS["copy"]
    assert record2["task_weights"]["recall"] == 1.0 and "copy" not in record2["task_weights"]
    assert record["curriculum_batch_tokens"] is None and record2["curriculum_batch_tokens"] == 256
    assert record2["lm_weight"] == 0.5 and record2["repeat_weight"] == 1.0 and record["repeat_weight"] == 0.0
    assert record["attn_weight"] == 0.0 and record["attention_hints"] == [] and record["attention_on_targets"] == {}
    assert record2["attn_weight"] == 1.0 and [h["kind"] for h in record2["attention_hints"]] == [
        "prev",
        "prev2",
        "lookup",
        "prev3",
    ]
    # grown to 2 layers; prev3 on a fresh head (head 2: the added KV head's first query head)
    assert {"0.0 prev", "0.1 prev2", "1.0 lookup", "1.2 prev3"} <= set(record2["attention_on_targets"])


def test_task_weights_change_the_mix(tokenizer):
    import random

    from dynkv_cli.bench import train

    only_recall = train.task_weights([f"{t}=0" for t in train.TASK_WEIGHTS] + ["recall=2"])
    assert only_recall == {"recall": 2.0}
    x, y, _ = train.make_batch(random.Random(0), [0], 128, 512, tokenizer, 0, 0.0, None, only_recall)
    assert all("Repeat the parts in any order." in tokenizer.decode(row) for row in x)
    for bad in (["recall"], ["nope=1"], ["vt=x"], ["vt=-1"], [f"{t}=0" for t in train.TASK_WEIGHTS]):
        with pytest.raises(SystemExit, match="--task-weight"):
            train.task_weights(bad)


def test_chains_sequences_ask_every_chain_in_the_suites_vt_format(tokenizer):
    """The training-only chains task: its lines are the suite's vt assignments, each chain in order;
    every question is vt's and its labelled answer is that chain, first variable first."""
    import random

    from dynkv_cli.bench import train

    assert "chains" not in train.TASK_WEIGHTS  # joins the mix only when given a weight
    for n in (96, 512):
        for seed in range(5):
            ids, labels = train.chains_sequence(random.Random(seed), n, tokenizer)
            assert len(ids) == len(labels) and len(ids) <= n + 40
            text = tokenizer.decode(ids, skip_special_tokens=True)
            doc, *qas = text.split("\nWhich variables are assigned the value ")
            value_of = dict(re.findall(r"VAR (\w+) = (\d+)\.", doc))
            source = dict(re.findall(r"VAR (\w+) = VAR (\w+)\.", doc))
            assert qas and len(value_of) >= 2 and set(source.values()) <= set(value_of) | set(source)
            answers = tokenizer.decode([t for t in labels if t != -100]).split(tokenizer.eos_token)
            for qa, labelled in zip(qas, answers, strict=False):
                value, answer = re.fullmatch(r"(\d+)\?\nAnswer: (.*)", qa.strip(), re.S).groups()
                chain = labelled.split()
                assert answer.split() == chain and value_of[chain[0]] == value
                assert all(source[b] == a for a, b in zip(chain, chain[1:]))  # each assigned from the one before
                assert doc.index(f"VAR {chain[0]} =") <= doc.index(f"VAR {chain[-1]} =")
            if n == 96:
                assert len(value_of) <= 2


def test_curriculum_end_keeps_a_run_in_the_short_stages(tmp_path):
    from dynkv_cli.bench import train

    first_lengths = train.STAGES[0][1]
    for rest in (0.0, 0.5, 0.999):
        assert train.stage(train.curriculum_fraction(0.0, 0.3, rest))[0] == first_lengths
    assert train.stage(train.curriculum_fraction(0.0, 1.0, 0.999))[0] == train.STAGES[-1][1]
    assert train.curriculum_fraction(0.3, 1.0, 0.5) == pytest.approx(0.65)
    # --batch-tokens replaces every stage's batch size and nothing else
    for frac in (0.0, 0.5, 0.999):
        own = train.stage(frac)
        assert own[1] == 8192 and train.stage(frac, 2048) == (own[0], 2048, *own[2:])
    bad_args = (
        ["--curriculum-end", "0"],
        ["--curriculum-start", "0.5", "--curriculum-end", "0.4"],
        ["--batch-tokens", "0"],
    )
    for bad in bad_args:
        with pytest.raises(SystemExit):
            train.main(["--out", str(tmp_path / "m"), *bad])
    assert not (tmp_path / "m").exists()


def test_extra_hints_need_the_hint_weight_and_the_heads(tmp_path, capsys):
    from dynkv_cli.bench import train

    out = tmp_path / "m"
    small = ["--hidden", "32", "--intermediate", "64", "--layers", "2", "--heads", "2", "--kv-heads", "1"]
    with pytest.raises(SystemExit):
        train.main(["--out", str(out), "--extra-hint", "chain", *small])
    assert "--extra-hint needs --attn-weight" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the said head is head 3: a 2-head model has none
        train.main(["--out", str(out), "--extra-hint", "said", "--attn-weight", "1", "--threads", "1", *small])
    assert "names a head the model lacks" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # 2 layers: the chain head (layer 1, head 1) is prev3's
        train.main(["--out", str(out), "--extra-hint", "chain", "--attn-weight", "1", "--threads", "1", *small])
    assert "two attention hints on one head" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one hint on a chosen head: the same check
        train.main(["--out", str(out), "--extra-hint", "chain:0:7", "--attn-weight", "1", "--threads", "1", *small])
    assert "names a head the model lacks" in capsys.readouterr().err
    for bad in ("chains", "chain:1", "chain:x:1", "copy:1:1", "chain:1:-1"):
        with pytest.raises(SystemExit):
            train.main(["--out", str(out), "--extra-hint", bad, "--attn-weight", "1", *small])
        assert "KIND:LAYER:HEAD" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--out", str(out), "--kv-group", "2", *small])
    assert "need --init" in capsys.readouterr().err
    assert not out.exists()


def test_repeat_loss_is_the_unlikelihood_of_the_items_already_said():
    """At each new item of an answer, -log(1 - p(an item already said)), from the model's own logits
    (here a stand-in whose hidden states are the logits)."""
    from dynkv_cli.bench import train

    items = torch.zeros(10, dtype=torch.bool)
    items[5:] = True
    x = torch.tensor([[1, 2, 3, 5, 6, 7, 2]])  # the answer: items 5, 6, 7, then a non-item
    y = torch.tensor([[-100, -100, -100, 5, 6, 7, 2]])
    logits = torch.full((1, 7, 10), -1e4)
    logits[0, 3, [5, 0]] = 0.0  # predicting the second item: p(5) = 0.5
    logits[0, 4, [5, 6, 1, 2]] = 0.0  # predicting the third: p(5) + p(6) = 0.5
    logits[0, 4, 0] = math.log(4.0)  # ... now 2/8
    model = types.SimpleNamespace(lm_head=lambda h: h)
    loss = train.repeat_loss(model, logits, x, y, items)
    torch.testing.assert_close(loss, torch.tensor((-math.log(0.5) - math.log(0.75)) / 2))
    x2 = torch.tensor([[1, 2, 3, 5, 6, 5, 2]])  # an answer that names 5 twice is not pushed off it
    assert train.said_targets(x2, torch.cat([y[:, :3], x2[:, 3:]], 1), items) == [(0, 3, [3])]
    assert train.repeat_loss(model, logits, x, torch.full_like(y, -100), items) == 0


def test_repeats_an_item_reads_the_first_line_of_a_list():
    from dynkv_cli.bench import train

    assert train.repeats_an_item("182319, 182319, 766350") and train.repeats_an_item("nasex nasex basel")
    assert not train.repeats_an_item("182319, 284155") and not train.repeats_an_item("TUKI VETU\nTUKI")


def test_extra_hints_by_name_or_by_head():
    from dynkv_cli.bench import train

    assert train.extra_hints("chain") == train.EXTRA_HINTS["chain"]
    assert train.extra_hints("chain:-1:6") == (train.Hint(-1, 6, "chain"),)
    assert train.extra_hints("prev3:1:0") == (train.Hint(1, 0, "prev3"),)


@pytest.mark.parametrize(("group", "add", "heads", "kv", "fresh"), [(2, 0, 8, 4, [3, 7]), (None, 1, 9, 3, [6, 7, 8])])
def test_widen_heads_keeps_the_function_then_trains_the_new_heads(tokenizer, group, add, heads, kv, fresh):
    """More heads, same function: the original query heads keep their weights and read a copy of
    their KV head, the fresh heads' output projections are zero, and one optimizer step makes them
    contribute. 6 query / 2 KV heads regrouped by 2 become (0 1) (2 new) (3 4) (5 new)."""
    from dynkv_cli.bench import train

    model = _hinted_model(tokenizer, "eager")
    cfg = model.config
    # 6 query heads of 16 over 2 KV heads (groups of 3); 144 is a multiple of 6, 8 and 9 heads
    cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size = 6, 16, 144
    model = type(model)._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    wide = train.widen_heads(model, group, add).eval()
    assert (wide.config.num_attention_heads, wide.config.num_key_value_heads) == (heads, kv)
    x = torch.randint(0, len(tokenizer), (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(wide(x).logits, model(x).logits, rtol=0, atol=1e-5)
    d, old, new = 16, model.model.layers[1].self_attn, wide.model.layers[1].self_attn
    original = [h for h in range(heads) if h not in fresh]
    assert len(original) == 6
    for i, h in enumerate(original):  # same query weights; the KV head it reads is a copy of its old one
        assert torch.equal(new.q_proj.weight[h * d : (h + 1) * d], old.q_proj.weight[i * d : (i + 1) * d])
        g_new, g_old = h // (heads // kv), i // 3
        assert torch.equal(
            new.k_proj.weight[g_new * d : (g_new + 1) * d], old.k_proj.weight[g_old * d : (g_old + 1) * d]
        )
        assert torch.equal(
            new.v_proj.weight[g_new * d : (g_new + 1) * d], old.v_proj.weight[g_old * d : (g_old + 1) * d]
        )
    for h in fresh:
        assert not new.o_proj.weight[:, h * d : (h + 1) * d].any()
        assert new.q_proj.weight[h * d : (h + 1) * d].any()
    wide.train()
    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    wide(x, labels=x).loss.backward()
    opt.step()
    assert all(new.o_proj.weight[:, h * d : (h + 1) * d].any() for h in fresh)
    for bad in ((0, 0), (None, -1)):
        with pytest.raises(ValueError):
            train.widen_heads(model, *bad)
    model.config.hidden_size = 100  # 8 or 9 query heads do not divide it: no config transformers saves
    with pytest.raises(ValueError, match="do not divide the hidden size"):
        train.widen_heads(model, group, add)


class _Shift(torch.nn.Module):
    """A stand-in model whose logits at position i point at token x[i + offset]: offset 1 is an
    oracle (teacher forcing shows it the answer), offset 0 repeats the current token."""

    def __init__(self, vocab: int, offset: int):
        super().__init__()
        self.vocab, self.offset = vocab, offset

    def forward(self, x):
        target = torch.roll(x, -self.offset, dims=1)
        return types.SimpleNamespace(logits=torch.nn.functional.one_hot(target, self.vocab).float())


def test_answer_token_accuracy_scores_each_answer_token(tokenizer):
    from dynkv_cli.bench.train import answer_token_accuracy, encode_example

    tasks = ["niah_single", "vt"]
    oracle = answer_token_accuracy(_Shift(len(tokenizer), 1), tokenizer, 200, 2, 0, "cpu", tasks)
    assert set(oracle) == set(tasks) and all(v == [1.0] * len(v) for v in oracle.values())
    ex = make_suite(["niah_single"], 200, 1, 0, "eval", tokenizer)[0]
    _, ans = encode_example(ex, tokenizer)
    assert len(oracle["niah_single"]) == min(8, len(ans))
    # repeating the current token: right only where an answer token equals the one before it
    echo = answer_token_accuracy(_Shift(len(tokenizer), 0), tokenizer, 200, 2, 0, "cpu", ["niah_single"])
    assert len(echo["niah_single"]) == len(oracle["niah_single"]) and max(echo["niah_single"]) < 1.0


class _Induction(torch.nn.Module):
    """A stand-in model that, at the last position, points at the token that followed the first
    earlier occurrence of the last `context` tokens: context 1 is an induction head that copies a
    value without knowing whose it is, context 2 matches "K is" and so binds the value to its key."""

    def __init__(self, vocab: int, context: int):
        super().__init__()
        self.vocab, self.context = vocab, context

    def forward(self, x):
        seq, c = x[0].tolist(), self.context
        tail = seq[-c:]
        nxt = next(seq[i + c] for i in range(len(seq) - c) if seq[i : i + c] == tail)
        logits = torch.zeros(1, len(seq), self.vocab)
        logits[0, -1, nxt] = 1.0
        return types.SimpleNamespace(logits=logits)


def test_binding_tells_copying_from_binding(tokenizer):
    from dynkv_cli.bench.train import binding_accuracy

    bound = binding_accuracy(_Induction(len(tokenizer), 2), tokenizer, 8, 0, "cpu")
    assert list(bound) == ["1", "2", "4", "8"]
    assert all(r["right"] == 1.0 and r["in_context"] == 1.0 for r in bound.values())
    assert [r["chance"] for r in bound.values()] == [1.0, 0.5, 0.25, 0.125]
    # copying the value of the first needle: always a value from the context, the right one about 1/k of the time
    copied = binding_accuracy(_Induction(len(tokenizer), 1), tokenizer, 8, 0, "cpu")
    assert all(r["in_context"] == 1.0 for r in copied.values())
    assert copied["1"]["right"] == 1.0 and copied["8"]["right"] < 0.5


def test_lm_weight_adds_the_document_loss(tokenizer):
    import random

    from transformers import LlamaForCausalLM

    from dynkv_cli.bench import train

    ns = types.SimpleNamespace(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, rope_theta=1e4)
    model = LlamaForCausalLM._from_config(train.model_config(tokenizer, ns))
    x, y, pos = train.make_batch(random.Random(0), [0], 96, 192, tokenizer, 0, 0.0, ("niah_single", "vt"))
    assert (x == tokenizer.pad_token_id).any()  # rows of different lengths: padding is excluded below
    plain, ans = train.answer_loss(model, x, y, pos)
    assert torch.equal(plain, ans)
    total, ans2 = train.answer_loss(model, x, y, pos, lm_weight=0.5)
    assert torch.allclose(ans2, ans)
    logits = model(x, position_ids=pos).logits[:, :-1].float()
    nxt, lab = x[:, 1:], y[:, 1:]
    rest = (lab == -100) & (nxt != tokenizer.pad_token_id)
    lm = torch.nn.functional.cross_entropy(logits[rest], nxt[rest])
    assert torch.allclose(total, ans + 0.5 * lm, atol=1e-5)


def test_lookup_targets_point_at_the_number_in_the_document(tokenizer):
    from dynkv_cli.bench import train

    be = tokenizer.backend_tokenizer
    doc = be.encode("The special magic number for bamon is 844880. The special magic number for rukir is 123456.").ids
    prompt = doc + be.encode("\nAnswer: The special magic number for rukir is", add_special_tokens=False).ids
    ans = be.encode(" 123456", add_special_tokens=False).ids + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + ans])
    labels = torch.tensor([[-100] * len(prompt) + ans])
    starts = train.number_tokens(tokenizer)
    assert starts[ans[0]] and not starts[ans[1]]  # " 123" starts a number, "456" does not
    source = doc.index(ans[0])
    assert train.lookup_targets(ids, labels, starts) == [(0, len(prompt) - 1, [source])]
    # a number written more often than max_sources is no lookup; answers are never sources
    assert train.lookup_targets(ids, labels, starts, max_sources=0) == []
    twice = torch.cat([ids, ids], 1)
    labels2 = torch.cat([labels, labels], 1)
    assert train.lookup_targets(twice, labels2, starts) == [
        (0, len(prompt) - 1, [source]),
        (0, ids.shape[1] + len(prompt) - 1, [source, ids.shape[1] + source]),
    ]


def test_lookup_targets_cover_words_only_when_asked(tokenizer):
    """With a word mask, each variable of a chain's answer points at where that variable is written
    (both of its places in the chain); without one, words are no lookups. Marked words are not words."""
    from dynkv_cli.bench import train

    be = tokenizer.backend_tokenizer
    words = train.word_tokens(tokenizer)
    a, b = T.VARS[:2]
    one = be.encode(" " + a, add_special_tokens=False).ids
    assert len(one) == 1 and words[one[0]]
    assert not words[be.encode(" " + T.MARKED[0], add_special_tokens=False).ids[0]]
    doc = be.encode(f"VAR {a} = 12345. The road was wide. VAR {b} = VAR {a}.").ids
    prompt = doc + be.encode("\nWhich variables are assigned the value 12345?\nAnswer:", add_special_tokens=False).ids
    ans = be.encode(f" {a} {b}", add_special_tokens=False).ids + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + ans])
    labels = torch.tensor([[-100] * len(prompt) + ans])
    starts = train.number_tokens(tokenizer)
    assert train.lookup_targets(ids, labels, starts) == []
    at_a = [i for i, t in enumerate(doc) if t == ans[0]]
    at_b = [i for i, t in enumerate(doc) if t == ans[1]]
    assert len(at_a) == 2 and len(at_b) == 1
    assert train.lookup_targets(ids, labels, starts, words=words) == [
        (0, len(prompt) - 1, at_a),
        (0, len(prompt), at_b),
    ]


def test_chain_targets_point_three_tokens_after_the_assigned_variable(tokenizer):
    """Each variable of a chain's answer points at the token three after where it is assigned: the
    end of its value for the first, the variable it is assigned from for the next (which is what the
    answer has just said); a word never assigned in the document is no target."""
    from dynkv_cli.bench import train

    be = tokenizer.backend_tokenizer
    words = train.word_tokens(tokenizer)
    equals = be.encode(" =", add_special_tokens=False).ids[0]
    a, b, c = T.VARS[:3]
    doc = be.encode(f"VAR {a} = 12345. The road was wide. VAR {b} = VAR {a}. The {c} waited.").ids
    prompt = doc + be.encode("\nWhich variables are assigned the value 12345?\nAnswer:", add_special_tokens=False).ids
    ans = be.encode(f" {a} {b} {c}", add_special_tokens=False).ids + [tokenizer.eos_token_id]
    assert len(ans) == 4
    ids = torch.tensor([prompt + ans])
    labels = torch.tensor([[-100] * len(prompt) + ans])
    lhs_a, lhs_b = doc.index(ans[0]), doc.index(ans[1])
    got = train.chain_targets(ids, labels, words, equals)
    assert got == [(0, len(prompt) - 1, [lhs_a + 3]), (0, len(prompt), [lhs_b + 3])]
    assert be.decode(doc[lhs_a + 1 : lhs_a + 4]).replace(" ", "") == "=12345"  # the value's last token
    assert doc[lhs_b + 3] == ans[0]  # b = VAR a: the source is the a that b is assigned from


def test_said_targets_point_at_the_items_already_in_the_answer(tokenizer):
    """From where each later item of an answer starts to where its earlier items start; a repeated item
    is no target, and a second answer in the same row starts afresh."""
    from dynkv_cli.bench import train

    be = tokenizer.backend_tokenizer
    items = train.item_tokens(tokenizer)
    w0, w1 = T.MARKED[:2]
    assert items[be.encode(" " + w0, add_special_tokens=False).ids[0]]
    assert not items[be.encode(" road", add_special_tokens=False).ids[0]]
    prompt = be.encode("The road was wide.\nAnswer:").ids
    ans = be.encode(" 123456, 654321, 123456", add_special_tokens=False).ids + [tokenizer.eos_token_id]
    second = be.encode("\nAnswer:", add_special_tokens=False).ids
    ans2 = be.encode(f" {w0} {w1}", add_special_tokens=False).ids + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + ans + second + ans2])
    labels = torch.tensor([[-100] * len(prompt) + ans + [-100] * len(second) + ans2])
    starts = [len(prompt) + i for i, t in enumerate(ans) if items[t]]
    assert len(starts) == 3  # the third repeats the first: no target
    at2 = len(prompt) + len(ans) + len(second)
    assert train.said_targets(ids, labels, items) == [(0, starts[1] - 1, [starts[0]]), (0, at2, [at2])]


def test_attention_hints_refuse_two_hints_on_one_head(tokenizer):
    from dynkv_cli.bench import train

    model = _hinted_model(tokenizer)  # 2 layers: the second-to-last is layer 0, whose head 0 is "prev"
    with pytest.raises(ValueError, match="two attention hints on one head"):
        train.AttentionHints(model, tokenizer, [*train.ATTENTION_HINTS, train.Hint(-2, 0, "chain")])
    with pytest.raises(ValueError, match="lacks"):
        train.AttentionHints(model, tokenizer, [train.Hint(0, 4, "prev3")])


def test_extra_hints_train_their_heads(tokenizer):
    """A few steps on the hint loss alone, on variable tracking: the prev3 head moves onto the token
    three back, the chain head towards the assignments, the said head onto the answer's earlier items,
    and its output alone makes those items less likely."""

    from dynkv_cli.bench import train

    model = _hinted_model(tokenizer, layers=4).train()
    hints = train.AttentionHints(
        model, tokenizer, [h for name in ("chain", "said") for h in train.EXTRA_HINTS[name]], copy_scale=0.2
    )
    assert [(h.layer, h.head, h.kind) for h in hints.hints] == [(1, 1, "prev3"), (3, 1, "chain"), (2, 3, "said")]
    first, on_target = _train_on_hints(model, hints, tokenizer, "vt")
    hints.remove()
    assert set(on_target) == {"1.1 prev3", "3.1 chain", "3.1 copy", "2.3 said", "2.3 anticopy"}
    assert first["1.1 prev3"] < 0.2 < 0.5 < on_target["1.1 prev3"]
    assert on_target["3.1 chain"] > 2 * first["3.1 chain"] and on_target["2.3 said"] > 2 * first["2.3 said"]
    assert on_target["2.3 anticopy"] < first["2.3 anticopy"]


def test_chain_copy_reads_the_sources_whatever_the_head_attends_to(tokenizer):
    """The chain head's copy term reads its sources alone: changing the head's queries moves its
    attention term and leaves the copy term as it was (the lookup's copy reads with its attention)."""
    import random

    from dynkv_cli.bench import train

    model = _hinted_model(tokenizer, layers=4).train()
    hints = train.AttentionHints(model, tokenizer, [*train.ATTENTION_HINTS[:2], *train.EXTRA_HINTS["chain"]])
    x, y, pos = train.make_batch(random.Random(0), [0], 128, 512, tokenizer, 0, 0.0, ("vt",))
    chain = hints.hints[-1]
    targets = train.chain_targets(x, y, hints.chain_words, hints.equals)
    assert chain.kind == "chain" and targets
    terms = []
    for randomise in (False, True):
        if randomise:
            with torch.no_grad():
                model.model.layers[3].self_attn.q_proj.weight.normal_(0.0, 1.0)
        with torch.no_grad():
            train.answer_loss(model, x, y, pos)
            terms.append(hints._read(chain, *hints._qk(chain), x, targets))
    hints.remove()
    assert abs(terms[0][0] - terms[1][0]) > 0.1  # the attention term moved
    torch.testing.assert_close(terms[0][1], terms[1][1])  # the copy term did not


def test_copy_weight_scales_only_the_copy_term(tokenizer):
    import random

    from dynkv_cli.bench import train

    model = _hinted_model(tokenizer).train()
    x, y, pos = train.make_batch(random.Random(0), [0], 128, 512, tokenizer, 0, 0.0, ("niah_multikey",))
    hints = train.AttentionHints(model, tokenizer)
    train.answer_loss(model, x, y, pos)  # one forward pass: the hints' captured inputs serve every scale
    totals = {}
    for scale in (0.0, 1.0, 3.0):
        hints.copy_scale = scale
        totals[scale], parts = hints.loss(x, y)
    hints.remove()
    copy = totals[1.0] - totals[0.0]
    assert copy > 0 and "1.0 copy" in parts
    assert (totals[3.0] - totals[1.0]).item() == pytest.approx(2 * copy.item(), rel=1e-4)


def test_grow_layers_keeps_the_function_then_trains_the_new_layers(tokenizer):
    """Block expansion: the grown model computes the same logits as the model it grew from, its new
    layers are copies of the layer before them with zero output projections, and one optimizer step
    makes the new layers contribute (they are trainable, not dead)."""
    from dynkv_cli.bench import train

    model = _hinted_model(tokenizer).eval()
    with torch.no_grad():  # random, not zero, norms and weights: a copy that adds anything would show
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    grown = train.grow_layers(model, [0, 1, 1]).eval()
    assert grown.config.num_hidden_layers == 5 and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in grown.model.layers] == [0, 1, 2, 3, 4]
    x = torch.randint(0, len(tokenizer), (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(grown(x).logits, model(x).logits, rtol=0, atol=1e-5)
    old, new = model.model.layers, grown.model.layers
    # layers 0 and 2 are the originals; 1 is a copy of 0, 3 and 4 copies of 1
    assert torch.equal(new[2].self_attn.o_proj.weight, old[1].self_attn.o_proj.weight)
    assert torch.equal(new[1].self_attn.q_proj.weight, old[0].self_attn.q_proj.weight)
    assert torch.equal(new[4].mlp.up_proj.weight, old[1].mlp.up_proj.weight)
    assert not any(new[i].self_attn.o_proj.weight.any() or new[i].mlp.down_proj.weight.any() for i in (1, 3, 4))
    assert grown.lm_head.weight.data_ptr() == grown.model.embed_tokens.weight.data_ptr()  # still tied
    grown.train()
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    grown(x, labels=x).loss.backward()
    opt.step()
    assert all(new[i].self_attn.o_proj.weight.any() and new[i].mlp.down_proj.weight.any() for i in (1, 3, 4))
    with pytest.raises(ValueError, match="layer 2 does not exist"):
        train.grow_layers(model, [2])


def test_widen_hidden_keeps_the_function_then_trains_the_new_dimensions(tokenizer):
    """A wider residual stream and MLP, same function: the old weights sit in the corner of the new
    ones, whatever writes to a new dimension starts at zero (so the norms, rescaled, see the same RMS),
    and training puts something in the new dimensions and the new MLP units (the last layer's writers
    after two steps: their only reader, the tied head, is zero until the first step moves it)."""
    from dynkv_cli.bench import train

    model = _hinted_model(tokenizer).eval()  # hidden 64 (4 heads of 16), MLP 64
    with torch.no_grad():  # random norms and weights: a mistake in the corners would show
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    wide = train.widen_hidden(model, 96, 80).eval()
    assert (wide.config.hidden_size, wide.config.intermediate_size, wide.config.head_dim) == (96, 80, 16)
    x = torch.randint(0, len(tokenizer), (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(wide(x).logits, model(x).logits, rtol=0, atol=1e-4)
    old, new = model.model.layers[1], wide.model.layers[1]
    assert torch.equal(new.self_attn.q_proj.weight[:, :64], old.self_attn.q_proj.weight)
    assert torch.equal(new.mlp.down_proj.weight[:64, :64], old.mlp.down_proj.weight)
    writers = (new.self_attn.o_proj.weight[64:], new.mlp.down_proj.weight[64:], new.mlp.down_proj.weight[:, 64:])
    assert not any(w.any() for w in writers) and not wide.model.embed_tokens.weight[:, 64:].any()
    assert new.self_attn.k_proj.weight[:, 64:].any() and new.mlp.up_proj.weight[64:].any()  # readers: random
    assert wide.lm_head.weight.data_ptr() == wide.model.embed_tokens.weight.data_ptr()  # still tied
    wide.train()
    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        wide(x, labels=x).loss.backward()
        opt.step()
    assert all(w.any() for w in writers) and wide.model.embed_tokens.weight[:, 64:].any()
    with pytest.raises(ValueError, match="can only grow"):
        train.widen_hidden(model, 48, 80)
    with pytest.raises(ValueError, match="not a multiple of the 4 attention heads"):
        train.widen_hidden(model, 98, 80)


def _train_on_hints(model, hints, tokenizer, task: str, steps: int = 40):
    """`steps` Adam steps on the hint loss alone, on batches of `task`: (the first step's attention on
    the targets, the last one's)."""
    import random

    from dynkv_cli.bench import train

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = random.Random(0)
    first = None
    for _ in range(steps):
        x, y, pos = train.make_batch(rng, [0], 128, 512, tokenizer, 0, 0.0, (task,))
        train.answer_loss(model, x, y, pos)
        loss, on_target = hints.loss(x, y)
        first = first or on_target
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, on_target


def _hinted_model(tokenizer, attn="sdpa", layers=2):
    from transformers import LlamaForCausalLM

    from dynkv_cli.bench import train

    torch.manual_seed(0)
    ns = types.SimpleNamespace(hidden=64, intermediate=64, layers=layers, heads=4, kv_heads=2, rope_theta=1e4)
    return LlamaForCausalLM._from_config(train.model_config(tokenizer, ns), attn_implementation=attn)


def test_attention_hints_recompute_the_heads_own_attention(tokenizer):
    """The hinted heads' attention, recomputed from the captured layer inputs, is the attention the
    model computed (eager attention returns it): the right query and KV-group slices, rotary, scale."""
    import random

    from dynkv_cli.bench import train

    model = _hinted_model(tokenizer, "eager").train()
    x, y, pos = train.make_batch(random.Random(0), [0], 96, 192, tokenizer, 0, 0.5, ("niah_multikey",))
    hints = train.AttentionHints(model, tokenizer)
    assert [(h.layer, h.head) for h in hints.hints] == [(0, 0), (0, 1), (1, 0)]  # -1 is the last layer
    out = model(x, attention_mask=torch.ones_like(x), position_ids=pos, output_attentions=True)
    n = x.shape[1]
    for hint in hints.hints:
        q, k, scale = hints._qk(hint)
        s = (q @ k.transpose(1, 2) * scale).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(s.softmax(-1), out.attentions[hint.layer][:, hint.head], atol=1e-5, rtol=1e-4)
    hints.remove()
    model(x)
    assert hints.inputs[0][0].shape[1] == n  # removed: nothing captured again (the last batch's inputs stay)


def test_attention_hints_train_their_heads(tokenizer):
    """A few steps on the hint loss alone move each hinted head's attention onto its targets."""

    from dynkv_cli.bench import train

    model = _hinted_model(tokenizer).train()
    hints = train.AttentionHints(model, tokenizer)
    first, on_target = _train_on_hints(model, hints, tokenizer, "niah_multikey")
    assert set(on_target) == {"0.0 prev", "0.1 prev2", "1.0 lookup", "1.0 copy"}
    assert all(first[k] < 0.2 for k in ("0.0 prev", "0.1 prev2", "1.0 lookup"))
    assert (
        on_target["0.0 prev"] > 0.5 and on_target["0.1 prev2"] > 0.5 and on_target["1.0 lookup"] > first["1.0 lookup"]
    )


def test_binding_heads_report_attention_on_the_values(tokenizer):
    """With every query zeroed, each head attends evenly over the prompt, so from the answer position
    the k values get k/T of its attention and the asked one 1/T: the positions and the means are right."""
    from dynkv_cli.bench import train

    model = _hinted_model(tokenizer)
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.data.zero_()
    heads = train.binding_heads(model, tokenizer, 3, 0, "cpu", k=4)
    assert set(heads) == {f"{layer}.{h}" for layer in range(2) for h in range(4)}
    lengths = [len(ids) for ids, _, _ in train._binding_prompts(tokenizer, 4, 3, 0)]
    expect_all = sum(4 / n for n in lengths) / 3
    expect_asked = sum(1 / n for n in lengths) / 3
    for r in heads.values():
        assert r["values"] == pytest.approx(expect_all, abs=1e-3) and r["asked"] == pytest.approx(
            expect_asked, abs=1e-3
        )
    assert model.config._attn_implementation == "sdpa" and model.training  # restored
