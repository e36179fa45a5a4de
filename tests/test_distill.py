"""Distillation in chunks of tokens: the loss and its gradients equal the full-logits reference, for every
family's LM head, and ``transact run`` distils through it."""

import pytest
import torch
from tiny import FAMILIES, VOCAB, tiny_model

from transact.arch import get_adapter
from transact.recovery import losses
from transact.recovery.chunked import chunk_tokens, chunked_distill_loss, final_hidden, next_token_targets

QWEN_VOCAB = 151_936


def _naive(student_logits, teacher_logits, ids, temperature, lm_weight):
    ce = losses.lm_loss(student_logits, ids)
    return losses.distill_loss(student_logits, teacher_logits, temperature) + lm_weight * ce, ce


def test_next_token_targets_by_hand():
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert next_token_targets(ids).tolist() == [6, 7, -100, 9, 10, -100]
    assert chunk_tokens(QWEN_VOCAB) == 220 and chunk_tokens(10**9) == 1


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_and_gradients_equal_the_full_logits_at_qwens_vocabulary(chunk):
    """A Qwen-size vocabulary on a hidden size of 16: loss, CE and the gradients of the hidden states and of
    the head's weight equal the reference computed on the full (B, L, V) logits, for chunks that split
    rows, span rows, and hold everything."""
    gen = torch.Generator().manual_seed(0)
    batch, length, width, t, w = 2, 9, 16, 2.0, 0.5
    head = torch.nn.Linear(width, QWEN_VOCAB, bias=False)
    teacher_head = torch.nn.Linear(width, QWEN_VOCAB, bias=False).requires_grad_(False)
    with torch.no_grad():
        for layer in (head, teacher_head):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
    hidden = torch.randn(batch, length, width, generator=gen, requires_grad=True)
    teacher_hidden = torch.randn(batch, length, width, generator=gen)
    ids = torch.randint(0, QWEN_VOCAB, (batch, length), generator=gen)

    expected, expected_ce = _naive(head(hidden), teacher_head(teacher_hidden), ids, t, w)
    expected.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    got, ce = chunked_distill_loss(hidden, teacher_hidden, ids, head, teacher_head, temperature=t, lm_weight=w,
                                   chunk=chunk)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, expected_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, grads[1], rtol=1e-4, atol=1e-7)
    assert teacher_head.weight.grad is None


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gives_its_logits_from_its_final_hidden_states(family):
    """What distillation computes per chunk is the model's own logits: the LM head on the last hidden state,
    then the family's transform (Gemma's soft-capping, Granite's scaling), set away from neutral here."""
    extra = {"final_logit_softcapping": 3.0} if family.startswith("gemma") else {}
    model = tiny_model(family, **extra)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = final_hidden(model, ids)
        torch.testing.assert_close(get_adapter(model).lm_logits(model, hidden), model(input_ids=ids).logits,
                                   rtol=0, atol=1e-6)
    assert final_hidden(model, ids).shape == (2, 12, 64)


def test_gemma_soft_capping_is_what_the_transform_applies():
    model = tiny_model("gemma2", final_logit_softcapping=3.0)
    hidden = torch.randn(1, 2, 64)
    with torch.no_grad():
        logits = get_adapter(model).lm_logits(model, hidden)
        raw = model.lm_head(hidden)
    assert logits.abs().max() < 3.0 and torch.allclose(logits, 3.0 * torch.tanh(raw / 3.0))


@pytest.mark.parametrize("family", ["granite", "gemma2"])
def test_the_training_objective_equals_the_full_logits_one_on_a_model(family):
    """What ``transact run`` with ``method: kd`` optimises (final hidden states through each model's own
    forward, heads and loss in chunks of 5 tokens) equals the loss on both models' full logits, with the
    same gradients, on families whose logits are transformed after the head."""
    from transact.recipes import Training
    from transact.recovery.methods import MicroBatch
    from transact.recovery.methods.kd import DenseTeacher, DistillSettings, distill_objective

    student, teacher = tiny_model(family, seed=0), tiny_model(family, seed=1).requires_grad_(False)
    training = Training(method="kd", methods={"kd": DistillSettings(temperature=2.0, lm_weight=0.3, chunk_tokens=5)})
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    loss, _ = _naive(student(input_ids=ids).logits, teacher(input_ids=ids).logits, ids, 2.0, 0.3)
    loss.backward()
    expected = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    got = distill_objective(MicroBatch(student, student, ids, None, training, DenseTeacher(ids.device, teacher)))
    got.backward()
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-6)
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunk_size_must_be_a_count():
    from transact.errors import TransactError
    from transact.recovery.methods.kd import DistillSettings

    with pytest.raises(TransactError, match=r"training\.kd\.chunk_tokens"):
        DistillSettings(chunk_tokens=-1)
