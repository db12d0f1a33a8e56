"""Logit processing before a token is drawn: bans, penalties (vLLM v1 order) and the min-p / top-k / top-p
cutoffs, batched over rows with per-row parameters (``Sampler`` in sampler.py draws from the result)."""

from __future__ import annotations

import math
from itertools import chain
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from joule.runtime.device import upload

if TYPE_CHECKING:
    from joule.runtime.sampler import SamplingRow

# On CPU, top-p seeks each row's nucleus among its best 512, then 4096 tokens and
# sorts the whole vocabulary only for rows whose nucleus is wider still (64 x 49k
# on two cores: topk(512) ~15 ms, a full sort ~150 ms). Accelerators always sort:
# it is cheap there, and the coverage check would cost a device sync.
_CPU_TOP_P_CANDIDATE_WIDTHS = (512, 4096)

def apply_bans_and_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Logit biases, banned tokens, grammar masks, repetition, frequency and presence penalties as float32 logits.

    Returns ``logits`` itself (in its own dtype) when no row needs any of them, else a
    new float32 tensor; the caller's logits are never modified, so raw logprobs stay raw.
    Work is proportional to the token histories, not to rows x vocabulary: only
    the (row, token) positions that occurred are gathered and updated.
    """
    vocab_size = logits.shape[1]
    banned = [row.banned_token_ids for row in rows]
    biased = [row.logit_bias or {} for row in rows]
    constraints = [row.constraint for row in rows]
    allowed = [row.allowed_token_ids for row in rows]
    if (not any(row.has_penalties for row in rows) and not any(len(ids) for ids in banned)
            and not any(biased) and not any(constraint is not None for constraint in constraints)
            and not any(ids is not None for ids in allowed)):
        return logits
    device = logits.device
    result = logits.to(torch.float32, copy=True)
    flat = result.view(-1)

    bias_index = flat_token_index([list(bias) for bias in biased], vocab_size, device)
    if bias_index is not None:  # before the bans: a banned token stays banned whatever its bias
        values = [value for bias in biased for value in bias.values()]
        flat.index_add_(0, bias_index, torch.tensor(values, dtype=torch.float32).to(device))
    banned_index = flat_token_index(banned, vocab_size, device, skip_out_of_range=True)
    if banned_index is not None:
        flat.index_fill_(0, banned_index, -math.inf)
    restricted = [row for row, ids in enumerate(allowed) if ids is not None]
    if restricted:
        keep = torch.zeros(len(restricted), vocab_size, dtype=torch.bool, device=device)
        keep.view(-1)[flat_token_index([allowed[row] for row in restricted], vocab_size, device,
                                       skip_out_of_range=True)] = True
        index = torch.tensor(restricted, dtype=torch.int64).to(device)
        result[index] = result[index].masked_fill(~keep, -math.inf)
    if any(constraint is not None for constraint in constraints):
        from joule.runtime.structured_output import apply_token_masks

        apply_token_masks(result, constraints)
        # The grammar wins where the bans left it nothing (e.g. only EOS may come and min_tokens bans it).
        constrained = [row for row, constraint in enumerate(constraints) if constraint is not None]
        index = torch.tensor(constrained, dtype=torch.int64).to(device)
        emptied = torch.isneginf(result[index]).all(dim=1).nonzero().flatten().tolist()
        if emptied:
            rows_left = [constrained[position] for position in emptied]
            left_index = torch.tensor(rows_left, dtype=torch.int64).to(device)
            own = logits[left_index].float()
            apply_token_masks(own, [constraints[row] for row in rows_left])
            result[left_index] = own

    # Rows with neutral values (repetition 1, frequency and presence 0) may be
    # included below: their updates are exact no-ops.
    histories = [row.output_token_ids if row.has_penalties else () for row in rows]
    outputs = flat_token_index(histories, vocab_size, device)
    if any(row.repetition_penalty != 1.0 for row in rows):
        # Every occurrence in prompt or output; duplicates all write the same value.
        prompt_ids = [row.prompt_token_ids if row.repetition_penalty != 1.0 else () for row in rows]
        prompts = flat_token_index(prompt_ids, vocab_size, device)
        occurred = [index for index in (prompts, outputs) if index is not None]
        if occurred:
            seen = torch.cat(occurred)
            penalties = row_values([row.repetition_penalty for row in rows], device)[seen // vocab_size]
            values = flat[seen]
            flat[seen] = torch.where(values > 0, values / penalties, values * penalties)

    if outputs is not None and any(row.frequency_penalty or row.presence_penalty for row in rows):
        # Sorted, each (row, token) is one run: its first element carries
        # frequency * count + presence, the rest add exact zeros, so the result
        # does not depend on the order duplicates are added in.
        ordered = outputs.sort().values
        run_starts = torch.searchsorted(ordered, ordered)
        counts = torch.searchsorted(ordered, ordered, right=True) - run_starts
        first = run_starts == torch.arange(len(ordered), device=device)
        owners = ordered // vocab_size
        frequency = row_values([row.frequency_penalty for row in rows], device)[owners]
        presence = row_values([row.presence_penalty for row in rows], device)[owners]
        flat.index_add_(0, ordered, torch.where(first, -(frequency * counts + presence), 0.0))
    return result


def filter_cutoffs(scaled: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor | None:
    """Per-row logit cutoff (keep ``scaled >= cutoff``) for min_p, top_k and top_p, or None.

    Each filter keeps a prefix of the row sorted by logit, so together they are
    one threshold, compared by value: ties at the boundary are all kept, alike
    whichever code path found it.
    """
    num_rows, vocab_size = scaled.shape
    device = scaled.device
    top_ks = [row.top_k if 0 < row.top_k < vocab_size else 0 for row in rows]
    use_min_p = any(row.min_p > 0.0 for row in rows)
    use_top_k = any(top_ks)
    top_p_rows = [i for i, row in enumerate(rows) if row.top_p < 1.0]
    if not (use_min_p or use_top_k or top_p_rows):
        return None

    row_max = scaled.amax(dim=-1)
    if use_min_p:
        log_min_p = [math.log(row.min_p) if row.min_p > 0.0 else -math.inf for row in rows]
        cutoffs = row_max + row_values(log_min_p, device)
    else:
        cutoffs = torch.full((num_rows,), -math.inf, dtype=torch.float32, device=device)

    if use_top_k:
        k_rows = [i for i, k in enumerate(top_ks) if k]
        k_index = index_tensor(k_rows, device)
        k_logits = scaled if len(k_rows) == num_rows else scaled.index_select(0, k_index)
        ks = index_tensor([top_ks[i] for i in k_rows], device)
        best = k_logits.topk(max(top_ks), dim=-1).values
        kth = best.gather(1, (ks - 1).unsqueeze(1)).squeeze(1)
        cutoffs[k_index] = torch.maximum(cutoffs[k_index], kth)

    if top_p_rows:
        p_index = index_tensor(top_p_rows, device)
        p_logits = scaled if len(top_p_rows) == num_rows else scaled.index_select(0, p_index)
        top_ps = row_values([rows[i].top_p for i in top_p_rows], device)
        lower = cutoffs[p_index]
        nucleus = _top_p_cutoffs(p_logits, row_max[p_index], lower, top_ps)
        cutoffs[p_index] = torch.maximum(lower, nucleus)
    return cutoffs


def _top_p_cutoffs(
    logits: torch.Tensor, row_max: torch.Tensor, lower: torch.Tensor, top_ps: torch.Tensor
) -> torch.Tensor:
    """Logit of the last token in each row's nucleus, among tokens >= ``lower``.

    The nucleus is the shortest most-likely-first prefix whose probability
    (renormalised over the tokens that survived min_p and top_k) reaches top_p.
    """
    vocab_size = logits.shape[1]
    # Float64, so that a seeded row's nucleus cannot change with the rounding
    # of a batch-shaped reduction: the boundary would have to fall within 1e-16.
    unnormalised = (logits.double() - row_max.double().unsqueeze(1)).exp_()
    unnormalised.masked_fill_(logits < lower.unsqueeze(1), 0.0)
    targets = top_ps.double() * unnormalised.sum(dim=-1)

    if logits.device.type != "cpu":
        ordered = logits.sort(dim=-1, descending=True).values
        return _nucleus_end(ordered, row_max, lower, targets)[0]

    # CPU: widen the candidate set only for rows whose nucleus was not found yet.
    # Checking coverage on the host is free here, as there is no device to wait for.
    cutoffs = torch.empty_like(row_max)
    pending = torch.arange(logits.shape[0])
    for width in [w for w in _CPU_TOP_P_CANDIDATE_WIDTHS if w < vocab_size] + [vocab_size]:
        candidates = logits if len(pending) == logits.shape[0] else logits.index_select(0, pending)
        ordered = candidates.topk(width, dim=-1).values  # a full sort when width == vocab_size
        found, covered = _nucleus_end(ordered, row_max[pending], lower[pending], targets[pending])
        if width == vocab_size:
            covered.fill_(True)
        cutoffs[pending[covered]] = found[covered]
        pending = pending[~covered]
        if not len(pending):
            break
    return cutoffs


def _nucleus_end(
    ordered: torch.Tensor, row_max: torch.Tensor, lower: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nucleus cutoff within descending ``ordered`` logits, and whether it was reached there."""
    width = ordered.shape[1]
    weights = (ordered.double() - row_max.double().unsqueeze(1)).exp_()
    weights.masked_fill_(ordered < lower.unsqueeze(1), 0.0)
    cumulative = weights.cumsum(dim=-1)
    # Tokens before the one whose cumulative mass reaches the target, plus that one.
    keep = ((cumulative < targets.unsqueeze(1)).sum(dim=-1) + 1).clamp_(max=width)
    cutoffs = ordered.gather(1, (keep - 1).unsqueeze(1)).squeeze(1)
    return cutoffs, cumulative[:, -1] >= targets


