"""Caption search for decoders that are not transformers models (the CNN-LSTM): greedy, sampling
and beam search, with transformers' own logits processors for the penalties.

A decoder is a `step(last_tokens, state) -> (logits, state)` function whose state is a tuple of
tensors with one row per sequence, so search never needs to know what the decoder keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.generation import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from captionkit.options import GenerationOptions

State = tuple[torch.Tensor, ...]
Step = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]


@dataclass(frozen=True)
class Tokens:
    """The decoder's special tokens: where sequences start and end, and what it must never say."""

    start: int
    end: int
    banned: tuple[int, ...] = ()


def processors(options: GenerationOptions, tokens: Tokens) -> LogitsProcessorList:
    """The penalties `options` ask for, as `generate` would apply them."""
    chain = LogitsProcessorList([SuppressTokensLogitsProcessor(list(tokens.banned))] if tokens.banned else [])
    if options.repetition_penalty is not None and options.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if options.no_repeat_ngram_size:
        chain.append(NoRepeatNGramLogitsProcessor(options.no_repeat_ngram_size))
    if options.min_new_tokens:
        # the start token is the one "prompt" token every sequence begins with
        chain.append(MinNewTokensLengthLogitsProcessor(1, options.min_new_tokens, tokens.end))
    return chain


def _warpers(options: GenerationOptions) -> LogitsProcessorList:
    chain = LogitsProcessorList()
    if options.temperature is not None:
        chain.append(TemperatureLogitsWarper(options.temperature))
    if options.top_p is not None:
        chain.append(TopPLogitsWarper(options.top_p))
    return chain


def search(step: Step, state: State, tokens: Tokens, options: GenerationOptions) -> list[list[list[int]]]:
    """Each row of `state`'s `options.candidates` token sequences, best first (without start/end)."""
    if options.num_beams > 1 and not options.do_sample:
        rows = state[0].shape[0]
        return [[seq for seq, _ in beam_search(step, tuple(s[i:i + 1] for s in state), tokens, options)]
                [:options.candidates] for i in range(rows)]
    n = options.candidates
    repeated = tuple(s.repeat_interleave(n, dim=0) for s in state)
    found = greedy(step, repeated, tokens, options)
    return [found[i * n:(i + 1) * n] for i in range(len(found) // n)]


def greedy(step: Step, state: State, tokens: Tokens, options: GenerationOptions) -> list[list[int]]:
    """Every row decoded at once: the likeliest token each step, or a sampled one with do_sample."""
    rows = state[0].shape[0]
    chain, warpers = processors(options, tokens), _warpers(options)
    sequences = torch.full((rows, 1), tokens.start, dtype=torch.long, device=state[0].device)
    done = torch.zeros(rows, dtype=torch.bool, device=sequences.device)
    generator = None
    if options.do_sample and options.seed is not None:
        generator = torch.Generator(device=sequences.device).manual_seed(options.seed)
    for _ in range(options.max_new_tokens):
        logits, state = step(sequences[:, -1], state)
        scores = chain(sequences, logits.float())  # on logits, as generate's greedy search does
        if options.do_sample:
            probs = torch.softmax(warpers(sequences, scores), dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            chosen = scores.argmax(-1)
        chosen = torch.where(done, torch.full_like(chosen, tokens.end), chosen)
        sequences = torch.cat([sequences, chosen[:, None]], dim=1)
        done |= chosen == tokens.end
        if done.all():
            break
    return [_trim(row.tolist(), tokens.end) for row in sequences[:, 1:]]


def beam_search(step: Step, state: State, tokens: Tokens,
                options: GenerationOptions) -> list[tuple[list[int], float]]:
    """One row's finished hypotheses, best first, scored as `generate` scores them: the summed log
    probabilities over (generated length ** length_penalty)."""
    beams, penalty = options.num_beams, options.length_penalty if options.length_penalty is not None else 1.0
    chain = processors(options, tokens)
    sequences = torch.full((1, 1), tokens.start, dtype=torch.long, device=state[0].device)
    totals = torch.zeros(1, device=sequences.device)
    finished: list[tuple[float, list[int]]] = []
    for length in range(1, options.max_new_tokens + 1):
        logits, state = step(sequences[:, -1], state)
        scores = chain(sequences, torch.log_softmax(logits.float(), dim=-1)) + totals[:, None]
        vocab = scores.shape[-1]
        best, flat = scores.view(-1).topk(min(2 * beams, scores.numel()))
        keep_rows, keep_tokens, keep_totals = [], [], []
        for rank, (total, index) in enumerate(zip(best.tolist(), flat.tolist(), strict=True)):
            row, token = divmod(index, vocab)
            if token == tokens.end:
                if rank < beams:  # an end below the best `beams` candidates would not survive in generate
                    finished.append((total / length ** penalty, sequences[row, 1:].tolist()))
                continue
            keep_rows.append(row)
            keep_tokens.append(token)
            keep_totals.append(total)
            if len(keep_rows) == beams:
                break
        if not keep_rows or _done(finished, max(keep_totals), length, beams, penalty):
            break
        index = torch.tensor(keep_rows, device=sequences.device)
        sequences = torch.cat([sequences[index], torch.tensor(keep_tokens, device=index.device)[:, None]], 1)
        totals = torch.tensor(keep_totals, device=index.device)
        state = tuple(s[index] for s in state)
    else:
        finished += [(total / options.max_new_tokens ** penalty, seq[1:])
                     for total, seq in zip(totals.tolist(), sequences.tolist(), strict=True)]
    finished.sort(key=lambda item: -item[0])
    return [(seq, score) for score, seq in finished[:max(beams, 1)]]


def _done(finished: list[tuple[float, list[int]]], best_live: float, length: int, beams: int,
          penalty: float) -> bool:
    """generate's rule (early_stopping=False): stop once `beams` hypotheses are finished and the best
    live beam, scored at the current length, cannot beat the worst of them."""
    if len(finished) < beams:
        return False
    worst = sorted(score for score, _ in finished)[-beams]
    return worst >= best_live / length ** penalty


def _trim(ids: list[int], end: int) -> list[int]:
    return ids[: ids.index(end)] if end in ids else ids
