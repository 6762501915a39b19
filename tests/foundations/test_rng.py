"""facecompat.rng: random streams at a resume, restored exactly on the device type that saved them and
reseeded (with a warning) on another."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facecompat import rng


def test_a_generator_restores_its_own_device_types_state_and_reseeds_from_another(caplog):
    source = torch.Generator().manual_seed(5)
    torch.rand(3, generator=source)
    target = torch.Generator()
    assert rng.restore_generator(target, source.get_state(), seed=5, what="sampler")
    assert torch.equal(torch.rand(4, generator=target), torch.rand(4, generator=source))
    philox = torch.from_numpy(np.array([5, 128], dtype=np.uint64).view(np.uint8).copy())  # a CUDA state
    with caplog.at_level("WARNING", logger="facecompat.train"):
        assert not rng.restore_generator(target, philox, seed=5, step=30, what="the sampler")
    assert "the sampler: the checkpoint's random stream was saved on another device type" in caplog.text
    expected = torch.Generator().manual_seed(rng.resume_seed(5, 30))
    assert torch.equal(torch.rand(4, generator=target), torch.rand(4, generator=expected))
    assert rng.resume_seed(5, 30) not in (5, rng.resume_seed(5, 31), rng.resume_seed(6, 30))


@pytest.mark.gpu
def test_a_cpu_checkpoint_stream_reseeds_a_cuda_generator():
    cuda = torch.Generator(device="cuda")
    cpu_state = torch.Generator().manual_seed(1).get_state()
    assert not rng.restore_generator(cuda, cpu_state, seed=1, what="sampler")
    expected = torch.Generator(device="cuda").manual_seed(rng.resume_seed(1))
    assert torch.equal(torch.rand(4, device="cuda", generator=cuda),
                       torch.rand(4, device="cuda", generator=expected))
    assert rng.restore_generator(cuda, expected.get_state(), seed=1, what="sampler")  # same type: exact
