"""Train the bundled byte-level BPE tokenizer on text from the task-family mix.

Digits are split one per token so that small arithmetic and codes are learnable, and a
`<|bos|>` is prepended by the post-processor so every prompt starts the same way it did in
training. The result loads with `AutoTokenizer.from_pretrained`.
"""

import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from quantbuild.tasks import sample_training_item, training_text

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
MIX = {"language_modelling": 3, "structured": 3, "retrieval": 2, "long_context": 1, "reasoning": 2}


def train_tokenizer(out: Path, vocab_size: int = 4096, samples: int = 20000, seed: int = 0) -> None:
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(f"tokenizer:{seed}")
    corpus = [training_text(sample_training_item(rng, MIX)) for _ in range(samples)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1024
    )
    fast.padding_side = "left"
    fast.save_pretrained(str(out))
