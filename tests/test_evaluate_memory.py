"""The evaluation loss in bounded memory: logits exist only for scored positions, a chunk at a time, and batches are
sized in tokens. The numbers equal those of the model's own full-logits forward."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from pipeline.evaluation.loss import IGNORE_INDEX, assistant_token_loss, collate, token_batches
from pipeline.evaluation.models import evaluation_dtype, quantization

# A 10 MB Qwen2 with Qwen2's 152064-row vocabulary, 8 rows of 2048 tokens (the old default batch), 64 of them scored
# per row. The model's own forward holds 8 × 2048 × 152064 bf16 logits (5 GB) before anything is scored.
BIG_VOCABULARY_CASE = """
import resource, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from pipeline.evaluation.loss import assistant_token_loss
config = Qwen2Config(vocab_size=152064, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
torch.manual_seed(0)
model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
ids = [torch.randint(0, 152064, (2048,)).tolist() for _ in range(8)]
masks = [[0] * 1984 + [1] * 64 for _ in range(8)]
result = assistant_token_loss(model, ids, masks, batch_tokens=8 * 2048, pad_id=0)
assert result.tokens == 8 * 64
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def full_logits_loss(model, input_ids, assistant_masks, *, batch_size: int, pad_id: int) -> tuple[float, int]:
    """Yesterday's algorithm, the reference: the model's own logits for every position, scored ones upcast."""
    total, tokens = 0.0, 0
    rows = list(zip(input_ids, assistant_masks, strict=True))
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            scored = labels != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1][scored].float(), labels[scored], reduction="sum"
            ).item()
            tokens += int(scored.sum())
    return total, tokens


def random_rows(vocab_size: int, lengths: list[int], seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]
    masks = [[int(i >= n // 3) for i in range(n)] for n in lengths]
    return ids, masks


def test_big_vocabulary_loss_peaks_under_2_gb():
    """Measured: 14.8 GB peak RSS with the full-logits forward, 1.1 GB here."""
    completed = subprocess.run([sys.executable, "-c", BIG_VOCABULARY_CASE], capture_output=True, text=True, check=True)
    peak = int(completed.stdout.split()[-1])
    assert peak < 2 * 1024**3, f"peak RSS {peak / 1024**3:.2f} GB"


@pytest.mark.parametrize("batch_tokens", [1, 150, 10_000])
def test_losses_equal_the_full_logits_forward_on_the_tiny_fixtures(tiny_models, batch_tokens):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], dtype="auto").eval()
    assert model.dtype == torch.bfloat16
    pad_id = AutoTokenizer.from_pretrained(tiny_models["target"]).pad_token_id
    ids, masks = random_rows(model.config.vocab_size, [37, 90, 12, 64, 90, 5])
    expected_total, expected_tokens = full_logits_loss(model, ids, masks, batch_size=8, pad_id=pad_id)
    result = assistant_token_loss(model, ids, masks, batch_tokens=batch_tokens, pad_id=pad_id)
    assert result.tokens == expected_tokens
    assert result.mean == pytest.approx(expected_total / expected_tokens, rel=1e-5)


def test_chunks_of_the_head_add_up_to_the_whole(tiny_models, monkeypatch):
    """Chunks of one position each give the loss of one chunk for all."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], dtype=torch.float32).eval()
    ids, masks = random_rows(model.config.vocab_size, [50, 70])
    whole = assistant_token_loss(model, ids, masks, batch_tokens=1000, pad_id=0)
    monkeypatch.setattr("pipeline.evaluation.loss.LOGITS_PER_CHUNK", 1)
    one_by_one = assistant_token_loss(model, ids, masks, batch_tokens=1000, pad_id=0)
    assert one_by_one.mean == pytest.approx(whole.mean, rel=1e-6)


def test_batches_stay_within_the_token_budget():
    lengths = [10, 300, 40, 41, 5, 120, 7]
    batches = token_batches(lengths, 128)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) * width <= 128 or len(batch) == 1
    assert [1] in batches, "a row longer than the budget is a batch alone"


class ScaledLogitsQwen2(Qwen2ForCausalLM):
    """Logits multiplied after lm_head, as Cohere's `logit_scale` does (a stand-in built from Qwen2)."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 0.25
        return output


def test_a_model_that_changes_its_logits_after_the_head_is_refused():
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    ids, masks = random_rows(128, [20])
    assistant_token_loss(Qwen2ForCausalLM(config).eval(), ids, masks, batch_tokens=64, pad_id=0)
    with pytest.raises(ValueError, match="not lm_head"):
        assistant_token_loss(ScaledLogitsQwen2(config).eval(), ids, masks, batch_tokens=64, pad_id=0)


def test_auto_dtype_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    """No GPU here: torch's bf16 probe is replaced by a T4's answer (capability 7.5) and an A100's."""
    cuda = torch.device("cuda")
    assert evaluation_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert evaluation_dtype("float32", cuda) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert evaluation_dtype("auto", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert evaluation_dtype("auto", cuda) == torch.bfloat16


def test_4_bit_evaluation_needs_a_gpu():
    assert quantization(False, torch.bfloat16, torch.device("cpu")) == {}
    with pytest.raises(ValueError, match="load_in_4bit"):
        quantization(True, torch.bfloat16, torch.device("cpu"))