def index_tensor(indices: list[int], device: torch.device) -> torch.Tensor:
    return upload(torch.tensor(indices, dtype=torch.int64), device)


def row_values(values: list[float], device: torch.device) -> torch.Tensor:
    return upload(torch.tensor(values, dtype=torch.float32), device)


def flat_token_index(
    per_row_ids: list[Sequence[int]], vocab_size: int, device: torch.device, skip_out_of_range: bool = False
) -> torch.Tensor | None:
    """``row * vocab_size + token`` for every token of every row, or None if there are none.

    Ids are checked on the host before upload: an out-of-range id would
    otherwise silently land in a neighbouring row. With ``skip_out_of_range``
    they are dropped instead (a banned id the model cannot produce needs no ban).
    """
    lengths = [len(ids) for ids in per_row_ids]
    if not any(lengths):
        return None
    if any(isinstance(ids, (torch.Tensor, np.ndarray)) for ids in per_row_ids):
        parts = [torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu() for ids in per_row_ids]
        tokens = torch.cat(parts)
    else:  # plain lists: one pass through numpy is ~4x faster than torch.tensor(list)
        flat_ids = np.fromiter(chain.from_iterable(per_row_ids), dtype=np.int64, count=sum(lengths))
        tokens = torch.from_numpy(flat_ids)
    row_starts = np.arange(len(per_row_ids), dtype=np.int64) * vocab_size
    offsets = torch.from_numpy(np.repeat(row_starts, lengths))
    in_range = (tokens >= 0) & (tokens < vocab_size)
    if not bool(in_range.all()):
        if not skip_out_of_range:
            bad = int(tokens[~in_range][0])
            raise ValueError(f"token id {bad} is outside the vocabulary of size {vocab_size}.")
        tokens, offsets = tokens[in_range], offsets[in_range]
        if not tokens.numel():
            return None
    return upload(tokens + offsets, device)
