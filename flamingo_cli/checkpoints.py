"""Build random-weight AF3 / MF / AF-Next checkpoints in the exact layout of the hub checkpoints.

No model weights can be downloaded where flamingo is developed and tested, so CI runs on a tiny
random checkpoint and GPU benchmarks on a full-size one built from the real configs. Both use the real
processor classes and chat templates and a tokenizer that carries the real special tokens, and are
saved with the hub's weight names (``language_model.model.*``, ``audio_tower.*``,
``multi_modal_projector.*``), which both transformers and vLLM 0.24 load.
Imports torch/transformers lazily: this module is only used by scripts, tests and ``flamingo demo``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from flamingo_cli.models import (
    AF3,
    AFNEXT,
    AFNEXT_CAPTIONER,
    AFNEXT_THINK,
    MF,
    MF_THINK,
    THINK_CLOSE,
    THINK_OPEN,
    ModelFamily,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>", "<|sound_bos|>", "<|sound_eos|>"]
# Think checkpoints: Qwen3-style added tokens that are not "special", so decoding keeps them in the text
# (whether the real AF-Next-think tokenizer adds them is doubtful: docs/model-family.md).
THINK_TOKENS = [THINK_OPEN, THINK_CLOSE]

# --kind → the family whose files the checkpoint carries.
KINDS: dict[str, ModelFamily] = {
    "af3": AF3,
    "mf": MF,
    "mf-think": MF_THINK,
    "af-next": AFNEXT,
    "af-next-think": AFNEXT_THINK,
    "af-next-captioner": AFNEXT_CAPTIONER,
}

# Sizes: "tiny" fits CPU CI (a few MB); "full" is the real Qwen2.5-7B + Whisper-large-v3 geometry.
# vLLM's CPU attention needs head_dim in {32, 64, 80, 96, 112, 128, ...}.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=40960,
        ),
        "audio": dict(hidden_size=160, intermediate_size=320, num_hidden_layers=2, num_attention_heads=2),
        "vocab_size": 640,
    },
    "full": {
        "text": dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
        ),
        "audio": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20),
        "vocab_size": None,  # 151672 as the real checkpoints (tokenizer padded with unused tokens)
    },
}


def processor_chat_template(family: ModelFamily) -> str:
    """The processor chat template the hub conversion scripts write (system prompt baked in)."""
    from flamingo_cli.prompts import default_chat_template

    return default_chat_template(family)


def _training_text() -> list[str]:
    from flamingo_cli.models import AF3_SYSTEM_PROMPT, AFNEXT_SYSTEM_PROMPT, MF_SYSTEM_PROMPT

    words = (
        "the a music audio sound speech song track describe caption transcribe lyrics genre tempo key "
        "instrument guitar piano drums bass voice vocals mood energy production style recording noise "
        "detail detailed what is in this clip listen carefully and write one sentence about it"
    )
    return [AF3_SYSTEM_PROMPT, MF_SYSTEM_PROMPT, AFNEXT_SYSTEM_PROMPT, words] * 4


# Where Qwen2.5 / AF3 / MF keep their special tokens (the full-size tokenizer uses these exact ids).
REAL_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<sound>": 151669,
    "<|sound_bos|>": 151670,
    "<|sound_eos|>": 151671,
    THINK_OPEN: 151667,  # Qwen3's ids; doubtful for AF-Next-think (docs/model-family.md)
    THINK_CLOSE: 151668,
}
REAL_VOCAB_SIZE = 151672


def build_tokenizer(vocab_size: int, think: bool = False):
    """A byte-level BPE tokenizer with Qwen2's special tokens and AF3/MF's sound tokens.

    Small sizes train a real BPE on a little text; the full size (151672) keeps that BPE and fills
    the vocabulary up to the real size with filler tokens, placing every special token at its real
    id, so any id a full-size model generates decodes.
    """
    import json as _json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    small = min(vocab_size, 640)
    extra = THINK_TOKENS if think else []
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=small - len(SPECIAL_TOKENS) - len(extra),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    if vocab_size >= REAL_VOCAB_SIZE:
        model = _json.loads(tok.to_str())["model"]
        vocab = dict(model["vocab"])
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        specials_at = {i: t for t, i in REAL_SPECIAL_IDS.items() if t in SPECIAL_TOKENS or t in extra}
        next_id = len(vocab)
        n = 0
        while next_id < vocab_size:
            if next_id in specials_at:
                vocab[specials_at[next_id]] = next_id
            else:
                # Fillers spelled in byte-level characters, so they decode like any other token.
                name, k = "Ġfill", n
                while True:
                    name += alphabet[k % len(alphabet)]
                    k //= len(alphabet)
                    if k == 0:
                        break
                vocab[name] = next_id
                n += 1
            next_id += 1
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if extra:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=131072,
    )


def _hub_key(key: str) -> str | None:
    """transformers-5 module names -> the hub checkpoints' weight names (what vLLM 0.24 loads)."""
    for src, dst in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.audio_tower.", "audio_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if key.startswith(src):
            return dst + key[len(src) :]
    return None  # non-persistent buffers (MF rotary tables) are not saved


