"""Organism presets (model size, training budget, corpus spec), architectures, and the spec parser."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from memeval.errors import UsageError
from memeval.organisms.corpus import CorpusSpec

ARCHS = ("gpt_neox", "gpt2", "llama")
DEFAULT_ARCH = "gpt_neox"


@dataclass(frozen=True)
class Preset:
    name: str
    d_model: int
    n_layers: int
    n_heads: int
    mlp_ratio: int            # MLP width = mlp_ratio × d_model (Llama: 2/3 of that, gated, same params)
    context: int              # training chunk length (tokens)
    batch_size: int
    steps: int
    lr: float
    warmup_frac: float
    vocab_size: int
    corpus: CorpusSpec
    weight_decay: float = 0.1
    min_lr_frac: float = 0.1
    checkpoint_fractions: tuple[float, ...] = (0.1, 0.25, 0.5)   # plus the final model (1.0)
    prefix_len: int = 16      # DEL protocol lengths in tokens (MemPi: 32 + 48 on Pythia)
    suffix_len: int = 32
    eval_batch_size: int = 64
    # the corpus (world, planted texts) is fixed by the preset; the organism seed sets the weight init,
    # where planted copies sit in the stream and the batch order (as TinyMem's seeds do)
    corpus_seed: int = 0
    # torch threads for training (0 = every available core). Part of the recipe: on CPU the thread count
    # changes the floating-point reduction order, so bit-identical rebuilds need the same count. The
    # environment variable MEMEVAL_THREADS overrides it (e.g. on a machine shared with other jobs).
    threads: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["corpus"] = self.corpus.to_dict()
        d["checkpoint_fractions"] = list(self.checkpoint_fractions)
        return d

    @property
    def train_tokens(self) -> int:
        return self.steps * self.batch_size * self.context


PRESETS: dict[str, Preset] = {
    # unit tests: a few seconds on 2 cores
    "micro": Preset(
        name="micro", d_model=64, n_layers=2, n_heads=2, mlp_ratio=4, context=64, batch_size=16, steps=140,
        lr=3e-3, warmup_frac=0.05, vocab_size=512,
        corpus=CorpusSpec(n_entities=8, profile_docs=60, prose_docs=40, code_docs=15, arith_docs=15,
                          planted=((1, 2), (2, 2), (8, 2), (32, 2), (128, 2)), n_controls=5,
                          heldout_docs=8, n_new_entities=4, n_arith_probes=20),
        eval_batch_size=32, threads=1,
    ),
    # the CI and laptop default: 2 CPU cores, a few minutes
    "tiny": Preset(
        name="tiny", d_model=128, n_layers=4, n_heads=4, mlp_ratio=4, context=128, batch_size=16, steps=800,
        lr=2e-3, warmup_frac=0.05, vocab_size=2048, threads=2,
        corpus=CorpusSpec(n_entities=100, profile_docs=4000, prose_docs=2500, code_docs=800, arith_docs=1200,
                          max_operand=12,
                          planted=((1, 40), (2, 40), (4, 40), (8, 40), (16, 40), (32, 40), (64, 32),
                                   (128, 24)),
                          n_controls=40, heldout_docs=100, n_new_entities=40, n_arith_probes=200),
    ),
    # GPT-2-small scale, for users with one GPU
    "small": Preset(
        name="small", d_model=768, n_layers=12, n_heads=12, mlp_ratio=4, context=512, batch_size=32, steps=20000,
        lr=6e-4, warmup_frac=0.02, vocab_size=8192,
        corpus=CorpusSpec(n_entities=2000, profile_docs=200000, prose_docs=150000, code_docs=50000,
                          arith_docs=50000, max_operand=99,
                          planted=tuple((2 ** k, 200) for k in range(8)), n_controls=500,
                          heldout_docs=2000, n_new_entities=500, n_arith_probes=1000,
                          planted_min_chars=600),
        prefix_len=32, suffix_len=48,
    ),
}


def parse_organism_spec(rest: str) -> tuple[str, str, int]:
    """``<preset>[:<arch>][@<seed>]`` → (preset, arch, seed); a bad part is a :class:`UsageError`."""
    body, at, seed_s = rest.partition("@")
    preset, _, arch = body.partition(":")
    preset, arch = preset.strip(), (arch.strip() or DEFAULT_ARCH)
    if preset not in PRESETS:
        raise UsageError(f"organism '{rest}': unknown preset '{preset}' (expected one of: {', '.join(PRESETS)})")
    if arch not in ARCHS:
        raise UsageError(f"organism '{rest}': unknown architecture '{arch}' (expected one of: {', '.join(ARCHS)})")
    seed = 0
    if at:
        try:
            seed = int(seed_s)
        except ValueError:
            raise UsageError(f"organism '{rest}': seed '{seed_s}' is not an integer (expected <preset>[:<arch>][@<seed>])") from None
        if seed < 0:
            raise UsageError(f"organism '{rest}': seed must be >= 0")
    return preset, arch, seed


def check(preset: str, arch: str) -> Preset:
    if preset not in PRESETS:
        raise UsageError(f"unknown organism preset '{preset}' (expected one of: {', '.join(PRESETS)})")
    if arch not in ARCHS:
        raise UsageError(f"unknown organism architecture '{arch}' (expected one of: {', '.join(ARCHS)})")
    return PRESETS[preset]


def model_config(p: Preset, arch: str, vocab_size: int, eos_id: int, pad_id: int):
    """A transformers config for ``arch`` at the preset's size (no dropout, untied embeddings)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    inner = p.mlp_ratio * p.d_model
    common = dict(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                  tie_word_embeddings=False)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=p.d_model, num_hidden_layers=p.n_layers, num_attention_heads=p.n_heads,
                             intermediate_size=inner, max_position_embeddings=p.context, rotary_pct=0.25,
                             use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=p.d_model, n_layer=p.n_layers, n_head=p.n_heads, n_inner=inner,
                          n_positions=p.context, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if arch == "llama":
        gated = max(16, int(round(inner * 2 / 3 / 16)) * 16)
        return LlamaConfig(hidden_size=p.d_model, num_hidden_layers=p.n_layers, num_attention_heads=p.n_heads,
                           num_key_value_heads=p.n_heads, intermediate_size=gated,
                           max_position_embeddings=p.context, **common)
    raise UsageError(f"unknown organism architecture '{arch}' (expected one of: {', '.join(ARCHS)})")
