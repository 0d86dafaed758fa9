"""Tiny models of the real families (no tests here): for Llama 3, Qwen2.5, Qwen3, Mistral, Gemma 2, Phi-3 and
Qwen2-MoE, a random config of the family's own HF architecture class, a tokenizer of the family's kind trained
here with `tokenizers` (byte-level BPE behind the family's split regex for Llama 3 / Qwen; a sentencepiece-style
Metaspace BPE for Mistral / Gemma / Phi-3) with the family's special tokens, the family's chat template written
from its documented behaviour, and its generation config. Nothing is downloaded.

The family details midpo must honour are kept: tied embeddings (Qwen2.5, Qwen3, Gemma 2), a vocabulary padded
past the tokenizer's length (Qwen, Phi-3), final-logit and attention soft-capping and alternating sliding windows
(Gemma 2; soft caps lowered so that they bite at this size), a sliding window (Mistral), fused qkv (Phi-3), a
default system prompt (Qwen2.5), an empty thinking block before the last answer (Qwen3), no system role (Gemma 2),
EOS after the turn end (Phi-3), a router with an auxiliary loss (Qwen2-MoE).

    build_family("qwen2.5", folder)   # model + tokenizer + generation_config.json in one HF folder
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The regexes of the real tokenizers' Split pre-tokenizers (Llama 3: numbers in threes; Qwen2: one digit each).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

# Meta-Llama-3-8B-Instruct's template: BOS once, headers, content trimmed, <|eot_id|> ends a turn.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Qwen2.5-Instruct (without tools): ChatML; a default system prompt when the conversation has none.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

# Qwen3 (without tools): ChatML, no default system prompt; earlier answers lose their <think> block, the last
# answer gets one (empty when the message has none); enable_thinking=false puts the empty block in the prompt.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{%- if loop.last %}{{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content + "
    "'<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}")

# Mistral-7B-Instruct-v0.3 (without tools): [INST] ... [/INST], the system prompt joins the LAST user message.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\n\n' + message['content'] "
    "+ '[/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported') }}{%- endif %}{%- endfor %}")

# gemma-2-it: no system role; turns end in <end_of_turn>\n; the assistant is "model".
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

# Phi-3-mini-4k-instruct: <|role|>\n ... <|end|>\n; EOS after the conversation unless a generation prompt follows.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@dataclass(frozen=True)
class Family:
    name: str
    arch: str  # the transformers config class
    kind: str  # "bytelevel" (split regex + byte-level BPE) or "metaspace" (sentencepiece-style BPE)
    specials: list[str]
    tokens: dict[str, str]  # bos/eos/pad/unk -> token
    template: str
    gen_eos: list[str]  # generation_config eos tokens (the turn end first)
    split: str = ""  # byte-level: the pre-tokenizer regex
    tied: bool = False
    vocab_pad: int = 0  # model vocab = tokenizer length rounded up to a multiple of 64, plus this
    config: dict = field(default_factory=dict)  # family-specific config fields
    system: bool = True  # a system message keeps the prompt a prefix of the conversation


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama3", "LlamaConfig", "bytelevel", LLAMA3_SPECIALS,
           {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>"}, LLAMA3_TEMPLATE, ["<|eot_id|>", "<|end_of_text|>"],
           split=LLAMA3_SPLIT, config={"rope_theta": 500000.0}),
    Family("qwen2.5", "Qwen2Config", "bytelevel", CHATML_SPECIALS, {"eos": "<|im_end|>", "pad": "<|endoftext|>"},
           QWEN25_TEMPLATE, ["<|im_end|>", "<|endoftext|>"], split=QWEN2_SPLIT, tied=True, vocab_pad=64),
    Family("qwen3", "Qwen3Config", "bytelevel", [*CHATML_SPECIALS, "<think>", "</think>"],
           {"eos": "<|im_end|>", "pad": "<|endoftext|>"}, QWEN3_TEMPLATE, ["<|im_end|>", "<|endoftext|>"],
           split=QWEN2_SPLIT, tied=True, vocab_pad=64, config={"head_dim": 8}),
    Family("mistral", "MistralConfig", "metaspace", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
           {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}, MISTRAL_TEMPLATE, ["</s>"], config={"sliding_window": 16},
           system=False),  # its system prompt joins the LAST user turn: the prompt alone is no prefix (prep rejects)
    Family("gemma2", "Gemma2Config", "metaspace",
           ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
           {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"}, GEMMA2_TEMPLATE, ["<end_of_turn>", "<eos>"],
           tied=True, system=False,
           config={"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16, "final_logit_softcapping": 3.0,
                   "attn_logit_softcapping": 5.0}),
    Family("phi3", "Phi3Config", "metaspace",
           ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
           {"bos": "<s>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": "<unk>"}, PHI3_TEMPLATE,
           ["<|endoftext|>", "<|end|>"], vocab_pad=32, config={"original_max_position_embeddings": 256}),
    Family("qwen2-moe", "Qwen2MoeConfig", "bytelevel", CHATML_SPECIALS, {"eos": "<|im_end|>", "pad": "<|endoftext|>"},
           QWEN25_TEMPLATE, ["<|im_end|>", "<|endoftext|>"], split=QWEN2_SPLIT, vocab_pad=64,
           config={"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 32, "router_aux_loss_coef": 0.01}),
)}

NAMES = tuple(FAMILIES)

WORDS = ("the apple is red and sweet while a banana is yellow . sort these numbers : 3 1 2 . "
         "reverse the list please . answer briefly with one word . why is the sky blue ? because light scatters . "
         "hello there , how are you today ? I am fine thanks . write a short poem about the sea "
         "def return print ( x ) list of items first second third yes no maybe system user assistant model").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Training text for the tokenizers: sentences of WORDS, some over several lines."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        out.append((" " if rng.random() < 0.5 else "\n").join(words))
    return out


def sentence(rng: random.Random, lo: int = 3, hi: int = 9) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def preference_rows(n: int, seed: int = 0, system: bool = False) -> list[dict]:
    """Conversational pairs (TRL's format) in the tokenizers' words; a system message when `system`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [{"role": "user", "content": sentence(rng)}]
        if system:
            prompt = [{"role": "system", "content": sentence(rng, 2, 4)}, *prompt]
        c, r = sentence(rng, 2, 6), sentence(rng, 2, 6)
        while r == c:
            r = sentence(rng, 2, 6)
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": c}],
                     "rejected": [{"role": "assistant", "content": r}]})
    return rows