def build_checkpoint(
    kind: str,
    out: str | Path,
    size: str = "tiny",
    dtype: str = "float32",
    seed: int = 0,
    lm_head_std: float | None = None,
) -> Path:
    """Write a random-weight checkpoint of one of KINDS to ``out`` and return its path.

    AF-Next kinds carry what the AF-Next conversion script writes (docs/model-family.md): MF's
    architecture with rope_theta 1800, a processor with max_audio_len 1800 and the AF-Next system
    prompt, and an LLM that takes 128K positions. Think kinds add ``<think>``/``</think>`` to the
    tokenizer and, when tiny, wire the output layer so greedy decoding goes through a think block.
    ``lm_head_std`` sharpens the output layer (default: 0.5 tiny, 0.02 full): quality comparisons
    (fp8 vs bf16) need logits with a spread, or every greedy step is a near-tie.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Processor,
        GenerationConfig,
        MusicFlamingoConfig,
        MusicFlamingoForConditionalGeneration,
        MusicFlamingoProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; choose one of {', '.join(KINDS)}")
    family = KINDS[kind]
    spec = SIZES[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tokenizer = build_tokenizer(spec["vocab_size"] or REAL_VOCAB_SIZE, think=family.think)
    vocab = tokenizer.get_vocab()
    ids = {t: vocab[t] for t in SPECIAL_TOKENS}
    vocab_size = spec["vocab_size"] or REAL_VOCAB_SIZE
    text_config = Qwen2Config(
        vocab_size=vocab_size,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        dtype=dtype,
        **{**spec["text"], **({"max_position_embeddings": 131072} if family.family == "afnext" else {})},
    )
    audio_config = {"model_type": "audioflamingo3_encoder", "num_mel_bins": 128, **spec["audio"]}
    feature_extractor = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)
    template = processor_chat_template(family)
    if kind == "af3":
        config = AudioFlamingo3Config(text_config=text_config, audio_config=audio_config, audio_token_id=ids["<sound>"])
        processor = AudioFlamingo3Processor(feature_extractor, tokenizer, chat_template=template)
        model_cls = AudioFlamingo3ForConditionalGeneration
        generation = GenerationConfig(
            bos_token_id=ids["<|endoftext|>"],
            do_sample=True,
            eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
            pad_token_id=ids["<|endoftext|>"],
            repetition_penalty=1.05,
            temperature=0.7,
            top_k=20,
            top_p=0.8,
        )
    else:
        config = MusicFlamingoConfig(
            text_config=text_config,
            audio_config=audio_config,
            audio_token_id=ids["<sound>"],
            audio_bos_token_id=ids["<|sound_bos|>"],
            audio_eos_token_id=ids["<|sound_eos|>"],
            rope_parameters={"rope_type": "default", "rope_theta": family.max_audio_s, "partial_rotary_factor": 0.2},
        )
        processor = MusicFlamingoProcessor(
            feature_extractor, tokenizer, chat_template=template, max_audio_len=family.max_audio_s
        )
        model_cls = MusicFlamingoForConditionalGeneration
        generation = GenerationConfig(
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            max_new_tokens=2048,
        )
    config.dtype = dtype
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta" if size == "full" else "cpu"):
        model = model_cls(config)
    if size == "full":
        model = model.to_empty(device="cpu")
    model = model.to(torch_dtype)
    # Tiny models get a sharper output layer: with near-flat logits every greedy step is a near-tie
    # and exact-parity tests would only measure rounding noise.
    if lm_head_std is None:
        lm_head_std = 0.5 if size == "tiny" else 0.02
    _init_random(model, seed, lm_head_std=lm_head_std)
    if family.think and size == "tiny":
        _wire_think_chain(model, tokenizer, seed)

    state = {}
    for key, tensor in model.state_dict().items():
        hub = _hub_key(key)
        if hub is not None:
            state[hub] = tensor.detach().contiguous()
    _save_sharded(state, out, save_file)
    config.architectures = [family.architecture]
    config.save_pretrained(out)
    generation.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "flamingo_checkpoint.json").write_text(
        json.dumps(
            {
                "random_weights": True,
                "kind": kind,
                "size": size,
                "dtype": dtype,
                "seed": seed,
                "lm_head_std": lm_head_std,
            }
        )
    )
    return out


# What a tiny think checkpoint says under greedy decoding: a think block, then an answer.
THINK_CHAIN = ["\n", THINK_OPEN, " listen", " carefully", THINK_CLOSE, " music", "<|im_end|>"]


def _wire_think_chain(model, tokenizer, seed: int, scale: float = 8.0) -> None:
    """Make greedy decoding follow THINK_CHAIN from the prompt's last token (``assistant\n``).

    In a tiny random transformer the last position's hidden state is dominated by the current token's
    embedding (the residual stream), so giving each chain token a large embedding and pointing the
    output row of its successor at it makes a deterministic next-token table, in transformers and in
    vLLM alike. The rest of the model stays random.
    """
    import torch

    ids = []
    for piece in THINK_CHAIN:
        enc = tokenizer.encode(piece, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"think chain piece {piece!r} is {len(enc)} tokens in this tokenizer; expected 1")
        ids.append(enc[0])
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for a in ids[:-1]:
            v = torch.randn(embed.shape[1], generator=gen)
            embed[a] = (v / v.norm() * scale).to(embed.dtype)
        for a, b in itertools.pairwise(ids):
            head[b] += (embed[a] / embed[a].norm() * scale * 4).to(head.dtype)


def _init_random(model, seed: int, lm_head_std: float = 0.02) -> None:
    """Small normal weights, unit norms: random but numerically tame in fp32 and bf16."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name and "weight" in name else 0.0)
            else:
                std = lm_head_std if name.startswith("lm_head") else 0.02
                p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))


def _save_sharded(state: dict, out: Path, save_file, shard_bytes: int = 4 << 30) -> None:
    shards: list[dict] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
