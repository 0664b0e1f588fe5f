"""Additive noise at a given SNR: white, or babble (a mixture of other speakers' utterances).

Every clip's noise is drawn from a generator seeded by (noise seed, clip id), so every method, batch
size and batch order tests on exactly the same noisy audio. The SNR is measured over each clip's own
samples (its true length, not the padded batch). Babble comes from a `BabblePool`: utterances of the
downstream corpus's training speakers (never the test split), and a clip's babble never contains
its own speaker.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from avssl.data.features import torchaudio

Condition = tuple[str, Optional[float]]  # ("clean", None) | ("white", 10.0) | ("babble", 0.0)
NOISE_TYPES = ("white", "babble")


def condition_name(cond: Condition) -> str:
    kind, snr = cond
    return "clean" if snr is None else f"{kind}_{snr:g}dB"


def parse_condition(name: str) -> Condition:
    """'white_10dB' -> ('white', 10.0); 'clean' -> ('clean', None)."""
    if name == "clean":
        return ("clean", None)
    kind, snr = name.rsplit("_", 1)
    return (kind, float(snr[:-2]))


def parse_snr(snr: Union[str, float]) -> Optional[float]:
    return None if snr == "clean" else float(snr)


def clip_generator(noise_seed: int, clip_id: str) -> torch.Generator:
    """The noise generator of one clip: the same for every method and batch layout."""
    return torch.Generator().manual_seed((int(noise_seed) * 1_000_003 + zlib.crc32(clip_id.encode())) % (2**63))


@dataclass
class BabblePool:
    """Utterances babble is built from, with their speakers and clip ids."""

    waves: list[np.ndarray]
    speakers: list[str]
    clip_ids: list[str]

    @classmethod
    def from_split(cls, waves: Sequence[np.ndarray], speakers: Sequence[str], clip_ids: Sequence[str], per_speaker: int = 8,
                   max_speakers: int = 64) -> "BabblePool":
        """Up to `per_speaker` clips from each of up to `max_speakers` speakers, spread evenly over the
        sorted speakers: speaker-diverse, deterministic, and a bounded memory whatever the corpus
        size (only these clips are read from `waves`)."""
        keep: dict[str, list[int]] = {}
        for i, s in enumerate(speakers):
            if len(keep.setdefault(s, [])) < per_speaker:
                keep[s].append(i)
        chosen = sorted(keep)
        if len(chosen) > max_speakers:
            chosen = [chosen[int(j)] for j in np.linspace(0, len(chosen) - 1, max_speakers).round()]
        idx = [i for s in chosen for i in keep[s]]
        return cls([np.asarray(waves[i], np.float32) for i in idx], [speakers[i] for i in idx], [clip_ids[i] for i in idx])

    def babble(self, n: int, speaker: Optional[str], talkers: int, gen: torch.Generator) -> torch.Tensor:
        """`talkers` utterances of distinct speakers other than `speaker`, each at the same level,
        circularly shifted, summed to n samples."""
        others = sorted({s for s in self.speakers if s != speaker})
        if len(others) < talkers:
            raise ValueError(f"babble with {talkers} talkers needs {talkers} speakers other than the clip's; the pool has {len(others)}")
        chosen = [others[int(i)] for i in torch.randperm(len(others), generator=gen)[:talkers]]
        out = torch.zeros(n)
        for spk in chosen:
            candidates = [i for i, s in enumerate(self.speakers) if s == spk]
            w = torch.tensor(self.waves[candidates[int(torch.randint(len(candidates), (1,), generator=gen))]])
            w = w.repeat(int(np.ceil(n / max(1, len(w)))))[:n] if len(w) < n else w[:n]
            w = torch.roll(w, int(torch.randint(max(1, n), (1,), generator=gen)))
            out += w / w.pow(2).mean().sqrt().clamp_min(1e-8)
        return out


def clip_noise(cond: Condition, n: int, gen: torch.Generator, speaker: Optional[str] = None, babble: Optional[BabblePool] = None, talkers: int = 4) -> torch.Tensor:
    kind, _ = cond
    if kind == "white":
        return torch.randn(n, generator=gen)
    if kind == "babble":
        if babble is None:
            raise ValueError("babble noise needs a babble pool (utterances of other speakers)")
        return babble.babble(n, speaker, talkers, gen)
    raise ValueError(f"unknown noise type '{kind}' ({', '.join(NOISE_TYPES)})")


def mix(wave: torch.Tensor, lengths: torch.Tensor, cond: Condition, noise_seed: int, clip_ids: Sequence[str],
        speakers: Optional[Sequence[str]] = None, babble: Optional[BabblePool] = None, talkers: int = 4) -> torch.Tensor:
    """wave [B, S] (clips padded to S; true lengths [B] in samples) -> each clip plus noise at the
    condition's SNR over its own length; padding stays silent."""
    kind, snr = cond
    if snr is None or kind == "clean":
        return wave
    b, s = wave.shape
    noise = torch.zeros(b, s)
    for i in range(b):
        n = int(lengths[i])
        gen = clip_generator(noise_seed, clip_ids[i])
        noise[i, :n] = clip_noise(cond, n, gen, speakers[i] if speakers is not None else None, babble, talkers)
    snr_t = torch.full((b,), float(snr), dtype=wave.dtype)
    mixed = torchaudio.functional.add_noise(wave, noise.to(wave.dtype), snr_t, lengths=lengths.to(wave.device))
    return mixed * (torch.arange(s)[None, :] < lengths[:, None]).to(wave.dtype)


def measured_snr(clean: torch.Tensor, noisy: torch.Tensor, length: int) -> float:
    """SNR in dB of one clip over its first `length` samples."""
    c = clean[:length].double()
    n = (noisy[:length] - clean[:length]).double()
    return float(10 * torch.log10(c.pow(2).sum() / n.pow(2).sum().clamp_min(1e-20)))
