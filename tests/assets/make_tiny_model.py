"""Build the tiny offline chat model the tests train on (committed under tests/assets/).

A byte-level BPE tokenizer (vocab 4096, ChatML special tokens, a chat template) trained on
local text, and a 2-layer Qwen2 model (hidden 64) pretrained for a few hundred plain-torch
steps on the same text, so that LoRA on top of it shows a clearly falling loss. Random
weights would give near-uniform logits and a loss that barely moves.

    python tests/assets/make_tiny_model.py [OUTPUT_DIR]   # about a minute on 2 CPU cores
"""

from __future__ import annotations

import random
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "tiny-chat-model"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus(seed: int = 0) -> list[str]:
    """Deterministic local text: stdlib source and made-up chat turns."""
    rng = random.Random(seed)
    texts: list[str] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json/__init__.py", "textwrap.py", "argparse.py", "csv.py", "shlex.py"):
        path = stdlib / name
        if path.exists():
            source = path.read_text(encoding="utf-8")
            texts += [source[i : i + 800] for i in range(0, len(source), 800)]
    subjects = ["the cat", "a robot", "my friend", "the teacher", "this program", "the river"]
    verbs = ["likes", "reads", "writes", "finds", "moves", "builds"]
    objects = ["books", "code", "music", "numbers", "stones", "letters"]
    for _ in range(1500):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        question = rng.choice(
            [
                f"What is {a} plus {b}?",
                f"Who {rng.choice(verbs)} {rng.choice(objects)}?",
                f"Write a sentence about {rng.choice(objects)}.",
            ]
        )
        answer = rng.choice(
            [
                f"{a} plus {b} is {a + b}.",
                f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}.",
            ]
        )
        texts.append(
            f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}<|im_end|>\n"
        )
    rng.shuffle(texts)
    return texts


def build(output: Path = DEFAULT_OUTPUT, steps: int = 300, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    texts = corpus(seed)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)

    ids = [tokenizer(t)["input_ids"] for t in texts]
    stream = [i for seq in ids for i in seq]
    block, batch = 128, 16
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        starts = [
            random.Random(seed * 100003 + step * 31 + j).randrange(len(stream) - block)
            for j in range(batch)
        ]
        x = torch.tensor([stream[s : s + block] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}", flush=True)

    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    return output


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT))
