"""Train the small BPE tokenizer shipped with the tiny Qwen2 preset (offline, deterministic).

Run from the repository root:  python scripts/train_tiny_tokenizer.py
It writes plugins/assets/tiny-tokenizer/, which is committed. The corpus is the synthetic task's
questions and answers plus a list of common English words, so the tokenizer covers the demo and
degrades gracefully (byte-level fallback) on anything else.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from nvila.core.data.synthetic import make_sample

OUT = Path(__file__).resolve().parents[1] / "plugins" / "assets" / "tiny-tokenizer"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# Qwen2-style ChatML template; a default system turn is not added, to keep demo sequences short.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = """the a an and or of to in on at for with from by is are was were be been it this that these those
what which who where when why how many much yes no not there here image picture photo video frame shape
shapes color colour colors object objects left right top bottom middle center corner side one two three four
five six seven eight nine ten red green blue yellow black white gray orange purple pink brown circle square
triangle rectangle line dot small large big describe show shown see count kind type in the image please answer
word short question is there any some all each every other more less than""".split()


def corpus(n: int = 20000) -> list[str]:
    rng = random.Random(1234)
    lines = [" ".join(WORDS)]
    for i in range(n):
        s = make_sample(rng, str(i), image_size=32)
        lines.append(f"system\nuser\n{s.question}\nassistant\n{s.answer}\n")
        lines.append(" ".join(rng.sample(WORDS, 12)).capitalize() + "?")
    return lines


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<image>", "<video>"])
    fast.chat_template = CHAT_TEMPLATE
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    print(f"wrote {OUT} ({len(fast)} tokens)")


if __name__ == "__main__":
    main()
