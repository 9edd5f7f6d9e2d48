"""The training forward: summed next-token loss, with the vocabulary projection only where
there are labels (prompt, pad and document-start positions never reach the LM head)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional
from transformers import PreTrainedModel

from finetune_trainer.data import IGNORE


class CausalLMLoss(nn.Module):
    """Wraps a Hugging Face causal LM; ``forward`` returns (loss summed over targets, #targets).

    Summed losses let the loop divide by the number of target tokens in the whole global batch,
    so gradient accumulation, data parallelism and packing all give the same mean loss.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self.model.get_decoder()  # type: ignore[no-untyped-call]
        # No attention mask: pads are at the right (causal attention never reaches them from a
        # real token) and position ids that restart at 0 mark packed documents.
        out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE
        head = self.model.get_output_embeddings()  # type: ignore[no-untyped-call]
        assert head is not None
        logits = head(hidden[keep]).float()
        loss = functional.cross_entropy(logits, targets[keep], reduction="sum")
        return loss, keep.sum()
