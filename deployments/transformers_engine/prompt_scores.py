"""Prompt log probabilities (OpenAI's `echo` with `logprobs`, vLLM's `prompt_logprobs`):
each prompt token's log probability given the tokens before it, computed while the
prompt is prefilled.

Only prefill groups that hold a request asking for them keep every position's logits
(the others keep the last one alone), and such a group is prefilled in chunks of at most
SCORING_CHUNK_TOKENS positions (rows x columns), so that no [prompt length, vocab] tensor
is ever held for a long prompt: a chunk's logits are scored, then dropped. Positions of
the left padding and rows that did not ask are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from deployments.protocol import TokenChoice, TokenLogprobs
from deployments.transformers_engine.sampling import score_rows

# Positions (rows x columns) whose logits one scored prefill chunk holds: 512 x 49152
# float32 logits are 100 MB, about as much again for their log-softmax.
SCORING_CHUNK_TOKENS = 512


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

    def columns(self, rows: int) -> int:
        """Most columns one chunk of the group may run."""
        return max(1, SCORING_CHUNK_TOKENS // rows)

    def add_chunk(self, logits: torch.Tensor, input_ids: torch.Tensor, done: int) -> None:
        """Scores the prompt tokens that the chunk's ``logits`` [rows, columns, vocab]
        predict: the logits at column c are the model's scores of the token at c + 1."""
        columns = min(logits.shape[1], self._width - 1 - done)  # the last column predicts a new token
        if columns <= 0:
            return
        asking = [row for row, wanted in enumerate(self._wanted) if wanted is not None]
        top = max(self._wanted[row] for row in asking)
        index = torch.tensor(asking, device=logits.device)
        targets = input_ids[index, done + 1: done + 1 + columns]
        chosen, best, best_ids = score_rows(
            logits[index, :columns].reshape(-1, logits.shape[-1]), targets.reshape(-1), max(top, 1)
        )
        chosen = chosen.view(len(asking), columns).tolist()
        best, best_ids = best.view(len(asking), columns, -1).tolist(), best_ids.view(len(asking), columns, -1).tolist()
        target_ids = targets.tolist()
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
