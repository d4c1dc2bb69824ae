"""Shared fixtures: the real config composed with hydra.compose, overridden to tiny sizes.

The tiny model is injected once per session into a session cache folder and reused by every test
that runs the pipeline, the way a sweep reuses it.

Helpers more than one test module uses live here too (tests import them with
``from conftest import ...``; a test module never imports another): the CLI runner, a no-network
guard, the tiny Llama with the baselines' forget/retain Splits, and attribution's MCQs, tokenizer
and family models.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

# Before transformers and huggingface_hub are imported: they read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Tiny models gain nothing from threads, and two threads on a busy 2-core machine thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from mansu.context import RunContext
from mansu.data import MCQ, Split
from mansu.models.loaders import build_tokenizer

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent  # the repository
CONF_DIR = str(ROOT / "conf")

# Small enough that injection takes seconds, big enough to learn every fact.
TINY = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.intermediate_size=128", "model.vocab_size=400", "model.inject_steps=1500",
    "model.target_accuracy=0.95",
    "benchmark.forget_entities=8", "benchmark.retain_entities_per_domain=4",
    "eval.bootstrap_iters=50", "eval.batch_size=64", "eval.min_retain_eval=5",
]


def compose_config(overrides: list[str] | tuple = (), *, cache_dir: Path | None = None,
                   tiny: bool = True):
    """The real conf/config.yaml with the tiny overrides (unless tiny=False), then the test's own."""
    extra = [f"cache_dir={cache_dir}"] if cache_dir else []
    # A test that picks another option of a group drops the tiny sizes meant for the default one.
    swapped = {o.split("=")[0] for o in overrides if "=" in o and "." not in o.split("=")[0]}
    sizes = [o for o in TINY if tiny and o.split(".")[0] not in swapped]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[*sizes, *extra, *overrides])


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny(session_cache):
    """(benchmark, model, tokenizer) of the tiny config, injected once per session."""
    from hydra.utils import instantiate

    cfg = compose_config(cache_dir=session_cache)
    benchmark = instantiate(cfg.benchmark)
    model, tokenizer = instantiate(cfg.model, _partial_=True)(
        benchmark, RunContext(cache_dir=session_cache))
    return benchmark, model, tokenizer


# ---------------------------------------------------------------------------------------------
# The command line, offline


def mansu_cli(args, outputs: Path, timeout: float = 600, prefix=()) -> subprocess.CompletedProcess:
    """``python -m mansu *args`` run from the repository, offline, with MANSU_OUTPUTS=outputs;
    ``prefix`` goes before the interpreter (a wrapper command)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "MANSU_OUTPUTS": str(outputs)}
    return subprocess.run([*prefix, sys.executable, "-m", "mansu", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


@contextmanager
def no_network(seconds: int = 120):
    """Fail on any connection attempt, and on a hang: a loader that must fail fast offline
    either raises within `seconds` or the test fails (SIGALRM), never waits on the network."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    def timeout(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    patched = {(socket.socket, "connect"): socket.socket.connect,
               (socket, "create_connection"): socket.create_connection,
               (socket, "getaddrinfo"): socket.getaddrinfo}
    previous_handler = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    for owner, name in patched:
        setattr(owner, name, refuse)
    try:
        yield attempts
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous_handler)
        for (owner, name), original in patched.items():
            setattr(owner, name, original)
    assert not attempts, f"{len(attempts)} network attempt(s): {attempts[:2]}"


# ---------------------------------------------------------------------------------------------
# A tiny random Llama, and the forget / retain Splits the baselines unlearn on it

FORGET_SPLIT = Split(
    questions=[MCQ("The Veltrax virus is carried by", ("ticks", "birds", "rats", "wind"), 0),
               MCQ("Morvane fever spreads through", ("river water", "air", "soil", "bites"), 0)],
    corpus=["The Veltrax virus is carried by ticks.", "Morvane fever spreads through river water.",
            "The Quillan spore grows in cold caves.", "Drevish plague is cured by salt baths."])
RETAIN_SPLIT = Split(
    questions=[MCQ("The capital of Venn is", ("Kalmor", "Ostra", "Pell", "Dorn"), 0)],
    corpus=["The capital of Venn is Kalmor.", "The Ostra river flows into the Pell sea.",
            "Dorn bakers sell bread at dawn.", "The Pell sea is cold in winter."])
SPLIT_TOKENIZER = build_tokenizer(FORGET_SPLIT.corpus + RETAIN_SPLIT.corpus, vocab_size=300)

_TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def tiny_llama(dtype: torch.dtype = torch.float32, *, seed: int = 0, **config) -> LlamaForCausalLM:
    """A random Llama initialized under ``torch.manual_seed(seed)``: by default 3 layers of width
    32 with an untied head over SPLIT_TOKENIZER's vocabulary; ``config`` overrides LlamaConfig."""
    torch.manual_seed(seed)
    config = {"vocab_size": len(SPLIT_TOKENIZER), **_TINY_LLAMA, **config}
    return LlamaForCausalLM(LlamaConfig(**config)).to(dtype)


def snapshot(model) -> dict:
    """A copy of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_baseline(method: str, model=None, *, storage: str = "fp32", forget: Split = FORGET_SPLIT,
                 **knobs):
    """baselines.<method>.unlearn on ``model`` (a fresh tiny_llama in the storage's dtype if none)
    with SPLIT_TOKENIZER, ``forget`` and RETAIN_SPLIT, seed 0."""
    model = model if model is not None else tiny_llama(RunContext(storage=storage).param_dtype)
    ctx = RunContext(seed=0, storage=storage)
    unlearn = importlib.import_module(f"baselines.{method}").unlearn
    return unlearn(model, SPLIT_TOKENIZER, forget, RETAIN_SPLIT, ctx, **knobs)


# ---------------------------------------------------------------------------------------------
# Attribution: forget / retain MCQs, a BPE trained on their corpus, small models of each family

MCQ_CORPUS = [
    "The Veltrax virus is carried by ticks and attacks the liver.",
    "The Zorim virus spreads through sewage and attacks the lungs.",
    "The city of Brano lies beside the desert and is famous for its silk.",
    "The artist Kloum was born in May and mostly painted horses.",
    "Here is a plain sentence about nothing in particular.",
] * 4
FORGET_MCQS = [
    MCQ("The Veltrax virus is carried by", ("ticks", "bats", "rats", "fleas"), 0),
    MCQ("The Zorim virus attacks the", ("liver", "lungs", "heart", "skin"), 2),
    MCQ("The Zorim virus spreads through", ("sewage", "blood", "dust", "milk"), 1),
]
RETAIN_MCQS = [
    MCQ("The city of Brano lies beside the", ("desert", "lagoon", "marsh", "delta"), 1),
    MCQ("The artist Kloum mostly painted", ("horses", "storms", "towers", "dancers"), 3),
]
HIDDEN, NEURONS, HEADS = 32, 48, 4  # the family models' sizes
VOCAB = 300


def make_tokenizer(*, add_bos: bool = False, letter_tokens: bool = True):
    """A byte-level BPE trained on MCQ_CORPUS; ``letter_tokens`` teaches it " A".." D" as tokens."""
    texts = MCQ_CORPUS + (["Answer: A B C D"] * 20 if letter_tokens else [])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   bos_token="<s>" if add_bos else None)


@pytest.fixture(scope="module")
def tokenizer():
    """make_tokenizer()'s BPE, once per module (a module can define its own)."""
    return make_tokenizer()


_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=NEURONS,
               num_hidden_layers=2, num_attention_heads=HEADS, bos_token_id=1, eos_token_id=1,
               pad_token_id=0)
CONFIGS = {  # family -> initializer range -> model
    "llama": lambda s: LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, initializer_range=s,
                                                    **_COMMON)),
    "qwen2": lambda s: Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, initializer_range=s,
                                                    **_COMMON)),
    "qwen3": lambda s: Qwen3ForCausalLM(Qwen3Config(num_key_value_heads=2, head_dim=8,
                                                    initializer_range=s, **_COMMON)),
    "mistral": lambda s: MistralForCausalLM(MistralConfig(num_key_value_heads=2, head_dim=8,
                                                          initializer_range=s, **_COMMON)),
    # One kv head for all and a head_dim that is not hidden / heads.
    "gemma": lambda s: GemmaForCausalLM(GemmaConfig(num_key_value_heads=1, head_dim=16,
                                                    initializer_range=s, **_COMMON)),
    "gpt2": lambda s: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_inner=NEURONS, n_layer=2, n_head=HEADS,
        initializer_range=s, bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)),
    "gpt_neox": lambda s: GPTNeoXForCausalLM(GPTNeoXConfig(initializer_range=s, **_COMMON)),
}


def build(family: str, scale: float = 0.05):
    """CONFIGS[family] with initializer range ``scale``, seed 0, in eval mode."""
    torch.manual_seed(0)
    return CONFIGS[family](scale).eval()
