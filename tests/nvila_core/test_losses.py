import pytest
import torch

from nvila.core.errors import NvilaError
from nvila.core.losses import chunked_loss, fused_loss, standard_loss


def test_chunked_loss_equals_the_standard_loss_and_its_gradients():
    torch.manual_seed(0)
    output = torch.nn.Linear(16, 50)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = -100  # unsupervised positions
    full = standard_loss(output(hidden), labels)
    grads_full = torch.autograd.grad(full, [hidden, output.weight])
    lean = chunked_loss(hidden, output, labels, chunk_size=4)  # several chunks, one partial
    grads_lean = torch.autograd.grad(lean, [hidden, output.weight])
    torch.testing.assert_close(lean, full)
    for a, b in zip(grads_lean, grads_full):
        torch.testing.assert_close(a, b)


def test_the_fused_loss_says_it_needs_a_gpu_on_cpu():
    with pytest.raises(NvilaError, match="needs a CUDA GPU.*chunked"):
        fused_loss(torch.randn(1, 2, 4), torch.nn.Linear(4, 8), torch.zeros(1, 2, dtype=torch.long))
