"""Random streams that survive a resume, also on another device type.

A ``torch.Generator``'s state is specific to its device type: a CPU generator holds the 5,056-byte
Mersenne Twister state, a CUDA generator 16 bytes of Philox seed and offset. A checkpoint written
on a GPU therefore cannot restore a CPU generator, nor the reverse (``set_state`` raises). Such a
stream (the Partial FC sampler, MixBCT's choice of mixed samples, BCT's old-head sampler, the
global CUDA stream) is re-seeded deterministically instead: the resumed run is reproducible, but
it draws other samples than an uninterrupted run would, and a warning in the training log says so.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("facecompat.train")

# Mixed into a stream's seed when it is re-seeded at a resume, so that the resumed run does not
# replay the draws its first steps made.
_RESUME_SALT = 0x2545F4914F6CDD1D


def resume_seed(seed: int, step: int = 0) -> int:
    """The seed a stream seeded with ``seed`` gets when it is re-seeded at optimiser step ``step``."""
    return (int(seed) * 6364136223846793005 + _RESUME_SALT + int(step)) % (2**63)


def restore_generator(generator: torch.Generator, saved: torch.Tensor, *, seed: int, step: int = 0,
                      what: str) -> bool:
    """Load ``saved`` (a ``get_state()`` tensor) into ``generator``, or re-seed it.

    The state fits when it was saved from a generator of the same device type (same state size).
    Otherwise ``generator`` is seeded with :func:`resume_seed` (``seed``, ``step``) and a warning
    naming ``what`` is logged. Returns True when the saved stream was restored exactly.
    """
    saved = saved.detach().cpu()
    expected = generator.get_state().numel()
    if saved.dtype == torch.uint8 and saved.numel() == expected:
        generator.set_state(saved)
        return True
    new_seed = resume_seed(seed, step)
    generator.manual_seed(new_seed)
    log.warning("%s: the checkpoint's random stream was saved on another device type (a %d-byte state; "
                "a %s generator's is %d bytes); re-seeded deterministically (seed %d), so this run is "
                "reproducible but draws other samples than an uninterrupted run would",
                what, saved.numel(), generator.device.type, expected, new_seed)
    return False