def build_tokenizer(fam: Family, out: Path):
    """The family's kind of tokenizer, trained on `corpus()`, saved to `out`; returns the loaded tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if fam.kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(fam.split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=fam.specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # sentencepiece-style: spaces become "▁" (one at the start), newlines are tokens of their own
        tok = Tokenizer(models.BPE(unk_token=fam.tokens["unk"], fuse_unk=True))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|▁?[^▁\n]+|▁"), behavior="isolated")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " ")])
        trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=fam.specials)
    tok.train_from_iterator(corpus(), trainer)
    kw = {f"{k}_token": v for k, v in fam.tokens.items()}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.chat_template = fam.template
    fast.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out))


def tiny_config(fam: Family, tok, *, layers: int = 2):
    import transformers

    ids = {k: tok.convert_tokens_to_ids(v) for k, v in fam.tokens.items()}
    vocab = len(tok)
    if fam.vocab_pad:
        vocab = -(-vocab // 64) * 64 + fam.vocab_pad
    cls = getattr(transformers, fam.arch)
    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
              tie_word_embeddings=fam.tied, bos_token_id=ids.get("bos"), eos_token_id=ids["eos"],
              pad_token_id=ids.get("pad", ids["eos"]))
    kw.update(fam.config)
    return cls(**kw)


def build_family(name: str, out: Path, seed: int = 0, *, layers: int = 2, max_shard_size: str | None = None) -> Path:
    """One HF folder at `out`: the family's tiny random model, its tokenizer and its generation config.
    max_shard_size (e.g. "64KB"): weights saved as sharded safetensors with an index, as big checkpoints are."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    fam = FAMILIES[name]
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(fam, out)
    cfg = tiny_config(fam, tok, layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(out), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    eos = [tok.convert_tokens_to_ids(t) for t in fam.gen_eos]
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=eos if len(eos) > 1 else eos[0],
                     pad_token_id=cfg.pad_token_id).save_pretrained(str(out))
    return out
