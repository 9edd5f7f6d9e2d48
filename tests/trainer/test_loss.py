"""The chunked cross-entropy (finetune_trainer/loss.py) against PyTorch's own ``cross_entropy``
over all logits at once, and its memory against the planner's charge. Its vocabulary-parallel
path (tensor parallel) is checked by tests/trainer/test_parallel_plans.py, whose worker makes
every run compute its loss in several chunks.

Tolerances (float32 throughout; only the order of summation differs): summed loss within a
relative 1e-6, gradients within 1e-5 of their largest element (measured: <= 1e-7 and
1.1e-6: the weight gradient is summed chunk by chunk). A
wrong chunk boundary, a missing softmax term or a wrong shard offset moves them by 1e-2 or more.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402
from transformers import AutoModelForCausalLM, MistralConfig  # noqa: E402

from finetune_trainer.data import IGNORE  # noqa: E402
from finetune_trainer.lm import CausalLMLoss  # noqa: E402
from finetune_trainer.loss import chunked_cross_entropy  # noqa: E402
from finetune_trainer.planner.memory import (  # noqa: E402
    CHUNKED_LOSS_BYTES_PER_LOGIT,
    LOSS_BYTES_PER_LOGIT,
    loss_chunk_tokens,
)

pytestmark = pytest.mark.trainer

LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5


def _inputs(n: int = 300, h: int = 32, vocab: int = 1000, bias: bool = False) -> Any:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    head = nn.Linear(h, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, h, generator=g) * 0.3)
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g))
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::3] = IGNORE  # prompt and pad positions
    return hidden, head, targets


def _grads(loss: Any, *tensors: Any) -> list[Any]:
    return list(torch.autograd.grad(loss, tensors))


def _close(got: list[Any], want: list[Any]) -> None:
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() <= GRAD_RTOL * b.abs().max(), (a - b).abs().max()


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("select", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_cross_entropy_over_all_logits(chunk: int | None, select: bool, bias: bool) -> None:
    hidden, head, targets = _inputs(bias=bias)
    params = [hidden, *head.parameters()]
    ref = nn.functional.cross_entropy(
        head(hidden).float(), targets, ignore_index=IGNORE, reduction="sum"
    )
    got = chunked_cross_entropy(
        hidden, head, targets, ignore_index=IGNORE, select_targets=select, chunk_tokens=chunk
    )
    assert got.item() == pytest.approx(ref.item(), rel=LOSS_RTOL)
    # a scaled loss (the loop multiplies by dp / target tokens) scales every gradient
    _close(_grads(got * 0.37, *params), _grads(ref * 0.37, *params))


def test_causal_lm_loss_matches_unchunked() -> None:
    """The trainer's training module (decoder, then the chunked head) against the decoder's
    output through the whole head and ``cross_entropy``: same loss, same gradient of every
    parameter."""
    cfg = MistralConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=512, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model: Any = AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(3, 512, (2, 40))
    pos = torch.cat([torch.arange(20), torch.arange(20)]).expand(2, 40)
    labels = ids.clone()
    labels[:, :10] = IGNORE
    lm = CausalLMLoss(model, chunk_tokens=9)
    loss, n = lm(ids, pos, labels)
    got = _grads(loss, *model.parameters())

    decoder = model.get_decoder()
    hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, :-1]).float()
    ref = nn.functional.cross_entropy(
        logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )
    assert int(n) == int((labels[:, 1:] != IGNORE).sum())
    assert loss.item() == pytest.approx(ref.item(), rel=LOSS_RTOL)
    _close(got, _grads(ref, *model.parameters()))


def _peak_above_inputs(fn: Any, n: int, h: int, vocab: int) -> float:
    """Peak bytes (MemTracker, FakeTensorMode: no real memory) of forward + backward beyond the
    inputs, in bf16 as on a GPU."""
    with FakeTensorMode():
        head = nn.Linear(h, vocab, bias=False, dtype=torch.bfloat16)
        hidden = torch.randn(n, h, dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(0, vocab, (n,))
        tracker = MemTracker()
        tracker.track_external(head, hidden, targets)
        with tracker:
            fn(hidden, head, targets).backward()
        peak = max(d["Total"] for d in tracker.get_tracker_snapshot("peak").values())
    return float(peak) - 2 * (n * h + vocab * h)


def test_peak_memory_is_one_chunk_as_the_planner_charges() -> None:
    """Llama-3's head (h 4096, vocabulary 128,256) over 8,192 tokens in bf16: all logits at once
    peak at the planner's 12 bytes per logit; the chunked loss at 6 bytes per logit of one chunk
    plus the hidden states' and the head's gradients (memory.loss_head_bytes)."""
    n, h, vocab = 8192, 4096, 128256

    def whole(hidden: Any, head: Any, targets: Any) -> Any:
        logits = head(hidden).float()
        return nn.functional.cross_entropy(logits, targets, reduction="sum")

    def chunked(hidden: Any, head: Any, targets: Any) -> Any:
        return chunked_cross_entropy(
            hidden, head, targets, ignore_index=IGNORE, select_targets=False
        )

    unchunked = _peak_above_inputs(whole, n, h, vocab)
    assert unchunked == pytest.approx(LOSS_BYTES_PER_LOGIT * n * vocab, rel=0.01)
    chunk = loss_chunk_tokens(vocab)
    grads = 2 * (n * h + vocab * h)
    got = _peak_above_inputs(chunked, n, h, vocab)
    assert got == pytest.approx(CHUNKED_LOSS_BYTES_PER_LOGIT * chunk * vocab + grads, rel=0.01)
    assert got < unchunked / 8
