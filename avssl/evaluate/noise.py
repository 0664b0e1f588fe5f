"""Additive noise at a given SNR: white, or babble (a mixture of other utterances), via torchaudio.
Noise is drawn from a seeded generator, so every method is tested on the same noisy audio."""

from __future__ import annotations

from typing import Optional, Union

import torch

from avssl.data.features import torchaudio

Condition = tuple[str, Optional[float]]  # ("clean", None) | ("white", 10.0) | ("babble", 0.0)


def condition_name(cond: Condition) -> str:
    kind, snr = cond
    return "clean" if snr is None else f"{kind}_{snr:g}dB"


def parse_snr(snr: Union[str, float]) -> Optional[float]:
    return None if snr == "clean" else float(snr)


def mix(wave: torch.Tensor, cond: Condition, generator: torch.Generator, babble_pool: Optional[torch.Tensor] = None, talkers: int = 4) -> torch.Tensor:
    """wave [B, S] -> wave + noise at the condition's SNR (over the whole clip)."""
    kind, snr = cond
    if snr is None or kind == "clean":
        return wave
    b, s = wave.shape
    if kind == "white":
        noise = torch.randn(b, s, generator=generator)
    elif kind == "babble":
        if babble_pool is None or len(babble_pool) < talkers:
            raise ValueError(f"babble noise needs at least {talkers} other utterances")
        idx = torch.randint(0, len(babble_pool), (b, talkers), generator=generator)
        pool = babble_pool[:, :s] if babble_pool.shape[1] >= s else torch.nn.functional.pad(babble_pool, (0, s - babble_pool.shape[1]))
        shift = torch.randint(0, max(1, s // 4), (b, talkers), generator=generator)
        noise = torch.zeros(b, s)
        for t in range(talkers):
            for i in range(b):
                noise[i] += torch.roll(pool[idx[i, t]], int(shift[i, t]))
    else:
        raise ValueError(f"unknown noise type '{kind}' (white, babble)")
    snr_t = torch.full((b,), float(snr))
    return torchaudio.functional.add_noise(wave, noise.to(wave.dtype), snr_t)
