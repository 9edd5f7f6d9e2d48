"""The training forward: summed next-token loss, with the vocabulary projection only where
there are labels (prompt, pad and document-start positions never reach the LM head), in chunks
and on the head's vocabulary shards under tensor parallelism (:mod:`finetune_trainer.loss`)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from finetune_trainer.data import IGNORE
from finetune_trainer.loss import chunked_cross_entropy


class CausalLMLoss(nn.Module):
    """Wraps a Hugging Face causal LM; ``forward`` returns (loss summed over targets, #targets).

    Summed losses let the loop divide by the number of target tokens in the whole global batch,
    so gradient accumulation, data parallelism and packing all give the same mean loss.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        chunk_tokens: int | None = None,
        select_targets: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        #: tokens per chunk of the loss; None: the planner's rule (finetune_trainer.loss)
        self.chunk_tokens = chunk_tokens
        #: only target positions reach the head (False: every position, masked; no
        #: data-dependent shapes, for FakeTensorMode)
        self.select_targets = select_targets

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        shifted: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``labels[i]`` is the token at position i (the loss pairs position i with label
        i + 1), or with ``shifted`` already the next token (context parallelism shifts before
        it splits the sequence: finetune_trainer.context)."""
        decoder = self.model.get_decoder()  # type: ignore[no-untyped-call]
        # No attention mask: pads are at the right (causal attention never reaches them from a
        # real token) and position ids that restart at 0 mark packed documents.
        out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        if shifted:
            hidden = out.last_hidden_state.flatten(0, 1)
            targets = labels.flatten()
        else:
            hidden = out.last_hidden_state[:, :-1].flatten(0, 1)
            targets = labels[:, 1:].flatten()
        head = self.model.get_output_embeddings()  # type: ignore[no-untyped-call]
        assert head is not None
        loss = chunked_cross_entropy(
            hidden,
            head,
            targets,
            ignore_index=IGNORE,
            select_targets=self.select_targets,
            chunk_tokens=self.chunk_tokens,
        )
        return loss, (targets != IGNORE).sum()
