"""Prompt log probabilities (OpenAI's `echo` with `logprobs`, vLLM's `prompt_logprobs`):
each prompt token's log probability given the tokens before it, computed while the
prompt is prefilled.

Only prefill groups that hold a request asking for them score positions (the others
keep the last position's logits alone). Such a group runs the model's backbone as any
prefill does and keeps its last hidden states (576 floats a position for SmolLM2, not
49152 logits); the output layer then turns them into logits SCORING_CHUNK_TOKENS
positions at a time, into one buffer each chunk reuses once scored, so no [prompt
length, vocab] tensor is ever held for a long prompt. (A model whose head does more than its output layer,
such as Gemma's logit soft-capping, keeps whole logits instead, and its prefill runs
in chunks of SCORING_CHUNK_TOKENS positions.) Positions of the left padding and rows
that did not ask are skipped. On 2 EPYC cores, 16 prompts of 512 tokens: whole logits
in chunks gave 0.58 of plain prefill's tokens/s; backbone states then the head in
chunks, with logsumexp instead of a whole log-softmax, gave the figure in
bench/results/prompt_scoring.json.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from deployments.protocol import TokenChoice, TokenLogprobs

# Positions whose logits are held at once while scoring: 512 x 49152 float32 logits are
# 100 MB.
SCORING_CHUNK_TOKENS = 512
# Attributes of a model's config that mean its head does more than its output layer.
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def output_layer(model) -> torch.nn.Module | None:
    """The model's output layer, when its logits are exactly that plain linear layer of
    the backbone's last hidden states (then prompts are scored from those states); else
    None (a soft-capped head, or one a LoRA adapter wraps: its per-row mask expects the
    batch's shape)."""
    if any(getattr(model.config, name, None) not in (None, 1.0) for name in _HEAD_TRANSFORMS):
        return None
    try:
        model.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    head = model.get_output_embeddings()
    return head if type(head) is torch.nn.Linear else None


def _scores(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """Log probabilities of the ``chosen`` tokens and of the ``top`` likeliest under
    ``logits`` [positions, vocab], which it overwrites: a logsumexp each, not a whole
    log-softmax, whose maximum is the likeliest token's score (one pass fewer), with
    the exponentials taken in place (a second [positions, vocab] tensor would be
    allocated, and its pages faulted in, for each chunk)."""
    picked = logits.gather(1, chosen[:, None])[:, 0]
    best = logits.max(dim=-1, keepdim=True) if top <= 1 else logits.topk(min(top, logits.shape[-1]), dim=-1)
    peak = best.values[:, :1]
    total = peak[:, 0] + logits.sub_(peak).exp_().sum(dim=-1).log_()
    if top == 0:
        empty = logits.new_zeros(len(logits), 0)
        return picked - total, empty, empty.long()
    return picked - total, best.values - total[:, None], best.indices


def _apply(head: torch.nn.Linear, states: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``head(states)``, written into ``out``."""
    if head.bias is None:
        return torch.mm(states, head.weight.t(), out=out)
    return torch.addmm(head.bias, states, head.weight.t(), out=out)


class PromptScores:
    """The prompt log probabilities of one prefill group, chunk by chunk.

    Args:
        wanted: per row of the group, how many alternatives to show beside each prompt
            token (0..20), or None for a row that asked for none.
        prompts: per row, its prompt's token ids (the rows are left-padded to the longest).
        token_text: a token id's text alone.
    """

    def __init__(
        self, wanted: Sequence[int | None], prompts: Sequence[Sequence[int]], token_text: Callable[[int], str]
    ) -> None:
        self._wanted = list(wanted)
        self._width = max(len(prompt) for prompt in prompts)
        self._starts = [self._width - len(prompt) for prompt in prompts]
        self._token_text = token_text
        # Each row's prompt tokens; the first has no log probability (nothing precedes it).
        self.rows: list[list[TokenLogprobs]] = [
            [TokenLogprobs(TokenChoice(prompt[0], token_text(prompt[0]), None))] for prompt in prompts
        ]

    @staticmethod
    def columns(rows: int) -> int:
        """Most columns one chunk may run when whole logits are kept."""
        return max(1, SCORING_CHUNK_TOKENS // rows)

    def add_chunk(
        self, states: torch.Tensor, input_ids: torch.Tensor, done: int, head: torch.nn.Module | None = None
    ) -> None:
        """Scores the prompt tokens that a prefill chunk predicts: ``states`` [rows,
        columns, hidden] are the backbone's last hidden states, made logits by ``head``
        SCORING_CHUNK_TOKENS positions at a time (without ``head``, ``states`` are the
        logits). Column c's logits are the model's scores of the token at c + 1."""
        columns = min(states.shape[1], self._width - 1 - done)  # the last column predicts a new token
        if columns <= 0:
            return
        asking = [row for row, wanted in enumerate(self._wanted) if wanted is not None]
        top = max(self._wanted[row] for row in asking)
        index = torch.tensor(asking, device=states.device)
        targets = input_ids[index, done + 1: done + 1 + columns].reshape(-1)
        flat = states[index, :columns].reshape(len(targets), -1)  # a copy (indexed): _scores may overwrite it
        logits = None
        if head is not None:  # one buffer for every chunk's logits, not 100 MB allocated per chunk
            logits = flat.new_empty(min(len(targets), SCORING_CHUNK_TOKENS), head.out_features, dtype=head.weight.dtype)
        parts = []
        for start in range(0, len(targets), SCORING_CHUNK_TOKENS):
            chunk = flat[start: start + SCORING_CHUNK_TOKENS]
            if head is not None:
                chunk = _apply(head, chunk, logits[: len(chunk)])
            parts.append(_scores(chunk.float(), targets[start: start + SCORING_CHUNK_TOKENS], top))
        chosen, best, best_ids = (torch.cat([part[i] for part in parts]) for i in range(3))
        chosen = chosen.view(len(asking), columns).tolist()
        best, best_ids = best.view(len(asking), columns, -1).tolist(), best_ids.view(len(asking), columns, -1).tolist()
        target_ids = targets.view(len(asking), columns).tolist()
        for position, row in enumerate(asking):
            shown = self._wanted[row]
            for column in range(max(0, self._starts[row] - done), columns):  # real tokens only
                token_id = target_ids[position][column]
                self.rows[row].append(TokenLogprobs(
                    TokenChoice(token_id, self._token_text(token_id), chosen[position][column]),
                    tuple(
                        TokenChoice(other, self._token_text(other), logprob)
                        for other, logprob in zip(best_ids[position][column][:shown], best[position][column][:shown],
                                                  strict=True)
                    ),
                ))

    def of_row(self, row: int) -> tuple[TokenLogprobs, ...] | None:
        """A row's prompt tokens with their log probabilities (the first token's None),
        or None if the row asked for none."""
        return None if self._wanted[row] is None else tuple(self.rows[row])
