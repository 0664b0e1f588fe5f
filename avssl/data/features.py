"""Audio features with torchaudio: MFCC, log-mel, prosody, all aligned to 25 fps video frames.

These are the audio pretext targets (never learned) and the hand-feature baselines.
"""

from __future__ import annotations

import sys
import types
from functools import lru_cache

import torch

from avssl.data.constants import FPS, HOP, SAMPLE_RATE  # noqa: F401

FEATURE_HOP = 160  # 10 ms analysis hop: four per video frame
PITCH_WINDOW = 1024
F0_MIN, F0_MAX = 70.0, 400.0
VOICED = 0.5  # a frame is voiced where the voicing confidence exceeds this; log-F0 counts only there


def _import_torchaudio() -> types.ModuleType:
    """Import torchaudio, tolerating a wheel whose compiled extension cannot load.

    The pure-Python transforms used here (MelSpectrogram, MFCC, resample, add_noise) do not need
    the extension; a machine where it loads uses torchaudio unchanged.
    """
    try:
        import torchaudio

        return torchaudio
    except OSError:
        pass
    for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
        del sys.modules[name]
    stub = types.ModuleType("torchaudio._extension")

    def _unavailable(*_a, **_k):
        raise RuntimeError("this torchaudio build's compiled extension cannot be loaded here")

    stub._IS_TORCHAUDIO_EXT_AVAILABLE = False
    stub._IS_ALIGN_AVAILABLE = False
    stub.fail_if_no_align = lambda _f: _unavailable
    stub._load_lib = lambda _lib: False
    stub._check_cuda_version = lambda: None
    sys.modules["torchaudio._extension"] = stub
    import torchaudio

    return torchaudio


torchaudio = _import_torchaudio()


# Centred windows padded with zeros (not reflected): a clip's last frames then see the same
# samples whether the clip stands alone or is zero-padded next to a longer batch mate.
_STFT = dict(n_fft=400, win_length=400, hop_length=FEATURE_HOP, center=True, pad_mode="constant")


@lru_cache(maxsize=8)
def _mel(n_mels: int) -> torch.nn.Module:
    return torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_mels=n_mels, **_STFT)


@lru_cache(maxsize=8)
def _mfcc(n_mfcc: int, n_mels: int) -> torch.nn.Module:
    return torchaudio.transforms.MFCC(SAMPLE_RATE, n_mfcc=n_mfcc, melkwargs=dict(n_mels=n_mels, **_STFT))


def _to_video_rate(feat: torch.Tensor, n_frames: int) -> torch.Tensor:
    """[B, C, n_hops] at 10 ms -> [B, n_frames, C] by averaging the four hops of each video frame."""
    per = HOP // FEATURE_HOP
    need = n_frames * per
    if feat.shape[-1] < need:
        feat = torch.nn.functional.pad(feat, (0, need - feat.shape[-1]), mode="replicate")
    feat = feat[..., :need].reshape(feat.shape[0], feat.shape[1], n_frames, per).mean(-1)
    return feat.transpose(1, 2)


def frames_of(wave: torch.Tensor) -> int:
    return wave.shape[-1] // HOP


def log_mel(wave: torch.Tensor, n_mels: int = 40) -> torch.Tensor:
    """[B, S] -> [B, T, n_mels] log-mel energies per video frame."""
    mel = _mel(n_mels).to(wave.device)(wave.float())
    return _to_video_rate(torch.log(mel + 1e-6), frames_of(wave))


def mfcc(wave: torch.Tensor, n_mfcc: int = 13, n_mels: int = 40) -> torch.Tensor:
    """[B, S] -> [B, T, n_mfcc], each clip on its own.

    torchaudio's `top_db` floor (80 dB below the loudest bin) is taken over the channel
    dimension too; the waveforms go in as [B, 1, S] so that the floor is per clip and a clip's
    MFCCs do not depend on its batch mates. Zero padding only lowers bins, so it never moves
    the floor either.
    """
    feat = _mfcc(n_mfcc, n_mels).to(wave.device)(wave.float().unsqueeze(1)).squeeze(1)
    return _to_video_rate(feat, frames_of(wave))


def frame_energy(wave: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, T, 1] log RMS energy of each video frame's samples."""
    t = frames_of(wave)
    x = wave[:, : t * HOP].float().reshape(wave.shape[0], t, HOP)
    return torch.log(x.pow(2).mean(-1, keepdim=True) + 1e-8) * 0.5


def prosody(wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] -> (log_f0 [B, T, 1], voicing [B, T, 1]).

    Normalised autocorrelation over a 64 ms window centred on each video frame: the lag of the
    peak gives F0, the peak's height (0..1) gives a voicing confidence. Unvoiced frames carry
    the log of the lowest F0 so the target stays bounded; the log-F0 loss and its statistics
    use only voiced frames (`voicing > VOICED`), the same frames where the target is a real F0.
    """
    b = wave.shape[0]
    t = frames_of(wave)
    pad = (PITCH_WINDOW - HOP) // 2
    x = torch.nn.functional.pad(wave[:, : t * HOP].float(), (pad, PITCH_WINDOW - HOP - pad))
    win = x.unfold(-1, PITCH_WINDOW, HOP)[:, :t]  # [B, T, W]
    win = win - win.mean(-1, keepdim=True)
    win = win * torch.hann_window(PITCH_WINDOW, device=wave.device)
    spec = torch.fft.rfft(win, n=2 * PITCH_WINDOW)
    ac = torch.fft.irfft(spec.abs().pow(2), n=2 * PITCH_WINDOW)[..., :PITCH_WINDOW]
    # Unbias for the shrinking overlap, then normalise by lag-0 energy.
    overlap = torch.arange(PITCH_WINDOW, 0, -1, device=wave.device, dtype=ac.dtype) / PITCH_WINDOW
    ac = ac / overlap.clamp_min(0.25)
    ac = ac / ac[..., :1].clamp_min(1e-8)
    lo, hi = int(SAMPLE_RATE / F0_MAX), int(SAMPLE_RATE / F0_MIN)
    peak, lag = ac[..., lo : hi + 1].max(-1)
    energy = frame_energy(wave).squeeze(-1)
    voiced = peak.clamp(0.0, 1.0) * (energy > energy.amax(-1, keepdim=True) - 4.0).float()
    f0 = SAMPLE_RATE / (lag + lo).float()
    log_f0 = torch.where(voiced > VOICED, torch.log(f0), torch.full_like(f0, torch.log(torch.tensor(F0_MIN)).item()))
    return log_f0.reshape(b, t, 1), voiced.reshape(b, t, 1)


def attribute_targets(wave: torch.Tensor, n_mfcc: int = 13, n_mels: int = 40) -> dict[str, torch.Tensor]:
    """Every audio pretext target, per video frame: name -> [B, T, D]."""
    log_f0, voicing = prosody(wave)
    return {
        "mfcc": mfcc(wave, n_mfcc, n_mels),
        "logmel": log_mel(wave, n_mels),
        "log_f0": log_f0,
        "voicing": voicing,
        "energy": frame_energy(wave),
    }


ATTRIBUTE_DIMS = {"log_f0": 1, "voicing": 1, "energy": 1}


def attribute_dims(n_mfcc: int, n_mels: int) -> dict[str, int]:
    return {"mfcc": n_mfcc, "logmel": n_mels, **ATTRIBUTE_DIMS}


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int = SAMPLE_RATE) -> torch.Tensor:
    if orig_sr == new_sr:
        return wave
    return torchaudio.functional.resample(wave, orig_sr, new_sr)
